"""PNG figures of a benchmark run: the stream timeline of one step, and step time / memory per strategy."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import common, noise

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

_MARK = re.compile(r"(forward|recompute):(\d+):(start|end)")
_COLORS = {
    "compute": "#4c72b0",
    "stopped_early": "#6a8cc4",
    "backward": "#8fa9d6",
    "d2h": "#dd8452",
    "h2d": "#55a868",
    "wait": "#c44e52",
}
_LEGEND = {
    "compute": "forward (F) / recompute (R) of a layer",
    "stopped_early": "recompute stopped early, then backward (R+B)",
    "backward": "backward of a layer (B)",
    "d2h": "offload to host (#handle)",
    "h2d": "prefetch to device (#handle)",
    "wait": "compute waiting for a copy",
}
_MEMORY = (
    ("peak_bytes", "peak allocated", "#c44e52"),
    ("held_after_forward_bytes", "held after forward", "#8172b2"),
)
DPI = 130
# The narrowest an interval is drawn, as a share of the step: about 8 pixels on the
# timeline, so that a copy a thousand times shorter than the step still shows.
MIN_BAR_SHARE = 1 / 200


def compute_intervals(trace: list[dict]) -> list[tuple[float, float, str]]:
    """Compute-stream intervals from the decoder layers' marks.

    F: a layer's forward pass; R: its recompute; B: its backward, from the end
    of the recompute to the start of the next one (or the end of the trace),
    which also holds any wait for the next layer's input. R+B: a recompute that
    never reached the layer's end (non-reentrant checkpointing stops once it has
    recomputed what backward needs), then the backward; the marks cannot tell
    where one ends and the other begins.
    """
    intervals = []
    forward_from: dict[str, float] = {}
    backward_phase: tuple[float, str] | None = None  # the interval in progress since a recompute began
    last = max((entry["end_ms"] for entry in trace), default=0.0)
    for entry in trace:
        match = _MARK.fullmatch(entry["label"]) if entry["op"] == "mark" else None
        if match is None:
            continue
        phase, layer, edge = match.groups()
        at = entry["start_ms"]
        if phase == "forward":
            if edge == "start":
                forward_from[layer] = at
            elif layer in forward_from:
                intervals.append((forward_from.pop(layer), at, f"F{layer}"))
        elif edge == "start":
            if backward_phase is not None:
                intervals.append((backward_phase[0], at, backward_phase[1]))
            backward_phase = (at, f"R{layer}+B{layer}")
        elif backward_phase is not None and backward_phase[1] == f"R{layer}+B{layer}":
            intervals.append((backward_phase[0], at, f"R{layer}"))
            backward_phase = (at, f"B{layer}")
    if backward_phase is not None:
        intervals.append((backward_phase[0], last, backward_phase[1]))
    return intervals


def timeline(trace: list[dict], title: str) -> Figure:
    """Three lanes, compute / D2H / H2D, over one traced step (ms since the step began).

    Waits of the compute stream for a copy are drawn over the compute lane in red;
    an interval is labelled where its label fits inside it.
    """
    from matplotlib.figure import Figure

    lanes = {"compute": compute_intervals(trace), "d2h": [], "h2d": []}
    waits = [(entry["start_ms"], entry["end_ms"]) for entry in trace if entry["op"] in common.STALL_OPS]
    for entry in trace:
        if entry["op"] == "offload":
            lanes["d2h"].append((entry["start_ms"], entry["end_ms"], f"#{entry['handle_id']}"))
        elif entry["op"] == "prefetch":
            lanes["h2d"].append((entry["start_ms"], entry["end_ms"], f"#{entry['handle_id']}"))
    figure = Figure(figsize=(14, 3.2), dpi=DPI, layout="constrained")
    axis = figure.subplots()
    span = max((end for intervals in lanes.values() for _, end, _ in intervals), default=1.0)
    min_width = span * MIN_BAR_SHARE
    legend, labelled = {}, []
    for row, (lane, intervals) in enumerate(reversed(lanes.items())):
        for start, end, label in intervals:
            kind = "backward" if label.startswith("B") else "stopped_early" if "+" in label else lane
            (bar,) = axis.barh(
                row,
                max(end - start, min_width),
                left=start,
                height=0.6,
                color=_COLORS[kind],
                edgecolor="white",
                linewidth=0.5,
            )
            legend.setdefault(kind, bar)
            labelled.append((bar, label))
    compute_row = len(lanes) - 1
    for start, end in waits:
        if end > start:
            (bar,) = axis.barh(
                compute_row, max(end - start, min_width), left=start, height=0.3, color=_COLORS["wait"]
            )
            legend.setdefault("wait", bar)
    axis.set_xlim(0, span + min_width)
    axis.set_yticks(range(3), ["H2D stream", "D2H stream", "compute stream"])
    axis.set_xlabel("ms since the step began")
    axis.grid(axis="x", alpha=0.3)
    figure.suptitle(title, fontsize=10)
    if legend:
        drawn = [kind for kind in _LEGEND if kind in legend]
        figure.legend(
            [legend[kind] for kind in drawn],
            [_LEGEND[kind] for kind in drawn],
            loc="outside lower center",
            ncols=len(drawn),
            fontsize=8,
        )
    _label_where_it_fits(figure, labelled)
    return figure


def _label_where_it_fits(figure: Figure, labelled: list[tuple[Rectangle, str]]) -> None:
    """Writes each bar's label inside it, leaving out labels wider than their bar."""
    figure.draw_without_rendering()  # lays the figure out: bar widths in pixels are final
    for bar, label in labelled:
        x, y = bar.get_center()
        text = bar.axes.text(x, y, label, ha="center", va="center", fontsize=6, color="white")
        if text.get_window_extent().width > bar.get_window_extent().width - 2:  # 1 px clear each side
            text.remove()


def strategies(result: dict[str, Any], title: str) -> Figure:
    """Step time (median, p20-p80) and, where it was measured, memory (peak, held after forward).

    Noisy strategies (see :mod:`.noise`) are hatched.
    """
    from matplotlib.figure import Figure

    rows = [row for row in result["strategies"] if not row.get("oom")]
    memory = [series for series in _MEMORY if any(row.get(series[0]) is not None for row in rows)]
    figure = Figure(figsize=(13 if memory else 7, 4), dpi=DPI, layout="constrained")
    axes = figure.subplots(1, 2 if memory else 1, squeeze=False)[0]
    _step_times(axes[0], rows)
    if memory:
        _memory(axes[1], rows, memory)
    for axis in axes:
        axis.tick_params(axis="x", rotation=30, labelsize=8)
    figure.suptitle(title, fontsize=10)
    return figure


def _step_times(axis: Axes, rows: list[dict[str, Any]]) -> None:
    medians = [row["step_ms"]["median"] for row in rows]
    errors = [
        [row["step_ms"]["median"] - row["step_ms"]["p20"] for row in rows],
        [row["step_ms"]["p80"] - row["step_ms"]["median"] for row in rows],
    ]
    bars = axis.bar([row["strategy"] for row in rows], medians, yerr=errors, color="#4c72b0", capsize=3)
    noisy = [bar for bar, row in zip(bars, rows, strict=True) if row.get("noisy")]
    for bar in noisy:
        bar.set_hatch("//")
    if noisy:
        axis.legend([noisy[0]], [f"noisy: {noise.ADVICE}"], fontsize=8)
    axis.set_ylabel("step time, ms (median, p20-p80)")


def _memory(axis: Axes, rows: list[dict[str, Any]], series: list[tuple[str, str, str]]) -> None:
    """One bar per strategy and series, side by side."""
    width = 0.8 / len(series)
    for index, (key, label, color) in enumerate(series):
        offset = (index - (len(series) - 1) / 2) * width
        values = [(row.get(key) or 0) / common.GIB for row in rows]
        axis.bar(
            [position + offset for position in range(len(rows))], values, width, label=label, color=color
        )
    axis.set_xticks(range(len(rows)), [row["strategy"] for row in rows])
    axis.set_ylabel("GiB above parameters and input")
    axis.legend(fontsize=8)


def save(figure: Figure, path: Path) -> None:
    figure.savefig(path, dpi=DPI, bbox_inches="tight")
