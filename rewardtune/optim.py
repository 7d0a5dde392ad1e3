"""`GradStep`: one optimiser step on a loss, with gradient averaging across processes and norm clipping.

Algorithms and learning rewards own their `GradStep`s. Across processes, gradients are averaged with a plain
`torch.distributed.all_reduce` when a process group is initialised (the trainer initialises it through accelerate);
together with identical initial weights this keeps parameters identical on every rank without wrapping modules in
DDP, whose forward hook would not see the custom calls (`step`, `sample`, value at t) the algorithms make.

Each all-reduce here is preceded by `agreement.exchange` (a status all-reduce of 10 integers), so a rank that failed
earlier in the iteration, or a rank that reached a different collective, stops every rank with one error instead of
leaving the others waiting (see agreement.py).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

from rewardtune.agreement import Point, exchange, payload_signature, world_size
from rewardtune.errors import NonFiniteError
from rewardtune.sharding import full_tensors, holds_sharded, is_sharded, shard_like


class GradStep:
    """Adam on one or more parameter groups, stepped by `step(loss)`.

    Adam runs torch's fused kernel (one kernel over all parameters; on the CPU about 2.5x faster per step than the
    multi-tensor implementation for the toy MLPs), which rounds differently from the per-parameter loop by about one
    unit in the last place per step. `fused = False` runs the multi-tensor (`foreach`) implementation instead, the
    loop's arithmetic bit for bit; FSDP-sharded parameters always run it (`configure` switches). The checkpoints of
    all three are the same format and load into each other.

    Args:
        groups: iterable of (parameters, learning rate) pairs; groups with no parameters are dropped.
        grad_clip: clip the global gradient norm to this value (None: no clipping).
        betas: Adam betas.
        fused: torch's fused Adam (True, the default) or its multi-tensor implementation (False).
    """

    def __init__(
        self,
        groups: Iterable[tuple[Iterable[torch.nn.Parameter], float]],
        *,
        grad_clip: float | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        fused: bool = True,
    ) -> None:
        param_groups = []
        for params, lr in groups:
            params = [p for p in params if p.requires_grad]
            if params:
                param_groups.append({"params": params, "lr": float(lr), "base_lr": float(lr)})
        if not param_groups:
            raise ValueError("GradStep needs at least one trainable parameter")
        self.optimizer = adam(param_groups, betas, fused)
        self.layout()
        self.grad_clip = grad_clip
        self.report_norm = True  # whether `step` returns the gradient norm (`set_logged`)
        self.scaler: torch.amp.GradScaler | None = None  # fp16 loss scaling (`configure`)
        self.skip_nonfinite = False
        self.skipped = 0  # steps skipped for non-finite gradients since this object was made

    def configure(self, *, loss_scaling: bool = False, skip_nonfinite: bool = False, device_type: str = "cpu") -> None:
        """The run's precision policy. `loss_scaling` (fp16 mixed precision): the loss is scaled before backward and
        the gradients unscaled before averaging, clipping and the step (torch.amp.GradScaler; the scale restarts on
        resume); an overflow skips the step and halves the scale, as loss scaling does. `skip_nonfinite`: any step
        whose averaged gradients are not finite is skipped; without it a non-finite step stops the run (the weights
        go non-finite and the trainer's check raises; under fp16, once the scale is down to 1). Skipped steps are
        counted in `skipped`."""
        self.scaler = torch.amp.GradScaler(device_type) if loss_scaling else None
        self.skip_nonfinite = skip_nonfinite
        self.layout()
        if self.sharded and self.optimizer.defaults.get("fused"):  # before any step: no state to carry over
            groups = [{k: v for k, v in g.items() if k not in ("fused", "foreach")} for g in self.optimizer.param_groups]
            self.optimizer = adam(groups, self.optimizer.defaults["betas"], fused=False)

    def layout(self) -> None:
        """Note which parameters are FSDP-sharded (after `sharding.swap_parameters`, which `configure` follows)."""
        params = self.parameters
        self.sharded = [p for p in params if is_sharded(p)]
        self.unsharded = [p for p in params if not is_sharded(p)]

    @property
    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def set_lr_scale(self, scale: float) -> None:
        """Scale every group's learning rate relative to its base value (for schedules)."""
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * scale

    def set_logged(self, logged: bool) -> None:
        """Whether the coming steps are logged (the trainer says so before each iteration; default: yes). Unlogged
        steps return no gradient norm, and compute it only when clipping, loss scaling or `skip_nonfinite` need it."""
        self.report_norm = logged

    def step(self, loss: torch.Tensor) -> torch.Tensor | None:
        """Back-propagate `loss`, average gradients over processes, clip, and step. Returns the gradient norm, a 0-d
        tensor (0 for a step skipped for non-finite gradients, which `skipped` counts), or None when the step is not
        logged (`set_logged`).

        Parameters sharded by FSDP (`sharding.py`) get their averaged gradient shards from FSDP's reduce-scatter, which
        runs only in a plain `backward()` (FSDP computes gradients on the gathered parameters, not on the sharded ones
        `inputs=` would name): then other modules' `.grad` fill too, which their own `GradStep`s clear before use.

        Only loss scaling and `skip_nonfinite` read the norm on the host (they decide on it): otherwise a non-finite
        step is taken like any other (the weights go non-finite and the trainer's check stops the run), so the step
        waits for nothing."""
        self.optimizer.zero_grad(set_to_none=True)
        scaled = self.scaler.scale(loss) if self.scaler is not None else loss
        params, sharded = self.parameters, self.sharded
        if sharded:
            scaled.backward()
        else:
            scaled.backward(inputs=params)  # leave other modules' .grad alone
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        average_gradients(self.unsharded)  # every rank: the same gradients, so finiteness
        decides = self.scaler is not None or self.skip_nonfinite
        norm = None
        if self.grad_clip is not None and not sharded:
            norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        elif self.grad_clip is not None or decides or self.report_norm:
            norm = global_grad_norm(params)
            if self.grad_clip is not None:
                clip_gradients(params, norm, self.grad_clip)
        if decides and not bool(torch.isfinite(norm)):  # the averaged gradients: every rank decides alike
            overflow = self.scaler is not None and self.scaler.get_scale() > 1.0  # fp16's routine: back off, retry
            if not (overflow or self.skip_nonfinite):
                raise NonFiniteError("gradients stayed non-finite under fp16 loss scaling down to scale 1; the last "
                                     "checkpoint is kept (train.skip_nonfinite = true skips and counts such steps)")
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.update(self.scaler.get_scale() * self.scaler.get_backoff_factor())
            self.skipped += 1
            return torch.zeros(()) if self.report_norm else None  # nothing was applied
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        return norm.detach() if self.report_norm else None

    def state_dict(self) -> dict:
        """Adam's state; moments of FSDP-sharded parameters gathered to full tensors (a collective then: every rank
        calls it), so the checkpoint does not depend on the number of processes."""
        state = self.optimizer.state_dict()
        return full_tensors(state) if holds_sharded(state) else state

    def load_state_dict(self, state: dict) -> None:
        """Load Adam's moments and step counts from `state` but keep this optimiser's hyperparameters (base lr, lr,
        betas, eps, weight decay, ...): they come from the recipe, which a resume may have changed. (torch's own
        `load_state_dict` would put back the saved ones, so a resumed run would record one lr and use another.)
        Moments of sharded parameters are cut to this rank's shard."""
        configured = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        state = self.shard_state(state)
        self.optimizer.load_state_dict(state)
        for group, hyperparameters in zip(self.optimizer.param_groups, configured, strict=True):
            group.update(hyperparameters)

    def shard_state(self, state: dict) -> dict:
        """`state` (a full optimiser state) with each sharded parameter's moments as this rank's shards."""
        params = self.parameters
        if not any(is_sharded(p) for p in params) or "state" not in state:
            return state
        moments = {}
        for index, entry in state["state"].items():
            param = params[int(index)] if int(index) < len(params) else None
            moments[index] = {
                k: shard_like(v, param) if param is not None and isinstance(v, torch.Tensor) and v.dim() > 0 else v
                for k, v in entry.items()
            }
        return {**state, "state": moments}


def adam(param_groups: list[dict], betas: tuple[float, float], fused: bool) -> torch.optim.Adam:
    """torch's Adam over `param_groups`: its fused kernel, or its multi-tensor implementation."""
    return torch.optim.Adam(param_groups, betas=betas, fused=True) if fused else torch.optim.Adam(
        param_groups, betas=betas, foreach=True)


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """All-reduce (mean) the gradients of `params` in one flat bucket; a no-op in a single process."""
    if world_size() == 1 or not params:
        return
    # Every rank runs the same graph, so the set of parameters with a gradient is the same on every rank (the status
    # exchange compares the bucket sizes: a rank-dependent graph raises DisagreementError on every rank).
    with_grad = [p for p in params if p.grad is not None]
    flat = torch.cat([p.grad.reshape(-1) for p in with_grad]) if with_grad else params[0].new_zeros(0)
    exchange(Point.GRADIENTS, params[0].device, values=payload_signature(flat))
    if not with_grad:
        return
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for p in with_grad:
        n = p.grad.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def global_grad_norm(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """The 2-norm of all of `params`' gradients together, each FSDP shard counted once (every rank gets the same
    value; a collective when some gradients are sharded)."""
    norms = []
    for p in params:
        if p.grad is not None:
            norm = p.grad.detach().float().norm()
            norms.append(norm.full_tensor() if is_sharded(norm) else norm)
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


def clip_gradients(params: list[torch.nn.Parameter], norm: torch.Tensor, max_norm: float) -> None:
    """Scale the gradients so that their global norm `norm` is at most `max_norm` (torch's clip_grad_norm_ rule)."""
    factor = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for p in params:
        if p.grad is not None:
            p.grad.mul_(factor.to(p.grad.device))


def all_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of `x` over processes (identity in a single process); used for statistics that must agree on every rank."""
    if world_size() == 1:
        return x
    exchange(Point.MEAN, x.device, values=payload_signature(x))
    x = x.clone()
    dist.all_reduce(x)
    return x / world_size()
