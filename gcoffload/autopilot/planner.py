"""Planning: the fastest mode for each layer whose activations fit a device-memory budget.

A pure function of a :class:`~gcoffload.profile.Profile` and a budget, tested
without running a model. Each layer that gradients flow through gets one of

* ``keep``: not checkpointed; autograd holds all its saved activations;
* ``swap``: not checkpointed; what it saves travels to host memory and back
  (:mod:`gcoffload.swapping`), so it holds almost nothing and is not recomputed;
* ``checkpoint``: only its input is held, on the device; recomputed in backward;
* ``offload``: checkpointed with the input parked in host memory;

and a layer the selective rule runs plainly stays ``plain``.

Note [The time model]
~~~~~~~~~~~~~~~~~~~~~
With ``F`` a layer's forward time, ``B = backward_per_forward * F`` its
backward time and ``R = recompute_per_forward * F`` its recompute time (both
ratios measured in the profile step), a layer costs ``F + B`` kept,
``F + R + B`` checkpointed, and ``F + R + B`` plus the copy time that cannot
hide when offloaded. An offload is
issued as the layer starts (the autopilot keeps no residency window: keeping an
input resident is the ``checkpoint`` mode), so its D2H copy hides behind the
layer's own forward. Its H2D copy is issued by the backward pass of the
``prefetch_depth``-th checkpointed layer after it, and hides behind the
backward time of the layers in between: at least the next layer's backward
(with its recompute if it has one) plus ``B`` of the ``prefetch_depth - 1``
layers after that, which is what the model counts. The last checkpointed
layer's input is fetched on demand (its H2D copy never hides); the copies
issued at the turn from forward to backward run while the last D2H copies may
still run, so they are charged at half the bidirectional rate. On the CPU
copies do not overlap compute: all of their time counts.

Note [The memory model]
~~~~~~~~~~~~~~~~~~~~~~~
What a plan holds after the forward pass is a union of storages (Note [What a
layer holds, by storage] in profile.py), each counted once:

* a kept layer's own saved storages;
* a layer's input, if the layer holds it (checkpointed, or kept and saving
  it) or the previous layer, kept, saves it as its output and the two are
  the same storage (measured, never assumed);
* a kept layer's output that is not the next layer's input, if it saves it;
* each argument storage (rotary tables, masks) that some layer holds: a
  checkpointed or offloaded layer holds all of its arguments, a kept layer
  those it saves.

An offloaded layer's input is on the host; a swapped layer holds only what
swap leaves on the device (``swap_resident_bytes``, its input and output if
they do not travel, and the arguments it saves, as a kept layer does). Each
layer's row attributes to it
its own storages, its output and the *next* layer's input (the first layer's
row also its own input), so the rows depend on the next layer's mode only;
arguments are summed once for the plan. That total is exactly what autograd
holds after forward (tests check it byte for byte, for every plan). The
program below charges every argument any planned layer passes, held or not
(an upper bound: they are few and small), so its plans stay within the budget
with the exact count. The peak adds the backward pass's working set: the
gradient flowing through the stack (two layer inputs), the gradient buffer of
the largest storage a layer saved (its backward pass allocates one that size
while the layer's activations are still held) and, if any layer is
recomputed, the largest layer's saved activations (a recompute) plus
``prefetch_depth`` prefetched units, plus, if any is offloaded, its own
input back on the device. A plan that swaps adds its largest swapped layer's
activations back on the device (with the prefetched units if they are
prefetched; the larger of this and a recompute counts) and the swapped bytes
whose D2H copy may still run when backward begins (each D2H copy timed
against the forward time after it). The plan keeps the peak within the budget. On the
simulated device the real peak of a step is within this for kept,
checkpointed and mixed plans; D2H copies still in flight when backward
begins are not counted (where copies hide behind compute, none are).

Note [Why an exact dynamic program]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Picking one of four modes per layer under a memory cap is a multiple-choice
knapsack. A layer's time and bytes depend on the next layer's mode (the H2D
window, the shared output storage) and on how many units follow (on-demand
and turn copies), so the program runs from the last layer to the
first with the state (mode of the layer, units after it, capped)
and the memory used, in units of a power of two between 1/8192 and 1/4096 of
the stack's largest total.
Bytes are rounded up to units, so a plan never exceeds the budget; for 128
layers the program takes tens of milliseconds. It runs twice, with offloading
allowed and without, since the working set of a plan that offloads is larger
by one input (Note [The memory model]), and twice more for each way of
bringing swapped activations back; the faster plan wins. The last layer never
swaps (its activations would come straight back). Being exact, more budget never
gives a plan predicted slower.

Note [The disk tier in the plan]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Under ``over_budget="disk"`` the profile carries the disk tier's measured
rates, and the inputs of a plan's earliest offloaded layers go straight to
disk (``OffloadOptions.to_disk``) until the rest fits the host budget:
backward needs them last, so their reads have the longest to hide, and their
writes the rest of the forward pass. Without a plan, the engine sends to disk
whatever arrives once the pool is full: the latest layers. The step time adds
the disk's waits (Note [The disk in the time model] in disk_time.py), so among
plans that fit the device budget the fastest one counts the disk too. The
plan's ``disk_read_ahead`` is how far ahead of the H2D prefetch backward must
read for the slowest read to hide: the layers whose backward passes its read
time covers, less the prefetch depth.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from .disk_time import exposed_disk_seconds, layers_on_disk
from .profile import LayerProfile, Profile

__all__ = [
    "LayerPlan",
    "Mode",
    "Plan",
    "fastest_plan",
    "holds_own_input",
    "keeps_output",
    "least_memory",
    "predict",
]

_RESOLUTION = 8192


class Mode(str, enum.Enum):
    """What a layer does with its activations."""

    KEEP = "keep"
    SWAP = "swap"
    CHECKPOINT = "checkpoint"
    OFFLOAD = "offload"
    PLAIN = "plain"

    @property
    def recomputes(self) -> bool:
        return self in (Mode.CHECKPOINT, Mode.OFFLOAD)

    @property
    def links(self) -> bool:
        """Whether the layer is a unit of the forward chain (prefetches, and is prefetched, in backward)."""
        return self in (Mode.CHECKPOINT, Mode.OFFLOAD, Mode.SWAP)


_MODES = (Mode.KEEP, Mode.SWAP, Mode.CHECKPOINT, Mode.OFFLOAD, Mode.PLAIN)


@dataclass(frozen=True)
class LayerPlan:
    """One layer's mode and what the models predict for it.

    Args:
        index: the layer's position in its stack.
        mode: what the layer does.
        held_bytes: device bytes it holds from its forward to its backward pass.
        seconds: its forward + backward time, recompute and exposed copies included.
        exposed_copy_seconds: the part of ``seconds`` spent waiting for copies.
    """

    index: int
    mode: Mode
    held_bytes: int
    seconds: float
    exposed_copy_seconds: float


@dataclass(frozen=True)
class Plan:
    """A mode per layer, with the predicted memory and step time.

    Args:
        layers: one :class:`LayerPlan` per layer, in forward order.
        budget_bytes: the device-memory budget it was made for.
        held_bytes: device bytes the layers hold after the forward pass.
        peak_bytes: ``held_bytes`` plus the backward pass's working set.
        step_seconds: predicted forward + backward time of the stack.
        tokens: tokens per step it was made for.
        prefetch_depth: units (inputs, swapped layers) copied back ahead of the backward pass.
        host_bytes: pinned host memory the plan's offloads and swaps take (those
            on disk left out).
        swap_prefetch: whether a swapped layer's activations are prefetched by
            the layers after it (else by its own backward pass, Note [Two ways
            to bring swapped activations back]).
        disk_layers: positions of the layers whose inputs go straight to the
            disk tier (Note [The disk tier in the plan]).
        disk_bytes: their input bytes.
        disk_seconds: the part of ``step_seconds`` spent waiting for the disk.
        disk_read_ahead: how many units ahead of the H2D prefetch backward
            reads from the disk, so that a read hides behind the backward passes
            it overlaps.
    """

    layers: tuple[LayerPlan, ...]
    budget_bytes: int
    held_bytes: int
    peak_bytes: int
    step_seconds: float
    tokens: int
    prefetch_depth: int
    host_bytes: int = 0
    swap_prefetch: bool = True
    disk_layers: tuple[int, ...] = ()
    disk_bytes: int = 0
    disk_seconds: float = 0.0
    disk_read_ahead: int = 0

    @property
    def modes(self) -> tuple[Mode, ...]:
        return tuple(layer.mode for layer in self.layers)

    def mode(self, index: int) -> Mode:
        """The mode of the layer at ``index``."""
        return self.layers[index].mode

    def counts(self) -> dict[str, int]:
        """How many layers each mode has."""
        return {mode.value: self.modes.count(mode) for mode in _MODES if mode in self.modes}

    def summary(self) -> str:
        """A table: one row per layer, then the totals."""
        rows = [
            f"gcoffload plan for {self.tokens} tokens per step, budget {_mib(self.budget_bytes)}",
            f"{'layer':>5}  {'mode':<10}  {'held':>12}  {'time':>10}  {'copy wait':>10}",
        ]
        for layer in self.layers:
            rows.append(
                f"{layer.index:>5}  {layer.mode.value:<10}  {_mib(layer.held_bytes):>12}  "
                f"{layer.seconds * 1e3:>7.3f} ms  {layer.exposed_copy_seconds * 1e3:>7.3f} ms"
            )
        counts = ", ".join(f"{count} {mode}" for mode, count in self.counts().items())
        host = f", host {_mib(self.host_bytes)}" if self.host_bytes else ""
        if self.disk_bytes:
            host += f", disk {_mib(self.disk_bytes)} (waits {self.disk_seconds * 1e3:.3f} ms)"
        rows.append(
            f"total: {counts}; held after forward {_mib(self.held_bytes)}, peak {_mib(self.peak_bytes)} "
            f"of {_mib(self.budget_bytes)}{host}; step {self.step_seconds * 1e3:.3f} ms (predicted)"
        )
        return "\n".join(rows)


def holds_own_input(layer: LayerProfile, mode: Mode | None) -> bool:
    """Whether ``layer`` in ``mode`` holds its input on the device after the forward pass."""
    return (
        mode is Mode.CHECKPOINT
        or (mode is Mode.KEEP and layer.saves_input)
        or (mode is Mode.SWAP and layer.saves_input and not layer.input_swapped)
    )


def keeps_output(layer: LayerProfile, mode: Mode) -> bool:
    """Whether ``layer`` in ``mode`` holds its output on the device after the forward pass."""
    return layer.saves_output and (mode is Mode.KEEP or (mode is Mode.SWAP and not layer.output_swapped))


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.2f} MiB"


class _Model:
    """The time and memory models of Notes [The time model] and [The memory model] for one profile.

    Args:
        profile: the measured layers and copies.
        prefetch_depth: units copied back ahead of the backward pass.
        swap: None (no layer swaps), or whether swapped layers are prefetched
            ahead (Note [Two ways to bring swapped activations back]).
        no_swap: indices of layers that may not swap (the host budget took them).
    """

    def __init__(
        self,
        profile: Profile,
        prefetch_depth: int,
        swap: bool | None = None,
        no_swap: frozenset[int] = frozenset(),
    ) -> None:
        self.layers = profile.layers
        self.copies = profile.copies
        self.arguments = profile.arguments
        self.backward_per_forward = profile.backward_per_forward
        self.recompute_per_forward = profile.recompute_per_forward
        self.depth = prefetch_depth
        self.swap = swap
        self.no_swap = no_swap
        planned = [layer for layer in self.layers if layer.planned]
        last_planned = max(
            (position for position, layer in enumerate(self.layers) if layer.planned), default=None
        )
        self.swappable = frozenset(
            position
            for position, layer in enumerate(self.layers)
            if swap is not None and layer.planned and layer.swap_bytes > 0 and position not in no_swap
        )
        # The program never swaps the last layer: its activations would come straight back, and keeping
        # them costs the same memory at the turn without the copies.
        self.last_planned = last_planned
        largest_input = max((layer.input_bytes for layer in self.layers), default=0)
        self.largest_swap = max((self.layers[position].swap_bytes for position in self.swappable), default=0)
        # The gradient through the stack (in and out of a layer) and the largest gradient buffer a layer's
        # backward pass allocates for what it saved.
        self.gradient_bytes = 2 * largest_input + max(
            (layer.largest_saved_bytes for layer in planned), default=0
        )
        prefetched_unit = max(largest_input, self.largest_swap if swap else 0)
        self.recompute_bytes = max((layer.saved_bytes for layer in planned), default=0) + (
            prefetch_depth * prefetched_unit
        )
        self.swap_working_bytes = self.largest_swap + (prefetch_depth * prefetched_unit if swap else 0)
        self.fetched_bytes = largest_input  # an offloaded layer's own input, back for its recompute
        self.passed_argument_bytes = sum(
            self.arguments[index] for index in {index for layer in planned for index in layer.arguments}
        )

    def allowed(self, position: int) -> tuple[Mode, ...]:
        """The modes layer ``position`` may have, from the most memory to the least."""
        layer = self.layers[position]
        if not layer.planned:
            return (Mode.PLAIN,)
        modes = [Mode.KEEP]
        if position in self.swappable:
            modes.append(Mode.SWAP)
        modes.append(Mode.CHECKPOINT)
        if layer.offloadable:
            modes.append(Mode.OFFLOAD)
        return tuple(modes)

    def held(self, index: int, mode: Mode, next_mode: Mode | None) -> int:
        """The bytes Note [The memory model] attributes to layer ``index``'s row."""
        layer = self.layers[index]
        held = layer.own_bytes if mode is Mode.KEEP else layer.swap_resident_bytes if mode is Mode.SWAP else 0
        if index == 0 and holds_own_input(layer, mode):
            held += layer.input_bytes
        holds_output = keeps_output(layer, mode)
        after = self.layers[index + 1] if next_mode is not None else None
        if after is None or not after.input_is_previous_output:
            held += layer.output_bytes if holds_output else 0
        if after is not None:
            shared = holds_output and after.input_is_previous_output
            if shared or holds_own_input(after, next_mode):
                held += after.input_bytes
        return held

    def argument_bytes(self, modes: Sequence[Mode]) -> int:
        """Bytes of the argument storages some layer holds in ``modes``."""
        held: set[int] = set()
        for layer, mode in zip(self.layers, modes, strict=True):
            if mode.recomputes:
                held.update(layer.arguments)
            elif mode in (Mode.KEEP, Mode.SWAP):
                held.update(layer.saved_arguments)
        return sum(self.arguments[index] for index in held)

    def host_bytes(self, modes: Sequence[Mode]) -> int:
        """Pinned host bytes the offloaded inputs and swapped activations of ``modes`` take."""
        return sum(
            layer.input_bytes if mode is Mode.OFFLOAD else layer.swap_bytes if mode is Mode.SWAP else 0
            for layer, mode in zip(self.layers, modes, strict=True)
        )

    def backward_seconds(self, index: int, mode: Mode) -> float:
        layer = self.layers[index]
        if mode is Mode.PLAIN:
            return 0.0
        recompute = self.recompute_per_forward if mode.recomputes else 0.0
        return layer.forward_seconds * (self.backward_per_forward + recompute)

    def exposed_copy(self, index: int, mode: Mode, next_mode: Mode | None, units_after: int) -> float:
        """Copy time an offloaded or swapped layer waits for; ``units_after`` is capped at depth + 1."""
        layer = self.layers[index]
        copies = self.copies
        nbytes = layer.input_bytes if mode is Mode.OFFLOAD else layer.swap_bytes
        turn = copies.overlaps_compute and 1 <= units_after <= self.depth
        h2d_rate = (
            min(copies.h2d_bytes_per_second, copies.bidirectional_bytes_per_second / 2)
            if turn
            else (copies.h2d_bytes_per_second)
        )
        d2h = nbytes / copies.d2h_bytes_per_second
        h2d = nbytes / h2d_rate
        if not copies.overlaps_compute:
            return d2h + h2d
        window = 0.0
        prefetched = units_after > 0 and next_mode is not None and (mode is Mode.OFFLOAD or self.swap)
        if prefetched:
            window = self.backward_seconds(index + 1, next_mode)
            for later in self.layers[index + 2 : index + 1 + self.depth]:
                window += later.forward_seconds * self.backward_per_forward
        if mode is Mode.OFFLOAD:
            return max(0.0, d2h - layer.forward_seconds) + max(0.0, h2d - window)
        # Swap: Note [Swap in the time model].
        after = self.layers[index + 1] if next_mode is not None else None
        d2h_window = 0.0
        if after is not None:
            d2h_window = after.forward_seconds
            if next_mode is Mode.OFFLOAD:
                d2h_window -= after.input_bytes / copies.d2h_bytes_per_second
        own_backward = self.backward_seconds(index, mode)
        on_demand = max(layer.first_needed_swap_bytes / h2d_rate, h2d - own_backward)
        waited = min(max(0.0, h2d - window), on_demand) if prefetched else on_demand
        return max(0.0, d2h - max(d2h_window, 0.0)) + waited

    def seconds(
        self, index: int, mode: Mode, next_mode: Mode | None, units_after: int
    ) -> tuple[float, float]:
        """(time, of which exposed copy time) of layer ``index`` in ``mode``."""
        forward = self.layers[index].forward_seconds
        moves = mode is Mode.OFFLOAD or mode is Mode.SWAP
        exposed = self.exposed_copy(index, mode, next_mode, units_after) if moves else 0.0
        return forward + self.backward_seconds(index, mode) + exposed, exposed

    def in_flight_bytes(self, modes: Sequence[Mode]) -> int:
        """Swapped bytes whose D2H copy may still run when backward begins (Note [The memory model])."""
        copies = self.copies
        if not copies.overlaps_compute:
            return 0
        in_flight = 0
        remaining = 0.0  # forward time after the layer
        for layer, mode in zip(reversed(self.layers), reversed(modes), strict=True):
            if mode is Mode.SWAP:
                d2h = layer.swap_bytes / copies.d2h_bytes_per_second
                if d2h > remaining:
                    in_flight += math.ceil(layer.swap_bytes * (1 - remaining / d2h))
            remaining += layer.forward_seconds
        return in_flight

    def in_flight_bound(self) -> int:
        """The most :meth:`in_flight_bytes` can be for a plan of the program (the last layer never swaps)."""
        modes = [
            Mode.SWAP if position in self.swappable and position != self.last_planned else Mode.KEEP
            for position in range(len(self.layers))
        ]
        return self.in_flight_bytes(modes)

    def reserve(self, modes: Sequence[Mode]) -> int:
        reserve = self.gradient_bytes
        working = self.recompute_bytes if any(mode.recomputes for mode in modes) else 0
        if Mode.SWAP in modes:
            working = max(working, self.swap_working_bytes)
            reserve += self.in_flight_bytes(modes)
        reserve += working
        if Mode.OFFLOAD in modes:
            reserve += self.fetched_bytes
        return reserve

    def case_reserve(self, offloads: bool, swaps: bool) -> int:
        """The largest :meth:`reserve` of any plan that offloads, swaps, as given (for the program)."""
        working = max(self.recompute_bytes, self.swap_working_bytes) if swaps else self.recompute_bytes
        in_flight = self.in_flight_bound() if swaps else 0
        return self.gradient_bytes + working + in_flight + (self.fetched_bytes if offloads else 0)


def predict(
    profile: Profile,
    modes: Sequence[Mode | str],
    memory_budget: int = 0,
    *,
    prefetch_depth: int = 1,
    swap_prefetch: bool = True,
) -> Plan:
    """The :class:`Plan` for given modes: what the models predict, whatever the budget.

    Args:
        profile: the measured layers and copies.
        modes: one mode per layer (a :class:`Mode` or its name).
        memory_budget: bytes, recorded in the plan (the prediction does not depend on it).
        prefetch_depth: units copied back ahead of the backward pass.
        swap_prefetch: whether swapped layers are prefetched by the layers
            after them (Note [Two ways to bring swapped activations back]).

    Raises:
        TypeError: ``profile`` is not a Profile, or ``modes`` not a sequence.
        ValueError: ``modes`` has the wrong length, holds an unknown mode or one
            a layer cannot have, or ``memory_budget`` is not a non-negative int.
    """
    _check_profile(profile, "predict")
    _check_depth(prefetch_depth)
    _check_budget(memory_budget)
    if isinstance(modes, (str, bytes)) or not isinstance(modes, Sequence):
        raise TypeError(f"predict: modes must be a sequence of modes, one per layer, got {modes!r}")
    if len(modes) != len(profile.layers):
        raise ValueError(f"modes: {len(modes)} given for {len(profile.layers)} layers")
    try:
        chosen = tuple(Mode(mode) for mode in modes)
    except ValueError:
        raise ValueError(
            f"predict: modes must each be one of {[mode.value for mode in _MODES]}, got {list(modes)!r}"
        ) from None
    model = _Model(profile, prefetch_depth, bool(swap_prefetch) if Mode.SWAP in chosen else None)
    for position, (layer, mode) in enumerate(zip(profile.layers, chosen, strict=True)):
        allowed = model.allowed(position)
        if mode not in allowed:
            raise ValueError(f"modes: layer {layer.index} cannot be {mode.value}; it allows {allowed}")
    return _assemble(profile, model, chosen, memory_budget)


def least_memory(profile: Profile, memory_budget: int = 0, *, prefetch_depth: int = 1) -> Plan:
    """The plan of the least memory the layers can take: every input that can leave the device offloaded.

    Raises:
        TypeError: ``profile`` is not a Profile.
        ValueError: ``memory_budget`` or ``prefetch_depth`` is not a non-negative int.
    """
    model = _Model(_check_profile(profile, "least_memory"), _check_depth(prefetch_depth))
    _check_budget(memory_budget)
    least = tuple(model.allowed(position)[-1] for position in range(len(profile.layers)))
    return _assemble(profile, model, least, memory_budget)


def _assemble(profile: Profile, model: _Model, modes: tuple[Mode, ...], budget: int) -> Plan:
    count = len(modes)
    rows: list[LayerPlan] = []
    held_total = 0
    step = 0.0
    units_after = 0
    for index in reversed(range(count)):
        next_mode = modes[index + 1] if index + 1 < count else None
        seconds, exposed = model.seconds(index, modes[index], next_mode, units_after)
        held = model.held(index, modes[index], next_mode)
        rows.append(LayerPlan(profile.layers[index].index, modes[index], held, seconds, exposed))
        held_total += held
        step = seconds + step  # the order the program adds in, so equal plans predict equal times
        if modes[index].links:
            units_after = min(units_after + 1, model.depth + 1)
    rows.reverse()
    held_total += model.argument_bytes(modes)
    return Plan(
        layers=tuple(rows),
        budget_bytes=budget,
        held_bytes=held_total,
        peak_bytes=held_total + model.reserve(modes),
        step_seconds=step,
        tokens=profile.tokens,
        prefetch_depth=model.depth,
        host_bytes=model.host_bytes(modes),
        swap_prefetch=model.swap is not False,
    )


def _check_profile(profile: Profile, caller: str) -> Profile:
    if not isinstance(profile, Profile):
        raise TypeError(
            f"{caller}: profile must be a gcoffload Profile (from an autopilot's profile step, or built "
            f"from LayerProfile and CopyProfile), got {type(profile).__name__}"
        )
    return profile


def _check_budget(memory_budget: int) -> int:
    if not isinstance(memory_budget, int) or isinstance(memory_budget, bool) or memory_budget < 0:
        raise ValueError(
            f"memory_budget must be a non-negative int of bytes here, got {memory_budget!r} "
            "(sizes such as '20GiB' are read by wrap_layers and patch_model)"
        )
    return memory_budget


def _check_depth(prefetch_depth: int) -> int:
    if not isinstance(prefetch_depth, int) or isinstance(prefetch_depth, bool) or prefetch_depth < 0:
        raise ValueError(f"prefetch_depth must be a non-negative int, got {prefetch_depth!r}")
    return prefetch_depth


def fastest_plan(
    profile: Profile,
    memory_budget: int,
    *,
    prefetch_depth: int = 1,
    swap: bool = True,
    host_budget: int | None = None,
) -> Plan:
    """The fastest modes whose predicted peak activation memory fits ``memory_budget``.

    See Notes [The time model], [The memory model] and [Why an exact dynamic program].

    Args:
        profile: the measured layers and copies.
        memory_budget: device bytes the layers' activations may take at the peak.
        prefetch_depth: units copied back ahead of the backward pass.
        swap: whether layers may swap (it needs the copy engine, as offloading does).
        host_budget: pinned host bytes a plan's swaps may bring its host
            memory to (None: no limit). Swaps go first, largest first, until it
            fits; inputs offloaded past it follow ``over_budget`` as always:
            to the disk tier, whose waits the plan counts, if the profile
            has its rates (Note [The disk tier in the plan]).

    Returns:
        The plan; all layers kept if that fits.

    Raises:
        ValueError: the budget is below what the layers need with every input
            offloaded (the message says that minimum), or an argument is invalid.
    """
    _check_budget(memory_budget)
    model = _Model(_check_profile(profile, "fastest_plan"), _check_depth(prefetch_depth))
    if host_budget is not None and (not isinstance(host_budget, int) or host_budget < 0):
        raise ValueError(f"host_budget must be None or a non-negative int of bytes, got {host_budget!r}")
    if not profile.layers:
        return _assemble(profile, model, (), memory_budget)
    kept = tuple(model.allowed(position)[0] for position in range(len(profile.layers)))
    all_kept = _assemble(profile, model, kept, memory_budget)
    if all_kept.peak_bytes <= memory_budget:
        return all_kept
    smallest = least_memory(profile, memory_budget, prefetch_depth=prefetch_depth)
    if smallest.peak_bytes > memory_budget:
        raise ValueError(
            f"memory_budget of {_mib(memory_budget)} is below the {_mib(smallest.peak_bytes)} the layers "
            f"need at {profile.tokens} tokens per step in the least memory they can take, every input that "
            f"can leave the device offloaded ({_mib(smallest.held_bytes)} held after forward + "
            f"{_mib(smallest.peak_bytes - smallest.held_bytes)} working set in backward). "
            "Raise the budget, or shorten the batch."
        )
    plans = [smallest, *_programs(profile, model, memory_budget, swaps=False)]
    if swap and prefetch_depth > 0:
        variants: tuple[bool, ...] = (False, True)
    else:
        variants = (False,) if swap else ()
    for prefetched in variants:
        no_swap: frozenset[int] = frozenset()
        while True:
            swapping = _Model(profile, prefetch_depth, prefetched, no_swap)
            if not swapping.swappable:
                break
            found = [
                plan
                for plan in _programs(profile, swapping, memory_budget, swaps=True)
                if Mode.SWAP in plan.modes
            ]
            over = []
            for plan in found:
                (plans if host_budget is None or plan.host_bytes <= host_budget else over).append(plan)
            if not over:
                break
            # Note [Swaps within the host budget]: the largest swap of the plans over it goes.
            swapped = {
                position for plan in over for position, mode in enumerate(plan.modes) if mode is Mode.SWAP
            }
            no_swap |= {max(swapped, key=lambda position: profile.layers[position].swap_bytes)}
    if profile.disk is not None and host_budget is not None:
        plans = [_with_disk(profile, model, plan, host_budget) for plan in plans]
    return min(plans, key=lambda plan: plan.step_seconds)


def _with_disk(profile: Profile, model: _Model, plan: Plan, host_budget: int) -> Plan:
    """``plan`` with what the disk tier adds to it: Note [The disk tier in the plan]."""
    disk = profile.disk
    offloaded = [
        (position, layer.input_bytes)
        for position, (layer, mode) in enumerate(zip(profile.layers, plan.modes, strict=True))
        if mode is Mode.OFFLOAD
    ]
    disk_layers = layers_on_disk(offloaded, plan.host_bytes, host_budget)
    if not disk_layers:
        return plan
    on_disk = [
        layer.input_bytes if position in disk_layers else 0 for position, layer in enumerate(profile.layers)
    ]
    backward = [model.backward_seconds(index, mode) for index, mode in enumerate(plan.modes)]
    waits = exposed_disk_seconds(
        [layer.forward_seconds for layer in profile.layers],
        backward,
        on_disk,
        read_bytes_per_second=disk.read_bytes_per_second,
        write_bytes_per_second=disk.write_bytes_per_second,
    )
    ahead = 0
    for position in disk_layers:
        read = on_disk[position] / disk.read_bytes_per_second
        covered, units = 0.0, 0
        for later in range(position + 1, len(backward)):
            if covered >= read:
                break
            covered += backward[later]
            units += 1
        ahead = max(ahead, units - model.depth + 1)
    return replace(
        plan,
        step_seconds=plan.step_seconds + waits,
        host_bytes=plan.host_bytes - sum(on_disk),
        disk_layers=disk_layers,
        disk_bytes=sum(on_disk),
        disk_seconds=waits,
        disk_read_ahead=max(ahead, 1),
    )


def _programs(profile: Profile, model: _Model, memory_budget: int, *, swaps: bool) -> list[Plan]:
    """The program's plans with offloading allowed and not (their working sets differ)."""
    plans = []
    for offloads in (True, False):
        reserve = model.case_reserve(offloads, swaps)
        modes = _knapsack(model, memory_budget - reserve - model.passed_argument_bytes, offloads)
        if modes is not None:
            plans.append(_assemble(profile, model, modes, memory_budget))
    return plans


def _knapsack(model: _Model, capacity_bytes: int, offloads: bool) -> tuple[Mode, ...] | None:
    """Exact dynamic program of Note [Why an exact dynamic program]; None if nothing fits once rounded.

    ``offloads``: whether layers may be offloaded.
    """
    if capacity_bytes < 0:
        return None

    def allowed(position: int) -> tuple[Mode, ...]:
        return tuple(
            mode
            for mode in model.allowed(position)
            if (offloads or mode is not Mode.OFFLOAD)
            and (mode is not Mode.SWAP or position != model.last_planned)
        )

    layers = model.layers
    count = len(layers)
    largest = sum(layer.own_bytes + layer.input_bytes + layer.output_bytes for layer in layers)
    # A power of two, so that sizes in KiB or MiB are whole units and round to nothing.
    unit = 1 << max(0, math.ceil(math.log2(max(largest, 1) / _RESOLUTION)))
    capacity = min(capacity_bytes // unit, _RESOLUTION + count)
    infinity = torch.full((capacity + 1,), math.inf, dtype=torch.float64)

    def shifted(costs: torch.Tensor, units: int) -> torch.Tensor:
        if units > capacity:
            return infinity
        return torch.cat((infinity[:units], costs[: capacity + 1 - units]))

    def units_of(nbytes: int) -> int:
        return -(-nbytes // unit)

    # best[m][k]: least time of layers index..count-1 with layer index in mode m and k checkpointed after it.
    best = {}
    last = count - 1
    for mode in allowed(last):
        seconds, _ = model.seconds(last, mode, None, 0)
        best[(mode, 0)] = shifted(
            torch.full((capacity + 1,), seconds, dtype=torch.float64), units_of(model.held(last, mode, None))
        )
    choices: list[dict] = [dict() for _ in range(count)]
    for index in reversed(range(count - 1)):
        current: dict[tuple[Mode, int], torch.Tensor] = {}
        pointers: dict[tuple[Mode, int], torch.Tensor] = {}
        options = list(best.items())
        for mode in allowed(index):
            for option, ((next_mode, after_next), costs) in enumerate(options):
                after = min(after_next + (1 if next_mode.links else 0), model.depth + 1)
                seconds, _ = model.seconds(index, mode, next_mode, after)
                candidate = shifted(costs, units_of(model.held(index, mode, next_mode))) + seconds
                key = (mode, after)
                if key not in current:
                    current[key] = candidate
                    pointers[key] = torch.full((capacity + 1,), option, dtype=torch.int16)
                else:
                    better = candidate < current[key]
                    current[key] = torch.where(better, candidate, current[key])
                    pointers[key] = torch.where(better, option, pointers[key])
        choices[index] = {key: (pointers[key], options) for key in current}
        best = current
    start = min(best, key=lambda key: best[key][capacity].item())
    if math.isinf(best[start][capacity].item()):
        return None
    modes = [start[0]]
    key, room = start, capacity
    for index in range(count - 1):
        pointer, options = choices[index][key]
        (next_key, _) = options[int(pointer[room])]
        room -= units_of(model.held(index, key[0], next_key[0]))
        modes.append(next_key[0])
        key = next_key
    return tuple(modes)
