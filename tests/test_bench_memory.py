"""`rewardtune bench --over-steps` (bench_memory.py): the saved-tensor meter on hand-counted graphs, DxDP's policy
step flat in T against BPTT's growth, the BPTT objective (DxDP's at T = 1, gradients through every step), and the
command line's rows and bad input. Tiny 8 Gaussians networks; no timing thresholds (the machine may be loaded)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import run_cli

from rewardtune import bench_memory
from rewardtune.bench_memory import (
    SavedTensorMeter,
    bptt_loss,
    memory_over_steps,
    prepare_trainer,
    storage_of,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny_8gaussians.toml"
# A narrow value keeps the terminal evaluation, which BPTT and DxDP both pay once, small beside the chain's steps.
SMALL_VALUE = ["value.hidden=8"]


@pytest.fixture(scope="module")
def rows() -> dict[tuple[int, str], dict]:
    result = memory_over_steps(TINY, SMALL_VALUE, [2, 8], bptt=True, repeats=1, warmup=1)
    return {(row["T"], row["method"]): row for row in result["rows"]}


def test_the_meter_counts_a_storage_saved_three_times_once_and_releases_it_after_backward():
    x = torch.randn(1000, requires_grad=True)
    with SavedTensorMeter() as meter:
        y = x.exp()  # saves its result y
        loss = (y * y).sum()  # saves y twice more
    assert meter.peak_bytes == meter.live_bytes == 1000 * 4  # one float32 storage
    loss.backward()
    assert meter.live_bytes == 0 and meter.peak_bytes == 4000


def test_the_meter_leaves_resident_storages_out():
    x = torch.randn(1000, requires_grad=True)
    with SavedTensorMeter(frozenset([storage_of(x)[0]])) as meter:
        x.pow(2).sum()  # saves x, which is in memory anyway
    assert meter.peak_bytes == 0


def test_a_dxdp_step_saves_the_same_bytes_at_t_2_and_t_8(rows):
    short, long = rows[2, "dxdp"], rows[8, "dxdp"]
    assert short["policy_batch"] == long["policy_batch"] == 32  # tiny_8gaussians' batch: policy_batch is unset
    # Only the [T] vector sigma_t grows with T (24 bytes from T = 2 to 8 today); 1 KiB is the tolerance.
    assert abs(long["saved_bytes"] - short["saved_bytes"]) <= 1024
    assert abs(long["iteration_saved_bytes"] - short["iteration_saved_bytes"]) <= 1024
    assert short["saved_bytes"] > 0 and short["cuda_peak_bytes"] is None and short["ms"] > 0


def test_the_8_gaussians_recipes_dxdp_step_is_flat_from_t_5_to_t_40():
    """Issue #19's bar at the recipe's own sizes (policy batch 640): within 1.2x and within 1 MiB."""
    result = memory_over_steps(ROOT / "recipes" / "dxmi_8gaussians.toml", [], [5, 40], repeats=1, warmup=1)
    short, long = (row["saved_bytes"] for row in result["rows"])
    assert long <= 1.2 * short and abs(long - short) <= 2**20


def test_a_bptt_step_saves_about_t_times_more(rows):
    # Activations of T transitions plus one terminal value: 3.6x from T = 2 to 8 with these sizes (4x at most).
    assert rows[8, "bptt"]["saved_bytes"] >= 3 * rows[2, "bptt"]["saved_bytes"]
    assert rows[2, "bptt"]["saved_bytes"] > rows[2, "dxdp"]["saved_bytes"]
    assert rows[2, "bptt"]["iteration_saved_bytes"] is None


def test_the_bptt_objective_is_dxdps_policy_objective_at_one_step():
    trainer = prepare_trainer(TINY, SMALL_VALUE, 1, warmup=1)
    algorithm = trainer.algorithm
    x0 = torch.randn(16, 2, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    expected = algorithm.policy_loss(x0, torch.zeros(16, dtype=torch.long), noise)
    # Same float32 operations in the same order: equal to round-off.
    torch.testing.assert_close(bptt_loss(algorithm, x0, torch.Generator().manual_seed(2)), expected,
                               rtol=1e-6, atol=1e-6)


def test_the_bptt_gradient_reaches_the_sampler_and_the_first_state():
    trainer = prepare_trainer(TINY, SMALL_VALUE, 4, warmup=1)
    backbone = trainer.backbone
    x0 = torch.randn(16, 2, generator=torch.Generator().manual_seed(1), requires_grad=True)
    parameters = [*backbone.network_parameters(), *backbone.sigma_parameters()]
    loss = bptt_loss(trainer.algorithm, x0, torch.Generator().manual_seed(2))
    *grads, grad_x0 = torch.autograd.grad(loss, [*parameters, x0])
    assert all(torch.isfinite(g).all() for g in grads)
    assert torch.stack([g.norm() for g in grads]).sum() > 0
    assert torch.isfinite(grad_x0).all() and grad_x0.norm() > 0  # back through all four transitions


def test_the_rss_delta_of_a_step_is_a_byte_count():
    delta = bench_memory.rss_delta(TINY, SMALL_VALUE, 2, "bptt", 0)
    assert delta is None or delta >= 0  # None where /proc/self/clear_refs or glibc are missing


def test_bench_over_steps_prints_a_table_and_writes_the_rows(tmp_path, capsys):
    out = tmp_path / "memory.json"
    code, stdout, err = run_cli(capsys, "bench", TINY, "--over-steps", "2,3", "--bptt", "--steps", "1",
                                "--warmup", "0", "--json", out)
    assert code == 0, err
    result = json.loads(out.read_text())
    assert [(row["T"], row["method"]) for row in result["rows"]] == [(2, "dxdp"), (2, "bptt"), (3, "dxdp"), (3, "bptt")]
    assert {"T", "method", "policy_batch", "saved_bytes", "peak_rss_delta", "cuda_peak_bytes", "ms"} <= set(
        result["rows"][0])
    for name in ("DxDP", "iteration", "BPTT", "DxDP ms", "BPTT ms"):
        assert name in stdout


@pytest.mark.parametrize("steps", ["5,x", "0,5", "2.5", "", "5,,10"])
def test_bench_over_steps_refuses_a_bad_t_in_one_line(capsys, steps):
    code, _, err = run_cli(capsys, "bench", TINY, "--over-steps", steps)
    assert code == 2
    assert err == f"error: --over-steps: expected comma-separated integers T >= 1 such as 5,10,20,40, got {steps!r}\n"


@pytest.mark.parametrize(("flags", "message"), [
    (["--bptt"], "--bptt needs --over-steps (e.g. --over-steps 5,10,20,40)"),
    (["--over-steps", "2", "--samples", "10"], "--samples is an option of the iteration benchmark; --over-steps takes none"),
    (["--over-steps", "2", "--trained-weights"],
     "--trained-weights is an option of the iteration benchmark; --over-steps takes none"),
])
def test_bench_refuses_options_of_the_other_mode(capsys, flags, message):
    code, _, err = run_cli(capsys, "bench", TINY, *flags)
    assert code == 2 and err == f"error: {message}\n"


def test_over_steps_needs_a_dxdp_recipe(capsys):
    recipe = ROOT / "recipes" / "pg_8gaussians.toml"
    code, _, err = run_cli(capsys, "bench", recipe, "--over-steps", "2")
    assert code == 2
    assert err == f"error: {recipe}: --over-steps measures DxDP's policy step; this recipe's algorithm is 'policy_gradient'\n"
