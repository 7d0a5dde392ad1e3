"""Energy-based anomaly detection (DxMI, Yoon et al. 2024, §5.3): MVTec-AD in UniAD's unified multi-class setting
and offline digits benchmarks (`sets`), frozen CNN feature maps projected onto the unit sphere (`features`), and
standard detectors on the same features to compare against (`baselines`): every detector scores a spatial feature
map with an energy map, higher meaning more anomalous.
"""
