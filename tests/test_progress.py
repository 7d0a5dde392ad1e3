"""Progress on stderr: plain log lines when it is not a terminal (CI logs, files), a bar that ends at total/total on a
terminal, and messages printed as written."""

from __future__ import annotations

import io
import re

from rich.console import Console

from rewardtune.progress import RichReporter

LINE = re.compile(r"^training  (\d+)/(\d+) \((\d+)%\)  elapsed \d+:\d\d:\d\d  [\d.e+-]+ it/s  td=0\.5$")


def run_stage(reporter: RichReporter, total: int, done: int = 0, stop_at: int | None = None) -> None:
    reporter.start(total, done, "training")
    for step in range(done + 1, (stop_at or total) + 1):
        reporter.advance(step, {"value/td_loss": 0.5, "not/shown": 1.0})
    reporter.stop()


def plain(**kwargs) -> tuple[RichReporter, Console]:
    console = Console(file=io.StringIO(), force_terminal=False, width=60)
    return RichReporter(console=console, **kwargs), console


def steps_printed(console: Console) -> list[int]:
    lines = console.file.getvalue().splitlines()
    assert all(LINE.match(line) for line in lines), lines  # whole lines, no control characters, not cut at width 60
    return [int(LINE.match(line).group(1)) for line in lines]


def test_without_a_terminal_progress_is_about_20_lines_per_stage_ending_at_the_total():
    reporter, console = plain()
    run_stage(reporter, total=45)
    assert steps_printed(console) == list(range(3, 46, 3))  # every ceil(45 / 20) = 3 steps, the last one included


def test_a_run_shorter_than_the_line_interval_ends_at_its_total():
    for total in (1, 4, 19):
        reporter, console = plain()
        run_stage(reporter, total=total)
        assert steps_printed(console) == list(range(1, total + 1))


def test_a_resumed_stage_counts_from_its_checkpoint_and_a_stopped_one_says_where():
    reporter, console = plain()
    run_stage(reporter, total=100, done=60)  # 40 steps: a line every 2
    assert steps_printed(console) == list(range(62, 101, 2))
    reporter, console = plain()
    run_stage(reporter, total=100, stop_at=7)  # stopped (a signal, an error) between two lines
    assert steps_printed(console) == [5, 7]


def test_a_slow_run_prints_a_line_every_line_seconds():
    reporter, console = plain(line_seconds=0.0)
    run_stage(reporter, total=100, stop_at=3)
    assert steps_printed(console) == [1, 2, 3]


def test_on_a_terminal_the_bar_ends_at_total_over_total():
    """Runs shorter than the old 10-step update interval once ended at 0/4."""
    console = Console(file=io.StringIO(), force_terminal=True, width=120)
    run_stage(RichReporter(console=console), total=4)
    output = console.file.getvalue()
    last_render = output[output.rindex("training") :]
    assert "4/4" in last_render and "td=0.5" in last_render


def test_messages_are_printed_as_written_and_only_when_enabled():
    reporter, console = plain()
    reporter.message("[reward] kind 'x': [bold]not markup[/bold]")
    RichReporter(enabled=False, console=console).message("rank 1")
    run_stage(RichReporter(enabled=False, console=console), total=3)
    assert console.file.getvalue() == "[reward] kind 'x': [bold]not markup[/bold]\n"
