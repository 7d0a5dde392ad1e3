"""rewardtune: fine-tune few-step diffusion samplers for arbitrary rewards with DxDP (and DxMI, its IRL form).

The Python API (README.md, docs/recipes.md "Python API") runs a recipe, builds its trainer, or composes the pieces:

    import rewardtune as rt
    result = rt.run_recipe("recipes/dxmi_8gaussians.toml", "runs/dxmi")            # what `rewardtune run` does
    trainer = rt.build_trainer(rt.load_recipe(path, ["train.steps=200"]), "runs/mine", reporter=rt.RichReporter())
    trainer.fit()                                          # runs/mine is a run directory `rewardtune eval` reads
    samples, conditions = rt.sample("runs/mine", 1000)     # what `rewardtune sample` draws (conditions: None
                                                           # unless the recipe has [conditions])
    rt.score_folder(rt.load_anomaly_model("runs/mvtec"), "images/", "scores/")   # what `rewardtune score` does
"""

from rewardtune.algorithms.ddpm import DDPMPretrain
from rewardtune.algorithms.dxdp import DxDP, DxDPConfig
from rewardtune.anomaly.model import load_anomaly_model
from rewardtune.anomaly.scoring import score_folder
from rewardtune.api import (
    build_trainer,
    load_run,
    make_recipe,
    run_recipe,
    sample,
    seed_everything,
)
from rewardtune.backbones.base import GaussianChainPolicy
from rewardtune.backbones.epsilon import EpsilonChainPolicy
from rewardtune.backbones.mlp import build_mlp_backbone
from rewardtune.data.toy import EightGaussians
from rewardtune.errors import RewardtuneError
from rewardtune.evaluation import ToyEvaluator
from rewardtune.nets.value import ValueFunction, build_time_mlp_value
from rewardtune.progress import RichReporter
from rewardtune.recipe import load_recipe
from rewardtune.rewards.base import Reward
from rewardtune.rewards.energy import EnergyReward, build_energy_reward
from rewardtune.trainer import EvalConfig, TrainConfig, Trainer

__all__ = [
    "DDPMPretrain", "DxDP", "DxDPConfig", "EightGaussians", "EnergyReward", "EpsilonChainPolicy", "EvalConfig",
    "GaussianChainPolicy", "Reward", "RewardtuneError", "RichReporter", "ToyEvaluator", "TrainConfig", "Trainer",
    "ValueFunction", "build_energy_reward", "build_mlp_backbone", "build_time_mlp_value", "build_trainer",
    "load_anomaly_model", "load_recipe", "load_run", "make_recipe", "run_recipe", "sample", "score_folder",
    "seed_everything",
]
__version__ = "0.1.0"
