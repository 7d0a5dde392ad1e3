"""Value `features`: V(x, t, c) as a small head on a frozen, differentiable feature network (a reward-model trunk).

A verifier reward such as the shapes benchmark's (GenEval-like pass/fail) gives no gradient, so DxDP's policy
improvement differentiates the value, and the value must learn the verifier from the chains it sees: a few
thousand images a minute on a CPU. A value trained from scratch on pixels (`resnet`) has to learn colours, shapes
and positions from that trickle (on the shapes benchmark it did not: docs/results.md). This value reuses a network
that already reads them (the way reward models put a head on frozen CLIP features, e.g. the LAION aesthetic
predictor) and learns only the head:

    h = A LayerNorm(phi(x)) + a,    V(x, t, c) = w_2^T silu(W_1 silu(h + e(c) + s(t)) + b_1) + b_2 + h^T f(c) / sqrt(H)

phi: the frozen trunk (no parameter is trained, but gradients flow through it to x, as policy improvement needs);
e(c), f(c): two embeddings of the condition (`ConditionEmbedding`, width H): e added before the nonlinearities, f
matched with the image's projection h in a scaled dot product (the projection form of a conditional discriminator,
as CLIP scores an image against a caption), so that whether the image shows what the prompt asks is one product
away. On degraded shapes renders under their own or a mismatched caption, trained on 1,536 of them, it explains about
half the variance of the verifier's fraction of checks on 512 others (tests/test_feature_value.py). An unconditional
value has neither term. s(t): a learned embedding of the sampler step t in 0..T, so one network holds the
cost-to-go of every step (a frozen trunk cannot tell a noisy x_t from a clean x_T on its own, while the TD targets
of early steps carry the time costs still to come); `time_dependent = false` drops it (Algorithm 2's V(x)).

Trunks: "shapes" (the shapes benchmark's classifier, `nets/shapes.py`, its 128-d penultimate features, for 3xSxS
images, S >= 16; trained at `trunk_seed`, by default 1: another network than the seed-0 one Fréchet distances are
measured in), or "package.module:factory" (a callable returning a module [B, *sample_shape] -> [B, F]; its
parameters are frozen here).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rewardtune.errors import PluginError
from rewardtune.nets.conditioning import ConditionEmbedding, Conditioning
from rewardtune.nets.value import ValueFunction


class FeatureHead(nn.Module):
    """net(x[, t], c=None) -> [B]: an MLP head on frozen trunk features phi(x) [B, F], plus the condition's and
    (with `num_steps`) the step's embedding.

    Args:
        trunk: module [B, *sample_shape] -> [B, F]; frozen here (requires_grad off, kept in eval mode).
        feature_dim: F.
        hidden: the head's width.
        conditioning: the condition it takes (None: unconditional).
        num_steps: T, for a step embedding of t in 0..T (t [B] given as floats holding integers); None: no t input.
    """

    def __init__(
        self,
        trunk: nn.Module,
        feature_dim: int,
        hidden: int,
        conditioning: Conditioning | None,
        num_steps: int | None = None,
    ) -> None:
        super().__init__()
        self.trunk = trunk.requires_grad_(False).eval()
        self.norm = nn.LayerNorm(feature_dim)
        self.inp = nn.Linear(feature_dim, hidden)
        self.condition = ConditionEmbedding(conditioning, hidden) if conditioning is not None else None
        self.match = ConditionEmbedding(conditioning, hidden) if conditioning is not None else None
        self.step = nn.Embedding(num_steps + 1, hidden) if num_steps is not None else None
        self.hidden = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, 1)

    def train(self, mode: bool = True) -> FeatureHead:
        super().train(mode)
        self.trunk.eval()  # a frozen trunk's normalisation statistics stay as they are
        return self

    def forward(self, x: torch.Tensor, *t: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        h = self.inp(self.norm(self.trunk(x).float()))  # [B, H]
        s = h if self.step is None else h + self.step(t[0].round().long().clamp(0, self.step.num_embeddings - 1))
        if self.condition is None:
            if c is not None:
                raise ValueError("this feature value is unconditional but was given a condition")
            return self.out(F.silu(self.hidden(F.silu(s)))).view(-1)
        e = self.condition(c, h.shape[0], h.device)
        match = (h * self.match(c, h.shape[0], h.device)).sum(1) / h.shape[1] ** 0.5  # [B]
        return self.out(F.silu(self.hidden(F.silu(s + e)))).view(-1) + match


class ShapesTrunk(nn.Module):
    """The shapes classifier's 128-d penultimate features, differentiable in the input: [B, 3, S, S] -> [B, 128].
    `seed`: the classifier's training seed (0 is the one Fréchet distances on shapes are measured with)."""

    def __init__(self, size: int, seed: int) -> None:
        super().__init__()
        from rewardtune.nets.shapes import load_shapes_classifier

        self.classifier = load_shapes_classifier(size, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(x)


def feature_trunk(name: str, sample_shape: tuple[int, ...], seed: int) -> nn.Module:
    """The trunk `name` names for samples of `sample_shape` (see the module docstring); `seed` is the "shapes"
    classifier's training seed.

    Raises:
        PluginError: an unknown name, or a "shapes" trunk for samples that are not 3xSxS images with S >= 16.
    """
    if name == "shapes":
        from rewardtune.data.shapes import MIN_SIZE

        if len(sample_shape) != 3 or sample_shape[0] != 3 or sample_shape[1] != sample_shape[2] or sample_shape[1] < MIN_SIZE:
            raise PluginError(
                f"value 'features': trunk 'shapes' reads RGB images 3xSxS with S >= {MIN_SIZE}, got sample shape "
                f"{tuple(sample_shape)}"
            )
        return ShapesTrunk(sample_shape[1], seed)
    if ":" in name:
        from rewardtune.imports import call_factory_path

        trunk = call_factory_path(name, f"value trunk {name!r}")
        if not isinstance(trunk, nn.Module):
            raise PluginError(f"value trunk {name!r} returned {type(trunk).__name__}, not a torch.nn.Module")
        return trunk
    raise PluginError(f"value 'features': unknown trunk {name!r}; use 'shapes' or \"package.module:factory\"")


def build_feature_value(
    sample_shape: tuple[int, ...],
    num_steps: int,
    conditioning: Conditioning | None = None,
    /,
    *,
    trunk: str = "shapes",
    trunk_seed: int = 1,
    hidden: int = 256,
    time_dependent: bool = True,
    lr: float = 1e-3,
    grad_clip: float | None = None,
) -> ValueFunction:
    """Value `features`: V(x, t[, c]) (or V(x[, c]) with `time_dependent = false`), an MLP head (`hidden` wide, Adam
    at `lr`) on the frozen features of `trunk` (module docstring), for a sampler of `num_steps` steps. `trunk_seed`:
    the training seed of the "shapes" classifier; the default 1 is not the seed-0 network that `eval.
    feature_extractor = "shapes"` measures Fréchet distances in, so the policy is not tuned against the evaluation's
    own features. Raises PluginError for a trunk that cannot read these samples."""
    module = feature_trunk(trunk, tuple(sample_shape), trunk_seed)
    with torch.no_grad():
        probe = module.eval()(torch.zeros(2, *sample_shape))
    if probe.dim() != 2 or probe.shape[0] != 2:
        raise PluginError(f"value trunk {trunk!r} must return features [B, F], got shape {tuple(probe.shape)}")
    net = FeatureHead(module, probe.shape[1], hidden, conditioning, num_steps if time_dependent else None)
    return ValueFunction(net, lr=lr, time_dependent=time_dependent, grad_clip=grad_clip, conditioning=conditioning)
