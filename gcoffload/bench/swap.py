"""Scenario (f): swap against checkpointing and offloading, at the least memory, at several bus speeds.

A decoder stack runs, at the budget every input offloaded needs (the least
memory the layers can take, as the autopilot's own profile predicts it),
under: plain checkpointing, checkpointing with every input offloaded, the
autopilot without swap (keep / checkpoint / offload), the autopilot with swap,
and every layer swapped. Per run: median step time and its ratio to plain
checkpointing, device memory held after the forward pass and at the peak,
pinned host memory at the peak, and for the autopilot its plan.

Where the bus can be set (the simulated device: ``set_bandwidth``), the runs
repeat at each ``bus_ratios`` entry: the bandwidth at which copying one
layer's swapped activations one way takes that many times the layer's forward
time. Elsewhere they run once, at the device's own bus, and the ratio is
reported as measured.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..autopilot.plan_cache import bucket_tokens
from ..autopilot.planner import fastest_plan, predict
from ..autopilot.profile import Profile
from ..checkpointing.options import OffloadOptions
from ..layers.wrap import WrappedLayers, wrap_layers
from . import common, noise
from .autopilot import measure_run
from .decoder import build_stack, training_step
from .stack_overlap import StackConfig

BUS_RATIOS = (0.3, 1.0, 3.0)
RUNS = ("checkpoint", "offload", "autopilot without swap", "autopilot", "swap")
CALIBRATIONS = 3  # profiles per bus speed at most, each correcting the bandwidth set
OPTIONS = OffloadOptions(min_offload_bytes=0)


def run(
    config: StackConfig,
    device: torch.device,
    dtype: torch.dtype,
    warmup: int,
    steps: int,
    advance: Callable[[str], None] = lambda label: None,
    *,
    bus_ratios: Sequence[float] = BUS_RATIOS,
    set_bandwidth: Callable[[float], None] | None = None,
) -> dict[str, Any]:
    """Measures the five runs at each bus speed (once, at the device's own, without ``set_bandwidth``).

    Args:
        set_bandwidth: sets the copy bandwidth, one way, in bytes per second.
    """
    stack = build_stack(config.shape, config.layers, device, dtype)
    inputs, output_grad = config.tensors(device, dtype)
    step = training_step(stack, inputs, output_grad)

    advance(f"swap {config.label}: profile")
    profile = _profile(stack, step)
    speeds: list[tuple[str, float | None]] = [(config.label, None)]
    if set_bandwidth is not None:
        speeds = [(f"{config.label} bus {ratio:g}x", ratio) for ratio in bus_ratios]
    results = []
    for label, ratio in speeds:
        if ratio is not None:
            profile = _at_ratio(ratio, profile, stack, step, set_bandwidth)
        results.append(
            _at_bus(label, stack, step, inputs, output_grad, profile, device, warmup, steps, advance)
        )
    return {
        "config": config.as_dict(),
        "label": config.label,
        "dtype": str(dtype),
        "buses": results,
    }


def _per_layer(profile: Profile) -> tuple[float, float]:
    """A layer's swapped bytes and forward seconds, on average."""
    swapped = statistics.mean(layer.swap_bytes for layer in profile.layers)
    return swapped, statistics.mean(layer.forward_seconds for layer in profile.layers)


def _bus_ratio(profile: Profile) -> float:
    """How many times its forward time copying one layer's swapped activations one way takes."""
    swapped, forward = _per_layer(profile)
    return swapped / profile.copies.d2h_bytes_per_second / forward


def _at_ratio(
    ratio: float,
    profile: Profile,
    stack: torch.nn.ModuleList,
    step: Callable[[], None],
    set_bandwidth: Callable[[float], None],
) -> Profile:
    """Sets the bandwidth for ``ratio``, corrected from the copies measured (a copy costs more than its
    bandwidth says: latency, the host's own memcpy); returns the profile measured at it."""
    swapped, forward = _per_layer(profile)
    bandwidth = swapped / (ratio * forward)
    for _ in range(CALIBRATIONS):
        set_bandwidth(bandwidth)
        profile = _profile(stack, step)
        measured = _bus_ratio(profile)
        if abs(measured / ratio - 1) <= 0.1:
            break
        bandwidth *= measured / ratio
    return profile


def _profile(stack: torch.nn.ModuleList, step: Callable[[], None]) -> Profile:
    with wrap_layers(stack, OPTIONS, memory_budget=1 << 62) as wrapped:
        for _ in range(2):  # the autopilot's first pass, then its profile step
            step()
        step()  # the profile step's backward pass is timed when the next pass begins
        (profile,) = wrapped.autopilot.profiles.values()
    return profile.scaled(bucket_tokens(profile.tokens))


def _at_bus(
    label: str,
    stack: torch.nn.ModuleList,
    step: Callable[[], None],
    inputs: torch.Tensor,
    output_grad: torch.Tensor,
    profile: Profile,
    device: torch.device,
    warmup: int,
    steps: int,
    advance: Callable[[str], None],
) -> dict[str, Any]:
    least = predict(profile, ["offload" if layer.offloadable else "checkpoint" for layer in profile.layers])
    budget = least.peak_bytes
    copies = profile.copies
    swapped, forward = _per_layer(profile)
    bus_ratio = _bus_ratio(profile)
    all_swap = predict(profile, ["swap" if layer.swap_bytes else "checkpoint" for layer in profile.layers])
    runs: dict[str, dict[str, Any]] = {
        "checkpoint": {"options": OffloadOptions(offload=False, min_offload_bytes=0)},
        "offload": {"options": OffloadOptions(keep_resident=0, min_offload_bytes=0)},
        "autopilot without swap": {"options": OPTIONS, "memory_budget": budget},
        "autopilot": {"options": OPTIONS, "memory_budget": budget},
        "swap": {"options": OPTIONS, "mode": "swap"},
    }
    rows = []
    for name, wrap in runs.items():
        advance(f"swap {label}: {name}")

        def pin_without_swap(wrapped: WrappedLayers) -> None:
            for _ in range(2):  # the first pass and the profile step; then a plan that never swaps
                step()
            (measured,) = wrapped.autopilot.profiles.values()
            scaled = measured.scaled(bucket_tokens(measured.tokens))
            wrapped.autopilot.use(
                fastest_plan(scaled, budget, prefetch_depth=OPTIONS.prefetch_depth, swap=False)
            )

        prepare = pin_without_swap if name == "autopilot without swap" else None
        warm = max(warmup, 3) if "memory_budget" in wrap else warmup
        rows.append(measure_run(name, stack, step, inputs, output_grad, device, warm, steps, wrap, prepare))
    noise.mark_implausible(rows, "run")
    gradient_bytes = sum(parameter.nbytes for parameter in stack.parameters() if parameter.requires_grad)
    for row in rows:
        if row.get("peak_bytes") is not None:
            row["peak_less_gradients_bytes"] = row["peak_bytes"] - gradient_bytes
    checkpointed = next(row for row in rows if row["run"] == "checkpoint").get("median_ms")
    for row in rows:
        if checkpointed and "median_ms" in row:
            row["vs_checkpoint"] = row["median_ms"] / checkpointed
        if row["run"] == "swap":
            row.update(predicted_ms=all_swap.step_seconds * 1e3, predicted_peak_bytes=all_swap.peak_bytes)
    return {
        "bus_ratio": bus_ratio,
        "budget_bytes": budget,
        "copies": vars(copies),
        "swap_bytes_per_layer": swapped,
        "forward_ms_per_layer": forward * 1e3,
        "runs": rows,
    }


COLUMNS = [
    ("run", "run", "str"),
    ("modes", "modes", "str"),
    ("median_ms", "step ms", "ms"),
    ("vs_checkpoint", "vs checkpoint", "ratio"),
    ("predicted_ms", "predicted ms", "ms"),
    ("held_after_forward_bytes", "held after fwd MiB", "mib"),
    ("peak_bytes", "peak MiB", "mib"),
    ("peak_less_gradients_bytes", "peak less weight grads MiB", "mib"),
    ("predicted_peak_bytes", "predicted peak MiB", "mib"),
    ("host_peak_bytes", "host peak MiB", "mib"),
    ("noisy", "noisy", "str"),
]


def report(result: dict[str, Any]) -> str:
    """One markdown table per bus speed, then the autopilot's plans."""
    parts = [f"### swap, {result['label']} ({result['dtype']})"]
    for bus in result["buses"]:
        copies = bus["copies"]
        swapped = common.format_value(bus["swap_bytes_per_layer"], "mib")
        d2h, h2d = copies["d2h_bytes_per_second"] / 1e9, copies["h2d_bytes_per_second"] / 1e9
        rows = [
            {**row, "modes": ", ".join(f"{count} {mode}" for mode, count in row["modes"].items())}
            if "modes" in row
            else row
            for row in bus["runs"]
        ]
        parts.append(
            f"\n**bus {bus['bus_ratio']:.2g}x**: one layer's swapped activations "
            f"({swapped} MiB) take {bus['bus_ratio']:.2g}x its forward time "
            f"({bus['forward_ms_per_layer']:.3g} ms) to copy one way; copies measured D2H {d2h:.3g} GB/s, "
            f"H2D {h2d:.3g} GB/s; "
            f"budget {common.format_value(bus['budget_bytes'], 'mib')} MiB (the least memory)\n"
        )
        parts.append(common.table(rows, COLUMNS))
        plans = [
            f"```\n{row['plan']}\n```" for row in bus["runs"] if row["run"] == "autopilot" and "plan" in row
        ]
        parts += ["", *plans]
    return "\n".join(parts)
