"""DxDP: Diffusion by Dynamic Programming (DxMI paper, Sec. 4; Algorithms 1 and 2).

The sampler is optimised for the control problem of Eq. (8),

    min_phi E_pi[ E(x_T) + tau1 sum_t log pi(x_{t+1} | x_t) + tau2 sum_t ||x_{t+1} - x_t||^2 / (2 s_t^2) ],

plus, with the KL safeguard (`kl_weight` = beta > 0), the running cost beta KL(pi_phi(. | x_t) || pi_ref(. | x_t)) at
every step against a frozen reference policy (the starting one): a KL-regularised objective, so the cost enters the
TD target and the policy loss alike (docs/algorithm.md, section 4, "The KL safeguard"). It is solved
without back-propagation through time, by alternating
- policy evaluation: temporal-difference regression of the value V(x_t, t) (Eq. (10), or Eq. (12) with a time cost);
- policy improvement: one reparameterised transition from states of the sampled trajectory (Eq. (11));
- adaptive velocity regularisation (AVR): s_t^2 <- alpha s_t^2 + (1 - alpha) E||x_{t+1} - x_t||^2 / D (Sec. 4.2).

Conventions. Every term is a SUM over the D dimensions of a sample (log-probs, the entropy D log sigma_t and
||.||^2), so tau multiplies per-sample quantities as in Eq. (8). The official DxMI code averages the running costs
over dimensions instead, which is the same as tau_sum = tau_mean / D; `per_dimension = true` applies that conversion
so recipes can quote the official temperatures (the effective weights are `DxDP.tau1`, `DxDP.tau2` and, for the KL
safeguard's beta, `DxDP.kl_weight`). Costs are minimised: V is a cost-to-go, V(., T) is the terminal cost -r(x_T)
(for DxMI, the energy). Reductions over the batch are means.

Conditional sampling (a [conditions] table): the condition c of a chain is part of its state, so every term is
conditioned on it: V(x_t, t, c), pi(x_{t+1} | x_t, c), the terminal cost -r(x_T, c) and, with a KL safeguard,
KL(pi(.|x_t, c) || pi_ref(.|x_t, c)). The conditions come with the trajectory (`Trajectory.condition`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Literal

import torch

from rewardtune.backbones.base import GaussianChainPolicy, gaussian_log_density
from rewardtune.conditions import Conditions
from rewardtune.modes import eval_mode
from rewardtune.nets.value import ValueFunction
from rewardtune.optim import GradStep, all_mean
from rewardtune.phases import NO_PHASES, Phases
from rewardtune.precision import at_least_fp32
from rewardtune.rewards.base import (
    Reward,
    check_reward_output,
    reward_name,
    reward_shares_value,
)
from rewardtune.types import Trajectory


@dataclass(frozen=True)
class DxDPConfig:
    """Hyperparameters of DxDP. Defaults follow the paper's 2D experiment (Algorithm 1, tau = 0.1)."""

    tau_entropy: float = 0.1  # tau1: weight of the entropy running cost tau1 log pi(x_{t+1}|x_t)
    tau_velocity: float = 0.1  # tau2: weight of the velocity running cost tau2 ||x_{t+1}-x_t||^2 / (2 s_t^2)
    per_dimension: bool = False  # tau1, tau2 and kl_weight are per dimension (official code's convention): divide
    # them by D
    entropy_in_value: bool = True  # Eq. (10): the entropy cost enters the TD target (false: Algorithm 2)
    velocity_in_value: bool = True  # Eq. (10): the velocity cost enters the TD target (false: Algorithm 2)
    value_entropy: Literal["sample", "closed_form"] = "sample"  # the TD target's log-density terms are those of the
    # sampled transition (log pi; with the KL safeguard also log pi - log pi_ref), or their conditional expectations
    # given x_t (-H = -(D log sigma_t + D/2 log 2 pi e); the exact KL): same fixed point, less variance
    time_cost: Literal["none", "linear", "sigmoid"] = "none"  # R(t) added to the TD target (Eq. (12))
    linear_time_cost: float = 0.05  # c of the linear time cost R(t) = c
    sigmoid_time_cost_scale: float = 1.0  # scale of the sigmoid time cost
    sigmoid_time_cost_center: float | None = None  # center of the sigmoid (None: T/2, as in the paper)
    td_mode: Literal["sequential", "batched"] = "sequential"  # Algorithm 1 sweeps t = T-1..0 with one step each;
    # "batched" takes one step on all t at once (T times cheaper, slower propagation)
    avr: bool = True  # adapt s_t (AVR); false keeps s_t = sigma_t at initialisation
    avr_alpha: float = 0.99  # AVR moving-average rate
    sampler_lr: float = 1e-5  # Adam lr of the sampler network
    sigma_lr: float = 1e-3  # Adam lr of log sigma_t (the paper uses 100x the sampler's)
    sampler_grad_clip: float | None = None  # clip of the sampler gradient norm
    policy_batch: int | None = None  # transitions per policy-improvement step, drawn uniformly from the B*T
    # sampled ones (None: B)
    value_warmup: int = 0  # iterations of energy/value updates before the first policy-improvement step
    kl_weight: float = 0.0  # beta of the KL safeguard, the running cost beta KL(pi_phi(.|x_t) || pi_ref(.|x_t)) against a
    # frozen copy of the starting backbone (exact Gaussian KL, sigma included; 0: off)
    kl_in_value: bool = True  # the KL cost enters the TD target (the KL-regularised objective; false: policy
    # improvement only, a greedy safeguard, as the running costs are under Algorithm 2)
    terminal: Literal["value", "reward"] = "value"  # what policy improvement differentiates at t+1 = T: the value
    # V(., T) (which learns -r(x_T); works for non-differentiable rewards) or the reward itself (needs gradients)


def time_cost(kind: str, t: torch.Tensor, num_steps: int, config: DxDPConfig) -> torch.Tensor | None:
    """R(t) of Sec. 4.3: linear R(t) = c, or sigmoid R(t) = scale * (sig(-t + T/2) - sig(-t - 1 + T/2)); None for
    "none" (no cost: nothing to add).

    The sigmoid costs telescope: sum_{t=0}^{T-1} R(t) = scale * (sig(T/2) - sig(-T/2)).
    """
    if kind == "none":
        return None
    t = t.to(torch.float64)
    if kind == "linear":
        return torch.full_like(t, config.linear_time_cost)
    if kind == "sigmoid":
        center = num_steps / 2 if config.sigmoid_time_cost_center is None else config.sigmoid_time_cost_center
        return config.sigmoid_time_cost_scale * (torch.sigmoid(center - t) - torch.sigmoid(center - t - 1))
    raise ValueError(f"unknown time cost {kind!r}: expected 'none', 'linear' or 'sigmoid'")


def velocity_cost(x: torch.Tensor, x_next: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """||x_t - x_{t+1}||^2 / (2 s_t^2), summed over dimensions: [B]. `s2` is s_t^2 per sample [B], or one s_t^2 (a
    0-d tensor) for rows of the same time."""
    return (x_next - x).flatten(1).pow(2).sum(1) / (2 * s2)


def td_target(
    v_next: torch.Tensor,
    log_prob: torch.Tensor,
    velocity: torch.Tensor,
    time_cost_t: torch.Tensor | None,
    config: DxDPConfig,
    tau1: float | None = None,
    tau2: float | None = None,
    *,
    kl: torch.Tensor | None = None,
    kl_weight: float | None = None,
) -> torch.Tensor:
    """Eq. (10)/(12): sg[V(x_{t+1}, t+1)] + tau1 log pi(x_{t+1}|x_t) + tau2 vel + R(t) + beta kl (switched terms dropped).

    `kl` [B] is the KL safeguard's cost of the transitions (`transition_kl`; None: no safeguard); `time_cost_t` [B] is
    R(t) (`time_cost`; None: no time cost). tau1, tau2 and kl_weight = beta default to the config's (pass the
    effective ones when `per_dimension` is set).
    """
    tau1 = config.tau_entropy if tau1 is None else tau1
    tau2 = config.tau_velocity if tau2 is None else tau2
    kl_weight = config.kl_weight if kl_weight is None else kl_weight
    target = v_next.detach()
    if time_cost_t is not None:
        target = target + time_cost_t.to(v_next.dtype)
    if config.entropy_in_value:
        target = target + tau1 * log_prob
    if config.velocity_in_value:
        target = target + tau2 * velocity
    if config.kl_in_value and kl is not None:
        target = target + kl_weight * kl
    return target.detach()


def gaussian_kl(
    mean: torch.Tensor, sigma: torch.Tensor, reference_mean: torch.Tensor, reference_sigma: torch.Tensor
) -> torch.Tensor:
    """KL(N(mean, sigma^2 I) || N(reference_mean, reference_sigma^2 I)) over the D event dimensions: [B].

        KL = D [log(sigma_ref / sigma) + sigma^2 / (2 sigma_ref^2) - 1/2] + ||mean - reference_mean||^2 / (2 sigma_ref^2)

    The sigma part is computed as D/2 (expm1(u) - u), u = 2 log(sigma / sigma_ref), exact to round-off near
    sigma = sigma_ref. Differentiable in `mean` and `sigma`; the reference is a constant.

    Args:
        mean, reference_mean: [B, *event_shape], the transition means m_phi(x_t, t) and m_ref(x_t, t).
        sigma, reference_sigma: [B], the per-sample noise levels sigma_t and sigma_ref,t.
    """
    d = math.prod(mean.shape[1:])
    reference_sigma = reference_sigma.detach()
    u = 2 * (sigma.log() - reference_sigma.log())  # [B]
    spread = 0.5 * d * (torch.expm1(u) - u)
    offset = (mean - reference_mean.detach()).flatten(1).pow(2).sum(1) / (2 * reference_sigma**2)
    return spread + offset


@torch.no_grad()
def reference_means(reference: GaussianChainPolicy, trajectory: Trajectory) -> torch.Tensor:
    """The reference policy's transition means m_ref(x_t, t, c) at every state x_0 .. x_{T-1} of `trajectory`, in at
    least fp32 and without gradient: [T, B, *sample_shape] (T reference forwards of B rows)."""
    states, T, B = trajectory.states, trajectory.num_steps, trajectory.batch_size
    c = trajectory.condition
    rows = []
    for t in range(T):
        tt = torch.full((B,), t, dtype=torch.long, device=states.device)
        rows.append(at_least_fp32(reference.mean_at(states[t], tt, c)))
    return torch.stack(rows)


@torch.no_grad()
def transition_kl(
    policy: GaussianChainPolicy,
    reference: GaussianChainPolicy,
    trajectory: Trajectory,
    *,
    sampled: bool,
    reference_mean: torch.Tensor | None = None,
) -> torch.Tensor:
    """The KL safeguard's running cost of each transition x_t -> x_{t+1} of `trajectory` (no gradient): [T, B].

    sampled = True: the single-sample estimate log pi(x_{t+1}|x_t) - log pi_ref(x_{t+1}|x_t) (the trajectory's own
    log-probs, so it needs them; one reference forward per state). sampled = False: the exact conditional
    KL(pi(.|x_t) || pi_ref(.|x_t)) (`gaussian_kl`; one forward of each policy per state). Given x_t both have the
    expectation KL(pi(.|x_t) || pi_ref(.|x_t)), so a value regressed on either has the same fixed point.

    `reference_mean`: the reference's means at the trajectory's states [T, B, ...] (`reference_means`) when the
    caller holds them already (DxDP reuses them in policy improvement); None: computed here.
    """
    if sampled and trajectory.log_probs is None:
        raise ValueError("the sampled KL needs the trajectory's log-probs (a trajectory drawn without guidance)")
    states, T, B = trajectory.states, trajectory.num_steps, trajectory.batch_size
    if reference_mean is None:
        reference_mean = reference_means(reference, trajectory)
    sigma, reference_sigma = policy.sigma(), reference.sigma()  # [T], [T]
    c = trajectory.condition
    rows = []
    for t in range(T):
        tt = torch.full((B,), t, dtype=torch.long, device=states.device)
        x, x_next = states[t], states[t + 1]
        if sampled:
            rows.append(trajectory.log_probs[t] - gaussian_log_density(x_next, reference_mean[t], reference_sigma[tt]))
        else:
            rows.append(gaussian_kl(policy.mean_at(x, tt, c), sigma[tt], reference_mean[t], reference_sigma[tt]))
    return torch.stack(rows)  # [T, B]


def frozen_reference(backbone: GaussianChainPolicy, kl_weight: float) -> GaussianChainPolicy | None:
    """The KL safeguard's reference pi_ref: the policy as it is now, frozen (None when kl_weight is 0). A backbone
    may give its own (`frozen_reference()`: a LoRA backbone whose adapters are still at zero is its own network with
    the adapters switched off, without a second copy of the network); otherwise a deep copy."""
    if kl_weight < 0:
        raise ValueError(f"kl_weight must be >= 0, got {kl_weight}")
    if kl_weight == 0:
        return None
    own = getattr(backbone, "frozen_reference", None)
    reference = own() if own is not None else None
    return reference if reference is not None else copy.deepcopy(backbone).requires_grad_(False).eval()


def effective_temperatures(config, event_dim: int) -> tuple[float, float, float]:
    """(tau1, tau2, beta) as they multiply per-sample sums: the config's `tau_entropy`, `tau_velocity` and
    `kl_weight`, divided by D = `event_dim` when `per_dimension` is set (the official code's per-dimension
    convention: it averages every running cost over dimensions)."""
    scale = 1.0 / event_dim if config.per_dimension else 1.0
    return config.tau_entropy * scale, config.tau_velocity * scale, config.kl_weight * scale


def sampler_optimizer(
    backbone: GaussianChainPolicy, sampler_lr: float, sigma_lr: float, grad_clip: float | None
) -> GradStep:
    """Adam on the sampler network (sampler_lr) and its log sigma_t (sigma_lr), with an optional norm clip."""
    return GradStep(
        [(backbone.network_parameters(), sampler_lr), (backbone.sigma_parameters(), sigma_lr)], grad_clip=grad_clip
    )


def sigma_metrics(backbone: GaussianChainPolicy) -> dict[str, torch.Tensor]:
    """{"sigma/t": sigma_t} for logging (0-d tensors: the trainer reads every metric in one copy)."""
    return {f"sigma/{t}": s for t, s in enumerate(backbone.sigma().detach())}


def initial_velocity_scale(backbone: GaussianChainPolicy) -> torch.Tensor:
    """AVR's starting point s_t^2 <- sigma_t^2 (Algorithm 1, line 2): [T]."""
    return backbone.sigma().detach().pow(2).clone()


def avr_update(s2: torch.Tensor, trajectory: Trajectory, alpha: float) -> torch.Tensor:
    """AVR (Sec. 4.2): s_t^2 <- alpha s_t^2 + (1 - alpha) mean_batch ||x_{t+1} - x_t||^2 / D, averaged over ranks."""
    states = trajectory.states
    d = states[0, 0].numel()
    sq = (states[1:] - states[:-1]).flatten(2).pow(2).sum(2).mean(1) / d  # [T]
    return alpha * s2 + (1 - alpha) * all_mean(sq)


class DxDP:
    """The DxDP optimiser over (backbone, reward, value); `update` is one iteration of Algorithm 1/2 minus the EBM step.

    The learning reward's own update (Algorithm 1, line 4) is done by the trainer before this is called. The backbone
    is optimised in eval mode (`backbone_mode`): the policy improved is the one sampled, without dropout.
    """

    needs_rollout = True
    backbone_mode = "eval"  # the trainer's mode for the backbone during `update`
    conditional = True  # conditions come with the trajectory; `real_condition` is not needed
    phases: Phases = NO_PHASES  # times the value and policy steps when a benchmark asks (`Trainer.time_phases`)

    def __init__(
        self, backbone: GaussianChainPolicy, reward: Reward, value: ValueFunction, *, config: DxDPConfig
    ) -> None:
        if config.terminal == "reward" and not reward.differentiable:
            raise ValueError("algorithm.terminal = 'reward' needs a differentiable reward; use terminal = 'value'")
        self.backbone, self.reward, self.value, self.config = backbone, reward, value, config
        self.tau1, self.tau2, self.kl_weight = effective_temperatures(config, backbone.event_dim)
        self.sampler_optimizer = sampler_optimizer(backbone, config.sampler_lr, config.sigma_lr, config.sampler_grad_clip)
        self.s2 = initial_velocity_scale(backbone)
        self.iteration = 0
        # KL safeguard: the starting policy, frozen (rebuilt identically on resume from the same initial weights).
        self.reference = frozen_reference(backbone, config.kl_weight)
        # With a shared network V(., T) *is* the energy, so the terminal value needs no regression of its own.
        self.terminal_shared = reward_shares_value(reward, value)

    def restart_from_current_policy(self) -> None:
        """Start over from the policy as it is now (a distillation's phase 2): AVR's s_t <- sigma_t (Algorithm 1,
        line 2) and, with the KL safeguard, this policy as its reference."""
        self.s2 = initial_velocity_scale(self.backbone)
        if self.reference is not None:
            self.reference.load_state_dict(self.backbone.state_dict())

    # ---- Eq. (10)/(12): policy evaluation ----------------------------------------------------------------------
    def value_at(self, x: torch.Tensor, t: torch.Tensor, condition: Conditions | None = None) -> torch.Tensor:
        """V(x, t, c): [N] for states x [N, ...] at per-row times t [N] under conditions c (N rows, or None). Rows at
        the terminal time T are scored on the
        sample the user gets, `backbone.output(x_T)`: V(., T) stands for the terminal cost -r(output(x_T)) (with a
        shared DxMI energy it *is* E(output(x_T)), the energy trained on those outputs), so neither the TD target nor
        policy improvement reads the value, or its gradient, at pixels outside the output range."""
        if self.backbone.output_range is not None:
            last = (t == self.backbone.num_steps).view(-1, *([1] * (x.dim() - 1)))
            x = torch.where(last, self.backbone.output(x), x)
        return self.value(x, t) if condition is None else self.value(x, t, condition)

    def terminal_cost(self, x: torch.Tensor, condition: Conditions | None = None) -> torch.Tensor:
        """-r(output(x_T), c): [B], no gradient."""
        x = self.backbone.output(x)  # the reward scores the sample the user gets, not the raw state x_T
        return check_reward_output(reward_name(self.reward), self.reward.cost(x, condition), x.shape[0]).detach()

    def evaluate_policy(
        self, trajectory: Trajectory, reference_mean: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Policy evaluation on the sampled `trajectory`: the terminal regression (unless V(., T) is the shared
        energy), then the TD steps (Eq. (10)/(12)). Returns the losses as 0-d tensors. `reference_mean`: the KL
        safeguard's reference means at the trajectory's states (`reference_means`), or None."""
        states, T, B = trajectory.states, trajectory.num_steps, trajectory.batch_size
        dev = states.device
        losses = {}
        c = trajectory.condition
        if not self.terminal_shared:  # V(x_T, T, c) regresses on the terminal cost -r(x_T, c)
            target = self.terminal_cost(states[-1], c)
            loss = (self.value_at(states[-1], self._times(T, B, dev), c) - target).pow(2).mean()
            self.value.optimizer.step(loss)
            losses["value/terminal_loss"] = loss.detach()
        # The policy does not change during evaluation: its KL costs [T, B] (or None) and its log-density terms
        # (`transition_log_probs`) are computed once for every TD step.
        kl = self.value_kl(trajectory, reference_mean)
        if kl is not None:
            losses["policy/path_kl"] = all_mean(kl.sum(0).mean())  # E sum_t KL_t: the KL of the chains
        log_probs = self.transition_log_probs(trajectory)
        if self.config.td_mode == "sequential":
            td = [self._td_step(trajectory, t, kl, log_probs) for t in range(T - 1, -1, -1)]
            losses["value/td_loss"] = torch.stack(td).double().sum() / T  # the mean, summed in float64 as floats were
        else:
            losses["value/td_loss"] = self._td_step(trajectory, None, kl, log_probs)
        return losses

    def value_kl(self, trajectory: Trajectory, reference_mean: torch.Tensor | None = None) -> torch.Tensor | None:
        """The KL safeguard's cost of each sampled transition for the TD target: [T, B] (None without the safeguard
        or with `kl_in_value = false`). Like the entropy term it follows `value_entropy`: the sampled log-ratio
        log pi - log pi_ref, or with "closed_form" (and for trajectories without log-probs) the exact conditional KL.
        `reference_mean` [T, B, ...]: the reference's means at the states when already computed, or None."""
        if self.reference is None or not self.config.kl_in_value:
            return None
        sampled = self.config.value_entropy == "sample" and trajectory.log_probs is not None
        return transition_kl(self.backbone, self.reference, trajectory, sampled=sampled, reference_mean=reference_mean)

    def reference_means_for(self, trajectory: Trajectory) -> torch.Tensor | None:
        """The reference's means at every state of `trajectory` [T, B, ...] when the TD targets need them (the KL
        safeguard in the value), computed once so that policy improvement reuses their rows instead of running the
        reference again; None otherwise (policy improvement then runs it on its own rows only)."""
        if self.reference is None or not self.config.kl_in_value:
            return None
        return reference_means(self.reference, trajectory)

    def td_batch(
        self,
        trajectory: Trajectory,
        t: int | None,
        kl: torch.Tensor | None = None,
        log_probs: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The regression batch of one TD step at time t (all T times when None): the states x_t [N, ...], their
        times [N] and the targets of Eq. (10)/(12) plus the KL cost [N] (no gradient); N = B, or T*B.

        Args:
            trajectory: the sampled chains.
            t: the transition x_t -> x_{t+1} to regress, or None for all of them.
            kl: the KL safeguard's cost of every transition [T, B] (`value_kl`), or None.
            log_probs: the log-density term of every transition [T, B] (`transition_log_probs`; None: computed here).
        """
        states, T, B = trajectory.states, trajectory.num_steps, trajectory.batch_size
        log_probs = self.transition_log_probs(trajectory) if log_probs is None else log_probs
        if t is None:  # every transition, time-major: rows u*B .. (u+1)*B - 1 are x_u
            x, x_next = states[:-1].flatten(0, 1), states[1:].flatten(0, 1)
            tt = torch.arange(T, device=x.device).repeat_interleave(B)
            log_prob, kl_t, s2 = log_probs.flatten(), None if kl is None else kl.flatten(), self.s2[tt]
        else:  # one time: views of the trajectory, and s_t^2 as one number
            x, x_next, tt = states[t], states[t + 1], self._times(t, B, states.device)
            log_prob, kl_t, s2 = log_probs[t], None if kl is None else kl[t], self.s2[t]
        with torch.no_grad():
            v_next = self.value_at(x_next, tt + 1, rows_condition(trajectory, T if t is None else 1))
            velocity = velocity_cost(x, x_next, s2)
            cost_t = time_cost(self.config.time_cost, tt, T, self.config)
            target = td_target(
                v_next, log_prob, velocity, cost_t, self.config, self.tau1, self.tau2, kl=kl_t, kl_weight=self.kl_weight
            )
        return x, tt, target

    def _td_step(
        self, trajectory: Trajectory, t: int | None, kl: torch.Tensor | None, log_probs: torch.Tensor
    ) -> torch.Tensor:
        """One Adam step on the squared Bellman residual at time t (all times when t is None); returns the loss."""
        x, tt, target = self.td_batch(trajectory, t, kl, log_probs)
        c = rows_condition(trajectory, 1 if t is not None else trajectory.num_steps)
        loss = ((self.value(x, tt) if c is None else self.value(x, tt, c)) - target).pow(2).mean()
        self.value.optimizer.step(loss)
        return loss.detach()

    @torch.no_grad()
    def transition_log_probs(self, trajectory: Trajectory) -> torch.Tensor:
        """The TD target's log-density term of every sampled transition: [T, B]. The trajectory's log pi(x_{t+1}|x_t),
        or with `value_entropy = "closed_form"` (and for trajectories without log-probs) its expectation -H_t, which
        depends on t only (one [T] computation broadcast over the batch)."""
        if self.config.value_entropy == "closed_form" or trajectory.log_probs is None:
            T, B = trajectory.num_steps, trajectory.batch_size
            steps = torch.arange(T, device=trajectory.states.device)
            return (-self.backbone.entropy(steps)).view(T, 1).expand(T, B)
        return trajectory.log_probs

    # ---- Eq. (11): policy improvement --------------------------------------------------------------------------
    def policy_loss(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
        condition: Conditions | None = None,
        reference_mean: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """mean[ V(x_{t+1}(phi), t+1, c) - tau1 D log sigma_t + tau2 ||x_t - x_{t+1}(phi)||^2 / (2 s_t^2)
                 + beta KL(pi_phi(.|x_t, c) || pi_ref(.|x_t, c)) ] over rows x_t [N, ...] at times t [N] with
        conditions c (N rows, or None); `reference_mean` [N, ...]: pi_ref's means at those rows when the caller holds
        them (None: the reference runs here).

        tau1 log pi(x_{t+1}|x_t) is replaced by its expectation -tau1 H = -tau1 (D log sigma_t + const), which has
        the same gradient under the reparameterisation (Algorithm 2, line 10). The KL is exact (`gaussian_kl`), a
        function of x_t differentiable in the mean and sigma_t. With `terminal = "reward"` the reward re-scores the
        rows that end at T in evaluation mode: a normalising composite folds only the iteration's sampled x_T
        (`terminal_cost`) into its statistics, once per iteration.
        """
        cfg, T = self.config, self.backbone.num_steps
        sigma = self.backbone.sigma()[t]  # [N]
        mean = self.backbone.mean_at(x, t, condition)
        x_next = mean + sigma.view(-1, *([1] * (x.dim() - 1))) * noise  # = backbone.step(x, t, noise, condition)
        next_value = self.value_at(x_next, t + 1, condition)
        if cfg.terminal == "reward":  # the last transition differentiates the reward itself, scored on those rows only
            last = t + 1 == T
            if last.any():
                next_value = next_value.clone()
                with eval_mode(self.reward):
                    c_last = None if condition is None else condition.select(last.nonzero().view(-1).cpu())
                    next_value[last] = self.reward.cost(self.backbone.output(x_next[last]), c_last).to(next_value.dtype)
        return (next_value + self.running_cost(x, t, mean, sigma, x_next, condition, reference_mean)).mean()

    def running_cost(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        mean: torch.Tensor,
        sigma: torch.Tensor,
        x_next: torch.Tensor,
        condition: Conditions | None = None,
        reference_mean: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Eq. (8)'s running cost of transitions x_t -> x_{t+1} = mean + sigma_t eps, as policy improvement (and a
        back-propagation-through-time benchmark, bench_memory.py) differentiates it: [N]

            -tau1 D log sigma_t + tau2 ||x_{t+1} - x_t||^2 / (2 s_t^2) + beta KL(pi_phi(.|x_t, c) || pi_ref(.|x_t, c))

        (tau1 log pi replaced by its expectation -tau1 H, `policy_loss`), for rows x_t [N, ...] at times t [N], their
        means and next states [N, ...], sigma_t [N] and conditions c (N rows, or None); `reference_mean` [N, ...]: pi_ref's
        means at those rows, or None (computed here)."""
        cost = self.tau2 * velocity_cost(x, x_next, self.s2[t]) - self.tau1 * (self.backbone.event_dim * sigma.log())
        if self.reference is not None:
            if reference_mean is None:
                with torch.no_grad():
                    reference_mean = self.reference.mean_at(x, t, condition)
            cost = cost + self.kl_weight * gaussian_kl(mean, sigma, reference_mean, self.reference.sigma()[t])
        return cost

    def improve_policy(
        self, trajectory: Trajectory, generator: torch.Generator | None, reference_mean: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """One Adam step of Eq. (11) on n = `policy_batch` (default B) transitions drawn uniformly from the T x B of
        `trajectory`; `reference_mean` [T, B, ...]: the reference's means at its states (`reference_means_for`), or
        None. Returns the metrics as 0-d tensors."""
        T, B = trajectory.num_steps, trajectory.batch_size
        n = self.config.policy_batch or B
        dev = trajectory.states.device
        flat = torch.randint(0, T * B, (n,), generator=generator, device=dev)
        t, index = flat // B, flat % B
        x = trajectory.states[t, index]
        condition = None if trajectory.condition is None else trajectory.condition.select(index.cpu())
        noise = torch.randn(x.shape, generator=generator, device=dev)
        rows_reference = None if reference_mean is None else reference_mean[t, index]
        loss = self.policy_loss(x, t, noise, condition, rows_reference)
        grad_norm = self.sampler_optimizer.step(loss)  # None when the trainer does not log this iteration
        metrics = {"policy/loss": loss.detach()}
        if grad_norm is not None:
            metrics["policy/grad_norm"] = grad_norm
        return metrics

    # ---- one iteration -------------------------------------------------------------------------------------------
    def update(
        self, real: torch.Tensor, trajectory: Trajectory, generator: torch.Generator | None, real_condition=None
    ) -> dict[str, torch.Tensor]:
        """One iteration on the sampled `trajectory` (its conditions ride along in it; the data's, `real_condition`,
        are not used). Returns the metrics as 0-d tensors (the trainer reads them all in one copy)."""
        self.s2 = self.s2.to(trajectory.states.device)
        if self.reference is not None:
            self.reference.to(trajectory.states.device)
        with self.phases.phase("value_update"):
            reference_mean = self.reference_means_for(trajectory)
            metrics = self.evaluate_policy(trajectory, reference_mean)
        if self.iteration >= self.config.value_warmup:
            with self.phases.phase("policy_step"):
                metrics.update(self.improve_policy(trajectory, generator, reference_mean))
        if self.config.avr:
            self.s2 = avr_update(self.s2, trajectory, self.config.avr_alpha)
        self.iteration += 1
        metrics.update(sigma_metrics(self.backbone))
        return metrics

    # ---- value guidance --------------------------------------------------------------------------------------------
    def guide(self, scale: float):
        """Value guidance (Sec. 5.2): x_{t+1} <- x_{t+1} - scale * sigma_t * grad V(x_{t+1}, t+1); scale > 0 lowers V."""

        def apply(x: torch.Tensor, t_next: int, sigma: torch.Tensor, condition: Conditions | None = None) -> torch.Tensor:
            with torch.enable_grad():
                x = x.detach().requires_grad_(True)
                v = self.value_at(x, self._times(t_next, x.shape[0], x.device), condition).sum()
                (grad,) = torch.autograd.grad(v, x)
            return (x - scale * sigma * grad).detach()

        return apply

    # ---- bookkeeping ----------------------------------------------------------------------------------------------
    @staticmethod
    def _times(t: int, n: int, device) -> torch.Tensor:
        return torch.full((n,), t, dtype=torch.long, device=device)

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"value": self.value}

    def optimizers(self) -> dict[str, GradStep]:
        return {"sampler": self.sampler_optimizer, "value": self.value.optimizer}

    def state_dict(self) -> dict:
        return {"s2": self.s2.clone(), "iteration": self.iteration}

    def load_state_dict(self, state: dict) -> None:
        self.s2 = state["s2"].to(self.s2.device)
        self.iteration = int(state["iteration"])


def rows_condition(trajectory: Trajectory, times: int) -> Conditions | None:
    """The conditions of `times` time slices of the trajectory's B chains stacked time-major (T*B rows for a batched TD
    step), or None for an unconditional trajectory."""
    return None if trajectory.condition is None else trajectory.condition.repeat(times)


def build_dxdp(
    backbone: GaussianChainPolicy, reward: Reward, value: ValueFunction, /, *, config: DxDPConfig
) -> DxDP:
    """Algorithm `dxdp`."""
    if value is None:
        raise ValueError("algorithm 'dxdp' needs a [value] section")
    if reward is None:
        raise ValueError("algorithm 'dxdp' needs a [reward] section")
    return DxDP(backbone, reward, value, config=config)


