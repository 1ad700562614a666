"""Scenario (d): the memory-budget autopilot against all-checkpoint and all-offload, at three budgets.

A decoder stack (the stack scenario's) runs under plain checkpointing, under
checkpointing with every input offloaded, and under the autopilot at three
budgets: 0%, 40% and 80% of the way from the least memory
the layers can take (every input offloaded) to what keeping every activation
takes, as the autopilot's own profile of the stack predicts them. Per run:
median step time, peak memory and memory held after the forward pass (where
the device reports memory), and for the autopilot its plan: the predicted
step time, held and peak bytes, and the per-layer table. The measured peak is
also shown less the weights' gradients, which the budget does not cover.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import torch

from ..autopilot.planner import predict
from ..checkpointing.options import OffloadOptions
from ..engine import get_engine, registry
from ..layers.wrap import WrappedLayers, wrap_layers
from . import common, noise
from .decoder import build_stack, run_stack, training_step
from .stack_overlap import StackConfig

FRACTIONS = (0.0, 0.4, 0.8)
BASELINES = {
    "checkpoint": {"options": OffloadOptions(offload=False, min_offload_bytes=0)},
    "offload": {"options": OffloadOptions(keep_resident=0, min_offload_bytes=0)},
}
RUNS = len(BASELINES) + len(FRACTIONS) + 1  # and the profile that finds the budgets


def run(
    config: StackConfig,
    device: torch.device,
    dtype: torch.dtype,
    warmup: int,
    steps: int,
    advance: Callable[[str], None] = lambda label: None,
) -> dict[str, Any]:
    """Measures the baselines and the autopilot at three budgets on one stack; a JSON-ready dict."""
    stack = build_stack(config.shape, config.layers, device, dtype)
    inputs, output_grad = config.tensors(device, dtype)
    step = training_step(stack, inputs, output_grad)

    advance(f"autopilot {config.label}: profile")
    with wrap_layers(stack, OffloadOptions(min_offload_bytes=0), memory_budget=1 << 62) as wrapped:
        for _ in range(2):  # the autopilot's first pass, then its profile step
            step()
        (profile,) = wrapped.autopilot.profiles.values()
    layers = profile.layers
    least = predict(profile, ["offload" if layer.offloadable else "checkpoint" for layer in layers])
    most = predict(profile, ["keep"] * len(layers))
    gradient_bytes = sum(parameter.nbytes for parameter in stack.parameters() if parameter.requires_grad)
    rows = []
    for name, options in BASELINES.items():
        advance(f"autopilot {config.label}: {name}")
        rows.append(measure_run(name, stack, step, inputs, output_grad, device, warmup, steps, options))
    free = common.free_bytes(device)
    for fraction in FRACTIONS:
        budget = int(least.peak_bytes + fraction * (most.peak_bytes - least.peak_bytes))
        if free is not None:  # the stack was sized for plain checkpointing, not for keeping everything
            budget = min(budget, free * 4 // 5)
        name = f"autopilot {fraction:.0%}"
        advance(f"autopilot {config.label}: {name}")
        options = {"memory_budget": budget, "options": OffloadOptions(min_offload_bytes=0)}
        # Untimed: the first pass, the profile step, and the step that makes the final plan.
        rows.append(
            measure_run(name, stack, step, inputs, output_grad, device, max(warmup, 3), steps, options)
        )
    noise.mark_implausible(rows, "run")  # the same stack, the same step: only the modes differ
    for row in rows:
        if row.get("peak_bytes") is not None:
            row["peak_less_gradients_bytes"] = row["peak_bytes"] - gradient_bytes
    return {
        "config": config.as_dict(),
        "label": config.label,
        "dtype": str(dtype),
        "least_memory_peak_bytes": least.peak_bytes,
        "all_keep_peak_bytes": most.peak_bytes,
        "copies": vars(profile.copies),
        "runs": rows,
    }


def measure_run(
    name: str,
    stack: torch.nn.ModuleList,
    step: Callable[[], None],
    inputs: torch.Tensor,
    output_grad: torch.Tensor,
    device: torch.device,
    warmup: int,
    steps: int,
    wrap: dict[str, Any],
    prepare: Callable[[WrappedLayers], None] | None = None,
) -> dict[str, Any]:
    """One run of ``stack`` wrapped with ``wrap`` (``wrap_layers``' keywords): step time, device memory
    of a step, the pinned host memory the step took at its peak, and the plan in force. ``prepare``
    runs first, inside the wrap."""
    with wrap_layers(stack, **wrap) as wrapped:
        try:
            if prepare is not None:
                prepare(wrapped)
            times = common.time_steps(step, device, warmup=warmup, steps=steps)
            stack.zero_grad(set_to_none=True)
            inputs.grad = None
            get_engine(device).synchronize()  # buffers of the last step's copies go back to the pool
            registry.reset_pool_peaks()
            host_before = registry.pool_stats().get(device.type, {}).get("in_use_bytes", 0)
            memory = common.memory_of_step(
                device, lambda: run_stack(stack, inputs), lambda output: output.backward(output_grad)
            )
        except torch.OutOfMemoryError:
            stack.zero_grad(set_to_none=True)
            return {"run": name, "oom": True, "noisy": None}
        host = registry.pool_stats().get(device.type, {}).get("peak_in_use_bytes")
        host = None if host is None else host - host_before  # what the step itself took
        plan = wrapped.plan
    row: dict[str, Any] = {
        "run": name,
        "median_ms": statistics.median(times),
        "step_ms": common.spread(times),
        **memory,
        "host_peak_bytes": host,
        "noisy": noise.diagnose(times, {}),
    }
    if plan is not None:
        row.update(
            budget_bytes=plan.budget_bytes,
            predicted_ms=plan.step_seconds * 1e3,
            predicted_held_bytes=plan.held_bytes,
            predicted_peak_bytes=plan.peak_bytes,
            modes=plan.counts(),
            plan=plan.summary(),
        )
    return row


COLUMNS = [
    ("run", "run", "str"),
    ("budget_bytes", "budget GiB", "gib"),
    ("modes", "modes", "str"),
    ("median_ms", "step ms", "ms"),
    ("predicted_ms", "predicted ms", "ms"),
    ("held_after_forward_bytes", "held after fwd GiB", "gib"),
    ("predicted_held_bytes", "predicted GiB", "gib"),
    ("peak_bytes", "peak GiB", "gib"),
    ("peak_less_gradients_bytes", "peak less weight grads GiB", "gib"),
    ("predicted_peak_bytes", "predicted peak GiB", "gib"),
    ("noisy", "noisy", "str"),
]


def report(result: dict[str, Any]) -> str:
    """A markdown table of the runs, then each plan's table."""
    rows = [
        {**row, "modes": ", ".join(f"{count} {mode}" for mode, count in row["modes"].items())}
        if "modes" in row
        else {**row, "modes": "out of memory"}
        if row.get("oom")
        else row
        for row in result["runs"]
    ]
    copies = result["copies"]
    header = (
        f"### autopilot, {result['label']} ({result['dtype']})\n"
        f"least-memory plan peak {common.format_value(result['least_memory_peak_bytes'], 'gib')} GiB, "
        f"all-keep peak {common.format_value(result['all_keep_peak_bytes'], 'gib')} GiB; copies measured "
        f"D2H {copies['d2h_bytes_per_second'] / 1e9:.3g} GB/s, "
        f"H2D {copies['h2d_bytes_per_second'] / 1e9:.3g} GB/s, "
        f"both ways {copies['bidirectional_bytes_per_second'] / 1e9:.3g} GB/s\n\n"
    )
    plans = "\n\n".join(f"```\n{row['plan']}\n```" for row in result["runs"] if "plan" in row)
    return header + common.table(rows, COLUMNS) + "\n\n" + plans
