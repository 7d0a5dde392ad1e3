"""Side-by-side speed (and, with --quality, sample quality) of rewardtune's DxMI iteration and the official DxMI update
code (swyoon/Diffusion-by-MaxEntIRL) on the same 2D problem (issue #19, item 4).

Setup (once; the official code needs numpy < 2, so it runs in its own virtualenv, which this script makes):

    git clone https://github.com/swyoon/Diffusion-by-MaxEntIRL scratch/official_dxmi
    python scripts/bench_official.py --official scratch/official_dxmi

The virtualenv (--venv, default scratch/official_venv) is created with --system-site-packages (torch, torchvision
and rewardtune come from this Python) and gets `numpy<2`. The official repository ships no 2D code: the glue here
builds, at the sizes of the recipe (default recipes/dxmi_8gaussians.toml), its `VARSampler` (FastDPM's VAR schedule,
T steps, learned sigma) around the same time-conditioned MLP rewardtune's `mlp` backbone uses, with 2D points as
[B, 2, 1, 1] "images" (the sampler is image-only), and a time-dependent value V(x, t) (rewardtune's `time_mlp`
network) that is also the energy, V(x, T) = E(x). Per iteration it does what `train_cifar10.train_one_epoch` does
(n_critic = n_generator = 1): `sampler.sample(B)`, `append_buffer` into a fresh `reset_buffer`,
`DxMI_Trainer.update_f_v(data, d_sample, buffer)` (AVR, the energy step, T TD steps), then
`DxMI_Trainer.update_sampler(buffer, 1)`. Data are rewardtune's generator's (`rewardtune.data.toy`) on both sides.

Worker A (official) and worker B (rewardtune: `make_trainer(build_experiment(recipe))`, `train_step`, past the value
warm-up, as `rewardtune bench` times it) each run in a fresh process with `--threads` intra-op threads, `--warmup`
untimed then `--steps` timed iterations, alternately A, B, A, B (`--alternations` pairs): on a noisy machine only the
ratios of neighbouring runs mean much. Reported: each side's median ms/iteration, the B/A ratio of every pair and
its median. `--set table.key=value` overrides the recipe (both sides read its sizes and settings); the recipe takes
every policy step on `algorithm.policy_batch` transitions (640 = B*T in dxmi_8gaussians) where the official
`update_sampler` takes B (128): `--set algorithm.policy_batch=128` is the equal-work comparison.

`--quality SECONDS`: each side instead trains for SECONDS of training time (from the same initial weights: random,
or `--init RUN_DIR`, a pretrained rewardtune DDPM run), stopping its clock every `--eval-every` seconds to draw
10,000 samples and score fixed data and uniform noise with its energy; this process then computes the sliced
Wasserstein distance to fresh data and the energy AUC with rewardtune's own metrics (`metrics.sliced_wasserstein`,
`metrics.auc`) for both: the iterations (and seconds) to SW < --sw-target and SW/AUC at equal training time.
rewardtune runs its recipe as it is there (value warm-up, EMA weights evaluated).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RECIPE = REPO / "recipes" / "dxmi_8gaussians.toml"
OFFICIAL_TRAINER = Path("models") / "DxMI" / "trainer.py"
READY_MARKER = ".bench_official_ready"
TOY_DATA = {"8gaussians": "EightGaussians", "25gaussians": "TwentyFiveGaussians", "pinwheel": "Pinwheel"}


class BenchError(Exception):
    """An expected failure: printed as one line, exit status 1."""


# ---- the official side's settings, read from the recipe -------------------------------------------------------------
def official_settings(recipe) -> dict:
    """The official `VARSampler` / `DxMI_Trainer` / optimiser settings that mirror `recipe` (a parsed rewardtune
    recipe); a recipe the official 2D glue cannot mirror is a BenchError naming the key."""
    r = recipe.resolved
    backbone, value, reward, alg = r["backbone"], r["value"], r["reward"], r["algorithm"]
    need = [
        ("data.kind", r["data"]["kind"] in TOY_DATA, f"one of {sorted(TOY_DATA)}"),
        ("backbone.kind", backbone["kind"] == "mlp", "'mlp'"),
        ("backbone.schedule", backbone.get("schedule") == "fastdpm", "'fastdpm' (the official VARSampler)"),
        ("backbone.prediction", backbone.get("prediction") == "epsilon", "'epsilon'"),
        ("value.kind", value["kind"] == "time_mlp" and value.get("time_dependent", True), "a time-dependent 'time_mlp'"),
        ("reward.kind", reward["kind"] == "energy" and reward.get("share_with_value"), "an energy shared with the value"),
        ("algorithm.kind", alg["kind"] == "dxdp", "'dxdp'"),
        ("algorithm.td_mode", alg.get("td_mode") == "sequential", "'sequential'"),
        ("algorithm.kl_weight", alg.get("kl_weight", 0.0) == 0.0, "0"),
        ("algorithm.terminal", alg.get("terminal", "value") == "value", "'value'"),
    ]
    for key, ok, expected in need:
        if not ok:
            raise BenchError(f"{key}: the official 2D glue needs {expected}")
    dim = 2  # every toy data set here is 2D
    scale = 1.0 if alg["per_dimension"] else float(dim)  # the official code averages its costs over dimensions
    learn, fix_last = backbone["learn_sigma"], backbone["fix_last_sigma"]
    time_cost = alg.get("time_cost", "none")
    return {
        "data": r["data"]["kind"],
        "num_steps": backbone["num_steps"],  # T
        "batch_size": r["train"]["batch_size"],  # B
        "hidden": backbone["hidden"], "depth": backbone["depth"], "time_dim": backbone["time_dim"],
        "value_hidden": value["hidden"], "value_depth": value["depth"], "value_time_dim": value["time_dim"],
        "trainable_beta": ("fix_last" if fix_last else True) if learn else False,
        "tau1": alg["tau_entropy"] * scale,
        "tau2": alg["tau_velocity"] * scale,
        "gamma": reward.get("gamma"),
        "adavelreg": alg["avr_alpha"] if alg["avr"] else None,
        "use_sampler_beta": True,  # AVR starts from the VAR schedule's eta, as the official configs do
        "entropy_in_value": 0 if alg["entropy_in_value"] else None,  # 0: on every step (Algorithm 1)
        "velocity_in_value": 0 if alg["velocity_in_value"] else None,
        "time_cost": alg["linear_time_cost"] if time_cost == "linear" else None,
        "time_cost_sig": alg["sigmoid_time_cost_scale"] if time_cost == "sigmoid" else None,
        "lr": alg["sampler_lr"], "beta_lr": alg["sigma_lr"], "v_lr": value["lr"],  # train_cifar10.py's Adam groups
        "n_generator": 1,  # one sampler step of B transitions per iteration
    }


def work_notes(recipe, official: dict, *, quality: bool) -> list[str]:
    """What differs between the two iterations' work, for the report."""
    alg, train = recipe.resolved["algorithm"], recipe.resolved["train"]
    batch, steps = official["batch_size"], official["num_steps"]
    policy = alg.get("policy_batch") or batch
    notes = [
        (f"policy step: official {batch} transitions (update_sampler, n_generator = 1), rewardtune {policy}"
         f" (algorithm.policy_batch){'; same' if policy == batch else '; NOT the same work'}"),
        ("official clips the sampler gradient norm at 0.1 every step"
         f"; rewardtune: algorithm.sampler_grad_clip = {alg.get('sampler_grad_clip')}"),
        "official Adam: torch.optim.Adam defaults (train_cifar10.py); rewardtune: torch's fused Adam (optim.GradStep)",
        (f"rewardtune also updates an EMA of the sampler (train.ema_decay = {train['ema_decay']}) and its lr schedule"
         f" ({train['lr_schedule']}); official: neither"),
        f"both: one energy step on {batch} data + {batch} samples, {steps} sequential TD steps of {batch} states, AVR",
        ("official extras: a T*B state buffer concatenated per iteration (state, next_state, mean, sigma, logp,"
         f" control), about {2 * steps + 8} .item() reads; rewardtune reads its metrics in one copy"),
    ]
    if quality:
        notes.append("--quality: ms/iteration = training seconds / iterations; rewardtune's include its value warm-up's"
                     " iterations (no policy step)")
    elif alg.get("value_warmup"):
        notes.append(f"rewardtune's value warm-up ({alg['value_warmup']} iterations) is skipped in the speed runs"
                     " (every timed iteration is a full one); --quality keeps it")
    return notes


# ---- the virtualenv -------------------------------------------------------------------------------------------------
def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def ensure_venv(venv: Path) -> Path:
    """The virtualenv's python, with `numpy<2` installed into it once (marked by READY_MARKER)."""
    python = venv_python(venv)
    if (venv / READY_MARKER).is_file() and python.is_file():
        return python
    print(f"setting up {venv} (--system-site-packages, numpy<2) ...", file=sys.stderr)
    if not python.is_file():
        run_checked([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], f"could not create {venv}")
    run_checked([str(python), "-m", "pip", "install", "--quiet", "numpy<2"], f"could not install numpy<2 into {venv}")
    probe = "import numpy, torch, torchvision; assert int(numpy.__version__.split('.')[0]) < 2; print(numpy.__version__)"
    version = run_checked([str(python), "-c", probe],
                          f"{venv} cannot import numpy<2, torch and torchvision (the official code imports all three)")
    (venv / READY_MARKER).write_text(version)
    return python


def run_checked(command: list[str], what: str) -> str:
    done = subprocess.run(command, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        raise BenchError(f"{what}: {lines[-1] if lines else f'exit status {done.returncode}'}")
    return done.stdout.strip()


# ---- workers --------------------------------------------------------------------------------------------------------
def run_worker(side: str, python: Path, spec: dict, work: Path, index: int) -> dict:
    """Run one worker process (`side` "official" or "rewardtune") on `spec`; returns its JSON result."""
    spec_path, out_path = work / f"{side}_{index}.spec.json", work / f"{side}_{index}.json"
    spec = {**spec, "snapshots": str(work / f"{side}_{index}.pt")}
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "PYTHONPATH": str(REPO)}
    command = [str(python), str(Path(__file__).resolve()), "--worker", side, "--spec", str(spec_path), "--out",
               str(out_path)]
    done = subprocess.run(command, check=False, capture_output=True, text=True, env=env, cwd=REPO)
    if done.returncode != 0 or not out_path.is_file():
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        raise BenchError(f"the {side} worker failed (exit status {done.returncode}); its output is above")
    return json.loads(out_path.read_text())


def timed_loop(iteration, *, warmup: int, steps: int) -> dict:
    """`warmup` untimed then `steps` timed calls of `iteration()`: ms per iteration (block mean, per-call median)."""
    for _ in range(warmup):
        iteration()
    times = []
    start = time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        iteration()
        times.append(time.perf_counter() - t0)
    total = time.perf_counter() - start
    return {"ms_per_iteration": 1000 * total / steps, "ms_median_call": 1000 * statistics.median(times)}


def trained_for(iteration, snapshot, *, seconds: float, eval_every: float) -> list[dict]:
    """Run `iteration()` for `seconds` of its own time, calling `snapshot()` (untimed) at 0, every `eval_every`
    seconds and at the end; returns the snapshots, each with its iteration count and training seconds."""
    snaps, clock, count, next_eval = [], 0.0, 0, 0.0
    while clock < seconds:
        if clock >= next_eval:
            snaps.append({**snapshot(), "iteration": count, "seconds": clock})
            next_eval += eval_every
        t0 = time.perf_counter()
        iteration()
        clock += time.perf_counter() - t0
        count += 1
    snaps.append({**snapshot(), "iteration": count, "seconds": clock})
    return snaps


def toy_data(kind: str):
    from rewardtune.data import toy

    return getattr(toy, TOY_DATA[kind])()


def official_networks(o: dict, table: int):
    """The official side's networks, rewardtune's `TimeMLP`s at the recipe's sizes: the sampler's eps(x, k) on points
    stored as [B, 2, 1, 1] images (the VARSampler is image-only), and the value V(x, t) -> [N, 1], also the energy
    V(x, T); `table` > 0 gives the value rewardtune's time table (integer times)."""
    from torch import nn

    from rewardtune.nets.mlp import TimeMLP

    class EpsNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = TimeMLP(2, 2, hidden=o["hidden"], depth=o["depth"], time_dim=o["time_dim"])

        def forward(self, x, k):
            return self.mlp(x, k).view_as(x)

    class Value(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = TimeMLP(2, 1, hidden=o["value_hidden"], depth=o["value_depth"], time_dim=o["value_time_dim"],
                               time_table=table)

        def forward(self, x, t, y=None):
            return self.mlp(x, t if table else t.float())

    return EpsNet(), Value()


def official_worker(spec: dict) -> dict:
    """Worker A: the official DxMI iteration (runs in the numpy<2 virtualenv)."""
    import torch

    sys.path.insert(0, spec["official"])
    from models.DxMI.trainer import DxMI_Trainer, append_buffer, reset_buffer
    from models.DxMI.var_sampler import VARSampler

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    o = spec["official_settings"]
    T, B = o["num_steps"], o["batch_size"]
    net, value = official_networks(o, 0 if spec["plain_official_nets"] else T + 1)
    load_initial(spec, net.mlp, value.mlp)
    sampler = VARSampler(net, T, (2, 1, 1), trainable_beta=o["trainable_beta"])  # sets net.log_betas
    rest = [p for name, p in net.named_parameters() if "log_betas" not in name]
    optimizer = torch.optim.Adam([{"params": net.log_betas, "lr": o["beta_lr"]}, {"params": rest, "lr": o["lr"]}])
    optimizer_v = torch.optim.Adam(value.parameters(), lr=o["v_lr"])
    trainer = DxMI_Trainer(
        B, tau1=o["tau1"], tau2=o["tau2"], gamma=o["gamma"], adavelreg=o["adavelreg"], n_timesteps=T,
        entropy_in_value=o["entropy_in_value"], velocity_in_value=o["velocity_in_value"],
        use_sampler_beta=o["use_sampler_beta"], time_cost=o["time_cost"], time_cost_sig=o["time_cost_sig"],
    )
    trainer.set_models(f=None, v=value, sampler=sampler, optimizer=optimizer, optimizer_fstar=None,
                       optimizer_v=optimizer_v)
    data, gen = toy_data(o["data"]), torch.Generator().manual_seed(spec["seed"])

    def iteration():  # train_cifar10.train_one_epoch's body, n_critic = n_generator = 1
        sampler.eval()
        images = data.sample(B, gen).view(B, 2, 1, 1)
        d_sample = sampler.sample(B, device="cpu")
        buffer = append_buffer(reset_buffer("cpu"), d_sample)
        trainer.update_f_v(images, d_sample, buffer)
        trainer.update_sampler(buffer, o["n_generator"])

    def snapshot():
        points = torch.load(spec["eval_points"], weights_only=True)
        with torch.no_grad():
            samples = sampler.sample(spec["eval_samples"], device="cpu")["sample"].view(-1, 2)
            energy = {k: value(x.view(-1, 2, 1, 1), torch.full((len(x),), T, dtype=torch.long)).view(-1)
                      for k, x in points.items()}
        return {"samples": samples, "energy_data": energy["data"], "energy_noise": energy["noise"]}

    schedule = {"timesteps": sampler.continuous_steps.tolist(), "sigma": net.log_betas.detach().exp().tolist()}
    return run_side(spec, iteration, snapshot, schedule)


def rewardtune_worker(spec: dict) -> dict:
    """Worker B: rewardtune's iteration, built as `rewardtune bench` builds it."""
    import torch

    from rewardtune.api import make_accelerator, make_trainer
    from rewardtune.bench import step, without_init_from
    from rewardtune.build import build_experiment
    from rewardtune.evaluation import draw_samples
    from rewardtune.recipe import load_recipe

    recipe = load_recipe(spec["recipe"], spec["overrides"] + [f"train.cpu_threads={spec['threads']}"])
    experiment = build_experiment(without_init_from(recipe))
    load_initial(spec, experiment.backbone.eps_net, experiment.value.net)
    trainer = make_trainer(experiment, None, None, make_accelerator())
    torch.set_num_threads(spec["threads"])
    if not spec["quality"]:
        trainer.algorithm.iteration = 10**9  # past the value warm-up: every timed iteration is a full one
    gen = torch.Generator().manual_seed(spec["seed"])

    def snapshot():
        points = torch.load(spec["eval_points"], weights_only=True)
        with torch.no_grad():
            samples = draw_samples(trainer.evaluated_backbone(), spec["eval_samples"], gen, None, spec["eval_samples"])
            energy = {k: trainer.reward.cost(x).view(-1) for k, x in points.items()}
        return {"samples": samples, "energy_data": energy["data"], "energy_noise": energy["noise"]}

    backbone = trainer.backbone
    schedule = {"timesteps": backbone.timesteps.tolist(), "sigma": backbone.sigma().detach().tolist()}
    return run_side(spec, lambda: step(trainer), snapshot, schedule)


def load_initial(spec: dict, eps_net, value_net) -> None:
    """The shared initial weights of --quality (both sides start from the same networks)."""
    if spec.get("initial"):
        import torch

        state = torch.load(spec["initial"], weights_only=True)
        eps_net.load_state_dict(state["eps_net"])
        value_net.load_state_dict(state["value_net"])


def run_side(spec: dict, iteration, snapshot, schedule: dict) -> dict:
    import torch

    result = {"threads": torch.get_num_threads(), "torch": torch.__version__, "schedule": schedule}
    if spec["quality"]:
        snaps = trained_for(iteration, snapshot, seconds=spec["quality"], eval_every=spec["eval_every"])
        torch.save(snaps, spec["snapshots"])
        last = snaps[-1]
        result.update(iterations=last["iteration"], seconds=last["seconds"],
                      ms_per_iteration=1000 * last["seconds"] / max(last["iteration"], 1))
    else:
        result.update(timed_loop(iteration, warmup=spec["warmup"], steps=spec["steps"]))
    import numpy

    result["numpy"] = numpy.__version__
    return result


# ---- the parent ------------------------------------------------------------------------------------------------------
def prepare_quality(args, recipe, work: Path) -> dict:
    """--quality: the evaluation points (data and uniform noise for the energy AUC) and the initial weights both
    sides load."""
    import torch

    from rewardtune.bench import without_init_from
    from rewardtune.build import build_experiment
    from rewardtune.metrics.auc import uniform_box

    gen = torch.Generator().manual_seed(args.seed + 1000)
    data = toy_data(recipe.resolved["data"]["kind"])
    points = {"data": data.sample(args.eval_samples, gen), "noise": uniform_box(args.eval_samples, 2, 4.1, gen)}
    torch.save(points, work / "eval_points.pt")
    if args.init is not None:
        from rewardtune.recipe import load_recipe

        recipe = load_recipe(args.recipe, args.overrides + [f"backbone.init_from={json.dumps(str(args.init))}"])
    else:
        recipe = without_init_from(recipe)
    torch.manual_seed(args.seed)
    experiment = build_experiment(recipe)
    torch.save({"eps_net": experiment.backbone.eps_net.state_dict(), "value_net": experiment.value.net.state_dict()},
               work / "initial.pt")
    return {"eval_points": str(work / "eval_points.pt"), "initial": str(work / "initial.pt")}


def quality_metrics(snapshot_file: str, *, seed: int, sw_target: float, data) -> dict:
    """SW to fresh data (the same fresh data for both sides at each evaluation) and energy AUC of every snapshot."""
    import torch

    from rewardtune.metrics.auc import energy_auc
    from rewardtune.metrics.sliced_wasserstein import sliced_wasserstein

    curve = []
    for j, snap in enumerate(torch.load(snapshot_file, weights_only=True)):
        gen = torch.Generator().manual_seed(seed + 7919 * (j + 1))
        fresh = data.sample(len(snap["samples"]), gen)
        sw = sliced_wasserstein(snap["samples"], fresh, num_projections=1000, generator=gen)
        auc = energy_auc(snap["energy_data"], snap["energy_noise"])
        curve.append({"iteration": snap["iteration"], "seconds": round(snap["seconds"], 2), "sw": sw, "auc": auc})
    hit = next((c for c in curve if c["sw"] < sw_target), None)
    return {"curve": curve, "final_sw": curve[-1]["sw"], "final_auc": curve[-1]["auc"],
            "iterations_to_target": None if hit is None else hit["iteration"],
            "seconds_to_target": None if hit is None else hit["seconds"]}


def median_of(values: list) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarise(runs: list[dict], args) -> dict:
    """Per-side medians, per-pair ratios B/A and their median."""
    sides = {side: [run[side] for run in runs] for side in ("official", "rewardtune")}
    ms = {side: [r["ms_per_iteration"] for r in results] for side, results in sides.items()}
    ratios = [b / a for a, b in zip(ms["official"], ms["rewardtune"])]
    summary = {
        "ms_per_iteration": ms,
        "median_ms_per_iteration": {side: statistics.median(v) for side, v in ms.items()},
        "ratio_rewardtune_over_official": ratios,
        "median_ratio": statistics.median(ratios),
    }
    if args.quality:
        for key in ("final_sw", "final_auc", "iterations_to_target", "seconds_to_target"):
            summary[f"median_{key}"] = {side: median_of([r["quality"][key] for r in results])
                                        for side, results in sides.items()}
    return summary


def schedule_check(first: dict) -> str:
    """Whether both sides run the same T-step schedule (DDPM timesteps and initial sigma_t)."""
    a, b = first["official"]["schedule"], first["rewardtune"]["schedule"]
    diff = {key: max(abs(x - y) for x, y in zip(a[key], b[key])) for key in ("timesteps", "sigma")}
    return (f"official vs rewardtune: max |difference| {diff['timesteps']:.2g} in the DDPM timesteps k_t,"
            f" {diff['sigma']:.2g} in the initial sigma_t")


def fmt(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def print_report(report: dict) -> None:
    s = report["summary"]
    print(f"recipe {report['recipe']} {' '.join(report['overrides'])}".rstrip())
    print(f"threads {report['threads']}, {report['alternations']} alternations (official, rewardtune, ...)")
    for side in ("official", "rewardtune"):
        print(f"{side:>10}: ms/iteration {fmt(s['ms_per_iteration'][side])}; median "
              f"{s['median_ms_per_iteration'][side]:.2f}")
    print(f"     ratio rewardtune/official per pair: {fmt(s['ratio_rewardtune_over_official'])}; "
          f"median {s['median_ratio']:.3f}")
    if report["quality"]:
        for key in ("final_sw", "final_auc", "iterations_to_target", "seconds_to_target"):
            print(f"{key:>20}: " + ", ".join(f"{side} {v}" for side, v in s[f"median_{key}"].items()))
    print(f"schedule: {report['schedule_check']}")
    for note in report["work_notes"]:
        print(f"  - {note}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--official", type=Path, help="a checkout of swyoon/Diffusion-by-MaxEntIRL")
    p.add_argument("--venv", type=Path, default=REPO / "scratch" / "official_venv", help="its virtualenv (made once)")
    p.add_argument("--recipe", type=Path, default=DEFAULT_RECIPE)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="TABLE.KEY=VALUE",
                   help="recipe override (both sides read the recipe)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads of every worker")
    p.add_argument("--warmup", type=int, default=20, help="untimed iterations per run")
    p.add_argument("--steps", type=int, default=200, help="timed iterations per run")
    p.add_argument("--alternations", type=int, default=5, help="(official, rewardtune) pairs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plain-official-nets", action="store_true",
                   help="the official side's value computes its time embedding per call (no time table)")
    p.add_argument("--quality", type=float, default=0.0, metavar="SECONDS", help="train SECONDS per run instead")
    p.add_argument("--eval-every", type=float, default=15.0, metavar="SECONDS", help="--quality: evaluation period")
    p.add_argument("--eval-samples", type=int, default=10000, help="--quality: samples per evaluation")
    p.add_argument("--sw-target", type=float, default=0.10, help="--quality: the SW to reach")
    p.add_argument("--init", type=Path, help="--quality: a pretrained rewardtune run both sides start from")
    p.add_argument("--json", type=Path, help="write the report here")
    p.add_argument("--worker", choices=("official", "rewardtune"), help=argparse.SUPPRESS)
    p.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is None:
        checks = [(args.official is not None, "--official PATH is required (a checkout of the official repository)"),
                  (args.threads >= 1 and args.steps >= 1 and args.warmup >= 0 and args.alternations >= 1,
                   "--threads, --steps and --alternations must be >= 1 and --warmup >= 0"),
                  (args.quality >= 0 and args.eval_every > 0, "--quality must be >= 0 and --eval-every > 0")]
        for ok, message in checks:
            if not ok:
                p.error(message)
    return args


def bench(args) -> dict:
    from rewardtune.recipe import load_recipe

    official = args.official.resolve()
    if not (official / OFFICIAL_TRAINER).is_file():
        raise BenchError(f"--official {args.official}: no {OFFICIAL_TRAINER} there (git clone "
                         "https://github.com/swyoon/Diffusion-by-MaxEntIRL)")
    recipe = load_recipe(args.recipe, args.overrides)
    settings = official_settings(recipe)
    python = ensure_venv(args.venv.resolve())
    spec = {"official": str(official), "recipe": str(args.recipe.resolve()), "overrides": args.overrides,
            "threads": args.threads, "warmup": args.warmup, "steps": args.steps, "seed": args.seed,
            "quality": args.quality, "eval_every": args.eval_every, "eval_samples": args.eval_samples,
            "plain_official_nets": args.plain_official_nets, "official_settings": settings}
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench_official_") as tmp:
        work = Path(tmp)
        if args.quality:
            spec.update(prepare_quality(args, recipe, work))
        for i in range(args.alternations):
            run = {}
            for side, exe in (("official", python), ("rewardtune", Path(sys.executable))):
                run[side] = run_worker(side, exe, {**spec, "seed": args.seed + i}, work, i)
                if args.quality:
                    run[side]["quality"] = quality_metrics(str(work / f"{side}_{i}.pt"), seed=args.seed + i,
                                                           sw_target=args.sw_target, data=toy_data(settings["data"]))
                print(f"[{i + 1}/{args.alternations}] {side}: {run[side]['ms_per_iteration']:.2f} ms/iteration",
                      file=sys.stderr)
            runs.append(run)
    return {"recipe": str(args.recipe), "overrides": args.overrides, "threads": args.threads,
            "alternations": args.alternations, "warmup": args.warmup, "steps": args.steps, "quality": args.quality,
            "machine": f"{platform.machine()} {platform.processor()}, {os.cpu_count()} CPUs",
            "official_settings": settings, "work_notes": work_notes(recipe, settings, quality=bool(args.quality)),
            "schedule_check": schedule_check(runs[0]), "runs": runs, "summary": summarise(runs, args)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        spec = json.loads(args.spec.read_text())
        result = (official_worker if args.worker == "official" else rewardtune_worker)(spec)
        args.out.write_text(json.dumps(result))
        return 0
    try:
        report = bench(args)
    except BenchError as err:
        print(f"bench_official: {err}", file=sys.stderr)
        return 1
    print_report(report)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
