"""Timing helpers: medians and percentiles, a per-tool stopwatch around the one tool runner,
and the result table the bench prints."""

from __future__ import annotations

import contextlib
import os
import statistics
import threading
import time
from collections import defaultdict
from typing import Callable, Iterator

import builder.render
import builder.tools.runner


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of `values`."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, round(q / 100 * len(ordered) + 0.4999))
    return ordered[min(rank, len(ordered)) - 1]


def timed(fn: Callable, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def _tool_label(tool: str, args) -> str:
    # osslsigncode is one tool doing three jobs in a build; they are timed apart.
    if tool == "osslsigncode" and args:
        return f"osslsigncode {args[0]}"
    return tool


class ToolClock:
    """Seconds spent per external tool (through builder.tools.runner.run) and in template
    rendering (builder.render.render), summed since the last `take()`. Thread-safe: formats
    built in parallel add to the same totals."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seconds: dict[str, float] = defaultdict(float)
        self._counts: dict[str, int] = defaultdict(int)

    def add(self, label: str, seconds: float) -> None:
        with self._lock:
            self._seconds[label] += seconds
            self._counts[label] += 1

    def take(self) -> dict[str, float]:
        with self._lock:
            out = dict(self._seconds)
            self._seconds.clear()
            self._counts.clear()
        return out

    @contextlib.contextmanager
    def installed(self) -> Iterator["ToolClock"]:
        """Wrap the runner and the renderer for the duration of the block."""
        real_run, real_render = builder.tools.runner.run, builder.render.render

        def run(tool, args, **kwargs):
            start = time.perf_counter()
            try:
                return real_run(tool, args, **kwargs)
            finally:
                self.add(_tool_label(tool, args), time.perf_counter() - start)

        def render(template, **context):
            start = time.perf_counter()
            try:
                return real_render(template, **context)
            finally:
                self.add("render", time.perf_counter() - start)

        builder.tools.runner.run, builder.render.render = run, render
        try:
            yield self
        finally:
            builder.tools.runner.run, builder.render.render = real_run, real_render


# -- printing ----------------------------------------------------------------------------------

def verdict(value: float, target: float, *, at_least: bool = False) -> str:
    """MET when `value` is at or below `target` (times), or with `at_least` at or above it
    (throughput)."""
    if value != value:  # NaN: not measured
        return "NOT MEASURED"
    return "MET" if (value >= target if at_least else value <= target) else "NOT MET"


def heading(title: str) -> None:
    print()
    print(title)
    print("=" * len(title))
    print(f"(load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs)")


def table(columns: list[str], rows: list[list[object]]) -> None:
    """A plain, aligned text table: first column left, the others right."""
    cells = [[str(c) for c in columns]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]

    def line(row: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    print(line(cells[0]))
    print("  ".join("-" * w for w in widths))
    for row in cells[1:]:
        print(line(row))


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:
            return "n/a"
        return f"{value:.3f}"
    return str(value)


def ms(seconds: float) -> str:
    return "n/a" if seconds != seconds else f"{seconds * 1000:.2f} ms"


def s(seconds: float) -> str:
    return "n/a" if seconds != seconds else f"{seconds:.3f} s"
