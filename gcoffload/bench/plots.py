"""PNG plots of a benchmark run: the stream timeline and step time / memory per strategy."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from . import common

_MARK = re.compile(r"(forward|recompute):(\d+):(start|end)")
_COLORS = {"compute": "#4c72b0", "backward": "#8fa9d6", "d2h": "#dd8452", "h2d": "#55a868", "wait": "#c44e52"}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def compute_intervals(trace: list[dict]) -> list[tuple[float, float, str]]:
    """Compute-stream intervals from the decoder layers' marks.

    F: a layer's forward pass; R: its recompute; B: its backward, from the end
    of the recompute to the start of the next one (or the end of the trace),
    which also holds any wait for the next layer's input.
    """
    starts: dict[tuple[str, str], float] = {}
    intervals = []
    backward_from: tuple[float, str] | None = None
    last = max((entry["end_ms"] for entry in trace), default=0.0)
    for entry in trace:
        match = _MARK.fullmatch(entry["label"]) if entry["op"] == "mark" else None
        if match is None:
            continue
        phase, layer, edge = match.groups()
        if edge == "start":
            starts[(phase, layer)] = entry["start_ms"]
            if phase == "recompute" and backward_from is not None:
                intervals.append((backward_from[0], entry["start_ms"], backward_from[1]))
                backward_from = None
        elif (phase, layer) in starts:
            label = f"F{layer}" if phase == "forward" else f"R{layer}"
            intervals.append((starts.pop((phase, layer)), entry["start_ms"], label))
            if phase == "recompute":
                backward_from = (entry["start_ms"], f"B{layer}")
    if backward_from is not None:
        intervals.append((backward_from[0], last, backward_from[1]))
    return intervals


def timeline(trace: list[dict], title: str, path: Path) -> None:
    """Three lanes, compute / D2H / H2D, over one traced step (ms since the step began).

    Waits of the compute stream for a copy are drawn over the compute lane in red.
    """
    plt = _pyplot()
    lanes = {"compute": compute_intervals(trace), "d2h": [], "h2d": []}
    waits = [
        (entry["start_ms"], entry["end_ms"], "wait") for entry in trace if entry["op"] in common.STALL_OPS
    ]
    for entry in trace:
        if entry["op"] == "offload":
            lanes["d2h"].append((entry["start_ms"], entry["end_ms"], f"#{entry['handle_id']}"))
        elif entry["op"] == "prefetch":
            lanes["h2d"].append((entry["start_ms"], entry["end_ms"], f"#{entry['handle_id']}"))
    figure, axis = plt.subplots(figsize=(14, 3.2))
    span = max((end for intervals in lanes.values() for _, end, _ in intervals), default=1.0)
    for row, (lane, intervals) in enumerate(reversed(lanes.items())):
        for start, end, label in intervals:
            color = _COLORS["backward"] if label.startswith("B") else _COLORS[lane]
            width = max(end - start, span / 500)  # keeps sub-pixel copies visible
            axis.barh(row, width, left=start, height=0.6, color=color, edgecolor="white", linewidth=0.5)
            if len(intervals) <= 64:
                axis.text((start + end) / 2, row, label, ha="center", va="center", fontsize=6, color="white")
    compute_row = len(lanes) - 1
    for start, end, _ in waits:
        if end > start:
            axis.barh(compute_row, end - start, left=start, height=0.3, color=_COLORS["wait"])
    axis.set_yticks(range(3), ["H2D stream", "D2H stream", "compute stream"])
    axis.set_xlabel(
        "ms since the step began (F: forward, R: recompute, B: backward of a layer; #: handle id; "
        "red: compute waiting for a copy)"
    )
    axis.set_title(title, fontsize=10)
    axis.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=130)
    plt.close(figure)


def strategies(result: dict[str, Any], path: Path) -> None:
    """Step time (median, p20-p80) and memory (peak, held after forward) for each strategy."""
    plt = _pyplot()
    rows = [row for row in result["strategies"] if not row.get("oom")]
    names = [row["strategy"] for row in rows]
    figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(13, 4))
    medians = [row["step_ms"]["median"] for row in rows]
    errors = [
        [row["step_ms"]["median"] - row["step_ms"]["p20"] for row in rows],
        [row["step_ms"]["p80"] - row["step_ms"]["median"] for row in rows],
    ]
    time_axis.bar(names, medians, yerr=errors, color="#4c72b0", capsize=3)
    time_axis.set_ylabel("step time, ms (median, p20-p80)")
    positions = range(len(rows))
    for offset, key, label, color in (
        (-0.2, "peak_bytes", "peak allocated", "#c44e52"),
        (0.2, "held_after_forward_bytes", "held after forward", "#8172b2"),
    ):
        values = [(row.get(key) or 0) / common.GIB for row in rows]
        memory_axis.bar([p + offset for p in positions], values, width=0.4, label=label, color=color)
    memory_axis.set_xticks(list(positions), names)
    memory_axis.set_ylabel("GiB above parameters and input")
    memory_axis.legend(fontsize=8)
    if all(row.get("peak_bytes") is None for row in rows):
        memory_axis.text(
            0.5, 0.5, "device memory is not measured on the CPU", ha="center", transform=memory_axis.transAxes
        )
    for axis in (time_axis, memory_axis):
        axis.tick_params(axis="x", rotation=30, labelsize=8)
    figure.suptitle(result["label"], fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=130)
    plt.close(figure)
