"""What every benchmark scenario shares: device helpers, step timing, statistics, tables, CLI types."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TextIO, TypeVar

import torch

from .. import __version__
from ..engine import get_engine

Output = TypeVar("Output")

GIB = 1 << 30
MIB = 1 << 20


# Trace entries that span a wait of the compute stream for a copy (Note [Traced stalls]).
STALL_OPS = ("fetch",)


class Progress:
    """Progress as plain lines, one per phase as it starts: ``[3/12] 14.2 s  stack smoke ...: naive``.

    Lines, not a redrawn bar, so that a log or a pipe keeps every phase and
    nothing beyond the standard library is needed. ``total`` is the number of
    phases announced up front; the seconds are those since the progress began.
    """

    def __init__(self, total: int, stream: TextIO | None = None) -> None:
        self.total = total
        self.done = 0
        self._stream = stream
        self._start = time.perf_counter()

    def __call__(self, label: str, phases: int = 1) -> None:
        """Announces the next phase (or ``phases`` of them at once, e.g. a stack that was skipped)."""
        self.done += phases
        elapsed = time.perf_counter() - self._start
        stream = self._stream or sys.stderr
        print(f"[{self.done}/{self.total}] {elapsed:.1f} s  {label}", file=stream, flush=True)

    def finish(self, label: str = "done") -> None:
        """The last line: how long all phases took."""
        stream = self._stream or sys.stderr
        print(f"{label} in {time.perf_counter() - self._start:.1f} s", file=stream, flush=True)


@contextlib.contextmanager
def one_thread_on_the_cpu(device: torch.device) -> Iterator[None]:
    """On the CPU, torch runs on one intra-op thread inside the block; elsewhere nothing changes.

    With a thread per core (torch's default), another job on the same cores
    takes a core from one of torch's threads and every parallel region then
    waits for it at its barrier: a step takes 20-30 times as long, and which
    strategy it hits is chance. On one thread another job only shares the
    core, and every strategy computes on the same single core, like the
    compute stream of a GPU. The previous thread count is restored after.
    """
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def synchronize(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def allocated_bytes(device: torch.device) -> int | None:
    return torch.get_device_module(device.type).memory_allocated(device) if device.type != "cpu" else None


def free_bytes(device: torch.device) -> int | None:
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type != "cpu":
        torch.get_device_module(device.type).reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int | None:
    return torch.get_device_module(device.type).max_memory_allocated(device) if device.type != "cpu" else None


def memory_of_step(
    device: torch.device, forward: Callable[[], Output], backward: Callable[[Output], None]
) -> dict[str, int | None]:
    """Device memory one step adds to what was allocated before it (None on the CPU).

    ``held_after_forward_bytes`` is read once the copy engine has drained, so
    offloaded inputs count as gone; ``peak_bytes`` covers the whole step.
    """
    get_engine(device).synchronize()  # and lets go of the sources of the last step's finished copies
    synchronize(device)
    reset_peak(device)
    before = allocated_bytes(device)
    output = forward()
    get_engine(device).synchronize()
    synchronize(device)
    held = allocated_bytes(device)
    backward(output)
    synchronize(device)
    peak = peak_bytes(device)
    return {
        "held_after_forward_bytes": None if held is None else held - before,
        "peak_bytes": None if peak is None else peak - before,
    }


def time_steps(step: Callable[[], None], device: torch.device, warmup: int, steps: int) -> list[float]:
    """Wall time (ms) of each of ``steps`` steps after ``warmup`` untimed ones, device-synchronised."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, 20th and 80th percentile."""
    if len(values) == 1:
        return {"median": values[0], "p20": values[0], "p80": values[0]}
    deciles = statistics.quantiles(values, n=10, method="inclusive")
    return {"median": statistics.median(values), "p20": deciles[1], "p80": deciles[7]}


def gbps(nbytes: float, milliseconds: float) -> float | None:
    return nbytes / milliseconds / 1e6 if milliseconds > 0 else None


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: torch.device) -> dict[str, Any]:
    """Machine, device and versions, recorded next to every result."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": name,
        "cpu_count": os.cpu_count(),
        "gcoffload": __version__,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "smoke_run": device.type == "cpu",
    }


def format_value(value: Any, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "ms":
        return f"{value:.1f}" if value >= 10 else f"{value:.2f}"
    if kind == "pct":
        return f"{100 * value:+.1f}%"
    if kind == "ratio":
        return f"{value:.2f}x"
    if kind == "frac":
        return f"{100 * value:.0f}%"
    if kind == "gib":
        return f"{value / GIB:.2f}"
    if kind == "mib":
        return f"{value / MIB:.2f}"
    if kind == "gbps":
        return f"{value:.1f}"
    if kind == "bytes":
        return f"{value / MIB:.0f} MiB" if value >= MIB else f"{value / 1024:.0f} KiB"
    return str(value)


def table(rows: Iterable[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """A markdown table; ``columns`` are (key, header, kind) with kind as in :func:`format_value`."""
    lines = ["| " + " | ".join(header for _, header, _ in columns) + " |"]
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        lines.append("| " + " | ".join(format_value(row.get(key), kind) for key, _, kind in columns) + " |")
    return "\n".join(lines)


def help_text(docstring: str) -> str:
    """A reST docstring as plain text for ``--help``: ``code`` and :mod:`.name` without their markup."""
    return re.sub(r":\w+:`\.?([^`]+)`", r"\1", docstring).replace("``", "")


def positive_int(text: str) -> int:
    """An argparse ``type``: a whole number of at least 1."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """An argparse ``type``: a whole number of at least 0."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, minimum: int) -> int:
    value = int(text) if re.fullmatch(r"[+-]?\d+", text) else None
    if value is None or value < minimum:
        raise argparse.ArgumentTypeError(f"must be a whole number >= {minimum}, not {text!r}")
    return value
