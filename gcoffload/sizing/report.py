"""A :class:`~gcoffload.sizing.estimate.Capacity` as text and as a plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .estimate import Capacity, Strategy

__all__ = ["plot", "text"]


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB"


def text(answer: Capacity) -> str:
    """The tables: fixed memory, the strategies at each asked length, the longest contexts, the plan."""
    config = answer.config
    weights = answer.weights
    tuning = f"LoRA rank {answer.lora_rank} (all linear layers)" if answer.lora_rank else "full fine-tuning"
    architecture = ", ".join(getattr(config, "architectures", None) or [type(config).__name__])
    host = _gib(answer.host_memory_bytes) if answer.host_memory_bytes is not None else "no limit"
    disk = answer.disk
    if disk is not None:
        host += (
            f"; disk: {_gib(disk.capacity_bytes)} ({disk.rates.read_bytes_per_second / 1e9:g} GB/s read, "
            f"{disk.rates.write_bytes_per_second / 1e9:g} GB/s write)"
        )
    dtype = str(answer.dtype).removeprefix("torch.")
    lines = [
        f"gcoffload plan: {answer.model} ({architecture}, {len(answer.estimator.curve.model.layers)} layers, "
        f"hidden {getattr(config, 'hidden_size', '?')}), {tuning}, {dtype}, "
        f"attention {answer.attn}, batch {answer.batch}",
        f"GPU {answer.gpu.name}: {_gib(answer.gpu.memory_bytes)}, {_gib(answer.usable_bytes)} usable; "
        f"pinned host memory: {host}",
        f"weights {_gib(weights.weight_bytes)} + gradients {_gib(weights.gradient_bytes)} + AdamW states "
        f"{_gib(weights.optimizer_bytes)} = {_gib(weights.total_bytes)} "
        f"({weights.parameters / 1e9:.2f} B parameters, {weights.trainable / 1e9:.3f} B trainable)",
    ]
    disk_column = f"{'disk':>12} " if disk else ""  # a column only where a disk was given
    for row in answer.fits:
        reference = next((fit for fit in row if fit.strategy is Strategy.CHECKPOINT), None)
        lines += [
            "",
            f"at {row[0].seq} tokens per sequence ({_one_layer(answer, row[0].seq)}):",
            f"{'strategy':<12} {'activations':>13} {'peak (est.)':>13} {'host':>12} "
            f"{disk_column}{'step (est.)':>12} {'vs checkpoint':>13}  fits",
        ]
        for fit in row:
            ratio = f"{fit.step_seconds / reference.step_seconds:.2f}x" if reference else "-"
            disk_cell = f"{_gib(fit.disk_bytes):>12} " if disk else ""
            lines.append(
                f"{fit.strategy.value:<12} {_gib(fit.activation_bytes):>13} {_gib(fit.peak_bytes):>13} "
                f"{_gib(fit.host_bytes):>12} {disk_cell}{fit.step_seconds * 1e3:>9.0f} ms {ratio:>13}  "
                f"{'yes' if fit.fits else 'no'}"
            )
    lines += ["", f"longest context that fits (tokens per sequence, in steps of {answer.granularity}):"]
    for strategy, seq in answer.longest.items():
        shown = (
            f">= {seq}" if seq >= answer.max_seq - answer.max_seq % answer.granularity else str(seq or "none")
        )
        lines.append(f"{strategy.value:<12} {shown:>10}   {strategy.description}")
    last = answer.fits[-1]
    pilot = next((fit for fit in last if fit.strategy is Strategy.AUTOPILOT), None)
    if pilot is not None:
        lines += ["", f"the autopilot's plan at {pilot.seq} tokens per sequence:", pilot.plan.summary()]
    lines += [
        "",
        f"Exact: activations{', host and disk' if disk else ' and host'} bytes (the step traced on the meta "
        "device). Estimates: the peak (weights, gradients, AdamW states, activations, returned logits, "
        "backward working set) and time "
        f"({answer.mfu:.0%} of {answer.gpu.peak_flops / 1e12:.0f} TFLOP/s, a "
        f"{answer.gpu.link_bytes_per_second / 1e9:.0f} GB/s host link"
        f"{', the disk as one serial queue' if disk else ''}).",
    ]
    if not answer.exact:
        lines.append("(every length was traced: this model's counts are no quadratic in the length)")
    return "\n".join(lines)


def _one_layer(answer: Capacity, seq: int) -> str:
    """A middle layer's forward time against its input's copy time, both estimates."""
    trace = answer.estimator.curve.at(seq)
    middle = len(trace.layer_flops) // 2
    forward = trace.layer_flops[middle] / (answer.gpu.peak_flops * answer.mfu)
    nbytes = trace.profile.layers[middle].input_bytes
    copy = nbytes / answer.gpu.link_bytes_per_second
    return (
        f"a layer's forward {forward * 1e3:.1f} ms (est.), its {nbytes / 2**20:.0f} MiB input "
        f"{copy * 1e3:.1f} ms to copy each way"
    )


def plot(answer: Capacity, path: Path, points: int = 32) -> Path:
    """Tokens per sequence against the estimated device peak, a line per strategy; a PNG at ``path``."""
    from matplotlib.figure import Figure

    top = max(max(answer.longest.values()), max(row[0].seq for row in answer.fits), answer.granularity)
    top = min(2 * top, answer.max_seq)
    step = max(answer.granularity, top // points // answer.granularity * answer.granularity)
    seqs = list(range(answer.granularity, top + 1, step))
    rows = answer.sweep(seqs)
    figure = Figure(figsize=(8, 5), layout="constrained")
    axis: Any = figure.add_subplot()
    for index, strategy in enumerate(answer.strategies):
        style = "--" if strategy is Strategy.SAVE_ON_CPU else "-"  # it lies on offload's line
        axis.plot(
            seqs, [row[index].peak_bytes / 2**30 for row in rows], style, marker=".", label=strategy.value
        )
    axis.axhline(
        answer.usable_bytes / 2**30, color="black", linestyle="--", label=f"{answer.gpu.name} usable"
    )
    axis.set_xlabel("tokens per sequence")
    axis.set_ylabel("device peak, GiB (estimate)")
    axis.set_ylim(0, 1.6 * answer.usable_bytes / 2**30)
    axis.set_title(
        f"{answer.model}: batch {answer.batch}, {'LoRA' if answer.lora_rank else 'full'}, {answer.attn}"
    )
    axis.legend()
    path = Path(path)
    figure.savefig(path, dpi=120)
    return path
