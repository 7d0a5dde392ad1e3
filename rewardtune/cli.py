"""The `rewardtune` command line: run, distill, eval, sample, export, score (anomaly scores of an image folder),
bench (a recipe's iteration time by phase), plugins, report.

Exit codes: 0 done (also `--help`, `--version`); 1 an internal error (a bug: `--debug` shows the traceback); 2 bad
input: a `RewardtuneError` (one `error: ...` line on stderr) or a usage error of the command line itself (a `Usage:`
line, then one `error: ...` line); 130/143 stopped by SIGINT/SIGTERM.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from typer.core import TyperCommand

from rewardtune.progress import RichReporter, err_console


class Command(TyperCommand):
    """A command whose usage line names required arguments by their metavar, `RECIPE`, as click does (typer 0.2x
    writes `{RECIPE}`, which reads as a choice)."""

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = super().collect_usage_pieces(ctx)
        return [p[1:-1] if p.startswith("{") and p.endswith("}") else p for p in pieces]


# Plain help (rich_markup_mode=None): rich markup would swallow recipe tables such as `[distill]` in help texts.
app = typer.Typer(
    add_completion=False, no_args_is_help=True, rich_markup_mode=None,
    help="Fine-tune few-step diffusion samplers for rewards (DxDP / DxMI).",
)
state = {"debug": False}


def show_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"rewardtune {version('rewardtune')}")
        raise typer.Exit()


@app.callback()
def main_options(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", help="Print the version and exit.", callback=show_version, is_eager=True)
    ] = False,
) -> None:
    state["debug"] = debug or os.environ.get("REWARDTUNE_DEBUG") == "1"


RecipeArgument = Annotated[Path, typer.Argument(help="The recipe (.toml).", metavar="RECIPE", show_default=False)]
RunDirArgument = Annotated[Path, typer.Argument(help="A run directory.", metavar="RUN_DIR", show_default=False)]
OutOption = Annotated[
    Path | None, typer.Option("--out", help="Run directory (default: runs/<run.name>).", metavar="RUN_DIR")
]
StepsOption = Annotated[int | None, typer.Option("--steps", help="Override train.steps.", metavar="N")]
SeedOption = Annotated[int | None, typer.Option("--seed", help="Override train.seed.", metavar="N")]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a recipe key (repeatable), e.g. --set train.lr_schedule=cosine.", metavar="TABLE.KEY=VALUE"),
]
ResumeOption = Annotated[bool, typer.Option("--resume", help="Continue from the run directory's latest checkpoint.")]
ForceOption = Annotated[bool, typer.Option("--force", help="Allow a run directory holding another recipe.")]


def recipe_overrides(set_: list[str] | None, steps: int | None, seed: int | None) -> list[str]:
    overrides = list(set_ or [])
    if steps is not None:
        overrides.append(f"train.steps={steps}")
    if seed is not None:
        overrides.append(f"train.seed={seed}")
    return overrides


@app.command(cls=Command)
def run(
    recipe: RecipeArgument,
    out: OutOption = None,
    steps: StepsOption = None,
    seed: SeedOption = None,
    set_: SetOption = None,
    resume: ResumeOption = False,
    force: ForceOption = False,
) -> None:
    """Train a recipe and write eval.json, metrics.jsonl, plots and checkpoints to the run directory."""
    run_with_overrides(recipe, out, recipe_overrides(set_, steps, seed), resume=resume, force=force)


@app.command(cls=Command)
def distill(
    recipe: Annotated[
        Path, typer.Argument(help="A distillation recipe (.toml with a [distill] table).", metavar="RECIPE", show_default=False)
    ],
    teacher: Annotated[
        Path | None,
        typer.Option("--teacher", help="The tuned T-step run to distil (overrides distill.teacher).", metavar="RUN_DIR"),
    ] = None,
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
    if load_recipe(recipe, overrides).distill is None:  # a teacher that no plugin uses is refused by the recipe itself
        raise RecipeError(f"{recipe} has no [distill] table naming the teacher, and no --teacher; see docs/distillation.md")
    run_with_overrides(recipe, out, overrides, resume=resume, force=force)


def run_with_overrides(recipe: Path, out: Path | None, overrides: list[str], *, resume: bool, force: bool) -> None:
    from rewardtune.api import make_accelerator, run_recipe
    from rewardtune.recipe import load_recipe

    parsed = load_recipe(recipe, overrides)
    out_dir = out or Path("runs") / parsed.run.name
    accelerator = make_accelerator()
    if accelerator.is_main_process:
        for note in run_option_notes(parsed, out_dir, resume=resume, force=force):
            print_error(f"note: {note}")
    reporter = RichReporter(enabled=accelerator.is_main_process)
    try:
        result = run_recipe(parsed, out_dir, resume=resume, force=force, reporter=reporter, accelerator=accelerator)
        accelerator.wait_for_everyone()
    finally:  # a process group left to the interpreter's exit can abort ("terminate called without an active exception")
        accelerator.end_training()
    if accelerator.is_main_process:
        print_result(result, out_dir)


def run_option_notes(recipe, out_dir: Path, *, resume: bool, force: bool) -> list[str]:
    """What `--resume` and `--force` will not do in `out_dir` (said, so that a flag is never silently ignored)."""
    from rewardtune import checkpoint as ckpt
    from rewardtune.api import check_out_dir
    from rewardtune.errors import RecipeError

    notes = []
    if resume and ckpt.latest_checkpoint(out_dir / "checkpoints") is None:
        notes.append(f"--resume: {out_dir} holds no checkpoint yet; starting fresh")
    if force:
        try:  # what the run does first anyway: it creates out_dir, or refuses a run directory that needs --force
            check_out_dir(out_dir, recipe, resume=resume, force=False)
            notes.append(f"--force: {out_dir} holds no other run, so there is nothing to force")
        except RecipeError:
            pass
    return notes


@app.command("eval", cls=Command)
def eval_(
    run_dir: RunDirArgument,
    best: Annotated[bool, typer.Option("--best", help="Evaluate checkpoints/best (written to eval_best.json).")] = False,
    step: Annotated[
        int | None,
        typer.Option("--step", help="Evaluate the kept checkpoint of this step (eval_stepN.json).", min=0, metavar="N"),
    ] = None,
    raw: Annotated[bool, typer.Option("--raw", help="Evaluate the trained weights, not their EMA (adds _raw to the file name).")] = False,
    cfg_scale: Annotated[
        float | None,
        typer.Option("--cfg-scale", help="Sample with this classifier-free guidance scale (conditional runs; adds _cfgW to the file name).", metavar="W"),
    ] = None,
) -> None:
    """Evaluate a run's latest checkpoint and rewrite its eval.json (or evaluate another checkpoint, the raw weights
    or another CFG scale, into a file of its own)."""
    from rewardtune import checkpoint as ckpt
    from rewardtune.api import load_run, set_cfg_scale
    from rewardtune.errors import RecipeError, RewardtuneError

    if best and step is not None:
        raise RecipeError("--best and --step name different checkpoints; give one")
    trainer = load_run(run_dir, best=best, step=step)
    if cfg_scale is not None:
        set_cfg_scale(trainer, cfg_scale)
    if raw and trainer.ema is None:
        print_error(
            f"note: --raw: {run_dir} keeps no EMA (train.ema_decay = 0), so its trained weights are the ones evaluated "
            "either way"
        )
    suffix = ("_best" if best else "") + (f"_step{step}" if step is not None else "") + ("_raw" if raw else "")
    suffix += f"_cfg{cfg_scale:g}" if cfg_scale is not None else ""
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


@app.command(cls=Command)
def sample(
    run_dir: RunDirArgument,
    n: Annotated[
        int | None,
        typer.Option(
            "-n",
            help="Number of samples [default: 64 for a .png grid, else 1000]; for a conditional run, per condition "
            "[default: 16 for .png grids, else 100].",
            min=1, metavar="N", show_default=False,
        ),
    ] = None,
    output: Annotated[
        Path,
        typer.Option(
            "-o", "--output",
            help="A .npz/.npy file, a .png grid (images), or a folder for one PNG per image. For a conditional run: "
            "one .png grid per condition (<stem>_<i>_<slug>.png when there are several), one subfolder per "
            "condition, or one .npz that also holds each sample's condition (labels or prompts).",
            metavar="PATH",
        ),
    ] = Path("samples.npz"),
    seed: Annotated[int, typer.Option("--seed", help="Sampling seed.", metavar="N")] = 0,
    guidance: Annotated[
        float, typer.Option("--guidance", help="Value guidance scale lambda (0: none; needs a value function).", metavar="SCALE")
    ] = 0.0,
    best: Annotated[bool, typer.Option("--best", help="Use checkpoints/best instead of the latest checkpoint.")] = False,
    cfg_scale: Annotated[
        float | None,
        typer.Option("--cfg-scale", help="Sample with this classifier-free guidance scale (conditional runs).", metavar="W"),
    ] = None,
    label: Annotated[
        list[int] | None,
        typer.Option(
            "--label", help="Sample class label K, 0 to the number of classes - 1 (repeatable; label-conditioned runs).",
            metavar="K",
        ),
    ] = None,
    prompt: Annotated[
        list[str] | None,
        typer.Option("--prompt", help="Sample this prompt (repeatable; prompt-conditioned runs; unseen prompts too).", metavar="TEXT"),
    ] = None,
    prompts_file: Annotated[
        Path | None,
        typer.Option("--prompts", help="Sample the prompts of this file, one per line (with --prompt: both).", metavar="FILE"),
    ] = None,
    rejection: Annotated[
        str | None,
        typer.Option("--rejection", help="Keep samples by rejection on the run's density-ratio estimate: drs or "
                     "budgeted (a discriminator_guidance run; unconditional).", metavar="RULE"),
    ] = None,
    budget: Annotated[
        float, typer.Option("--budget", help="--rejection budgeted: proposals per kept sample on average (K >= 1).",
                            metavar="K")
    ] = 2.0,
) -> None:
    """Draw samples from a run's latest (or best) checkpoint.

    A conditional run is sampled under the class labels (--label) or prompts (--prompt, --prompts) given, -n samples
    each; with none of these options, every training condition of the run equally. --rejection keeps -n samples of
    many by the run's density-ratio estimate (a discriminator_guidance run): drs, or budgeted with --budget K.
    """
    from rewardtune import api
    from rewardtune.errors import RewardtuneError
    from rewardtune.sampling import (
        default_sample_count,
        read_prompt_lines,
        write_conditional_samples,
        write_samples,
    )

    prompts = list(prompt or [])
    if prompts_file is not None:
        prompts += read_prompt_lines(prompts_file, "--prompts: ")
    if n is None:
        n = default_sample_count(output, conditional=api.is_conditional_run(run_dir))
    samples, condition = api.sample(
        run_dir, n, labels=label or None, prompts=prompts or None, seed=seed, best=best, guidance=guidance,
        cfg_scale=cfg_scale, rejection=rejection, budget=budget,
    )
    shape = tuple(samples.shape[1:])
    try:
        if condition is None:
            written = [(write_samples(samples, output), "", samples.shape[0])]
        else:
            written = write_conditional_samples(samples, condition, output)
    except OSError as err:
        raise RewardtuneError(f"cannot write {output}: {err.strerror or err}") from None
    for path, what, count in written:
        print_error(f"wrote {count} samples of shape {shape}" + (f" for {what}" if what else "") + f" to {path}")


@app.command(cls=Command)
def export(
    run_dir: RunDirArgument,
    to: Annotated[Path, typer.Option("--to", help="The folder to write (created; must be empty unless --force).", metavar="DIR")],
    best: Annotated[bool, typer.Option("--best", help="Export checkpoints/best instead of the latest checkpoint.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty --to folder.")] = False,
) -> None:
    """Write a run's tuned sampler as a diffusers pipeline folder (sd and unconditional ddpm runs).

    `DiffusionPipeline.from_pretrained(DIR)` loads it (LoRA adapters merged into the UNet; a LoRA run also writes
    DIR/lora in diffusers' LoRA format), and DIR/rewardtune_sampler.json holds the few-step sampler (its schedule,
    learned noise levels and CFG scale), which `rewardtune.export.sample_exported` runs.
    """
    from rewardtune.api import load_run
    from rewardtune.export import export_backbone

    trainer = load_run(run_dir, best=best)
    written = export_backbone(trainer.evaluated_backbone(), to, force=force,
                              mixed_precision=trainer.config.mixed_precision)
    print_error(f"exported {run_dir} to {to}: " + ", ".join(p.name for p in written))


@app.command(cls=Command)
def score(
    run_dir: RunDirArgument,
    input_folder: Annotated[
        Path,
        typer.Argument(
            help="The images to score (PNG, JPEG, BMP, TIFF; subfolders too). In MVTec's test layout (good/ plus one "
            "folder per defect type) the images are labelled and the AUROCs computed.",
            metavar="INPUT_FOLDER", show_default=False,
        ),
    ],
    out: Annotated[
        Path,
        typer.Option("-o", "--out", help="The folder to write scores.csv, overlays/ and auroc.json to (created).",
                     metavar="OUT", show_default=False),
    ],
    masks: Annotated[
        Path | None,
        typer.Option("--masks", help="Defect masks in MVTec's ground_truth layout (<defect>/<stem>_mask.png), for the "
                     "pixel AUROC.", metavar="FOLDER"),
    ] = None,
    best: Annotated[bool, typer.Option("--best", help="Use checkpoints/best instead of the latest checkpoint.")] = False,
) -> None:
    """Score a folder of images for anomalies with a trained energy (DxMI section 5.3).

    An image's score is the highest energy of its feature map; its overlay shows the energy map upsampled to the
    image. Writes scores.csv, overlays/*.png and, for a labelled folder, auroc.json (image AUROC; pixel AUROC with
    --masks).
    """
    from rewardtune.anomaly import scoring
    from rewardtune.errors import RewardtuneError

    scoring.check_paths(input_folder, out, masks)  # before the (slow) model load
    model = scoring.load_model_for(run_dir, best=best)
    try:
        summary = scoring.score_folder(model, input_folder, out, masks_dir=masks)
    except OSError as err:  # a read-only or full output folder
        raise RewardtuneError(f"cannot write into {out}: {err.strerror or err}") from None
    print_anomaly_summary(summary)


@app.command(cls=Command)
def bench(
    recipe: RecipeArgument,
    steps: Annotated[
        int | None,
        typer.Option("--steps", help="Timed training iterations [default: 50]; with --over-steps, timed calls per "
                     "measurement [default: 3].", min=1, metavar="N", show_default=False),
    ] = None,
    warmup: Annotated[
        int | None,
        typer.Option("--warmup", help="Untimed iterations before them [default: 5; with --over-steps, at each T: 1].",
                     min=0, metavar="N", show_default=False),
    ] = None,
    samples: Annotated[
        int | None,
        typer.Option("--samples", help="Samples drawn to time the sampler (0: none) [default: 1000].", min=0,
                     metavar="N", show_default=False),
    ] = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Also write the result to this JSON file.", metavar="PATH")
    ] = None,
    profile: Annotated[
        Path | None,
        typer.Option("--profile", help="Also run a few iterations under torch's profiler and write its Chrome trace "
                     "here.", metavar="PATH"),
    ] = None,
    over_steps: Annotated[
        str | None,
        typer.Option("--over-steps", help="Instead, measure the memory of DxDP's policy step and iteration at each of "
                     "these numbers of sampling steps, e.g. 5,10,20,40 (a DxDP recipe; the policy batch fixed).",
                     metavar="T,T,..."),
    ] = None,
    bptt: Annotated[
        bool, typer.Option("--bptt", help="With --over-steps: also the same policy objective optimised by "
                           "back-propagation through time.")
    ] = False,
    rss: Annotated[
        bool, typer.Option("--rss", help="With --over-steps on a CPU: also each step's rise of the peak RSS, in a "
                           "fresh process per T and method (seconds each).")
    ] = False,
    trained_weights: Annotated[
        bool, typer.Option("--trained-weights", help="Time the weights backbone.init_from names (a finished run's "
                           "folder) instead of random ones: for rewards whose cost depends on the images.")
    ] = False,
    set_: SetOption = None,
) -> None:
    """Time a recipe's training iteration by phase (rollout, reward update, value update, policy step, the rest), its
    sampler's samples per second and the peak memory; one process, no run directory (docs/results.md, Throughput).
    With --over-steps: the memory of DxDP's policy step at each T instead, with --bptt beside BPTT's."""
    from rewardtune.errors import RewardtuneError

    for path, option in ((json_path, "--json"), (profile, "--profile")):
        if path is not None and not path.parent.is_dir():  # before the benchmark, not after it
            raise RewardtuneError(f"{option}: the folder {path.parent} does not exist")
    overrides = list(set_ or [])
    if over_steps is not None:
        for option, given in (("--samples", samples is not None), ("--profile", profile is not None),
                              ("--trained-weights", trained_weights)):
            if given:
                raise RewardtuneError(f"{option} is an option of the iteration benchmark; --over-steps takes none")
        bench_over_steps(recipe, overrides, parse_step_list(over_steps), bptt=bptt, rss=rss,
                         repeats=3 if steps is None else steps, warmup=1 if warmup is None else warmup,
                         json_path=json_path)
        return
    for option, given in (("--bptt", bptt), ("--rss", rss)):
        if given:
            raise RewardtuneError(f"{option} needs --over-steps (e.g. --over-steps 5,10,20,40)")
    bench_iterations(recipe, overrides, steps=50 if steps is None else steps, warmup=5 if warmup is None else warmup,
                     samples=1000 if samples is None else samples, profile=profile, json_path=json_path,
                     trained_weights=trained_weights)


def bench_iterations(recipe: Path, overrides: list[str], *, steps: int, warmup: int, samples: int,
                     profile: Path | None, json_path: Path | None, trained_weights: bool = False) -> None:
    """`rewardtune bench` without --over-steps: the iteration by phase, samples/s, peak memory."""
    from rich.table import Table

    from rewardtune.bench import benchmark, print_rows
    from rewardtune.recipe import load_recipe

    result = benchmark(load_recipe(recipe, overrides), steps=steps, warmup=warmup, samples=samples, profile=profile,
                       trained_weights=trained_weights)
    title = (f"{recipe}: T = {result['num_steps']}, batch {result['batch_size']}, {result['device']}, "
             f"{result['threads']} thread(s); {steps} iterations after {warmup}"
             + ("; the weights of backbone.init_from" if trained_weights else "; random weights"))
    table = Table("per iteration", "", title=title, title_justify="left")
    for name, value in print_rows(result):
        table.add_row(name, value)
    Console().print(table)
    write_bench_json(json_path, result)
    if profile is not None:
        print_error(f"profiler trace: {profile}")


def bench_over_steps(recipe: Path, overrides: list[str], num_steps: list[int], *, bptt: bool, rss: bool,
                     repeats: int, warmup: int, json_path: Path | None) -> None:
    """`rewardtune bench --over-steps`: the memory of DxDP's policy step (and BPTT's) at each T."""
    from rich.table import Table

    from rewardtune.bench_memory import memory_over_steps, table_rows

    result = memory_over_steps(recipe, overrides, num_steps, bptt=bptt, repeats=repeats, warmup=warmup, rss=rss)
    if rss and result["device"].startswith("cuda"):
        print_error("note: --rss: on a GPU the allocator's peak is measured instead of the RSS")
    policy_batch = result["rows"][0]["policy_batch"]
    title = (f"{recipe}: policy batch {policy_batch}, batch {result['batch_size']}, {result['device']}, "
             f"{result['threads']} thread(s). MiB saved for backward (RSS, GPU: the peak's rise) per step of DxDP, "
             f"its iteration and BPTT; ms: the median of {repeats}")
    header, rows = table_rows(result)
    table = Table(*header, title=title, title_justify="left")
    for row in rows:
        table.add_row(*row)
    Console().print(table)
    write_bench_json(json_path, result)


def parse_step_list(text: str) -> list[int]:
    """--over-steps: "5,10,20,40" -> [5, 10, 20, 40]; a RewardtuneError unless every item is an integer >= 1."""
    from rewardtune.errors import RewardtuneError

    try:
        values = [int(item) for item in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise RewardtuneError(f"--over-steps: expected comma-separated integers T >= 1 such as 5,10,20,40, got {text!r}")
    return values


def write_bench_json(json_path: Path | None, result: dict) -> None:
    """Write a benchmark's `result` to `json_path` (nothing when None)."""
    from rewardtune import checkpoint as ckpt
    from rewardtune.errors import RewardtuneError

    if json_path is None:
        return
    try:
        ckpt.write_json_atomic(json_path, result)
    except OSError as err:
        raise RewardtuneError(f"cannot write {json_path}: {err.strerror or err}") from None
    print_error(f"wrote {json_path}")


@app.command(cls=Command)
def plugins() -> None:
    """List the backbones, values, rewards, data, algorithms and priors (built-in and installed)."""
    from rich.table import Table

    from rewardtune.registry import REGISTRIES

    table = Table("kind", "name", "source")
    for kind, registry in REGISTRIES.items():
        for name in registry.names():
            table.add_row(kind, name, registry.source(name))
    Console().print(table)


@app.command(cls=Command)
def report(
    root: Annotated[
        Path,
        typer.Argument(help="A folder of run directories (runs named <recipe>_s<seed> are grouped).", metavar="FOLDER", show_default=False),
    ],
    curves: Annotated[
        Path | None, typer.Option("--curves", help="Also plot each metric against time to this PNG.", metavar="PNG")
    ] = None,
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
            plotted = plot_curves(runs, curves)
        except OSError as err:
            raise RewardtuneError(f"cannot write {curves}: {err.strerror or err}") from None
        if not plotted:
            raise RewardtuneError(f"--curves: no run under {root} has a metrics.jsonl with timed records to plot")
        print_error(f"curves: {curves}")


def print_result(result: dict, out_dir: Path) -> None:
    """The pooled metrics (with their starting values), then, for a conditional run, a table of the per-condition
    metrics ("<metric>/<condition>" keys) and one of the held-out conditions' ("held_out/<metric>/<condition>")."""
    from rewardtune.report import condition_rows, pooled_metrics

    console = Console()
    console.print(f"[bold]{out_dir}[/bold] step {result['step']}")
    initial = result.get("initial_metrics") or {}
    for key, value in pooled_metrics(result["metrics"]).items():
        start = f"  (start {initial[key]:.4f})" if key in initial else ""
        console.print(f"  {key:28s} {value:.4f}{start}")
    for held_out, title in ((False, "per condition"), (True, "held-out conditions")):
        names, rows = condition_rows(result["metrics"], held_out=held_out)
        if rows:
            console.print(condition_table(title, names, rows))


def print_anomaly_summary(summary: dict) -> None:
    """`rewardtune score`'s result: a table of the AUROCs on stdout; notes and the files written on stderr."""
    from rich.table import Table

    title = f"{summary['images']} images" + (f", {summary['anomalous']} anomalous" if "anomalous" in summary else "")
    table = Table("metric", "value", title=title, title_justify="left")
    for key, name in (("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC")):
        if key in summary:
            table.add_row(name, f"{summary[key]:.4f}")
    if table.rows:
        Console().print(table)
    for note in summary["notes"]:
        print_error(f"note: {note}")
    for what, path in summary["files"].items():
        print_error(f"{what}: {path}")


def condition_table(title: str, names: list[str], rows: dict[str, dict[str, float]]):
    """A rich Table: one row per condition, one column per metric ("-" where a condition lacks it)."""
    from rich.table import Table
    from rich.text import Text

    table = Table("condition", *names, title=title, title_justify="left")
    for condition, values in rows.items():  # Text: a prompt is shown as written, never read as markup
        table.add_row(Text(condition), *(f"{values[m]:.4f}" if m in values else "-" for m in names))
    return table


def print_error(text: str) -> None:
    """One line on stderr, as written (no markup, no wrapping): errors, notes and what a command wrote."""
    err_console.print(text, markup=False, highlight=False, soft_wrap=True)


def click_errors() -> tuple[type[Exception], type[Exception]]:
    """(ClickException, Abort) of the click that typer runs on: its own copy in typer >= 0.2x, click before."""
    click_exception = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
    return click_exception, typer.Abort


def print_usage_error(err) -> int:
    """A usage error of the command line (bad value, missing argument, unknown option or command, ...): the usage
    line, then one `error: ...` line pointing at --help. Returns the exit code (2)."""
    ctx = getattr(err, "ctx", None)
    if type(err).__name__ == "NoArgsIsHelpError":  # `rewardtune` alone: the message is the help
        err_console.print(err.format_message(), markup=False, highlight=False)
        return err.exit_code
    hint = ""
    if ctx is not None:
        print_error(ctx.get_usage())
        hint = f" (see `{ctx.command_path} --help`)"
    print_error(f"error: {err.format_message()}{hint}")
    return err.exit_code


def main() -> None:
    """The console script: `app` without click's standalone mode, so that every failure goes through one handler.

    Click then returns (not exits with) the code of `--help`, `--version` and Ctrl-C outside training, and raises
    its usage errors, which are printed as click would and exit 2.
    """
    from rewardtune.errors import Interrupted, RewardtuneError

    click_exception, click_abort = click_errors()
    try:
        code = app(standalone_mode=False, prog_name="rewardtune")  # also under `python -m rewardtune`
    except Interrupted as err:
        print_error(str(err))
        sys.exit(err.exit_code)
    except RewardtuneError as err:
        if state["debug"]:
            raise
        print_error(f"error: {err}")
        sys.exit(2)
    except KeyboardInterrupt:
        code = 130
    except click_exception as err:
        sys.exit(print_usage_error(err))
    except click_abort as err:  # click turns Ctrl-C into Abort (click < 8.2) or an exit code of 130 (returned above)
        code = 130 if isinstance(err.__context__, KeyboardInterrupt) else 1
        if code == 1:
            print_error("aborted")
    except Exception as err:  # anything else is a bug
        if state["debug"]:
            raise
        print_error(f"internal error: {type(err).__name__}: {err} (rerun as `rewardtune --debug ...` for the traceback)")
        sys.exit(1)
    if code == 130:
        print_error("interrupted")
    sys.exit(code if isinstance(code, int) else 0)
