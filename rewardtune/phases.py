"""Wall-clock time per phase of a training iteration, for `rewardtune bench` (bench.py).

The trainer and the algorithms that time their parts mark them with `self.phases.phase(name)`. Their `phases` is
`NO_PHASES` unless a benchmark hands them a `PhaseClock` (`Trainer.time_phases`): then each `phase` block adds its
time to its name, exclusive of the phases nested in it, so the phases of an iteration add up to the iteration. The
no-op costs one method call per block, and torch's profiler scopes (`record_function`) are opened only when the clock
is asked for them.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator


class Phases:
    """Times nothing: `phase(name)` is an empty context (what the trainer and the algorithms hold by default)."""

    def phase(self, name: str) -> contextlib.AbstractContextManager:
        return NO_CONTEXT


NO_CONTEXT = contextlib.nullcontext()
NO_PHASES = Phases()


class PhaseClock(Phases):
    """Adds up the wall-clock seconds of each named phase, exclusive of the phases nested in it.

    Args:
        synchronize: called at every phase boundary before reading the clock (`torch.cuda.synchronize` on a GPU,
            whose kernels run asynchronously; None on a CPU).
        profile: also open a `torch.profiler.record_function(name)` scope per phase, for a profiler trace.
    """

    def __init__(self, synchronize: Callable[[], None] | None = None, *, profile: bool = False) -> None:
        self.synchronize = synchronize
        self.profile = profile
        self.seconds: dict[str, float] = {}
        self.nested: list[float] = []  # per open phase: the seconds of the phases nested in it so far

    def now(self) -> float:
        if self.synchronize is not None:
            self.synchronize()
        return time.perf_counter()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = self.now()
        self.nested.append(0.0)
        try:
            if self.profile:
                from torch.profiler import record_function

                with record_function(name):
                    yield
            else:
                yield
        finally:
            elapsed = self.now() - start
            inner = self.nested.pop()
            self.seconds[name] = self.seconds.get(name, 0.0) + elapsed - inner
            if self.nested:
                self.nested[-1] += elapsed

    def reset(self) -> None:
        self.seconds = {}
