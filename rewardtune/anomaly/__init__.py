"""Energy-based anomaly detection and localisation (DxMI §5.3; docs/anomaly.md): `features` (frozen CNN features on a
common grid, projected onto the unit sphere), `sets` (MVTec-AD's folder layout and the offline digits benchmarks),
`baselines` (k-NN, per-location Gaussian, Isolation Forest on the same features), `scoring` (max-pooled image scores,
bilinear localisation maps, AUROCs, `score_folder` behind `rewardtune score`), `evaluation` (`AnomalyEvaluator`) and
`model` (a trained run as a scorer; it loads runs, so it sits at the API level)."""
