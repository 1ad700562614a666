"""What each strategy needs at a length, and the longest context that fits: :func:`capacity`.

Note [What the capacity numbers rest on]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
*Exact* (traced, Note [Tracing on the meta device] in trace.py): the bytes
autograd holds on the device after the forward pass (``activation_bytes``),
and the host bytes of the offloaded inputs and swapped activations (a
storage under ``min_offload_bytes`` at the traced lengths that grows past it
at a longer one, found by no trace, is counted on the device, not the host). The decoder layers are counted
by the autopilot's own memory model (Note [The memory model] in
planner.py), the rest of the model (embedding, final norm, head and loss) as
traced, storages shared across the boundary once.

The strategies' layer modes: no checkpointing keeps every layer; torch
checkpointing checkpoints every layer; gcoffload's offload offloads every
input but the last ``keep_resident`` (``patch_model``'s defaults);
transformers' ``offload=True`` (``save_on_cpu`` around torch's non-reentrant
checkpoint) moves what that checkpoint saves through saved-tensor hooks: its
positional tensor arguments, the hidden states of every layer, while the
keyword ones (masks, rotary tables) stay on the device, as gcoffload's offload
of every input does; its copies run on the compute stream, so the time model
charges all of them. The autopilot's plan is the fastest whose estimated
peak fits, with its swaps within the host memory given.

With a disk (``disk_memory``), gcoffload's offload and the autopilot put the
offloaded inputs that do not fit the host memory on it, the earliest layers'
first, as the engine's disk tier does (:mod:`.disk`); swapped activations and
``save_on_cpu``'s inputs stay in host memory. A strategy then fits if its
host bytes fit the host memory and its disk bytes the disk; the disk's bytes
plus the host's are the host bytes it would take without a disk, exactly.

*Estimated*:

* the peak (``peak_bytes``): parameters, gradients and AdamW states
  (:class:`~gcoffload.sizing.trace.Weights`), the activations, the loss
  and logits the step returns (held through backward, as ``output =
  model(...)`` holds them; the Trainer drops them first, which leaves their
  size spare), and the larger of two working sets in
  backward: the layers' (the planner's: the gradient through the stack, a
  recompute, the prefetched inputs) and the head's (twice its largest saved
  storage: the gradients of the logits, which exist together at the start of
  backward). Allocator fragmentation and library workspaces are what
  ``reserve_bytes`` leaves for; a peak may also come in the forward pass or
  the optimizer step, which this does not model;
* time: each layer's forward FLOPs at ``mfu`` of the GPU's datasheet peak,
  backward twice that, a recompute once; copies at the GPU's link speed,
  hidden behind compute as the planner's time model says, and the disk's
  transfers as Note [The disk in the time model] in disk_time.py says. It says
  how the strategies compare, not how fast a step will be.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..autopilot.budget import parse_size
from ..autopilot.disk_time import exposed_disk_seconds, layers_on_disk
from ..autopilot.planner import Mode, Plan, fastest_plan, holds_own_input, keeps_output, least_memory, predict
from ..autopilot.profile import LayerProfile, Profile
from ..checkpointing.options import OffloadOptions
from .curve import TraceCurve
from .disk import Disk, resolve_disk
from .hardware import Gpu, resolve_gpu
from .model_source import load_config
from .trace import MetaModel, ModelTrace, Weights

__all__ = ["Capacity", "Strategy", "StrategyFit", "capacity"]

DEFAULT_RESERVE = 2 * 2**30
DEFAULT_MFU = 0.4
_DTYPES = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}  # fmt: skip


class Strategy(str, enum.Enum):
    """How the layers' activations are kept."""

    NONE = "none"
    CHECKPOINT = "checkpoint"
    SAVE_ON_CPU = "save_on_cpu"
    OFFLOAD = "offload"
    AUTOPILOT = "autopilot"

    @property
    def description(self) -> str:
        return _DESCRIPTIONS[self]


_DESCRIPTIONS = {
    Strategy.NONE: "no checkpointing",
    Strategy.CHECKPOINT: "torch checkpointing of every layer (transformers' gradient checkpointing)",
    Strategy.SAVE_ON_CPU: "transformers' offload=True: inputs to host memory on the compute stream",
    Strategy.OFFLOAD: "gcoffload's default: inputs in pinned host memory (the last stays), side streams",
    Strategy.AUTOPILOT: "gcoffload's autopilot: keep, swap, checkpoint or offload each layer, to fit",
}


@dataclass(frozen=True)
class StrategyFit:
    """One strategy at one length (Note [What the capacity numbers rest on]).

    Args:
        strategy: the strategy.
        seq: tokens per sequence.
        activation_bytes: device bytes autograd holds after the forward pass (exact).
        peak_bytes: the step's device peak, weights and optimizer included (estimate).
        host_bytes: pinned host bytes it takes (exact).
        step_seconds: forward + backward time (estimate), ``disk_seconds`` included.
        fits: whether the peak fits the usable device memory, the host
            bytes the host memory and the disk bytes the disk.
        plan: the decoder layers' modes, with the planner's predictions.
        disk_bytes: bytes of the layer inputs on disk (exact; 0 without a disk).
        disk_layers: the layers whose inputs are on disk, in forward order.
        disk_seconds: the time the step waits for the disk (estimate).
    """

    strategy: Strategy
    seq: int
    activation_bytes: int
    peak_bytes: int
    host_bytes: int
    step_seconds: float
    fits: bool
    plan: Plan
    disk_bytes: int = 0
    disk_layers: tuple[int, ...] = ()
    disk_seconds: float = 0.0


@dataclass(frozen=True)
class Capacity:
    """The answer of :func:`capacity`: each strategy at the asked lengths, and the longest context of each.

    Attributes:
        model: the model as named.
        config: its transformers config.
        gpu: the device planned for; ``usable_bytes`` of its memory may be used.
        host_memory_bytes: the pinned host memory allowed (None: no limit).
        disk: the disk for offloaded inputs past the host memory (None: none).
        batch, dtype, attn, lora_rank, mfu: the step counted.
        weights: parameters, gradients, optimizer states.
        fits: every strategy at every asked length, by length then strategy.
        longest: the longest sequence each strategy fits (a multiple of
            ``granularity``; 0: not even that; ``max_seq``: at least that).
        granularity, max_seq: the search's step and ceiling.
        exact: whether the counts between traced lengths were interpolated
            exactly (Note [Why three traces are exact] in curve.py).
    """

    model: str
    config: Any
    gpu: Gpu
    usable_bytes: int
    host_memory_bytes: int | None
    disk: Disk | None
    batch: int
    dtype: torch.dtype
    attn: str
    lora_rank: int | None
    mfu: float
    weights: Weights
    fits: tuple[tuple[StrategyFit, ...], ...]
    longest: dict[Strategy, int]
    granularity: int
    max_seq: int
    exact: bool
    estimator: _Estimator = field(repr=False, compare=False)

    @property
    def strategies(self) -> tuple[Strategy, ...]:
        return tuple(fit.strategy for fit in self.fits[0])

    def sweep(self, seqs: Iterable[int]) -> tuple[tuple[StrategyFit, ...], ...]:
        """Every strategy at each of ``seqs`` (interpolated where exact: cheap), for a plot."""
        return tuple(
            tuple(self.estimator.fit(self.estimator.curve.at(seq), strategy) for strategy in self.strategies)
            for seq in seqs
        )

    def at(self, seq: int) -> dict[Strategy, StrategyFit]:
        """The strategies at an asked length."""
        for row in self.fits:
            if row[0].seq == seq:
                return {fit.strategy: fit for fit in row}
        raise KeyError(f"seq={seq} was not asked; asked: {[row[0].seq for row in self.fits]}")

    def to_dict(self) -> dict[str, Any]:
        """Plain numbers, for JSON."""
        return {
            "model": self.model,
            "gpu": {
                "name": self.gpu.name,
                "memory_bytes": self.gpu.memory_bytes,
                "usable_bytes": self.usable_bytes,
            },
            "host_memory_bytes": self.host_memory_bytes,
            "disk": {"capacity_bytes": self.disk.capacity_bytes, **vars(self.disk.rates)}
            if self.disk is not None
            else None,
            "batch": self.batch,
            "dtype": str(self.dtype).removeprefix("torch."),
            "attn": self.attn,
            "lora_rank": self.lora_rank,
            "mfu": self.mfu,
            "weights": vars(self.weights) | {"total_bytes": self.weights.total_bytes},
            "lengths": [
                {
                    "seq": row[0].seq,
                    "strategies": {
                        fit.strategy.value: {
                            "activation_bytes": fit.activation_bytes,
                            "peak_bytes": fit.peak_bytes,
                            "host_bytes": fit.host_bytes,
                            "disk_bytes": fit.disk_bytes,
                            "disk_layers": list(fit.disk_layers),
                            "step_seconds_estimate": fit.step_seconds,
                            "disk_seconds_estimate": fit.disk_seconds,
                            "fits": fit.fits,
                            "modes": dict(sorted(fit.plan.counts().items())),
                        }
                        for fit in row
                    },
                }
                for row in self.fits
            ],
            "longest_seq": {strategy.value: seq for strategy, seq in self.longest.items()},
            "granularity": self.granularity,
            "max_seq": self.max_seq,
            "exact": self.exact,
        }


class _Estimator:
    """The strategies of Note [What the capacity numbers rest on] for one model, device and batch."""

    def __init__(
        self,
        curve: TraceCurve,
        weights: Weights,
        gpu: Gpu,
        usable: int,
        host: int | None,
        mfu: float,
        disk: Disk | None = None,
    ) -> None:
        self.keep_resident = curve.options.keep_resident
        self.curve = curve
        self.weights = weights
        self.gpu = gpu
        self.usable = usable
        self.host = host
        self.disk = disk
        self.flops_per_second = gpu.peak_flops * mfu

    def fit(self, trace: ModelTrace, strategy: Strategy) -> StrategyFit:
        """``strategy`` at the length of ``trace``."""
        # save_on_cpu copies on the compute stream: the planner then charges all of their time.
        on_compute_stream = strategy is Strategy.SAVE_ON_CPU
        profile = replace(
            trace.profile,
            copies=replace(self.gpu.copies(), overlaps_compute=not on_compute_stream),
            layers=tuple(
                replace(layer, forward_seconds=flops / self.flops_per_second)
                for layer, flops in zip(trace.profile.layers, trace.layer_flops, strict=True)
            ),
        )
        if strategy is Strategy.AUTOPILOT:
            plan = self._autopilot(trace, profile)
        else:
            plan = predict(profile, self._modes(profile, strategy))
        held = self._activations(trace, plan)
        working_set = max(plan.peak_bytes - plan.held_bytes, trace.head_working_set_bytes)
        peak = self.weights.total_bytes + held + trace.returned_bytes + working_set
        moves_inputs = strategy in (Strategy.OFFLOAD, Strategy.AUTOPILOT)
        on_disk, disk_seconds = self._spill_to_disk(profile, plan) if moves_inputs else ((), 0.0)
        disk_bytes = sum(profile.layers[position].input_bytes for position in on_disk)
        host = plan.host_bytes - disk_bytes
        seconds = plan.step_seconds + disk_seconds + 3 * trace.other_flops / self.flops_per_second
        fits = (
            peak <= self.usable
            and (self.host is None or host <= self.host)
            and (self.disk is None or disk_bytes <= self.disk.capacity_bytes)
        )
        return StrategyFit(
            strategy, trace.seq, held, peak, host, seconds, fits, plan,
            disk_bytes=disk_bytes,
            disk_layers=tuple(plan.layers[position].index for position in on_disk),
            disk_seconds=disk_seconds,
        )  # fmt: skip

    def _spill_to_disk(self, profile: Profile, plan: Plan) -> tuple[tuple[int, ...], float]:
        """Positions of the layers whose offloaded inputs go to disk, and the disk's exposed time.

        See :mod:`.disk`, and Note [The disk in the time model] in disk_time.py.
        """
        if self.disk is None or self.host is None:
            return (), 0.0
        layers = profile.layers
        offloaded = [
            (position, layer.input_bytes)
            for position, (layer, mode) in enumerate(zip(layers, plan.modes, strict=True))
            if mode is Mode.OFFLOAD
        ]
        on_disk = layers_on_disk(offloaded, plan.host_bytes, self.host)

        def backward(layer: LayerProfile, mode: Mode) -> float:  # as Note [The time model] in planner.py
            if mode is Mode.PLAIN:
                return 0.0
            recompute = profile.recompute_per_forward if mode.recomputes else 0.0
            return layer.forward_seconds * (profile.backward_per_forward + recompute)

        seconds = exposed_disk_seconds(
            [layer.forward_seconds for layer in layers],
            [backward(layer, mode) for layer, mode in zip(layers, plan.modes, strict=True)],
            [layer.input_bytes if position in on_disk else 0 for position, layer in enumerate(layers)],
            read_bytes_per_second=self.disk.rates.read_bytes_per_second,
            write_bytes_per_second=self.disk.rates.write_bytes_per_second,
        )
        return on_disk, seconds

    def _modes(self, profile: Any, strategy: Strategy) -> tuple[Mode, ...]:
        if strategy is Strategy.SAVE_ON_CPU:  # it moves every checkpoint's positional tensors: the input
            return least_memory(profile).modes
        if strategy is Strategy.OFFLOAD:  # as patch_model runs it: the last keep_resident inputs stay
            modes = list(least_memory(profile).modes)
            offloaded = [index for index, mode in enumerate(modes) if mode is Mode.OFFLOAD]
            for index in offloaded[len(offloaded) - self.keep_resident :] if self.keep_resident else ():
                modes[index] = Mode.CHECKPOINT
            return tuple(modes)
        wanted = Mode.KEEP if strategy is Strategy.NONE else Mode.CHECKPOINT
        return tuple(wanted if layer.planned else Mode.PLAIN for layer in profile.layers)

    def _autopilot(self, trace: ModelTrace, profile: Any) -> Plan:
        """The fastest plan whose estimated peak fits; the least-memory plan when none does.

        The planner keeps a plan's held bytes plus its own working set within
        its budget; the head's working set, where larger, takes the excess
        over the smallest working set a plan can have (all layers kept) off
        that budget, so that both fit.
        """
        layers = trace.profile.layers
        boundary = layers[0].input_bytes * trace.other_saves_stack_input
        boundary += layers[-1].output_bytes * trace.other_saves_stack_output
        budget = self.usable - self.weights.total_bytes - trace.returned_bytes - trace.other_bytes - boundary
        kept = predict(profile, self._modes(profile, Strategy.NONE))
        budget -= max(0, trace.head_working_set_bytes - (kept.peak_bytes - kept.held_bytes))
        try:
            return fastest_plan(profile, max(budget, 0), host_budget=self.host)
        except ValueError:  # not even the least memory fits: it does not fit at all
            return least_memory(profile)

    @staticmethod
    def _activations(trace: ModelTrace, plan: Plan) -> int:
        """The plan's held bytes, the rest of the model's, and the storages both save once."""
        layers = trace.profile.layers
        held = plan.held_bytes + trace.other_bytes
        if trace.other_saves_stack_input and not holds_own_input(layers[0], plan.modes[0]):
            held += layers[0].input_bytes
        if trace.other_saves_stack_output and not keeps_output(layers[-1], plan.modes[-1]):
            held += layers[-1].output_bytes
        return held

    def longest(self, strategy: Strategy, granularity: int, max_seq: int) -> int:
        """The longest multiple of ``granularity`` up to ``max_seq`` that fits (0: none)."""

        def fits(steps: int) -> bool:
            return self.fit(self.curve.at(steps * granularity), strategy).fits

        return _largest(fits, max_seq // granularity) * granularity


def _largest(fits: Callable[[int], bool], ceiling: int) -> int:
    """The largest ``n`` in ``1..ceiling`` with ``fits(n)`` (monotone), or 0."""
    if ceiling < 1 or not fits(1):
        return 0
    low, high = 1, 2
    while high <= ceiling and fits(high):
        low, high = high, high * 2
    high = min(high, ceiling + 1)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def capacity(
    model: Any,
    seq: int | Sequence[int] = 8192,
    *,
    batch: int = 1,
    gpu: Any = "H100 80GB",
    dtype: str | torch.dtype = "bfloat16",
    lora_rank: int | None = None,
    attn: str = "sdpa",
    host_memory: int | str | None = None,
    disk_memory: int | str | None = None,
    disk_bandwidth: float | str | tuple[float | str, float | str] | None = None,
    mfu: float = DEFAULT_MFU,
    link_bytes_per_second: float | None = None,
    reserve_bytes: int | str = DEFAULT_RESERVE,
    granularity: int = 1024,
    max_seq: int | None = None,
    strategies: Iterable[Strategy | str] = tuple(Strategy),
    min_offload_bytes: int = OffloadOptions().min_offload_bytes,
) -> Capacity:
    """How much device memory each strategy needs to train ``model``, and how many tokens fit.

    Builds the model from its config on the meta device (no weights, no GPU),
    traces the training step and plans it (Note [What the capacity numbers
    rest on]).

    Args:
        model: a transformers config, a ``config.json`` path, a model
            directory or a hub id (the config only is read).
        seq: tokens per sequence to report, one length or several.
        batch: sequences per step.
        gpu: a name from :data:`~gcoffload.sizing.hardware.GPUS`, or a memory size.
        dtype: the weights' and activations' dtype.
        lora_rank: LoRA adapters of this rank on every linear layer (PEFT's
            ``"all-linear"``); None for full fine-tuning.
        attn: ``"sdpa"``, ``"eager"`` or ``"flash"``.
        host_memory: pinned host memory allowed (bytes or a size); None for no limit.
        disk_memory: a local disk for the offloaded inputs past ``host_memory``
            (bytes or a size such as ``"3.84TB"``), which gcoffload's offload
            and autopilot then fill from the first layer up; None for no disk.
        disk_bandwidth: the disk's sequential rate, in bytes per second or
            as ``"7GB/s"``, one for reads and writes or a ``(read, write)``
            pair (``"7GB/s,5GB/s"``); None for one PCIe 4 datacenter NVMe
            (7 GB/s read, 5 GB/s write, :mod:`gcoffload.sizing.disk`).
        mfu: the fraction of the GPU's peak FLOP/s a step reaches (time estimates only).
        link_bytes_per_second: the host link, one way, instead of the GPU's.
        reserve_bytes: device memory left to the CUDA context, workspaces, fragmentation.
        granularity: the longest contexts are multiples of it (and the
            shortest length interpolated).
        max_seq: where the search for the longest context stops
            (default: 8 times the config's ``max_position_embeddings``).
        strategies: the strategies to count.
        min_offload_bytes: inputs smaller than this stay on the device.

    Raises:
        ValueError: an argument is out of range (the message names it).
    """
    seqs = (seq,) if isinstance(seq, int) else tuple(seq)
    for name, value in [
        ("batch", batch),
        ("granularity", granularity),
        *(("seq", length) for length in seqs),
    ]:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not seqs:
        raise ValueError("seq: give at least one length")
    if isinstance(mfu, bool) or not isinstance(mfu, (int, float)) or not 0 < mfu <= 1:
        raise ValueError(f"mfu must be a fraction of peak FLOP/s in (0, 1], got {mfu!r}")
    try:
        chosen = tuple(Strategy(strategy) for strategy in strategies)
    except ValueError:
        raise ValueError(
            f"strategies must be among {[strategy.value for strategy in Strategy]}, got {list(strategies)!r}"
        ) from None
    torch_dtype = _dtype(dtype)
    device = resolve_gpu(gpu, link_bytes_per_second)
    reserve = parse_size(reserve_bytes)
    if reserve >= device.memory_bytes:
        raise ValueError(
            f"reserve_bytes ({reserve}) leaves nothing of the {device.name}'s {device.memory_bytes} bytes"
        )
    try:
        host = parse_size(host_memory) if host_memory is not None else None
    except ValueError as error:
        raise ValueError(f"host_memory: {error}") from None
    disk = _disk_from_arguments(disk_memory, disk_bandwidth, host)
    config = load_config(model)
    if max_seq is None:
        max_seq = 8 * int(getattr(config, "max_position_embeddings", 0) or 131072)
    if not isinstance(max_seq, int) or isinstance(max_seq, bool) or max_seq < granularity:
        raise ValueError(f"max_seq must be an int of at least granularity ({granularity}), got {max_seq!r}")
    meta_model = MetaModel(config, torch_dtype, attn, lora_rank)
    weights = meta_model.weights()
    curve = TraceCurve(meta_model, batch, granularity, OffloadOptions(min_offload_bytes=min_offload_bytes))
    estimator = _Estimator(curve, weights, device, device.memory_bytes - reserve, host, mfu, disk)
    fits = tuple(tuple(estimator.fit(curve.at(length), strategy) for strategy in chosen) for length in seqs)
    longest = {strategy: estimator.longest(strategy, granularity, max_seq) for strategy in chosen}
    return Capacity(
        model=str(model) if not hasattr(model, "to_dict") else type(model).__name__,
        config=config,
        gpu=device,
        usable_bytes=device.memory_bytes - reserve,
        host_memory_bytes=host,
        disk=disk,
        batch=batch,
        dtype=torch_dtype,
        attn=attn,
        lora_rank=lora_rank,
        mfu=mfu,
        weights=weights,
        fits=fits,
        longest=longest,
        granularity=granularity,
        max_seq=max_seq,
        exact=curve.exact,
        estimator=estimator,
    )


def _disk_from_arguments(disk_memory: object, disk_bandwidth: object, host: int | None) -> Disk | None:
    if disk_memory is None:
        if disk_bandwidth is not None:
            raise ValueError("disk_bandwidth: a disk's rate needs the disk; give disk_memory too")
        return None
    if host is None:
        raise ValueError(
            "disk_memory: the disk takes the offloaded inputs that do not fit host_memory; "
            "give host_memory too"
        )
    return resolve_disk(disk_memory, disk_bandwidth)


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.lower().removeprefix("torch.")]
    raise ValueError(f"dtype must be one of {sorted(set(_DTYPES))}, got {dtype!r}")
