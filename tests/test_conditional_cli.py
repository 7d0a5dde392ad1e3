"""Conditional runs at the command line and in the Python API: `rewardtune sample --label/--prompt/--prompts` (one
grid per condition, an .npz that holds each sample's condition, one subfolder per condition), `rewardtune.sample`,
and the per-condition tables of `rewardtune eval` and `rewardtune report`. Bad conditions exit 2 with one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_cli import cli
from test_conditions import conditional_tables

import rewardtune as rt
from rewardtune.api import make_recipe, run_recipe
from rewardtune.errors import RewardtuneError
from rewardtune.report import (
    condition_rows,
    markdown_tables,
    pooled_metrics,
    split_metric_key,
)
from rewardtune.sampling import condition_slug

CONTEXT_FREE = "recording_rewards:build_context_free_reward"
PROMPTS = ["left", "right", "up", "down"]


def tiny(tables: dict) -> dict:
    """`tables` with 2 denoising steps and 2 training steps (seconds on a CPU)."""
    tables["backbone"]["num_steps"] = 2
    tables["train"]["steps"] = 2
    return tables


@pytest.fixture(scope="module")
def label_run(tmp_path_factory) -> Path:
    """8 Gaussians conditioned on their 8 classes."""
    out = tmp_path_factory.mktemp("runs") / "labels"
    run_recipe(make_recipe(tiny(conditional_tables(reward=CONTEXT_FREE))), out)
    return out


@pytest.fixture(scope="module")
def prompt_run(tmp_path_factory) -> Path:
    """8 Gaussians conditioned on 4 prompts (hash text encoder), one of them held out."""
    tables = tiny(conditional_tables(reward=CONTEXT_FREE, algorithm="policy_gradient"))
    tables["conditions"] = {"kind": "prompts", "prompts": PROMPTS, "held_out": 0.25,
                            "text_encoder": {"kind": "hash", "dim": 8}}
    del tables["value"]
    tables["eval"]["num_samples"] = 60  # a multiple of the 3 training prompts (sliced Wasserstein needs equal counts)
    out = tmp_path_factory.mktemp("runs") / "prompts"
    run_recipe(make_recipe(tables), out)
    return out


@pytest.fixture(scope="module")
def image_run(tmp_path_factory) -> Path:
    """8x8 digits conditioned on their 10 classes (DDPM, flattened pixels as features)."""
    tables = {
        "data": {"kind": "digits"},
        "conditions": {"kind": "labels", "num_classes": 10},
        "backbone": {"kind": "mlp", "num_steps": 2, "hidden": 32, "depth": 2, "time_dim": 16},
        "algorithm": {"kind": "ddpm"},
        "train": {"steps": 1, "batch_size": 16, "log_every": 1, "checkpoint_every": 10},
        "eval": {"num_samples": 20, "plot": False, "feature_extractor": "faulty_plugins:build_flat_features"},
    }
    out = tmp_path_factory.mktemp("runs") / "digits"
    run_recipe(make_recipe(tables), out)
    return out


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory) -> Path:
    """An unconditional run."""
    tables = tiny(conditional_tables(reward=CONTEXT_FREE))
    del tables["conditions"]
    out = tmp_path_factory.mktemp("runs") / "plain"
    run_recipe(make_recipe(tables), out)
    return out


def one_error_line(code: int, err: str) -> str:
    """The one line a bad input prints, after checking it exits 2 without a traceback."""
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


# ---- rewardtune sample -------------------------------------------------------------------------------------------
def test_two_labels_write_two_grids(image_run: Path, tmp_path: Path, capsys):
    """-n counts per condition; each grid holds its condition's 4 images (2 x 2, each 8 px enlarged to 64)."""
    code, _, err = cli(capsys, "sample", str(image_run), "--label", "3", "--label", "5", "-n", "4",
                       "-o", str(tmp_path / "grid.png"))
    assert code == 0, err
    paths = [tmp_path / "grid_0_class_3.png", tmp_path / "grid_1_class_5.png"]
    assert err.strip().splitlines() == [
        f"wrote 4 samples of shape (1, 8, 8) for class 3 to {paths[0]}",
        f"wrote 4 samples of shape (1, 8, 8) for class 5 to {paths[1]}",
    ]
    assert not (tmp_path / "grid.png").exists()
    for path in paths:
        with Image.open(path) as grid:
            assert grid.size == (2 * 66 + 2, 2 * 66 + 2)


def test_one_label_writes_the_path_given_and_folders_hold_one_subfolder_per_condition(image_run, tmp_path, capsys):
    code, _, err = cli(capsys, "sample", str(image_run), "--label", "7", "-o", str(tmp_path / "seven.png"))
    assert code == 0, err
    assert err.strip() == f"wrote 16 samples of shape (1, 8, 8) for class 7 to {tmp_path / 'seven.png'}"  # 16 by default
    with Image.open(tmp_path / "seven.png") as grid:
        assert grid.size == (4 * 66 + 2, 4 * 66 + 2)
    code, _, err = cli(capsys, "sample", str(image_run), "--label", "1", "--label", "2", "-n", "2",
                       "-o", str(tmp_path / "pngs"))
    assert code == 0, err
    assert sorted(p.relative_to(tmp_path / "pngs").as_posix() for p in (tmp_path / "pngs").rglob("*.png")) == [
        "0_class_1/000000.png", "0_class_1/000001.png", "1_class_2/000000.png", "1_class_2/000001.png",
    ]


def test_npz_holds_the_label_of_each_sample(label_run: Path, tmp_path: Path, capsys):
    out = tmp_path / "s.npz"
    code, _, err = cli(capsys, "sample", str(label_run), "--label", "3", "--label", "5", "-n", "6", "-o", str(out))
    assert code == 0, err
    assert err.strip() == f"wrote 12 samples of shape (2,) for 2 conditions to {out}"
    saved = np.load(out)
    assert saved["samples"].shape == (12, 2)
    assert saved["labels"].tolist() == [3] * 6 + [5] * 6
    # the CLI draws what the Python API draws
    samples, condition = rt.sample(label_run, 6, labels=[3, 5])
    np.testing.assert_array_equal(saved["samples"], samples.numpy())
    assert condition.labels.tolist() == saved["labels"].tolist()


def test_without_a_condition_option_every_training_condition_is_sampled_equally(label_run, prompt_run, tmp_path, capsys):
    code, _, err = cli(capsys, "sample", str(label_run), "-o", str(tmp_path / "all.npz"))
    assert code == 0, err
    labels = np.load(tmp_path / "all.npz")["labels"]
    assert np.bincount(labels).tolist() == [100] * 8  # 100 per condition by default
    code, _, err = cli(capsys, "sample", str(prompt_run), "-n", "3", "-o", str(tmp_path / "p.npz"))
    assert code == 0, err
    prompts = np.load(tmp_path / "p.npz")["prompts"].tolist()
    train = [p for p in PROMPTS if p in prompts]
    assert len(train) == 3 and prompts == [p for p in train for _ in range(3)]  # the held-out prompt is not sampled


def test_prompts_from_options_and_a_file_including_unseen_ones(prompt_run: Path, tmp_path: Path, capsys):
    listed = tmp_path / "prompts.txt"
    listed.write_text("up\na prompt never trained on\n")
    out = tmp_path / "p.npz"
    code, _, err = cli(capsys, "sample", str(prompt_run), "--prompt", "left", "--prompts", str(listed), "-n", "2",
                       "-o", str(out))
    assert code == 0, err
    saved = np.load(out)
    assert saved["samples"].shape == (6, 2)
    assert saved["prompts"].tolist() == ["left", "left", "up", "up", "a prompt never trained on"] + [
        "a prompt never trained on"]


def test_a_prompt_file_with_an_empty_line_is_a_one_line_error(prompt_run: Path, tmp_path: Path, capsys):
    listed = tmp_path / "prompts.txt"
    listed.write_text("up\n\ndown\n")
    line = one_error_line(*cli(capsys, "sample", str(prompt_run), "--prompts", str(listed))[::2])
    assert line == f"error: --prompts: {listed} line 2 is empty"


@pytest.mark.parametrize(
    ("run", "args", "message"),
    [
        ("label_run", ["--label", "8"], "label 8 is out of range: {run} has 8 classes (0..7)"),
        ("label_run", ["--label", "-1"], "label -1 is out of range"),
        ("label_run", ["--prompt", "up"], "{run} is conditioned on class labels 0..7: sample it with --label K"),
        ("prompt_run", ["--label", "1"], "{run} is conditioned on prompts: sample it with --prompt TEXT"),
        ("prompt_run", ["--prompt", " "], "prompt 1 of the 1 given is empty"),
        ("plain_run", ["--prompt", "up"], "{run} is an unconditional run: it takes no prompts (--prompt, --prompts)"),
        ("plain_run", ["--label", "0"], "{run} is an unconditional run: it takes no class labels (--label)"),
        ("label_run", ["--label", "1", "--label", "2", "-o", "x.npy"], "cannot say which of the 2 conditions"),
    ],
)
def test_conditions_a_run_cannot_take_are_one_line_errors(run, args, message, request, tmp_path, capsys):
    run_dir = request.getfixturevalue(run)
    args = [str(tmp_path / a) if a.endswith(".npy") else a for a in args]
    line = one_error_line(*cli(capsys, "sample", str(run_dir), *args)[::2])
    assert message.format(run=run_dir) in line


def test_the_help_documents_per_condition_counts(capsys):
    code, out, _ = cli(capsys, "sample", "--help")
    assert code == 0
    flat = " ".join(out.split())
    for text in ("--label K", "--prompt TEXT", "--prompts FILE", "per condition", "every training condition"):
        assert text in flat, text


# ---- the Python API ------------------------------------------------------------------------------------------------
def test_api_sample_returns_the_condition_of_each_sample(label_run, prompt_run, plain_run):
    samples, condition = rt.sample(label_run, 5, labels=[1, 2], seed=3)
    assert samples.shape == (10, 2) and condition.labels.tolist() == [1] * 5 + [2] * 5
    again, _ = rt.sample(label_run, 5, labels=[1, 2], seed=3)
    torch.testing.assert_close(samples, again, rtol=0, atol=0)  # same seed, same samples
    samples, condition = rt.sample(prompt_run, 2, prompts=["up", "sideways"])
    assert samples.shape == (4, 2) and condition.prompts == ("up", "up", "sideways", "sideways")
    assert condition.embeddings.shape == (4, 8)  # the text encoder embedded the unseen prompt too
    samples, condition = rt.sample(plain_run, 7)
    assert samples.shape == (7, 2) and condition is None
    with pytest.raises(RewardtuneError, match="out of range"):
        rt.sample(label_run, 1, labels=[9])
    with pytest.raises(RewardtuneError, match="unconditional"):
        rt.sample(plain_run, 1, labels=[0])


def test_condition_slugs_are_safe_file_names():
    assert condition_slug("class 3") == "class_3"
    assert condition_slug("A red circle, LEFT of a blue square!") == "a_red_circle_left_of_a_blue_square"
    assert condition_slug("an extremely long prompt that keeps going and going") == "an_extremely_long_prompt_that_keeps_goin"
    assert condition_slug("¿?") == "condition"


# ---- rewardtune eval and report --------------------------------------------------------------------------------------
def test_metric_keys_split_into_pooled_and_per_condition():
    assert split_metric_key("class_accuracy") == (False, "class_accuracy", None)
    assert split_metric_key("class_accuracy/class 3") == (False, "class_accuracy", "class 3")
    assert split_metric_key("held_out/reward_mean") == (True, "reward_mean", None)
    assert split_metric_key("held_out/accuracy/position") == (True, "accuracy", "position")
    assert split_metric_key("accuracy/a red circle/blue square") == (False, "accuracy", "a red circle/blue square")


def table_rows(out: str, title: str) -> dict[str, list[str]]:
    """{first cell: other cells} of the rich table printed under `title`."""
    section = out[out.index(title):]
    rows = {}
    for line in section.splitlines()[1:]:
        if "│" not in line:
            if rows:
                break
            continue
        cells = [c.strip() for c in line.strip().strip("│┃").split("│")]
        rows[cells[0]] = cells[1:]
    return rows


def test_eval_prints_a_per_condition_table(label_run: Path, capsys):
    code, out, err = cli(capsys, "eval", str(label_run))
    assert code == 0, err
    metrics = json.loads((label_run / "eval.json").read_text())["metrics"]
    pooled, table = out[: out.index("per condition")], table_rows(out, "per condition")
    assert "class_accuracy/" not in pooled and f"class_accuracy {' ' * 14}{metrics['class_accuracy']:.4f}" in pooled
    assert list(table) == [f"class {k}" for k in range(8)]
    assert all(table[f"class {k}"] == [f"{metrics[f'class_accuracy/class {k}']:.4f}"] for k in range(8))


def test_eval_prints_held_out_conditions_in_their_own_table(capsys):
    from rewardtune.cli import print_result

    metrics = {"reward_mean": 0.5, "accuracy": 0.25, "accuracy/position": 0.5, "accuracy/colors": 0.0,
               "held_out/reward_mean": 0.4, "held_out/accuracy": 0.1, "held_out/accuracy/position": 0.2}
    print_result({"step": 3, "metrics": metrics, "initial_metrics": None}, Path("run"))
    out = capsys.readouterr().out
    assert "held_out/reward_mean" in out[: out.index("per condition")]
    assert table_rows(out, "per condition") == {"position": ["0.5000"], "colors": ["0.0000"]}
    assert table_rows(out, "held-out conditions") == {"position": ["0.2000"]}


def test_report_adds_per_condition_tables(label_run: Path, tmp_path: Path, capsys):
    for seed, shift in ((0, 0.0), (1, 0.5)):
        run = tmp_path / f"cond_s{seed}"
        shutil.copytree(label_run, run, ignore=shutil.ignore_patterns("checkpoints"))
        result = json.loads((run / "eval.json").read_text())
        result["metrics"] = {k: (shift if k.startswith("class_accuracy/") else v) for k, v in result["metrics"].items()}
        result["metrics"]["held_out/reward_mean/up"] = 1.0 + shift
        (run / "eval.json").write_text(json.dumps(result))
    code, out, err = cli(capsys, "report", str(tmp_path))
    assert code == 0, err
    pooled, per_condition = out.split("Per condition (mean ± std over seeds):")
    assert "class_accuracy/" not in pooled and "| class_accuracy (start) |" in pooled  # pooled tables: pooled metrics
    assert "| recipe | condition | seeds | class_accuracy |" in per_condition
    assert "| cond | class 3 | 2 | 0.25 ± 0.25 |" in per_condition
    held_out = per_condition.split("Held-out conditions (mean ± std over seeds):")[1]
    assert "| cond | up | 2 | 1.25 ± 0.25 |" in held_out


def test_report_of_unconditional_runs_has_no_per_condition_tables(plain_run: Path, tmp_path: Path):
    shutil.copytree(plain_run, tmp_path / "plain_s0", ignore=shutil.ignore_patterns("checkpoints"))
    runs = [{"name": "plain_s0", "group": "plain", "path": tmp_path / "plain_s0", "wall": None,
             **json.loads((plain_run / "eval.json").read_text())}]
    text = markdown_tables(runs)
    assert "Per condition" not in text and "Held-out" not in text
    assert len(text.splitlines()) == 7  # the run table, a blank line and the recipe table, as before
    assert pooled_metrics(runs[0]["metrics"]) == runs[0]["metrics"]
    assert condition_rows(runs[0]["metrics"], held_out=False) == ([], {})


def test_eval_with_another_cfg_scale_writes_its_own_file(label_run, capsys):
    code, _, err = cli(capsys, "eval", str(label_run), "--cfg-scale", "1.5")
    assert code == 0, err
    assert (label_run / "eval_cfg1.5.json").is_file()


def test_cfg_scale_on_an_unconditional_run_is_a_one_line_error(plain_run, capsys):
    code, _, err = cli(capsys, "eval", str(plain_run), "--cfg-scale", "2")
    assert code == 2 and "cfg_scale" in err and len(err.strip().splitlines()) == 1, err
