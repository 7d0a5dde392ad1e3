"""`rewardtune bench RECIPE --over-steps 5,10,20,40 [--bptt]`: the memory of one DxDP policy-improvement step, and
of a whole training iteration, as the number of sampling steps T grows; beside it, the same objective optimised by
back-propagation through time (BPTT), to show what DxDP's one-step policy improvement saves (DxMI paper, Sec. 4:
the sampler is trained "without back-propagation through time").

For each T the recipe is built with `backbone.num_steps = T` and random weights (`bench.without_init_from`), DxDP is
put past its `value_warmup`, and `warmup` iterations run first (they create the optimisers' moments). The policy
batch n (`algorithm.policy_batch`, else `train.batch_size`) is the recipe's at every T, so the policy step does the
same work at every T. Memory is measured three ways:

- `saved_bytes`: the peak bytes of the tensors autograd holds for backward while they are alive
  (`torch.autograd.graph.saved_tensors_hooks`, each storage counted once; the modules' parameters and buffers,
  in memory anyway, left out). Exact and deterministic, on a CPU too: it is the memory back-propagation adds to a
  step, and the part BPTT makes grow with T.
- `peak_rss_delta` (CPU, Linux, on request): the rise of the process's resident-set high-water mark over one step,
  in a fresh process per T and method (glibc's malloc thresholds fixed, freed heap handed back with
  `malloc_trim`, then the mark reset through /proc/self/clear_refs). Coarser: it includes gradients, the optimiser's
  temporaries and the allocator's own behaviour.
- `cuda_peak_bytes` (GPU): `torch.cuda.max_memory_allocated` during the step, less what was allocated before it.

BPTT is a mode of this benchmark, not an algorithm or a recipe option: n chains start from the prior and are rolled
out with gradients by the reparameterised transitions x_{t+1} = mean_phi(x_t, t, c) + sigma_t eps, and the loss is
the objective of Eq. (8) that DxDP's policy improvement minimises one transition at a time (`DxDP.policy_loss`),

    mean[ c(x_T) + sum_t ( -tau1 D log sigma_t + tau2 ||x_{t+1} - x_t||^2 / (2 s_t^2) + beta KL_t ) ],

with c(x_T) = V(x_T, T) (`terminal = "value"`) or -r(output(x_T)) (`terminal = "reward"`), the recipe's effective
temperatures (`DxDP.tau1`, `tau2`, `kl_weight`) and AVR's s_t^2; it is back-propagated through all T steps and
taken with the sampler's own optimiser.
"""

from __future__ import annotations

import ctypes
import statistics
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from multiprocessing import get_context
from pathlib import Path
from typing import Self

import torch

from rewardtune.bench import describe_device, step, without_init_from
from rewardtune.errors import RecipeError

METHODS = ("dxdp", "bptt")
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 64 * 1024  # bytes: larger blocks are mapped on their own in the RSS-measuring process


class SavedTensorMeter:
    """Counts the bytes of the tensors autograd saves for backward inside the `with` block: `live_bytes` now and
    `peak_bytes` at most, each storage once however many saved tensors view it, each released when autograd frees
    its graph (which may be after the block).

    Args:
        resident: keys (`storage_of`) of storages that are in memory anyway, the modules' parameters and buffers
            (`module_storages`): saving them costs nothing, so they are not counted.
    """

    def __init__(self, resident: frozenset[tuple] = frozenset()) -> None:
        self.resident = resident
        self.storages: dict[tuple, list[int]] = {}  # storage key -> [bytes, saved tensors holding it]
        self.live_bytes = 0
        self.peak_bytes = 0
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def __enter__(self) -> Self:
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.hooks.__exit__(*exc)

    def pack(self, tensor: torch.Tensor) -> Saved:
        key, nbytes = storage_of(tensor)
        if key in self.resident:
            return Saved(tensor)
        entry = self.storages.setdefault(key, [nbytes, 0])
        if entry[1] == 0:
            self.live_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        entry[1] += 1
        saved = Saved(tensor)
        weakref.finalize(saved, self.release, key)  # the handle holds the tensor, so the storage outlives the count
        return saved

    @staticmethod
    def unpack(saved: Saved) -> torch.Tensor:
        return saved.tensor

    def release(self, key: tuple) -> None:
        entry = self.storages[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.live_bytes -= entry[0]
            del self.storages[key]


class Saved:
    """What autograd keeps in place of a saved tensor while a `SavedTensorMeter` counts it."""

    __slots__ = ("__weakref__", "tensor")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


def storage_of(tensor: torch.Tensor) -> tuple[tuple, int]:
    """(a key naming the tensor's storage, the storage's size in bytes); a tensor without a plain storage (sparse,
    a wrapper subclass) is its own storage of numel * element_size bytes."""
    try:
        storage = tensor.untyped_storage()
        return (str(tensor.device), storage.data_ptr()), storage.nbytes()
    except (RuntimeError, NotImplementedError, TypeError):
        return ("tensor", id(tensor)), tensor.numel() * tensor.element_size()


def module_storages(modules) -> frozenset[tuple]:
    """The `storage_of` keys of the parameters and buffers of `modules`."""
    return frozenset(storage_of(tensor)[0] for module in modules for tensor in (*module.parameters(), *module.buffers()))


def check_num_steps(num_steps: list[int]) -> None:
    """A ValueError unless `num_steps` is a non-empty list of integers T >= 1."""
    if not num_steps or any(isinstance(t, bool) or not isinstance(t, int) or t < 1 for t in num_steps):
        raise ValueError(f"the numbers of steps T must be integers >= 1, got {num_steps}")


def load_at(recipe_path: Path, overrides: list[str], num_steps: int):
    """The recipe with its `--set` overrides and `backbone.num_steps = num_steps`; a RecipeError unless its algorithm
    is DxDP (the policy step measured here is DxDP's)."""
    from rewardtune.recipe import load_recipe

    recipe = load_recipe(recipe_path, [*overrides, f"backbone.num_steps={num_steps}"])
    kind = recipe.plugins["algorithm"].kind
    if kind != "dxdp":
        raise RecipeError(f"{recipe_path}: --over-steps measures DxDP's policy step; this recipe's algorithm is {kind!r}")
    return without_init_from(recipe)


def prepare_trainer(recipe_path: Path, overrides: list[str], num_steps: int, *, warmup: int):
    """A trainer of the recipe at T = `num_steps`, past DxDP's value warm-up, after `warmup` iterations."""
    from rewardtune.api import make_accelerator, make_trainer
    from rewardtune.build import build_experiment

    trainer = make_trainer(build_experiment(load_at(recipe_path, overrides, num_steps)), None, None, make_accelerator())
    algorithm = trainer.algorithm
    algorithm.iteration = 10**9  # past `value_warmup`: every iteration takes a policy step
    algorithm.s2 = algorithm.s2.to(trainer.device)  # as `DxDP.update` does first (with warmup = 0 none has run)
    if algorithm.reference is not None:
        algorithm.reference.to(trainer.device)
    for _ in range(warmup):
        step(trainer)
    return trainer


def policy_batch(trainer) -> int:
    """n, the rows of a policy-improvement step: `algorithm.policy_batch`, else the batch size."""
    return trainer.algorithm.config.policy_batch or trainer.config.batch_size


def rollout(trainer, n: int):
    """n chains sampled as a training iteration samples them (no gradients, with the run's conditions):
    a `Trajectory` with states [T+1, n, *event_shape]."""
    _, real_condition = trainer.real_batch(n)
    condition = trainer.rollout_conditions(n, real_condition)
    trainer.backbone.eval()
    with trainer.autocast():
        return trainer.backbone.sample(n, trainer.train_gen, condition=condition)


def dxdp_step(trainer) -> Callable[[], None]:
    """One DxDP policy-improvement step (`DxDP.improve_policy`: n reparameterised transitions from states of a
    sampled trajectory, one optimiser step) on a trajectory of the batch size sampled now, as a callable."""
    trajectory = rollout(trainer, trainer.config.batch_size)

    def run() -> None:
        with in_update_mode(trainer):
            trainer.algorithm.improve_policy(trajectory, trainer.train_gen)

    return run


def bptt_loss(algorithm, x0: torch.Tensor, generator: torch.Generator | None, condition=None) -> torch.Tensor:
    """The policy objective of Eq. (8) over whole chains from the starts `x0` [n, *event_shape] (conditions
    `condition`, n rows, or None), rolled out with gradients (module docstring): a 0-d tensor whose backward runs
    through all T transitions."""
    from rewardtune.precision import at_least_fp32

    backbone, T, n = algorithm.backbone, algorithm.backbone.num_steps, x0.shape[0]
    sigmas = backbone.sigma()  # [T]
    x, running = x0, x0.new_zeros(n)
    for t in range(T):
        tt = torch.full((n,), t, dtype=torch.long, device=x.device)
        sigma = sigmas[tt]  # [n]
        mean = at_least_fp32(backbone.mean_at(x, tt, condition))  # [n, *event_shape]
        noise = torch.randn(x.shape, generator=generator, device=x.device)
        x_next = mean + sigma.view(-1, *([1] * (x.dim() - 1))) * noise  # = backbone.step(x, tt, noise, condition)
        running = running + algorithm.running_cost(x, tt, mean, sigma, x_next, condition)  # DxDP.policy_loss's
        x = x_next
    if algorithm.config.terminal == "reward":
        terminal = algorithm.reward.cost(backbone.output(x), condition)
    else:
        terminal = algorithm.value_at(x, torch.full((n,), T, dtype=torch.long, device=x.device), condition)
    return (terminal + running).mean()


def bptt_step(trainer) -> Callable[[], None]:
    """One BPTT step on n = `policy_batch(trainer)` chains: `bptt_loss` from fresh prior draws, back-propagated and
    taken by the sampler's optimiser, as a callable."""
    algorithm, backbone, n = trainer.algorithm, trainer.backbone, policy_batch(trainer)
    _, real_condition = trainer.real_batch(n)
    condition = trainer.rollout_conditions(n, real_condition)

    def run() -> None:
        with in_update_mode(trainer):
            x0 = backbone.prior.sample(n, backbone.sample_shape, trainer.train_gen, trainer.device)
            algorithm.sampler_optimizer.step(bptt_loss(algorithm, x0, trainer.train_gen, condition))

    return run


@contextmanager
def in_update_mode(trainer) -> Iterator[None]:
    """The backbone in the mode the algorithm's update declares, under the run's autocast (as the trainer runs the
    update); the backbone back in eval mode after it."""
    trainer.backbone.train(trainer.backbone_training)
    try:
        with trainer.autocast():
            yield
    finally:
        trainer.backbone.eval()


def measure(run: Callable[[], None], device: torch.device, *, repeats: int,
            resident: frozenset[tuple] = frozenset()) -> dict:
    """One untimed call of `run` under a `SavedTensorMeter(resident)` (and on a GPU the allocator's peak), then
    `repeats` timed calls. Returns {"saved_bytes": int, "cuda_peak_bytes": int | None, "ms": the median
    milliseconds per call}."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    with SavedTensorMeter(resident) as meter:
        run()
    cuda_peak = None
    if cuda:
        torch.cuda.synchronize(device)
        cuda_peak = torch.cuda.max_memory_allocated(device) - before
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(1000 * (time.perf_counter() - start))
    return {"saved_bytes": meter.peak_bytes, "cuda_peak_bytes": cuda_peak, "ms": statistics.median(times)}


def measure_at(trainer, *, bptt: bool, repeats: int) -> list[dict]:
    """The rows of the trainer's T (`prepare_trainer`): DxDP's policy step and whole iteration (`measure`), and with
    `bptt` the BPTT step."""
    num_steps, n, device = trainer.backbone.num_steps, policy_batch(trainer), trainer.device
    resident = module_storages(trainer.modules().values())
    dxdp = measure(dxdp_step(trainer), device, repeats=repeats, resident=resident)
    iteration = measure(lambda: step(trainer), device, repeats=repeats, resident=resident)
    rows = [{"T": num_steps, "method": "dxdp", "policy_batch": n, **dxdp, "peak_rss_delta": None,
             **{f"iteration_{key}": value for key, value in iteration.items()}}]
    if bptt:
        bptt_row = measure(bptt_step(trainer), device, repeats=repeats, resident=resident)
        rows.append({"T": num_steps, "method": "bptt", "policy_batch": n, **bptt_row, "peak_rss_delta": None,
                     "iteration_saved_bytes": None, "iteration_cuda_peak_bytes": None, "iteration_ms": None})
    return rows


def rss_delta(recipe_path: Path, overrides: list[str], num_steps: int, method: str, warmup: int) -> int | None:
    """Bytes by which one `method` step ("dxdp" or "bptt") raises this process's peak resident set above its
    resident set before the step (Linux; None where /proc/self/clear_refs or glibc's malloc_trim are missing). Meant
    for a fresh process (`rss_delta_in_fresh_process`): in a used one the allocator's cache blurs it."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    trainer = prepare_trainer(recipe_path, overrides, num_steps, warmup=warmup)
    run = dxdp_step(trainer) if method == "dxdp" else bptt_step(trainer)
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so that the step's pages are counted anew
        Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark VmHWM to the resident set
        before = proc_status_bytes("VmRSS")
    except (OSError, AttributeError):
        return None
    run()
    return proc_status_bytes("VmHWM") - before


def proc_status_bytes(field: str) -> int:
    """A memory field of /proc/self/status ("VmRSS", "VmHWM"; given in kB) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {field}")


def rss_delta_in_fresh_process(recipe_path: Path, overrides: list[str], num_steps: int, method: str,
                               warmup: int) -> int | None:
    """`rss_delta` in a freshly spawned process (a few seconds: it imports torch and builds the experiment)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fresh_process_rss_delta, recipe_path, overrides, num_steps, method, warmup).result()


def fresh_process_rss_delta(recipe_path: Path, overrides: list[str], num_steps: int, method: str,
                            warmup: int) -> int | None:
    """What the fresh process runs: `rss_delta` with glibc's malloc thresholds fixed (`MMAP_THRESHOLD`: blocks of
    64 KiB and more are mapped when allocated and unmapped when freed, so the peak counts the step's own tensors;
    with the default, adaptive ones dxmi_8gaussians' DxDP step measured 5.1 to 6.9 MiB from run to run, fixed 4.5
    to 4.9)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD)
    except (OSError, AttributeError):  # not glibc: `rss_delta` says None
        pass
    return rss_delta(recipe_path, overrides, num_steps, method, warmup)


def memory_over_steps(recipe_path: Path, overrides: list[str], num_steps: list[int], *, bptt: bool = False,
                      repeats: int = 3, warmup: int = 1, rss: bool = False) -> dict:
    """The memory benchmark of the module docstring for each T in `num_steps`.

    Args:
        recipe_path, overrides: the recipe and its `--set` overrides (a DxDP recipe).
        num_steps: the T values, integers >= 1.
        bptt: also measure the BPTT step.
        repeats: timed calls per measurement (>= 1; their median is `ms`).
        warmup: training iterations before measuring, at each T (>= 0).
        rss: also measure `peak_rss_delta` in a fresh process per T and method (CPU only, where a GPU's allocator
            peak is not measured; seconds each).

    Returns:
        JSON-ready {"recipe", "device", "torch", "threads", "batch_size", "rows"}; `rows` holds per T a "dxdp" row
        and with `bptt` a "bptt" row: {"T", "method", "policy_batch", "saved_bytes", "cuda_peak_bytes" (None on a
        CPU), "peak_rss_delta" (None unless `rss`), "ms", and for "dxdp" the whole iteration's "iteration_saved_bytes",
        "iteration_cuda_peak_bytes", "iteration_ms"}; bytes as integers, times in milliseconds.
    """
    check_num_steps(num_steps)
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats >= 1 and warmup >= 0 are needed, got {repeats} and {warmup}")
    rows = []
    for T in num_steps:
        trainer = prepare_trainer(recipe_path, overrides, T, warmup=warmup)
        rows += measure_at(trainer, bptt=bptt, repeats=repeats)
    device = trainer.device
    if rss and device.type == "cpu":
        for row in rows:
            row["peak_rss_delta"] = rss_delta_in_fresh_process(recipe_path, overrides, row["T"], row["method"], warmup)
    return {"recipe": str(recipe_path), "device": describe_device(device), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "batch_size": trainer.config.batch_size, "rows": rows}


def table_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    """The table `rewardtune bench --over-steps` prints: (header, one row of strings per T). Memory in MiB: saved
    for backward by DxDP's policy step ("DxDP"), its whole iteration ("iteration") and BPTT's step ("BPTT"), then
    the RSS rises and GPU peaks that were measured; the median milliseconds per step ("... ms") last."""
    by_t: dict[int, dict[str, dict]] = {}
    for row in result["rows"]:
        by_t.setdefault(row["T"], {})[row["method"]] = row
    bptt = any("bptt" in methods for methods in by_t.values())
    rss = any(row["peak_rss_delta"] is not None for row in result["rows"])
    cuda = any(row["cuda_peak_bytes"] is not None for row in result["rows"])
    columns = [("DxDP", "dxdp", "saved_bytes"), ("iteration", "dxdp", "iteration_saved_bytes")]
    columns += [("BPTT", "bptt", "saved_bytes")] if bptt else []
    for flag, what, key in ((rss, "RSS", "peak_rss_delta"), (cuda, "GPU", "cuda_peak_bytes")):
        if flag:
            columns += [(f"DxDP {what}", "dxdp", key)] + ([(f"BPTT {what}", "bptt", key)] if bptt else [])
    columns += [("DxDP ms", "dxdp", "ms")] + ([("BPTT ms", "bptt", "ms")] if bptt else [])
    lines = []
    for T, methods in by_t.items():
        line = [str(T)]
        for name, method, key in columns:
            value = methods.get(method, {}).get(key)
            line.append("-" if value is None else f"{value:.1f}" if name.endswith("ms") else f"{value / 2**20:.2f}")
        lines.append(line)
    return ["T", *(name for name, _, _ in columns)], lines
