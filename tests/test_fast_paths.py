"""The hot path's shortcuts (issue 19) give the numbers of the plain paths, bit for bit (the fused Adam kernel, `GradStep`'s
default, to round-off): multi-tensor Adam in `GradStep`, its checkpoints both ways, gradient norms only on logged steps, the value's time-embedding table, the
trainer reading every metric in one copy, and DxDP's closed-form entropy computed once per iteration."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import rewardtune as rt
from rewardtune.nets.mlp import TimeMLP
from rewardtune.nets.value import build_time_mlp_value
from rewardtune.optim import GradStep
from rewardtune.trainer import EMA, metric_floats

ROOT = Path(__file__).resolve().parents[1]


def tiny(*overrides: str):
    return rt.build_trainer(rt.load_recipe(ROOT / "recipes" / "tiny_8gaussians.toml", list(overrides)))


def small_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 16), nn.SiLU(), nn.Linear(16, 1))


def loss_of(net: nn.Module, step: int) -> torch.Tensor:
    x = torch.randn(32, 3, generator=torch.Generator().manual_seed(step))
    return (net(x) - x.sum(1, keepdim=True)).pow(2).mean()


# ---- GradStep: multi-tensor Adam ---------------------------------------------------------------------------------
@pytest.mark.parametrize("fused", [False, True])
def test_gradstep_steps_as_torchs_per_parameter_adam_does(fused):
    """The multi-tensor implementation is the loop bit for bit; the fused kernel (the default) differs from it by
    round-off only."""
    net, reference = small_net(0), small_net(0)
    opt = GradStep([(net.parameters(), 1e-2)], grad_clip=0.5, **({} if fused else {"fused": False}))
    group = opt.optimizer.param_groups[0]
    assert (group["fused"] is True) if fused else (group["foreach"] is True)
    plain = torch.optim.Adam(reference.parameters(), lr=1e-2, foreach=False)  # the loop GradStep used to run
    for step in range(5):
        opt.step(loss_of(net, step))
        plain.zero_grad()
        loss_of(reference, step).backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
        plain.step()
    for p, q, start in zip(net.parameters(), reference.parameters(), small_net(0).parameters(), strict=True):
        assert not torch.equal(p, start)  # the steps moved every weight
        if fused:
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(p, q)


class LoopAdam:
    """torch's per-parameter Adam loop, which GradStep ran before, behind GradStep's step and state methods."""

    def __init__(self, params) -> None:
        self.optimizer = torch.optim.Adam(params, lr=1e-2, foreach=False)

    def step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)


OPTIMISERS = {
    "loop": LoopAdam,
    "foreach": lambda params: GradStep([(params, 1e-2)], fused=False),
    "fused": lambda params: GradStep([(params, 1e-2)]),
}
PAIRS = [("loop", "foreach"), ("foreach", "loop"), ("loop", "fused"), ("fused", "loop"), ("foreach", "fused")]


@pytest.mark.parametrize(("saved_by", "loaded_by"), PAIRS)
def test_adam_state_loads_both_ways_between_the_loop_and_the_multi_tensor_and_fused_optimisers(saved_by, loaded_by):
    """A checkpoint of the per-parameter Adam (earlier releases) resumes in today's GradStep and the other way round,
    and the resumed steps are the uninterrupted ones (bit for bit between the loop and the multi-tensor
    implementation, to round-off with the fused kernel on either side: it rounds its own way)."""
    net = small_net(0)
    saver = OPTIMISERS[saved_by](net.parameters())
    for step in range(3):
        saver.step(loss_of(net, step))
    resumed = small_net(1)
    resumed.load_state_dict(net.state_dict())
    loader = OPTIMISERS[loaded_by](resumed.parameters())
    loader.load_state_dict(copy.deepcopy(saver.state_dict()))  # as from a file: no moments shared
    for step in range(3, 6):  # the uninterrupted run goes on with the optimiser it had
        saver.step(loss_of(net, step))
        loader.step(loss_of(resumed, step))
    exact = "fused" not in (saved_by, loaded_by)
    for p, q in zip(net.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q) if exact else torch.allclose(p, q, rtol=1e-6, atol=1e-7)
    state = loader.state_dict()["state"][0]
    assert float(state["step"]) == 6 and float(state["exp_avg_sq"].abs().sum()) > 0  # the moments carried over


def test_an_unlogged_step_returns_no_norm_and_takes_the_same_step():
    logged_net, quiet_net = small_net(0), small_net(0)
    logged, quiet = GradStep([(logged_net.parameters(), 1e-2)]), GradStep([(quiet_net.parameters(), 1e-2)])
    quiet.set_logged(False)
    for step in range(3):
        norm = logged.step(loss_of(logged_net, step))
        assert quiet.step(loss_of(quiet_net, step)) is None
        assert isinstance(norm, torch.Tensor) and norm.dim() == 0 and float(norm) > 0
    for p, q in zip(logged_net.parameters(), quiet_net.parameters(), strict=True):
        assert torch.equal(p, q)


def test_an_unlogged_step_still_skips_a_nonfinite_step_when_asked():
    weight = nn.Parameter(torch.ones(3))
    opt = GradStep([([weight], 0.1)])
    opt.configure(skip_nonfinite=True)
    opt.set_logged(False)
    assert opt.step((weight * float("nan")).sum()) is None
    assert opt.skipped == 1 and torch.equal(weight.detach(), torch.ones(3))


def test_the_ema_update_is_the_per_parameter_lerp_bit_for_bit_and_leaves_frozen_parameters_shared():
    live = small_net(0)
    live[0].weight.requires_grad_(False)  # a frozen parameter (a LoRA base, say) is shared, not averaged
    ema = EMA(live, decay=0.9)
    shadow = [p.detach().clone() for p in live.parameters()]
    for step in range(4):
        with torch.no_grad():
            for p in live.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(step)))
        ema.update(live)
        decay = min(0.9, (2 + step) / (11 + step))
        for s, p in zip(shadow, live.parameters(), strict=True):
            if p.requires_grad:
                s.lerp_(p.detach(), 1 - decay)
    for e, s, p in zip(ema.module.parameters(), shadow, live.parameters(), strict=True):
        assert (e is p) if not p.requires_grad else (torch.equal(e, s) and not torch.equal(e, p))


# ---- the value's time-embedding table ----------------------------------------------------------------------------
@pytest.mark.parametrize("time_scale", [1.0, 100.0, 0.37])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_time_table_rows_are_the_computed_embeddings_bit_for_bit(time_scale, dtype):
    computed = TimeMLP(2, 1, hidden=8, depth=1, time_dim=16, time_scale=time_scale).to(dtype)
    looked_up = TimeMLP(2, 1, hidden=8, depth=1, time_dim=16, time_scale=time_scale, time_table=6).to(dtype)
    t = torch.randint(0, 6, (37,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(looked_up.time_embedding(t), computed.time_embedding(t))  # int64 times: the table
    assert torch.equal(looked_up.time_embedding(t.float()), computed.time_embedding(t.float()))  # floats: computed
    assert torch.equal(looked_up.time_embedding(t), computed.time_embedding(t.float()))  # what a value used to pass


def test_time_table_refuses_a_time_outside_it():
    net = TimeMLP(2, 1, hidden=8, depth=1, time_dim=16, time_table=4)
    with pytest.raises(IndexError):
        net(torch.zeros(2, 2), torch.tensor([1, 4]))


def test_a_time_mlp_value_looks_its_times_up_and_values_as_before():
    torch.manual_seed(0)
    table = build_time_mlp_value((2,), None, 5, hidden=16, depth=2, time_dim=16)
    torch.manual_seed(0)
    plain = build_time_mlp_value((2,), hidden=16, depth=2, time_dim=16)  # no num_steps: no table, float times
    assert table.integer_times and table.net.time_table == 6 and not plain.integer_times
    x, t = torch.randn(12, 2), torch.arange(6).repeat(2)
    assert torch.equal(table(x, t), plain(x, t))
    assert "tables" not in str(list(table.state_dict()))  # derived, not checkpointed


# ---- the trainer reads metrics in one copy, and norms only when it logs ------------------------------------------
def test_metric_floats_reads_tensors_as_item_would_and_keeps_the_order():
    values = {"a": torch.tensor(0.1), "b": 2.5, "c": torch.tensor(1 / 3, dtype=torch.float64), "d": torch.tensor([7.0])}
    read = metric_floats(values)
    assert list(read) == ["a", "b", "c", "d"]
    assert read == {"a": values["a"].item(), "b": 2.5, "c": values["c"].item(), "d": 7.0}
    assert all(type(v) is float for v in read.values())


def test_the_gradient_norm_is_a_metric_of_logged_steps_only():
    trainer = tiny("train.steps=6", "train.log_every=3")
    trainer.out_dir = None
    seen = []
    while trainer.step < 6:
        metrics = trainer.train_step()
        trainer.step += 1
        seen.append("policy/grad_norm" in metrics)
        assert all(type(v) is float for v in metrics.values())
    assert seen == [False, False, True, False, False, True]


# ---- DxDP: the closed-form entropy once per iteration ------------------------------------------------------------
@pytest.mark.parametrize("value_entropy", ["closed_form", "sample"])
def test_td_targets_from_the_iterations_log_probs_are_those_computed_per_step(value_entropy):
    trainer = tiny(f"algorithm.value_entropy={value_entropy}")
    algorithm = trainer.algorithm
    trajectory = trainer.backbone.sample(16, torch.Generator().manual_seed(0))
    log_probs = algorithm.transition_log_probs(trajectory)  # [T, B]
    for t in [*range(trajectory.num_steps), None]:
        _, _, shared = algorithm.td_batch(trajectory, t, None, log_probs)
        _, _, own = algorithm.td_batch(trajectory, t)
        assert torch.equal(shared, own)
    if value_entropy == "closed_form":  # per step, as td_batch used to compute it: -H(t) for each row
        for t in range(trajectory.num_steps):
            expected = -trainer.backbone.entropy(torch.full((16,), t))
            assert torch.equal(log_probs[t], expected)
