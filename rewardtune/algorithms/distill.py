"""Algorithm `distill`: a one-step student from a tuned T-step teacher (docs/distillation.md).

The student is an ordinary backbone with T = 1, x_1 = mean_s(x_0) + sigma_s z. Training has two phases in one run:

1. Regression on teacher pairs (`regression_steps` iterations). Each iteration draws x_0 from the prior, runs the
   frozen teacher from that same x_0 to x_T (by default with its noise switched off, `teacher_noise = false`: a
   deterministic map that least squares can fit exactly; with its own noise the target is random given x_0), and
   fits the student's Gaussian transition to the pairs: the mean by least squares, sigma_s by matching the residual
   variance in log space,

       L = ||x_T - mean_s(x_0)||^2 / D + (log sigma_s - 1/2 log sg(mean ||x_T - mean_s(x_0)||^2 / D))^2.

   (The Gaussian likelihood has the same minimiser, but its gradient in log sigma_s falls by orders of magnitude as
   sigma_s grows from its floor, which stalls Adam; the log-space match is well conditioned.) The mean converges to
   E[x_T | x_0] and sigma_s^2 to the residual variance per dimension. A stochastic teacher's x_T given x_0 can lie
   in several modes, so with `teacher_noise = true` this Gaussian is a blurred start (on 8 Gaussians the DxMI
   teacher's first step has sigma_0 = 1.3: the conditional means fill the centre); the noiseless path is not the
   teacher's distribution either, but a sharp one. With that deterministic target the residual is the student's own
   approximation error, not noise the teacher adds, and spending it as iid noise on every sample costs quality (on
   digits, FD 6.44 with sigma_s = 0.116, the residual std, against 5.15 for the same mean with sigma_s ~ 0.001):
   `regression_sigma` sets sigma_s to a fixed value instead, held during regression and learned in phase 2.
2. DxMI at T = 1 (the remaining iterations): DxDP with the teacher's learned energy as the (frozen) reward, so the
   student keeps the entropy term tau1 log pi and moves each blurred conditional mean into the energy's nearest
   well (what regression could not represent). With `kl_weight` > 0 the KL safeguard's reference is the student as
   regression left it (not its random initialisation): phase 2 is kept near the regressed map.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rewardtune.algorithms.dxdp import (
    DxDP,
    DxDPConfig,
    sampler_optimizer,
    sigma_metrics,
)
from rewardtune.backbones.base import GaussianChainPolicy
from rewardtune.nets.value import ValueFunction
from rewardtune.optim import GradStep, all_mean
from rewardtune.rewards.base import Reward
from rewardtune.types import Teacher, Trajectory


@dataclass(frozen=True)
class DistillConfig(DxDPConfig):
    """DxDP's hyperparameters (phase 2, T = 1) plus the regression phase's."""

    regression_steps: int = 1000  # iterations of regression on teacher pairs before DxDP takes over
    regression_lr: float = 1e-4  # Adam lr of the student's network during regression
    regression_sigma_lr: float = 1e-2  # Adam lr of the student's log sigma during regression
    teacher_noise: bool = False  # regress on the teacher run with its own noise (true) or its noiseless mean path
    regression_sigma: float | None = None  # unset: fit sigma_s to the residual std; a number: set sigma_s to it, held
    restart_lr_schedule: bool = False  # phase 2 runs train.lr_schedule from its start (else one schedule spans both)


def regression_loss(
    student: GaussianChainPolicy, x0: torch.Tensor, target: torch.Tensor, *, fit_sigma: bool = True
) -> tuple[torch.Tensor, dict[str, float]]:
    """Least squares on the student's mean plus (`fit_sigma`) sigma_s matched to the residual std in log space (per
    dimension)."""
    d = student.event_dim
    t = torch.zeros(x0.shape[0], dtype=torch.long, device=x0.device)
    mean = student.mean(x0, t)
    mse = (target - mean).flatten(1).pow(2).sum(1).mean() / d
    residual_var = all_mean(mse.detach()).clamp_min(1e-12)
    metrics = {"distill/mse": float(mse.detach()), "distill/residual_std": float(residual_var.sqrt())}
    if not fit_sigma:
        return mse, metrics
    sigma_loss = (student.sigma()[0].log() - 0.5 * residual_var.log()).pow(2)
    return mse + sigma_loss, metrics


def set_sigma(student: GaussianChainPolicy, sigma: float) -> None:
    """Set the one-step student's sigma_s (phase 2 learns it from there at `sigma_lr`)."""
    with torch.no_grad():
        student.log_sigma.fill_(math.log(sigma))


class Distill:
    """Regression on teacher pairs, then DxDP at T = 1 against the teacher's reward; the student is optimised in eval
    mode in both phases (`backbone_mode`), as it is sampled (the frozen teacher stays in eval mode)."""

    backbone_mode = "eval"  # the trainer's mode for the backbone during `update`

    def __init__(
        self, backbone: GaussianChainPolicy, reward: Reward, value: ValueFunction, teacher: Teacher, *, config: DistillConfig
    ) -> None:
        self.backbone, self.teacher, self.config = backbone, teacher, config
        self.dxdp = DxDP(backbone, reward, value, config=config)
        self.regression_optimizer = sampler_optimizer(backbone, config.regression_lr, config.regression_sigma_lr, None)
        self.iteration = 0
        if config.regression_sigma is not None:
            set_sigma(backbone, config.regression_sigma)

    @property
    def needs_rollout(self) -> bool:
        """No student rollout during regression (it would go unused), and so no update of a learning reward (`teacher`
        with learn = true): the energy stays as the teacher left it until DxDP starts."""
        return self.iteration >= self.config.regression_steps

    def regress(self, batch_size: int, generator: torch.Generator | None) -> dict[str, float]:
        """One regression step on fresh teacher pairs (same x_0)."""
        device = self.backbone.device
        teacher = self.teacher.backbone.to(device)
        x0 = self.backbone.prior.sample(batch_size, self.backbone.sample_shape, generator, device)
        if self.config.teacher_noise:
            target = teacher.sample(batch_size, generator, x0=x0).final
        else:
            target = teacher.mean_path(x0)
        loss, metrics = regression_loss(self.backbone, x0, target, fit_sigma=self.config.regression_sigma is None)
        metrics["distill/loss"] = loss.item()
        grad_norm = self.regression_optimizer.step(loss)  # None when the trainer does not log this iteration
        if grad_norm is not None:
            metrics["policy/grad_norm"] = grad_norm
        return metrics

    def update(
        self, real: torch.Tensor, trajectory: Trajectory | None, generator: torch.Generator | None
    ) -> dict[str, float]:
        if self.iteration == self.config.regression_steps:  # phase 2 begins from the regressed student (its sigma_s)
            self.dxdp.restart_from_current_policy()
        if not self.needs_rollout:
            metrics = self.regress(real.shape[0], generator)
            metrics.update(sigma_metrics(self.backbone))
        else:
            metrics = self.dxdp.update(real, trajectory, generator)
        self.iteration += 1
        return metrics

    def lr_schedule_window(self, step: int, total: int) -> tuple[int, int]:
        """The iterations `train.lr_schedule` spans at `step`: the whole run, or with `restart_lr_schedule` each phase
        its own (a cosine over the whole run leaves a late phase 2 a few percent of its learning rate)."""
        boundary = self.config.regression_steps
        if not self.config.restart_lr_schedule or boundary >= total:
            return 0, total
        return (0, boundary) if step < boundary else (boundary, total)

    def guide(self, scale: float):
        return self.dxdp.guide(scale)

    def modules(self) -> dict[str, torch.nn.Module]:
        modules = self.dxdp.modules()
        if self.dxdp.reference is not None:  # the regressed student: checkpointed, a resumed phase 2 needs it
            modules["reference"] = self.dxdp.reference
        return modules

    def optimizers(self) -> dict[str, GradStep]:
        return {**self.dxdp.optimizers(), "regression": self.regression_optimizer}

    def state_dict(self) -> dict:
        return {"iteration": self.iteration, "dxdp": self.dxdp.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.iteration = int(state["iteration"])
        self.dxdp.load_state_dict(state["dxdp"])


def build_distill(
    backbone: GaussianChainPolicy, reward: Reward, value: ValueFunction, teacher: Teacher, /, *, config: DistillConfig
) -> Distill:
    """Algorithm `distill` (needs a [distill] table naming the teacher, a [value] and a [reward], usually 'teacher')."""
    if teacher is None:
        raise ValueError("algorithm 'distill' needs a [distill] table naming the teacher")
    if value is None or reward is None:
        raise ValueError("algorithm 'distill' needs a [value] and a [reward] section (reward kind 'teacher')")
    if tuple(teacher.backbone.sample_shape) != tuple(backbone.sample_shape):
        raise ValueError(
            f"the student's sample shape {tuple(backbone.sample_shape)} differs from the teacher's "
            f"{tuple(teacher.backbone.sample_shape)}"
        )
    if backbone.num_steps != 1:
        raise ValueError(f"algorithm 'distill' trains a one-step student: set backbone.num_steps = 1 (got {backbone.num_steps})")
    if config.regression_sigma is not None and not config.regression_sigma > 0:
        raise ValueError(f"regression_sigma must be > 0 (or left unset to fit the residual std), got {config.regression_sigma}")
    if config.regression_steps < 0:
        raise ValueError(f"regression_steps must be >= 0, got {config.regression_steps}")
    return Distill(backbone, reward, value, teacher, config=config)
