"""Progress reporting shared by the CLI and the Python API, on stderr: a rich progress bar with live metrics on a
terminal, plain log lines elsewhere (a CI log, a file), where a redrawn bar would be cut or garbled."""

from __future__ import annotations

import math
import time
from typing import ClassVar

from rich.console import Console

err_console = Console(stderr=True)


class RichReporter:
    """Progress of the main process: a rich bar on a terminal, else one log line every `line_every()` steps.

    Args:
        enabled: report at all (False on the other ranks).
        console: where to print (default: stderr); whether it is a terminal picks the bar or the lines.
        line_seconds: without a terminal, also print a line when this many seconds passed since the last one (a
            slow run still shows signs of life in a CI log).
    """

    SHOWN: ClassVar[dict[str, str]] = {
        "energy/real": "E(data)", "energy/fake": "E(samples)", "value/td_loss": "td", "policy/loss": "policy",
        "ddpm/loss": "loss", "distill/mse": "mse", "autoencoder/loss": "loss",
    }
    LINES_PER_STAGE: ClassVar[int] = 20  # without a terminal: about this many lines per training stage

    def __init__(self, enabled: bool = True, console: Console | None = None, line_seconds: float = 60.0) -> None:
        self.enabled = enabled
        self.console = console or err_console
        self.line_seconds = line_seconds
        self.progress = None
        self.task = None
        self.stage: dict | None = None  # without a terminal: the stage's description, total, start and last line

    def start(self, total: int, done: int, description: str) -> None:
        """A training stage (pretraining, then fine-tuning) from step `done` to `total`."""
        if not (self.enabled and total > done):
            return
        if not self.console.is_terminal:
            now = time.perf_counter()
            self.stage = {"description": description, "total": total, "done": done, "start": now, "line_at": now,
                          "line_step": done, "step": done, "metrics": {}}
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TimeRemainingColumn(), TextColumn("{task.fields[metrics]}"), console=self.console,
        )
        self.progress.start()
        self.task = self.progress.add_task(description, total=total, completed=done, metrics="")

    def advance(self, step: int, metrics: dict[str, float]) -> None:
        """Step `step` is done (the bar redraws itself at most 10 times a second, so every step is cheap)."""
        if self.task is not None:
            self.progress.update(self.task, completed=step, metrics=self.shown(metrics))
        elif self.stage is not None:
            stage = self.stage
            stage["step"], stage["metrics"] = step, metrics
            due = step - stage["line_step"] >= self.line_every(stage["total"] - stage["done"])
            late = time.perf_counter() - stage["line_at"] >= self.line_seconds
            if due or late or step >= stage["total"]:
                self.print_line()

    def line_every(self, steps: int) -> int:
        """Steps between two log lines, for a stage of `steps` steps."""
        return max(1, math.ceil(steps / self.LINES_PER_STAGE))

    def print_line(self) -> None:
        """`training  120/1000 (12%)  elapsed 0:01:05  1.85 it/s  E(data)=0.12 td=0.3`: one plain line."""
        stage = self.stage
        now = time.perf_counter()
        elapsed = now - stage["start"]
        rate = (stage["step"] - stage["done"]) / elapsed if elapsed > 0 else 0.0
        percent = 100 * stage["step"] // stage["total"]
        line = (
            f"{stage['description']}  {stage['step']}/{stage['total']} ({percent}%)  elapsed {clock(elapsed)}  "
            f"{rate:.3g} it/s  {self.shown(stage['metrics'])}"
        ).rstrip()
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)
        stage["line_at"], stage["line_step"] = now, stage["step"]

    def shown(self, metrics: dict[str, float]) -> str:
        return " ".join(f"{self.SHOWN[k]}={metrics[k]:.3g}" for k in self.SHOWN if k in metrics)

    def message(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress, self.task = None, None
        if self.stage is not None:
            if self.stage["step"] > self.stage["line_step"]:  # stopped early (a signal, an error): where it got to
                self.print_line()
            self.stage = None


def clock(seconds: float) -> str:
    """Seconds as H:MM:SS."""
    whole = int(seconds)
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"
