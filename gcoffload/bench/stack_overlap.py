"""Scenario (b): a decoder stack under each strategy, with gcoffload's copies traced.

Per strategy: step time (median, p20, p80), overhead against plain
checkpointing, peak memory, memory held after the forward pass next to the
prediction, and for gcoffload the achieved D2H/H2D bandwidth next to a raw
pinned copy of the same size measured in the same run, the overlap fraction
(1 - exposed copy time / copy time, both from device events: the exposed time
is how long the compute stream stood waiting for a copy), pinned bytes and host
allocations after warm-up. Copy times come from three steps traced back to
back, undisturbed; memory from one more step that synchronises after forward.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..engine import get_engine
from . import common, noise
from .copy_bandwidth import raw_copy_ms
from .decoder import LLAMA_1B, LLAMA_8B, SMOKE, DecoderShape, build_stack
from .strategies import STRATEGIES, Strategy

SHAPES = {shape.name: shape for shape in (LLAMA_1B, LLAMA_8B, SMOKE)}
# Steps traced back to back, without a synchronisation between forward and backward
# (which would let every D2H copy finish before backward starts); copy metrics are
# their average, the timeline shows the last.
TRACED_STEPS = 3
STEP_MARK = "step"


@dataclasses.dataclass(frozen=True)
class StackConfig:
    shape: DecoderShape
    layers: int
    batch: int
    length: int

    @property
    def label(self) -> str:
        return f"{self.shape.name} L={self.layers} {self.batch}x{self.length}"

    def as_dict(self) -> dict[str, Any]:
        """The stack's shape, layers and tokens, for a result's JSON."""
        return {**self.shape.as_dict(), "layers": self.layers, "batch": self.batch, "length": self.length}

    def input_bytes(self, dtype: torch.dtype) -> int:
        return self.batch * self.length * self.shape.hidden * torch.empty((), dtype=dtype).element_size()

    def tensors(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The stack's input (requiring grad) and the gradient of its output, the same in every run."""
        torch.manual_seed(1)
        inputs = torch.randn(self.batch, self.length, self.shape.hidden, device=device, dtype=dtype)
        return inputs.requires_grad_(True), torch.randn_like(inputs)

    def fitted(self, dtype: torch.dtype, free_bytes: int | None) -> StackConfig:
        """This stack with as many of its layers as plain checkpointing fits in ``free_bytes``.

        Per layer: weights and gradients, and the checkpointed input. Once: one
        layer's recompute and its gradients, the stack's input and its gradient.
        A fifth of the memory stays free for the caching allocator and the
        raw-copy measurements. ``free_bytes=None`` (the CPU) keeps every layer.
        """
        if free_bytes is None:
            return self
        size = torch.empty((), dtype=dtype).element_size()
        tokens = self.batch * self.length
        per_layer = 2 * self.shape.parameters_per_layer * size + self.input_bytes(dtype)
        once = 2 * self.shape.activation_bytes_per_layer(tokens, size) + 2 * self.input_bytes(dtype)
        fit = (free_bytes * 4 // 5 - once) // per_layer
        return dataclasses.replace(self, layers=max(0, min(self.layers, fit)))


def run(
    config: StackConfig,
    strategies: Sequence[Strategy],
    device: torch.device,
    dtype: torch.dtype,
    warmup: int,
    steps: int,
    advance: Callable[[str], None] = lambda label: None,
) -> dict[str, Any]:
    """Measures every strategy on one stack; returns a JSON-ready dict with a row per strategy."""
    stack = build_stack(config.shape, config.layers, device, dtype)
    inputs, output_grad = config.tensors(device, dtype)
    input_bytes = config.input_bytes(dtype)
    rows, timeline = [], None
    for strategy in strategies:
        advance(f"stack {config.label}: {strategy.name}")
        try:
            row, trace = _measure(strategy, stack, inputs, output_grad, config, device, warmup, steps)
        except torch.OutOfMemoryError:
            row, trace = {"strategy": strategy.name, "oom": True}, None
        rows.append(row)
        if strategy.name == "gcoffload-d1":
            timeline = trace
    raw = {
        "d2h_gbps": common.gbps(input_bytes, raw_copy_ms(input_bytes, device, "d2h")),
        "h2d_gbps": common.gbps(input_bytes, raw_copy_ms(input_bytes, device, "h2d")),
    }
    raw["noisy"] = noise.diagnose(gbps={"raw D2H": raw["d2h_gbps"], "raw H2D": raw["h2d_gbps"]})
    _relate(rows, raw, overlap=device.type != "cpu")
    noise.mark_implausible(rows, "strategy")  # every strategy does the same work
    del stack, inputs, output_grad
    return {
        "config": config.as_dict(),
        "label": config.label,
        "dtype": str(dtype),
        "layer_input_bytes": input_bytes,
        "raw_copy": raw,
        "strategies": rows,
        "timeline": timeline,
    }


def _measure(
    strategy: Strategy,
    stack: torch.nn.ModuleList,
    inputs: torch.Tensor,
    output_grad: torch.Tensor,
    config: StackConfig,
    device: torch.device,
    warmup: int,
    steps: int,
) -> tuple[dict[str, Any], list[dict] | None]:
    engine = get_engine(device)
    pool = engine._impl.pool
    with strategy.activate(stack) as forward:

        def step() -> None:
            stack.zero_grad(set_to_none=True)
            inputs.grad = None
            forward(inputs).backward(output_grad)

        for _ in range(warmup):
            step()
        engine.reset_stats()
        host_allocations = pool.stats()["host_alloc_calls"]
        times = common.time_steps(step, device, warmup=0, steps=steps)
        host_allocations = pool.stats()["host_alloc_calls"] - host_allocations
        copies = engine.stats()

        with engine.trace() as trace:
            for _ in range(TRACED_STEPS):
                engine.mark(STEP_MARK)
                step()
        stack.zero_grad(set_to_none=True)
        inputs.grad = None
        memory = common.memory_of_step(
            device, lambda: forward(inputs), lambda output: output.backward(output_grad)
        )

    input_bytes = config.input_bytes(inputs.dtype)
    row: dict[str, Any] = {
        "strategy": strategy.name,
        "description": strategy.description,
        "step_ms": common.spread(times),
        "median_ms": statistics.median(times),
        **memory,
        "predicted_held_bytes": None
        if strategy.held_inputs is None
        else strategy.held_inputs(config.layers) * input_bytes,
    }
    if strategy.engine:
        row.update(_copy_metrics(trace, steps, copies))
        row["host_allocations_after_warmup"] = host_allocations
        row["pinned_bytes"] = pool.stats()["reserved_bytes"]
    row["noisy"] = noise.diagnose(times, {"D2H": row.get("d2h_gbps"), "H2D": row.get("h2d_gbps")})
    return row, last_step(trace) if strategy.engine else None


def last_step(trace: list[dict]) -> list[dict]:
    """The entries issued after the last step mark, with times counted from that mark."""
    starts = [
        index for index, entry in enumerate(trace) if entry["op"] == "mark" and entry["label"] == STEP_MARK
    ]
    origin = trace[starts[-1]]["start_ms"]
    return [
        {**entry, "start_ms": entry["start_ms"] - origin, "end_ms": entry["end_ms"] - origin}
        for entry in trace[starts[-1] + 1 :]
    ]


def _copy_metrics(trace: list[dict], steps: int, copies: dict[str, int]) -> dict[str, Any]:
    """Per step: bandwidth, copy time, exposed copy time (traced steps) and copy counts (timed steps)."""
    traced_steps = max(1, sum(entry["op"] == "mark" and entry["label"] == STEP_MARK for entry in trace))
    by_direction = {"offload": [], "prefetch": []}
    for entry in trace:
        if entry["op"] in by_direction:
            by_direction[entry["op"]].append(entry)

    def direction(entries: list[dict]) -> tuple[float | None, float]:
        rates = [common.gbps(entry["nbytes"], _span_ms(entry)) for entry in entries]
        rates = [rate for rate in rates if rate is not None]
        return (statistics.median(rates) if rates else None), sum(map(_span_ms, entries))

    stalls = [entry for entry in trace if entry["op"] in common.STALL_OPS]
    d2h_gbps, d2h_ms = direction(by_direction["offload"])
    h2d_gbps, h2d_ms = direction(by_direction["prefetch"])
    return {
        "d2h_gbps": d2h_gbps,
        "h2d_gbps": h2d_gbps,
        "copy_ms_per_step": (d2h_ms + h2d_ms) / traced_steps,
        "exposed_copy_ms_per_step": sum(map(_span_ms, stalls)) / traced_steps,
        "offloads_per_step": copies["offloads"] / steps,
        "prefetch_hits_per_step": copies["prefetch_hits"] / steps,
        "on_demand_fetches_per_step": copies["on_demand_fetches"] / steps,
    }


def _span_ms(entry: dict) -> float:
    return entry["end_ms"] - entry["start_ms"]


def _relate(rows: list[dict[str, Any]], raw: dict[str, Any], overlap: bool) -> None:
    """Adds overhead against plain checkpointing, the overlap fraction and the share of raw bandwidth.

    Overlap is left out on the CPU, where copies are synchronous: the compute
    "stream" never waits for them because they already ran inline.
    """
    baseline = next((row for row in rows if row["strategy"] == "checkpoint" and not row.get("oom")), None)
    for row in rows:
        if row.get("oom"):
            continue
        if baseline is not None:
            row["overhead_vs_checkpoint"] = row["median_ms"] / baseline["median_ms"] - 1
        if overlap and row.get("copy_ms_per_step"):
            row["overlap_fraction"] = max(0.0, 1 - row["exposed_copy_ms_per_step"] / row["copy_ms_per_step"])
        for direction in ("d2h", "h2d"):
            achieved, reference = row.get(f"{direction}_gbps"), raw[f"{direction}_gbps"]
            if achieved and reference:
                row[f"{direction}_vs_raw"] = achieved / reference


COLUMNS = [
    ("strategy", "strategy", "str"),
    ("median_ms", "step ms", "ms"),
    ("p20_ms", "p20", "ms"),
    ("p80_ms", "p80", "ms"),
    ("overhead_vs_checkpoint", "vs checkpoint", "pct"),
    ("peak_bytes", "peak GiB", "gib"),
    ("held_after_forward_bytes", "held after fwd GiB", "gib"),
    ("predicted_held_bytes", "predicted GiB", "gib"),
    ("d2h_gbps", "D2H GB/s", "gbps"),
    ("h2d_gbps", "H2D GB/s", "gbps"),
    ("overlap_fraction", "overlap", "frac"),
    ("host_allocations_after_warmup", "host allocs", "str"),
    ("noisy", "noisy", "str"),
]


def report(result: dict[str, Any]) -> str:
    rows = [
        {**row, "p20_ms": row["step_ms"]["p20"], "p80_ms": row["step_ms"]["p80"]}
        if not row.get("oom")
        else row
        for row in result["strategies"]
    ]
    for row in rows:
        if row.get("oom"):
            row["median_ms"] = None
            row["description"] = "out of memory"
    raw = result["raw_copy"]
    noisy = f" (noisy: {raw['noisy']})" if raw.get("noisy") else ""
    header = (
        f"### {result['label']} ({result['dtype']}, "
        f"layer input {common.format_value(result['layer_input_bytes'], 'bytes')})\n"
        f"raw pinned copy of one layer input: D2H {common.format_value(raw['d2h_gbps'], 'gbps')} GB/s, "
        f"H2D {common.format_value(raw['h2d_gbps'], 'gbps')} GB/s{noisy}\n\n"
    )
    return header + common.table(rows, COLUMNS)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=common.help_text(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--shape",
        choices=sorted(SHAPES),
        default="llama-1b-like",
        help="layer dimensions (default: %(default)s)",
    )
    parser.add_argument(
        "--layers",
        type=common.positive_int,
        help="layers in the stack (default: as many as fit, up to the model's depth)",
    )
    parser.add_argument(
        "--batch", type=common.positive_int, default=4, help="sequences (default: %(default)s)"
    )
    parser.add_argument(
        "--length", type=common.positive_int, default=2048, help="tokens per sequence (default: %(default)s)"
    )
    parser.add_argument(
        "--strategies",
        nargs="+",
        choices=sorted(STRATEGIES),
        default=list(STRATEGIES),
        help="strategies to compare (default: all)",
    )
    parser.add_argument(
        "--warmup",
        type=common.non_negative_int,
        default=10,
        help="untimed steps per strategy (default: %(default)s)",
    )
    parser.add_argument(
        "--steps",
        type=common.positive_int,
        default=20,
        help="timed steps per strategy (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    device = get_engine().device
    dtype = torch.bfloat16 if device.type != "cpu" else torch.float32
    shape = SHAPES[args.shape]
    config = StackConfig(shape, args.layers or shape.depth, args.batch, args.length)
    if args.layers is None:
        config = config.fitted(dtype, common.free_bytes(device))
    with common.one_thread_on_the_cpu(device):
        result = run(
            config, [STRATEGIES[name] for name in args.strategies], device, dtype, args.warmup, args.steps
        )
    print(report(result))
