"""The `rewardtune` command line: run, eval, sample, plugins.

Every user error is a `RewardtuneError`: one line on stderr and exit code 2 (`--debug` shows the traceback).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, ClassVar

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Fine-tune few-step diffusion samplers for rewards (DxDP / DxMI).")
err_console = Console(stderr=True)
state = {"debug": False}


@app.callback()
def main_options(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
) -> None:
    state["debug"] = debug or os.environ.get("REWARDTUNE_DEBUG") == "1"


class RichReporter:
    """A rich progress bar with live metrics (main process only)."""

    SHOWN: ClassVar[dict[str, str]] = {
        "energy/real": "E(data)", "energy/fake": "E(samples)", "value/td_loss": "td", "policy/loss": "policy",
        "ddpm/loss": "loss", "distill/mse": "mse",
    }

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.progress = None
        self.task = None

    def start(self, total: int, done: int, description: str) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        if self.enabled and total > done:  # one bar per training stage (pretraining, then fine-tuning)
            self.progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TimeRemainingColumn(), TextColumn("{task.fields[metrics]}"), console=err_console,
            )
            self.progress.start()
            self.task = self.progress.add_task(description, total=total, completed=done, metrics="")

    def advance(self, step: int, metrics: dict[str, float]) -> None:
        if self.task is not None and (step % 10 == 0):
            shown = " ".join(f"{self.SHOWN[k]}={metrics[k]:.3g}" for k in self.SHOWN if k in metrics)
            self.progress.update(self.task, completed=step, metrics=shown)

    def message(self, text: str) -> None:
        if self.enabled:
            err_console.print(text)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress, self.task = None, None


OutOption = Annotated[Path | None, typer.Option("--out", help="Run directory (default: runs/<run.name>).")]
StepsOption = Annotated[int | None, typer.Option("--steps", help="Override train.steps.")]
SeedOption = Annotated[int | None, typer.Option("--seed", help="Override train.seed.")]
SetOption = Annotated[list[str] | None, typer.Option("--set", help="Override a recipe key: table.key=value.")]
ResumeOption = Annotated[bool, typer.Option("--resume", help="Continue from the run directory's latest checkpoint.")]
ForceOption = Annotated[bool, typer.Option("--force", help="Allow a run directory holding another recipe.")]


def recipe_overrides(set_: list[str] | None, steps: int | None, seed: int | None) -> list[str]:
    overrides = list(set_ or [])
    if steps is not None:
        overrides.append(f"train.steps={steps}")
    if seed is not None:
        overrides.append(f"train.seed={seed}")
    return overrides


@app.command()
def run(
    recipe: Annotated[Path, typer.Argument(help="The recipe (.toml).")],
    out: OutOption = None,
    steps: StepsOption = None,
    seed: SeedOption = None,
    set_: SetOption = None,
    resume: ResumeOption = False,
    force: ForceOption = False,
) -> None:
    """Train a recipe and write eval.json, metrics.jsonl, plots and checkpoints to the run directory."""
    run_with_overrides(recipe, out, recipe_overrides(set_, steps, seed), resume=resume, force=force)


@app.command()
def distill(
    recipe: Annotated[Path, typer.Argument(help="A distillation recipe (.toml with a [distill] table).")],
    teacher: Annotated[Path | None, typer.Option("--teacher", help="The tuned T-step run to distil (overrides distill.teacher).")] = None,
    out: OutOption = None,
    steps: StepsOption = None,
    seed: SeedOption = None,
    set_: SetOption = None,
    resume: ResumeOption = False,
    force: ForceOption = False,
) -> None:
    """Distil a tuned sampler into a one-step student (`rewardtune run` on a [distill] recipe, with --teacher)."""
    from rewardtune.errors import RecipeError
    from rewardtune.recipe import load_recipe

    overrides = recipe_overrides(set_, steps, seed)
    if teacher is not None:
        overrides.append(f"distill.teacher={str(teacher.resolve())!r}")
    if load_recipe(recipe, overrides).distill is None:
        raise RecipeError(f"{recipe} has no [distill] table (naming the teacher); see docs/distillation.md")
    run_with_overrides(recipe, out, overrides, resume=resume, force=force)


def run_with_overrides(recipe: Path, out: Path | None, overrides: list[str], *, resume: bool, force: bool) -> None:
    from rewardtune.api import make_accelerator, run_recipe
    from rewardtune.recipe import load_recipe

    parsed = load_recipe(recipe, overrides)
    out_dir = out or Path("runs") / parsed.run.name
    accelerator = make_accelerator()
    reporter = RichReporter(enabled=accelerator.is_main_process)
    try:
        result = run_recipe(parsed, out_dir, resume=resume, force=force, reporter=reporter, accelerator=accelerator)
        accelerator.wait_for_everyone()
    finally:  # a process group left to the interpreter's exit can abort ("terminate called without an active exception")
        accelerator.end_training()
    if accelerator.is_main_process:
        print_result(result, out_dir)


@app.command("eval")
def eval_(
    run_dir: Annotated[Path, typer.Argument(help="A run directory.")],
    best: Annotated[bool, typer.Option("--best", help="Evaluate checkpoints/best (written to eval_best.json).")] = False,
    step: Annotated[int | None, typer.Option("--step", help="Evaluate the kept checkpoint of this step (eval_stepN.json).", min=0)] = None,
    raw: Annotated[bool, typer.Option("--raw", help="Evaluate the trained weights, not their EMA (adds _raw to the file name).")] = False,
) -> None:
    """Evaluate a run's latest checkpoint and rewrite its eval.json (or evaluate another checkpoint, or the raw
    weights, into a file of its own)."""
    from rewardtune import checkpoint as ckpt
    from rewardtune.api import load_run
    from rewardtune.errors import RecipeError, RewardtuneError

    if best and step is not None:
        raise RecipeError("--best and --step name different checkpoints; give one")
    trainer = load_run(run_dir, best=best, step=step)
    suffix = ("_best" if best else "") + (f"_step{step}" if step is not None else "") + ("_raw" if raw else "")
    try:
        metrics = trainer.evaluate(plot_name=f"samples{suffix}.png", raw=raw)
        result = {"step": trainer.step, "metrics": metrics, "initial_metrics": trainer.initial_metrics}
        if suffix:
            ckpt.write_json_atomic(run_dir / f"eval{suffix}.json", result)
        else:
            trainer.write_eval(metrics)
    except OSError as err:  # a read-only or full run directory
        raise RewardtuneError(f"cannot write the evaluation into {run_dir}: {err.strerror or err}") from None
    print_result(result, run_dir)


@app.command()
def sample(
    run_dir: Annotated[Path, typer.Argument(help="A run directory.")],
    n: Annotated[int, typer.Option("-n", help="Number of samples.", min=1)] = 1000,
    output: Annotated[Path, typer.Option("-o", "--output", help="A .npz/.npy file, a .png grid (images), or a folder for one PNG per image.")] = Path("samples.npz"),
    seed: Annotated[int, typer.Option("--seed", help="Sampling seed.")] = 0,
    guidance: Annotated[float, typer.Option("--guidance", help="Value guidance scale lambda (0: none).")] = 0.0,
    best: Annotated[bool, typer.Option("--best", help="Use checkpoints/best instead of the latest checkpoint.")] = False,
) -> None:
    """Draw samples from a run's latest (or best) checkpoint."""
    import torch

    from rewardtune.api import load_run
    from rewardtune.errors import RewardtuneError
    from rewardtune.sampling import write_samples

    trainer = load_run(run_dir, best=best)
    backbone = trainer.evaluated_backbone()
    guide = trainer.algorithm.guide(guidance) if guidance else None
    gen = torch.Generator(device=backbone.device).manual_seed(seed)
    samples = trainer.evaluator.draw(backbone, n, gen, guide)
    try:
        written = write_samples(samples, output)
    except OSError as err:
        raise RewardtuneError(f"cannot write {output}: {err.strerror or err}") from None
    err_console.print(f"wrote {n} samples of shape {tuple(samples.shape[1:])} to {written}")


@app.command()
def plugins() -> None:
    """List the backbones, values, rewards, data and algorithms (built-in and installed)."""
    from rich.table import Table

    from rewardtune.registry import REGISTRIES

    table = Table("kind", "name", "source")
    for kind, registry in REGISTRIES.items():
        for name in registry.names():
            table.add_row(kind, name, registry.source(name))
    Console().print(table)


@app.command()
def report(
    root: Annotated[Path, typer.Argument(help="A folder of run directories (runs named <recipe>_s<seed> are grouped).")],
    curves: Annotated[Path | None, typer.Option("--curves", help="Also plot each metric against time to this PNG.")] = None,
) -> None:
    """Print markdown tables of a folder of runs (per run, and mean ± std over seeds)."""
    from rewardtune.errors import RewardtuneError
    from rewardtune.report import load_runs, markdown_tables, plot_curves

    if not root.is_dir():
        raise RewardtuneError(f"{root} is not a folder")
    runs = load_runs(root)
    if not runs:
        raise RewardtuneError(f"no runs with an eval.json under {root}")
    print(markdown_tables(runs))
    if curves is not None:
        try:
            plot_curves(runs, curves)
        except OSError as err:
            raise RewardtuneError(f"cannot write {curves}: {err.strerror or err}") from None
        err_console.print(f"curves: {curves}")


def print_result(result: dict, out_dir: Path) -> None:
    console = Console()
    console.print(f"[bold]{out_dir}[/bold] step {result['step']}")
    initial = result.get("initial_metrics") or {}
    for key, value in result["metrics"].items():
        start = f"  (start {initial[key]:.4f})" if key in initial else ""
        console.print(f"  {key:28s} {value:.4f}{start}")


def main() -> None:
    from rewardtune.errors import Interrupted, RewardtuneError

    try:
        app(standalone_mode=False)
    except Interrupted as err:
        err_console.print(str(err), markup=False, highlight=False, soft_wrap=True)
        sys.exit(err.exit_code)
    except RewardtuneError as err:
        if state["debug"]:
            raise
        err_console.print(f"error: {err}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted", markup=False)
        sys.exit(130)
    except Exception as err:  # click's usage errors are handled below; anything else is a bug
        import click

        if isinstance(err, click.exceptions.ClickException):
            err.show()
            sys.exit(err.exit_code)
        if isinstance(err, click.exceptions.Abort):
            sys.exit(130)
        if state["debug"]:
            raise
        err_console.print(f"internal error: {type(err).__name__}: {err} (rerun as `rewardtune --debug ...` for the traceback)", markup=False, soft_wrap=True)
        sys.exit(1)
