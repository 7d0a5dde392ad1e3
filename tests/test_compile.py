"""`train.compile = true` (compiling.py): the networks are compiled in place (same parameter names and checkpoints,
the same numbers through dynamo's graphs), and a compiler that fails turns compilation off with a one-line note
while training goes on. The tests trace with dynamo's "eager" backend (inductor's code generation takes minutes on
this CPU; its speed is a GPU matter, docs/results.md)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import rewardtune as rt
from rewardtune import compiling
from rewardtune.trainer import SilentReporter

ROOT = Path(__file__).resolve().parents[1]


class Notes(SilentReporter):
    def __init__(self) -> None:
        self.lines: list[str] = []

    def message(self, text: str) -> None:
        self.lines.append(text)


def trained(*overrides: str, reporter=None, steps: int = 3):
    torch.manual_seed(0)
    trainer = rt.build_trainer(rt.load_recipe(ROOT / "recipes" / "tiny_8gaussians.toml", list(overrides)),
                               reporter=reporter)
    trainer.algorithm.iteration = 10**9  # past the value warm-up: the policy step runs too
    metrics = []
    for _ in range(steps):
        metrics.append(trainer.train_step())
        trainer.step += 1
    return trainer, metrics


@pytest.fixture
def eager_backend(monkeypatch):
    monkeypatch.setattr(compiling, "BACKEND", "eager")
    yield
    torch._dynamo.reset()


@pytest.fixture
def failing_backend(monkeypatch):
    """A backend that fails as inductor does without a C++ compiler."""

    def failing(graph, example_inputs):
        raise RuntimeError("no C++ compiler here")

    torch._dynamo.reset()
    monkeypatch.setattr(compiling, "BACKEND", failing)
    yield
    torch._dynamo.reset()


def test_compiled_networks_train_as_the_uncompiled_ones_with_the_same_checkpoints(eager_backend):
    compiled, compiled_metrics = trained("train.compile=true")
    plain, plain_metrics = trained()
    assert {type(m).__name__ for m in compiled.compiled} == {"TimeMLP", "ValueAtTime"} and not plain.compiled
    assert all(m._compiled_call_impl is not None for m in compiled.compiled)  # really compiled
    for name, module in compiled.modules().items():
        reference = plain.modules()[name].state_dict()
        state = module.state_dict()
        assert list(state) == list(reference)  # no "_orig_mod." prefixes: checkpoints are interchangeable
        for key in state:
            torch.testing.assert_close(state[key], reference[key], rtol=1e-5, atol=1e-6)
    for got, want in zip(compiled_metrics, plain_metrics, strict=True):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_a_compiler_that_fails_falls_back_to_eager_with_one_note(failing_backend):
    notes = Notes()
    trainer, metrics = trained("train.compile=true", reporter=notes)
    assert trainer.compiled == [] and len(metrics) == 3 and all(math.isfinite(v) for v in metrics[-1].values())
    compile_notes = [line for line in notes.lines if "train.compile" in line]
    assert len(compile_notes) == 1 and "\n" not in compile_notes[0] and "no C++ compiler here" in compile_notes[0]
    assert compile_notes[0].endswith("training goes on uncompiled")


def test_a_compiler_that_fails_in_the_first_evaluation_falls_back_there(failing_backend):
    notes = Notes()
    trainer = rt.build_trainer(rt.load_recipe(ROOT / "recipes" / "tiny_8gaussians.toml", ["train.compile=true",
                                                                                         "train.ema_decay=0"]),
                               reporter=notes)
    metrics = trainer.evaluate()  # samples the compiled backbone itself (no EMA copy)
    assert trainer.compiled == [] and all(math.isfinite(v) for v in metrics.values())
    assert sum("train.compile" in line for line in notes.lines) == 1


def test_an_error_of_the_networks_own_is_not_taken_for_a_compile_failure():
    def failing(graph, example_inputs):
        raise RuntimeError("x")

    torch._dynamo.reset()
    with pytest.raises(Exception) as raised:
        torch.compile(torch.nn.Linear(2, 2), backend=failing)(torch.zeros(1, 2))
    torch._dynamo.reset()
    assert compiling.is_compile_failure(raised.value) and compiling.failure_line(raised.value) == "RuntimeError: x"
    assert not compiling.is_compile_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not compiling.is_compile_failure(ValueError("a plugin's own error"))


def test_the_ema_copy_is_left_uncompiled(eager_backend):
    trainer, _ = trained("train.compile=true", "train.ema_decay=0.9", steps=1)
    ema_children = {id(m) for m in trainer.ema.module.children()}
    assert not ema_children & {id(m) for m in trainer.compiled}
