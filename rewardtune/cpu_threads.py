"""How many torch intra-op threads a training process uses on a CPU (`train.cpu_threads`).

Measured with `scripts/bench_iteration.py` (ms per iteration; docs/recipes.md has the table): a sampler network of
a few thousand to 50k parameters runs as fast on 1 thread as on more, a 0.6M-parameter MLP or the digits UNet
gains 1.8-2x from 4 threads and little beyond, and threads beyond the free cores are ruinous: two runs side by side
on 2 cores with 2 threads each took 8-12x longer per iteration than with 1 each, and torch's default of every core
made a 0.6M MLP 4.5x slower than 8 threads on an idle 16-core machine. "auto" therefore takes one thread for small
networks and at most `AUTO_MAX_THREADS` otherwise. It depends on the recipe and the machine, never on the load:
the thread count changes the rounding of some kernels (a convolution's weight gradient), so a load-dependent choice
would break bitwise reproducibility of reruns.
"""

from __future__ import annotations

import os

import torch

AUTO = "auto"
SMALL_NETWORK_PARAMETERS = 200_000  # a sampler network below this many parameters gets one thread under "auto"
AUTO_MAX_THREADS = 4  # "auto" never takes more threads than this per process


def cpu_thread_count(setting: int | str, backbone: torch.nn.Module, local_processes: int) -> int:
    """The intra-op thread count for `train.cpu_threads = setting` (0: leave torch's default).

    "auto": OMP_NUM_THREADS when it is set (the user's or the launcher's choice; torchrun sets 1); else 1 for a
    sampler with fewer than SMALL_NETWORK_PARAMETERS parameters; else the cores this process may run on divided
    among the `local_processes` training processes of this machine, at most AUTO_MAX_THREADS.
    """
    if setting != AUTO:
        return int(setting)
    requested = os.environ.get("OMP_NUM_THREADS", "").strip()
    if requested.isdigit() and int(requested) > 0:
        return int(requested)
    if sum(p.numel() for p in backbone.parameters()) < SMALL_NETWORK_PARAMETERS:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(AUTO_MAX_THREADS, cores // max(1, local_processes)))


def local_process_count(accelerator) -> int:
    """Training processes on this machine: torchrun's LOCAL_WORLD_SIZE, else all of the accelerator's."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
