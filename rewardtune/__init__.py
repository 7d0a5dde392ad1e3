"""rewardtune: fine-tune few-step diffusion samplers for arbitrary rewards with DxDP (and DxMI, its IRL form).

The Python API is constructing the pieces and calling `Trainer(...).fit()`, or running a recipe:

    import rewardtune as rt
    result = rt.run_recipe("recipes/dxmi_8gaussians.toml", "runs/dxmi")
"""

from rewardtune.algorithms.ddpm import DDPMPretrain
from rewardtune.algorithms.dxdp import DxDP, DxDPConfig
from rewardtune.api import load_run, run_recipe
from rewardtune.backbones.base import GaussianChainPolicy
from rewardtune.backbones.epsilon import EpsilonChainPolicy
from rewardtune.backbones.mlp import build_mlp_backbone
from rewardtune.data.toy import EightGaussians
from rewardtune.errors import RewardtuneError
from rewardtune.evaluation import ToyEvaluator
from rewardtune.nets.value import ValueFunction, build_time_mlp_value
from rewardtune.recipe import load_recipe
from rewardtune.rewards.base import Reward
from rewardtune.rewards.energy import EnergyReward, build_energy_reward
from rewardtune.trainer import EvalConfig, TrainConfig, Trainer

__all__ = [
    "DDPMPretrain", "DxDP", "DxDPConfig", "EightGaussians", "EnergyReward", "EpsilonChainPolicy", "EvalConfig",
    "GaussianChainPolicy", "Reward", "RewardtuneError", "ToyEvaluator", "TrainConfig", "Trainer", "ValueFunction",
    "build_energy_reward", "build_mlp_backbone", "build_time_mlp_value", "load_recipe", "load_run", "run_recipe",
]
__version__ = "0.1.0"
