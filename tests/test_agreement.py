"""Agreement across processes (rewardtune/agreement.py), on two ranks simulated by two threads of this process.

`ThreadedGroup` stands in for torch.distributed: its collectives meet at a barrier, as the real ones do, so the
protocol runs exactly as under `accelerate launch`, deterministically and in milliseconds. A rank left waiting (a
hang under real processes) fails with BrokenBarrierError after a timeout instead. tests/test_multiprocess.py runs
the same decisions in two real processes.
"""

from __future__ import annotations

import json
import pickle
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from helpers import QuadraticCost

from rewardtune import agreement
from rewardtune.agreement import Point
from rewardtune.build import build_experiment
from rewardtune.errors import (
    NonFiniteError,
    PluginError,
    RewardtuneError,
)
from rewardtune.optim import GradStep, all_mean
from rewardtune.recipe import load_recipe
from rewardtune.rewards.composite import CompositeReward
from rewardtune.trainer import EvalConfig, Trainer, broadcast_modules

ROOT = Path(__file__).resolve().parents[1]


class ThreadedGroup:
    """torch.distributed for `size` ranks that are threads: all_reduce (sum, max), broadcast and
    broadcast_object_list meet at a barrier; a rank waiting longer than `timeout` s raises BrokenBarrierError."""

    def __init__(self, monkeypatch, size: int = 2, timeout: float = 10.0) -> None:
        self.size, self.local = size, threading.local()
        self.barrier = threading.Barrier(size, timeout=timeout)
        self.slots: list = [None] * size
        fakes = {
            "is_available": lambda: True, "is_initialized": lambda: True, "get_world_size": lambda: size,
            "get_rank": self.rank, "all_reduce": self.all_reduce, "broadcast": self.broadcast,
            "broadcast_object_list": self.broadcast_object_list,
        }
        for name, fake in fakes.items():
            monkeypatch.setattr(dist, name, fake)

    def rank(self) -> int:
        return self.local.rank

    def meet(self, value) -> list:
        """Every rank's `value`, in rank order."""
        self.slots[self.rank()] = value
        self.barrier.wait()
        values = list(self.slots)
        self.barrier.wait()  # everyone has read before anyone writes the next collective's value
        return values

    def all_reduce(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM, async_op: bool = False, **_):
        stacked = torch.stack(self.meet(tensor.clone()))
        tensor.copy_(stacked.amax(0) if op == dist.ReduceOp.MAX else stacked.sum(0))
        return SimpleNamespace(wait=lambda: True) if async_op else None  # a finished Work

    def broadcast(self, tensor: torch.Tensor, src: int = 0, **_) -> None:
        tensor.copy_(self.meet(tensor.clone())[src])

    def broadcast_object_list(self, objects: list, src: int = 0, **_) -> None:
        objects[:] = pickle.loads(self.meet(pickle.dumps(objects) if self.rank() == src else None)[src])

    def run(self, fn) -> list[tuple[object, BaseException | None]]:
        """fn(rank) on every rank, one thread each; (result, exception) per rank."""
        outcomes: list = [None] * self.size

        def target(rank: int) -> None:
            self.local.rank = rank
            try:
                outcomes[rank] = (fn(rank), None)
            except BaseException as err:  # noqa: BLE001 (the test inspects what each rank raised)
                outcomes[rank] = (None, err)

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.size)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert not any(t.is_alive() for t in threads)
        return outcomes


def errors(outcomes) -> list[str]:
    return [f"{type(err).__name__}: {err}" for _, err in outcomes]


def test_one_process_needs_no_collective():
    assert agreement.world_size() == 1
    assert agreement.exchange(Point.ITERATION, "cpu", stop=15, values=(3,)) == 15
    assert agreement.broadcast_from_main({"a": 1.0}, "cpu") == {"a": 1.0}
    original = PluginError("reward 'x' broke")
    with pytest.raises(PluginError) as raised, agreement.together(Point.FIT_END, "cpu"):
        raise original
    assert raised.value is original and str(original) == "reward 'x' broke"  # unchanged


def one_gradient_step(size: int) -> None:
    """A GradStep on `size` weights (its gradients are averaged over the ranks)."""
    weight = torch.nn.Parameter(torch.ones(size))
    GradStep([([weight], 0.1)]).step(weight.pow(2).sum())


def other_rank_goes_on(where: str) -> None:
    """What the healthy rank does after the failing rank raised: its next collective."""
    if where == "all_mean":
        all_mean(torch.ones(2))
    elif where == "gradients":
        one_gradient_step(3)
    elif where == "broadcast":
        agreement.broadcast_from_main({"metric": 1.0}, "cpu")
    # "block_end": the exchange that closes the block


@pytest.mark.parametrize("error", [PluginError, RuntimeError])
@pytest.mark.parametrize("where", ["all_mean", "gradients", "broadcast", "block_end"])
def test_an_error_on_one_rank_is_the_same_error_on_every_rank(monkeypatch, where, error):
    """Rank 1 raises (a RewardtuneError, or any exception: a plugin's bug) while rank 0 goes on to its next collective."""
    group = ThreadedGroup(monkeypatch)

    def rank_fn(rank: int) -> None:
        with agreement.together(Point.FIT_END, "cpu"):
            if rank == 1:
                raise error("reward 'x' broke")
            other_rank_goes_on(where)

    outcomes = group.run(rank_fn)
    expected = f"{error.__name__}: reward 'x' broke (on rank 1 of 2)"
    assert errors(outcomes) == [expected, expected]
    assert all(agreement.is_agreed(err) for _, err in outcomes)


def test_the_lowest_failing_rank_names_the_error(monkeypatch):
    group = ThreadedGroup(monkeypatch)

    def rank_fn(rank: int) -> None:
        with agreement.together(Point.FIT_END, "cpu"):
            raise (NonFiniteError("value/td_loss became nan") if rank == 0 else PluginError("reward broke"))

    expected = "NonFiniteError: value/td_loss became nan (on rank 0 of 2)"
    assert errors(group.run(rank_fn)) == [expected, expected]


class TwoArgumentError(Exception):
    def __init__(self, what: str, where: str) -> None:
        super().__init__(f"{what} at {where}")


def test_an_error_that_cannot_be_pickled_arrives_as_a_rewardtune_error(monkeypatch):
    group = ThreadedGroup(monkeypatch)

    def rank_fn(rank: int) -> None:
        with agreement.together(Point.FIT_END, "cpu"):
            if rank == 1:
                raise TwoArgumentError("boom", "step 3")
            all_mean(torch.ones(1))

    (_, on_main), (_, on_failing) = group.run(rank_fn)
    assert type(on_failing) is TwoArgumentError and str(on_failing) == "boom at step 3 (on rank 1 of 2)"
    assert type(on_main) is RewardtuneError and str(on_main) == "TwoArgumentError: boom at step 3 (on rank 1 of 2)"


@pytest.mark.parametrize(
    ("rank1_first", "message"),
    [
        (lambda: all_mean(torch.ones(3)), "the processes disagree at an all_mean: the number of elements is 2 on one and 3 on another"),
        (lambda: all_mean(torch.ones(2, dtype=torch.float64)), "the processes disagree at an all_mean: the dtype is torch.float32 on one and torch.float64 on another"),
        (
            lambda: one_gradient_step(2),
            (
                "the processes reached different points (a gradient all-reduce on one, an all_mean on another): some "
                "code ran a rank-dependent branch or collective"
            ),
        ),
    ],
    ids=["size", "dtype", "point"],
)
def test_ranks_at_different_collectives_raise_one_disagreement(monkeypatch, rank1_first, message):
    """Rank 1 runs one collective more than rank 0 before their common all_mean of two float32 numbers."""
    group = ThreadedGroup(monkeypatch)

    def rank_fn(rank: int) -> None:
        with agreement.together(Point.FIT_END, "cpu"):
            if rank == 1:
                rank1_first()
            all_mean(torch.ones(2))

    assert errors(group.run(rank_fn)) == [f"DisagreementError: {message}"] * 2


def test_ranks_broadcast_rank0_weights_only_when_they_built_the_same_modules(monkeypatch):
    group = ThreadedGroup(monkeypatch)

    def rank_fn(rank: int, width: int) -> torch.Tensor:
        module = torch.nn.Linear(2, width(rank))  # random weights: the two ranks start different
        broadcast_modules({"m": module})
        return module.weight.detach().clone()

    (w0, _), (w1, _) = group.run(lambda rank: rank_fn(rank, lambda r: 2))
    assert torch.equal(w0, w1)
    expected = (
        "DisagreementError: the processes disagree at a broadcast from the main process: the number of elements is 6 "
        "on one and 9 on another"
    )
    assert errors(group.run(lambda rank: rank_fn(rank, lambda r: 2 + r))) == [expected] * 2


def test_broadcast_from_main_gives_every_rank_the_main_value(monkeypatch):
    group = ThreadedGroup(monkeypatch)
    outcomes = group.run(lambda rank: agreement.broadcast_from_main({"reward_mean": float(rank)}, "cpu"))
    assert outcomes == [({"reward_mean": 0.0}, None)] * 2


def test_composite_statistics_are_those_of_every_process_batch_together(monkeypatch):
    """Issue #12: each rank normalised with its own running statistics. Rank r scores its own batches (of different
    sizes); both ranks must end with the statistics one process gets from the pooled batches."""
    gen = torch.Generator().manual_seed(0)
    batches = [[torch.randn(n, 2, generator=gen) * (1 + r) + r for r in range(2)] for n in (5, 3)]  # [update][rank]

    def composite() -> CompositeReward:
        return CompositeReward({"q": (QuadraticCost(torch.zeros(2)), 1.0)}, normalize=True, momentum=0.5)

    pooled = composite()
    for per_rank in batches:
        pooled.update_statistics(pooled.term_rewards(torch.cat(per_rank)))
    group = ThreadedGroup(monkeypatch)

    def rank_fn(rank: int) -> CompositeReward:
        reward = composite()
        for per_rank in batches:
            reward.update_statistics(reward.term_rewards(per_rank[rank]))
        return reward

    (rank0, _), (rank1, _) = group.run(rank_fn)
    for name in ("running_mean", "running_var"):
        assert torch.equal(getattr(rank0, name), getattr(rank1, name)), name
        # float64 sums of 8 numbers against a two-pass mean/variance: ~1e-15 relative
        torch.testing.assert_close(getattr(rank0, name), getattr(pooled, name), rtol=1e-12, atol=1e-12)


# ---- the trainer, on two thread ranks -------------------------------------------------------------------------------
class RankEvaluator:
    """Metrics that differ per rank: rank 0's `score` rises with each evaluation, rank 1's falls, so each rank alone
    would keep a different best checkpoint. Rank `fail_rank` raises at evaluation number `fail_at`."""

    def __init__(self, rank: int, fail_rank: int = -1, fail_at: int = 0) -> None:
        self.rank, self.fail_rank, self.fail_at, self.calls = rank, fail_rank, fail_at, 0

    def evaluate(self, backbone, reward, seed, guide=None) -> dict[str, float]:
        self.calls += 1
        if self.rank == self.fail_rank and self.calls == self.fail_at:
            raise PluginError(f"evaluator failed on call {self.calls}")
        return {"score": float(self.calls if self.rank == 0 else -self.calls)}


def thread_trainers(group: ThreadedGroup, tmp_path: Path, steps: int, **evaluator_options):
    """Per rank: a Trainer of recipes/tiny_8gaussians.toml (built here, sequentially: building seeds torch) that keeps
    its best `score` in tmp_path, with a RankEvaluator."""
    recipe = load_recipe(ROOT / "recipes" / "tiny_8gaussians.toml", [f"train.steps={steps}", "train.checkpoint_every=100"])
    experiments = [build_experiment(recipe) for _ in range(group.size)]

    def trainer(rank: int) -> Trainer:
        accelerator = SimpleNamespace(
            device=torch.device("cpu"), process_index=rank, is_main_process=rank == 0, num_processes=group.size,
            wait_for_everyone=lambda: group.meet(None),
        )
        exp = experiments[rank]
        return Trainer(
            backbone=exp.backbone, algorithm=exp.algorithm, reward=exp.reward, data=exp.data,
            evaluator=RankEvaluator(rank, **evaluator_options), config=recipe.train, out_dir=tmp_path,
            eval_config=EvalConfig(keep_best="score", best_mode="max", plot=False), accelerator=accelerator,
        )

    return trainer


def test_every_rank_keeps_the_same_best_checkpoint_and_reports_the_main_metrics(monkeypatch, tmp_path):
    """Evaluation every step, metrics that differ per rank: every rank returns the main process's metrics and keeps
    the best checkpoint the main process's metrics name (rank 0's score rises: the last periodic evaluation)."""
    group = ThreadedGroup(monkeypatch)
    make = thread_trainers(group, tmp_path, steps=4)

    def rank_fn(rank: int):
        trainer = make(rank)
        trainer.config = trainer.config.__class__(**{**trainer.config.__dict__, "eval_every": 1})
        return trainer.fit(), trainer.best

    (result0, best0), (result1, best1) = [outcome for outcome, _ in group.run(rank_fn)]
    assert result0 == result1 == json.loads((tmp_path / "eval.json").read_text())
    assert result0["metrics"] == {"score": 5.0}  # rank 0's 5th evaluation (steps 0..4)
    # periodic evaluations at steps 1, 2, 3 (evaluation number step + 1): rank 0's best is the last, rank 1's the first
    assert best0 == best1 == {"step": 3, "metric": "score", "value": 4.0}
    assert json.loads((tmp_path / "checkpoints" / "best" / "best.json").read_text()) == best0


def test_an_evaluation_failing_on_one_rank_stops_every_rank_with_its_error(monkeypatch, tmp_path):
    group = ThreadedGroup(monkeypatch)
    make = thread_trainers(group, tmp_path, steps=4, fail_rank=1, fail_at=3)

    def rank_fn(rank: int):
        trainer = make(rank)
        trainer.config = trainer.config.__class__(**{**trainer.config.__dict__, "eval_every": 1})
        trainer.fit()

    on_main, on_failing = errors(group.run(rank_fn))
    assert on_main == on_failing
    assert on_main.startswith("PluginError: evaluator failed on call 3") and on_main.endswith("(on rank 1 of 2)")
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000001"  # the last good one is kept


def test_a_nan_on_one_rank_stops_every_rank_with_the_same_error(monkeypatch, tmp_path):
    group = ThreadedGroup(monkeypatch)
    make = thread_trainers(group, tmp_path, steps=4)

    def rank_fn(rank: int):
        trainer = make(rank)
        update = trainer.algorithm.update

        def update_with_nan_on_rank1(real, trajectory, generator):
            metrics = update(real, trajectory, generator)
            return {**metrics, "energy/fake": float("nan")} if rank == 1 and trainer.step == 2 else metrics

        trainer.algorithm.update = update_with_nan_on_rank1
        trainer.fit()

    expected = "NonFiniteError: energy/fake became nan at step 3; the last checkpoint is kept (on rank 1 of 2)"
    assert errors(group.run(rank_fn)) == [expected, expected]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000000"
