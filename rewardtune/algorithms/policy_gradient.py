"""Algorithm `policy_gradient`: the baseline DxDP is measured against (DDPO, Black et al. 2023; SFT-PG, Fan & Lee
2023; GCD, ../shared/papers/002).

Every iteration the trainer samples B chains (no gradient, with their per-step log-probs log pi_old). The return of
transition t of chain i is the soft reward-to-go

    G_t = r(x_T) + beta_knn * h_knn(x_T) - sum_{u >= t} [tau1 log pi_old(x_{u+1} | x_u) + tau2 ||x_{u+1} - x_u||^2 / (2 s_u^2)
                                                         + beta (log pi_old(x_{u+1} | x_u) - log pi_ref(x_{u+1} | x_u))],

where h_knn is GCD's per-sample k-nearest-neighbour (Kozachenko-Leonenko) marginal-entropy term log rho_k(x_T)
(optional). The running costs make the objective the same one DxDP optimises (Eq. (8): entropy and velocity costs,
s_u adapted by AVR); without the velocity cost an energy that is still flat lets the entropy term inflate sigma_t
without bound (measured: sigma_0 0.6 -> 81 in 3,000 iterations on 8 Gaussians). The last term is DxDP's KL safeguard
(`kl_weight` = beta, against a frozen copy of the starting policy) as the sampled log-ratio, whose expectation given
x_u is KL(pi_old(.|x_u) || pi_ref(.|x_u)): like the sampled log pi of the entropy cost, its own gradient has
expectation zero, so the score-function gradient of the return is the whole gradient of the KL-regularised objective
(the exact KL as a function of x_u would need its direct gradient added to the loss). The advantage
A_t = G_t - b(x_t, t) uses a learned value baseline b = V(x_t, t)
(regressed on G_t; the batch mean of G_t per t without a [value] section) and is normalised over the batch.
Policy improvement is PPO's clipped surrogate on the per-step Gaussian log-probs,

    L = -mean min(rho A, clip(rho, 1 - eps, 1 + eps) A),     rho = pi(x_{t+1} | x_t) / pi_old(x_{t+1} | x_t),

for `ppo_epochs` passes over the B*T transitions in `minibatches` shuffled minibatches. Unlike DxDP it needs no
gradient of the reward or the value: only the score function grad log pi.

Conditional runs can replace the baseline with an advantage that uses each chain's condition (`advantage`, see
advantages.py): "per_condition" standardises returns by a running per-prompt buffer (DDPO), "group" draws the batch
as groups of `group_size` chains per condition and standardises within each group (GRPO).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from rewardtune.algorithms.advantages import PerConditionStats, group_advantages
from rewardtune.algorithms.dxdp import (
    avr_update,
    effective_temperatures,
    frozen_reference,
    rows_condition,
    sampler_optimizer,
    sigma_metrics,
    transition_kl,
    velocity_cost,
)
from rewardtune.backbones.base import GaussianChainPolicy
from rewardtune.errors import RecipeError
from rewardtune.nets.conditioning import Conditioning
from rewardtune.nets.value import ValueFunction
from rewardtune.optim import GradStep, all_mean
from rewardtune.rewards.base import (
    Reward,
    check_reward_output,
    reward_name,
    reward_shares_value,
)
from rewardtune.types import Trajectory


@dataclass(frozen=True)
class PolicyGradientConfig:
    """Hyperparameters of the PPO-clip policy gradient."""

    tau_entropy: float = 0.1  # tau1 of the soft return -tau1 sum log pi (0: plain reward maximisation)
    tau_velocity: float = 0.0  # tau2 of the velocity running cost tau2 ||x_{t+1} - x_t||^2 / (2 s_t^2)
    per_dimension: bool = False  # tau1, tau2 and kl_weight are per dimension (divided by D), DxDP's convention
    avr: bool = True  # adapt s_t as DxDP's AVR does (false: s_t = sigma_t at initialisation)
    avr_alpha: float = 0.99  # AVR moving-average rate
    value_warmup: int = 0  # iterations that fit only the baseline (and the learned reward) before policy steps
    kl_weight: float = 0.0  # beta of the KL safeguard's running cost beta (log pi - log pi_ref) against a frozen copy of
    # the starting backbone (0: off)
    knn_entropy: float = 0.0  # beta_knn: weight of GCD's kNN marginal-entropy bonus log rho_k(x_T) (0: off)
    knn_k: int = 5  # k of the nearest-neighbour distance rho_k (within each process's batch)
    clip_range: float = 0.2  # eps of PPO's clipped ratio
    ppo_epochs: int = 1  # passes over each batch's transitions
    minibatches: int = 1  # minibatches per pass
    normalize_advantages: bool = True  # advantage = "baseline": standardise A over the batch (and processes)
    advantage: Literal["baseline", "per_condition", "group"] = "baseline"  # A = G - V (baseline); G standardised
    # by a per-condition buffer of recent returns (DDPO's per-prompt stat tracking); or within groups of chains
    # drawn under one condition (GRPO). The last two need [conditions] and no [value]
    group_size: int = 1  # advantage = "group": chains per condition in a batch (divides train.batch_size)
    stat_buffer_size: int = 32  # advantage = "per_condition": returns kept per condition
    stat_min_count: int = 16  # advantage = "per_condition": a condition's own statistics from this many returns
    sampler_lr: float = 1e-5  # Adam lr of the sampler network
    sigma_lr: float = 1e-3  # Adam lr of log sigma_t
    sampler_grad_clip: float | None = None  # clip of the sampler gradient norm


def knn_log_distance(x: torch.Tensor, k: int) -> torch.Tensor:
    """log rho_k(x_i): log of the distance from each sample to its k-th nearest other sample: [B]."""
    flat = x.flatten(1).double()
    if flat.shape[0] <= k:
        raise ValueError(f"the kNN entropy bonus needs more than k = {k} samples per process, got {flat.shape[0]}")
    dist = torch.cdist(flat, flat)
    dist.fill_diagonal_(float("inf"))
    rho = dist.kthvalue(k, dim=1).values
    return rho.clamp_min(1e-12).log().to(x.dtype)


def soft_returns(terminal_reward: torch.Tensor, running_costs: torch.Tensor) -> torch.Tensor:
    """G_t = r_T - sum_{u >= t} c_u: [T, B] from r_T [B] and the running costs c [T, B]."""
    to_go = running_costs.flip(0).cumsum(0).flip(0)  # sum over u >= t
    return terminal_reward.unsqueeze(0) - to_go


def running_costs(
    trajectory: Trajectory,
    s2: torch.Tensor,
    tau1: float,
    tau2: float,
    *,
    kl: torch.Tensor | None = None,
    kl_weight: float = 0.0,
) -> torch.Tensor:
    """c_t = tau1 log pi(x_{t+1} | x_t) + tau2 ||x_{t+1} - x_t||^2 / (2 s_t^2) + beta kl_t of the sampled transitions:
    [T, B]. `kl` [T, B] is the KL safeguard's cost of each transition (`transition_kl`), or None (no safeguard)."""
    states = trajectory.states
    velocity = torch.stack([velocity_cost(states[t], states[t + 1], s2[t]) for t in range(trajectory.num_steps)])
    costs = tau1 * trajectory.log_probs + tau2 * velocity
    return costs if kl is None else costs + kl_weight * kl


def ppo_clip_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantage: torch.Tensor, clip_range: float):
    """PPO's clipped surrogate (to minimise) and diagnostics (clip fraction, approximate KL)."""
    log_ratio = log_prob - old_log_prob
    ratio = log_ratio.exp()
    unclipped = ratio * advantage
    clipped = ratio.clamp(1 - clip_range, 1 + clip_range) * advantage
    loss = -torch.minimum(unclipped, clipped).mean()
    with torch.no_grad():
        clip_fraction = ((ratio - 1).abs() > clip_range).float().mean()
        approx_kl = ((ratio - 1) - log_ratio).mean()  # Schulman's k3 estimator of KL(old || new)
    return loss, clip_fraction, approx_kl


class PolicyGradient:
    """PPO-clip on the sampler's per-step Gaussian log-probs, with a learned value baseline.

    The backbone is optimised in eval mode (`backbone_mode`), the mode it was sampled in: the log-probs recomputed on
    the first pass equal the sampled ones (ratio 1), which dropout active in only one of the two would break."""

    needs_rollout = True
    backbone_mode = "eval"  # the trainer's mode for the backbone during `update`
    conditional = True  # conditions come with the trajectory; `real_condition` is not needed

    def __init__(
        self, backbone: GaussianChainPolicy, reward: Reward, value: ValueFunction | None, *, config: PolicyGradientConfig
    ) -> None:
        self.backbone, self.reward, self.value, self.config = backbone, reward, value, config
        self.tau1, self.tau2, self.kl_weight = effective_temperatures(config, backbone.event_dim)
        self.s2 = backbone.sigma().detach().pow(2).clone()  # [T], s_t of the velocity cost (AVR), as in DxDP
        # KL safeguard: the starting policy, frozen (rebuilt identically on resume from the same initial weights).
        self.reference = frozen_reference(backbone, config.kl_weight)
        self.sampler_optimizer = sampler_optimizer(backbone, config.sampler_lr, config.sigma_lr, config.sampler_grad_clip)
        self.iteration = 0
        self.stats = (
            PerConditionStats(config.stat_buffer_size, config.stat_min_count) if config.advantage == "per_condition" else None
        )
        # the trainer draws the rollouts' conditions in groups of this many chains (GRPO)
        self.rollout_group_size = config.group_size if config.advantage == "group" else 1

    def terminal_reward(self, x: torch.Tensor, condition=None) -> torch.Tensor:
        """r(x_T, c) plus the optional kNN entropy bonus: [B].

        The reward is scored with gradients enabled (as DxDP's terminal cost is): a composite reward with `normalize`
        updates its running statistics only then, and treats a `torch.no_grad()` call as an evaluation."""
        x = self.backbone.output(x)  # reward and kNN bonus score the sample the user gets, not the raw state x_T
        r = -check_reward_output(reward_name(self.reward), self.reward.cost(x.detach(), condition), x.shape[0]).detach()
        if self.config.knn_entropy > 0:
            try:
                r = r + self.config.knn_entropy * knn_log_distance(x.detach(), self.config.knn_k)
            except ValueError as err:  # too few samples per process for k: a recipe setting, not a bug
                raise RecipeError(f"algorithm.knn_k: {err}; raise train.batch_size or lower knn_k") from None
        return r

    def advantages(self, trajectory: Trajectory, returns: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """A_t = G_t - baseline(x_t, t), normalised; also fits the value baseline. [T, B].

        The baseline is regressed at t < T only, so a time-dependent value that is also the learned energy
        (V(., T) = E) keeps its terminal slot for the energy (a time-independent one is refused at build)."""
        T, B = trajectory.num_steps, trajectory.batch_size
        metrics = {}
        if self.config.advantage != "baseline":
            if trajectory.condition is None:
                raise RecipeError(f"algorithm.advantage = {self.config.advantage!r} needs conditional rollouts ([conditions])")
            if self.config.advantage == "group":
                return group_advantages(returns, self.config.group_size), metrics
            return self.stats.normalize(trajectory.condition.keys(), returns), metrics
        if self.value is not None:
            x = trajectory.states[:-1].flatten(0, 1)  # [T*B, ...]
            t = torch.arange(T, device=x.device).repeat_interleave(B)
            c = rows_condition(trajectory, T)
            value = (lambda: self.value(x, t)) if c is None else (lambda: self.value(x, t, c))
            with torch.no_grad():
                baseline = value().view(T, B)
            loss = (value() - returns.flatten()).pow(2).mean()
            self.value.optimizer.step(loss)
            metrics["value/loss"] = loss.item()
        else:
            baseline = all_mean(returns.mean(1, keepdim=True))
        advantage = returns - baseline
        if self.config.normalize_advantages:
            mean = all_mean(advantage.mean())
            std = all_mean((advantage - mean).pow(2).mean()).sqrt()
            advantage = (advantage - mean) / (std + 1e-8)
        return advantage, metrics

    def improve_policy(self, trajectory: Trajectory, advantage: torch.Tensor, generator) -> dict[str, float]:
        cfg = self.config
        T, B = trajectory.num_steps, trajectory.batch_size
        x = trajectory.states[:-1].flatten(0, 1)
        x_next = trajectory.states[1:].flatten(0, 1)
        t = torch.arange(T, device=x.device).repeat_interleave(B)
        old = trajectory.log_probs.flatten()
        adv = advantage.flatten()
        c = rows_condition(trajectory, T)
        n = T * B
        size = max(1, n // cfg.minibatches)
        losses, clips, kls = [], [], []
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(n, generator=generator, device=x.device)
            for start in range(0, size * cfg.minibatches, size):
                idx = order[start : start + size]
                log_prob = self.backbone.log_prob(x_next[idx], x[idx], t[idx], None if c is None else c.select(idx.cpu()))
                loss, clip_fraction, approx_kl = ppo_clip_loss(log_prob, old[idx], adv[idx], cfg.clip_range)
                self.sampler_optimizer.step(loss)
                losses.append(loss.item())
                clips.append(float(clip_fraction))
                kls.append(float(approx_kl))
        return {
            "policy/loss": sum(losses) / len(losses),
            "policy/clip_fraction": sum(clips) / len(clips),
            "policy/approx_kl": sum(kls) / len(kls),
        }

    def update(
        self, real: torch.Tensor, trajectory: Trajectory, generator: torch.Generator | None, real_condition=None
    ) -> dict[str, float]:
        """One iteration on the sampled `trajectory` (its conditions ride along in it; the data's, `real_condition`,
        are not used)."""
        if trajectory.log_probs is None:
            raise ValueError("policy_gradient needs the sampled log-probs (a trajectory drawn without guidance)")
        self.s2 = self.s2.to(trajectory.states.device)
        kl = None
        if self.reference is not None:
            self.reference.to(trajectory.states.device)
            kl = transition_kl(self.backbone, self.reference, trajectory, sampled=True)  # [T, B]
        r = self.terminal_reward(trajectory.final, trajectory.condition)
        costs = running_costs(trajectory, self.s2, self.tau1, self.tau2, kl=kl, kl_weight=self.kl_weight)
        returns = soft_returns(r, costs)
        advantage, metrics = self.advantages(trajectory, returns)
        if kl is not None:
            metrics["policy/path_kl"] = float(all_mean(kl.sum(0).mean()))  # E sum_t KL_t: the KL of the chains
        if self.iteration >= self.config.value_warmup:
            metrics.update(self.improve_policy(trajectory, advantage.detach(), generator))
        if self.config.avr:
            self.s2 = avr_update(self.s2, trajectory, self.config.avr_alpha)
        metrics["reward/mean"] = float(all_mean(r.mean()))
        self.iteration += 1
        metrics.update(sigma_metrics(self.backbone))
        return metrics

    def guide(self, scale: float):
        raise RecipeError("value guidance needs a cost-to-go value function (dxdp); policy_gradient's is a baseline")

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"value": self.value} if self.value is not None else {}

    def optimizers(self) -> dict[str, GradStep]:
        opts = {"sampler": self.sampler_optimizer}
        if self.value is not None:
            opts["value"] = self.value.optimizer
        return opts

    def state_dict(self) -> dict:
        state = {"s2": self.s2.clone(), "iteration": self.iteration}
        if self.stats is not None:
            state["condition_stats"] = self.stats.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.s2 = state["s2"].to(self.s2.device)
        self.iteration = int(state["iteration"])
        if self.stats is not None:
            self.stats.load_state_dict(state.get("condition_stats", {}))


def build_policy_gradient(
    backbone: GaussianChainPolicy,
    reward: Reward,
    value: ValueFunction | None,
    conditioning: Conditioning | None = None,
    /,
    *,
    config: PolicyGradientConfig,
) -> PolicyGradient:
    """Algorithm `policy_gradient` (PPO-clip with a value baseline; [value] optional; per-condition or group
    advantages for conditional runs)."""
    if reward is None:
        raise ValueError("algorithm 'policy_gradient' needs a [reward] section")
    check_advantage_settings(config, value, conditioning)
    if config.ppo_epochs < 1 or config.minibatches < 1:
        raise ValueError("ppo_epochs and minibatches must be at least 1")
    if not 0 < config.clip_range < 1:
        raise ValueError(f"clip_range must be in (0, 1), got {config.clip_range}")
    if config.knn_k < 1:
        raise ValueError(f"knn_k must be at least 1, got {config.knn_k}")
    if config.knn_entropy < 0:
        raise ValueError(f"knn_entropy must be >= 0, got {config.knn_entropy}")
    if reward_shares_value(reward, value) and not value.time_dependent:
        raise ValueError(
            "policy_gradient regresses its baseline on returns at t < T, which would overwrite an energy that is the "
            "same time-independent [value] network; use a time-dependent value or [reward] share_with_value = false"
        )
    return PolicyGradient(backbone, reward, value, config=config)


def check_advantage_settings(config: PolicyGradientConfig, value, conditioning) -> None:
    """`advantage`, `group_size` and the stat-tracking options must fit together and fit the recipe."""
    if config.advantage == "baseline":
        if config.group_size != 1:
            raise ValueError(f"group_size = {config.group_size} applies to advantage = 'group'")
        return
    if conditioning is None:
        raise ValueError(f"advantage = {config.advantage!r} normalises per condition and needs a [conditions] table")
    if value is not None:
        raise ValueError(f"advantage = {config.advantage!r} uses no value baseline; drop the [value] table")
    if config.advantage == "group" and config.group_size < 2:
        raise ValueError("advantage = 'group' needs group_size >= 2 chains per condition")
    if config.advantage == "per_condition":
        if config.group_size != 1:
            raise ValueError(f"group_size = {config.group_size} applies to advantage = 'group'")
        if not 2 <= config.stat_min_count <= config.stat_buffer_size:
            raise ValueError("need 2 <= stat_min_count <= stat_buffer_size")
