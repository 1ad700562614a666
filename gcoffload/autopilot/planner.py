"""Planning: the fastest mode for each layer whose activations fit a device-memory budget.

A pure function of a :class:`~gcoffload.profile.Profile` and a budget, tested
without running a model. Each layer that gradients flow through gets one of

* ``keep``: not checkpointed; autograd holds all its saved activations;
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

An offloaded layer's input is on the host. Each layer's row attributes to it
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
``prefetch_depth`` prefetched inputs, plus, if any is offloaded, its own
input back on the device. The plan keeps the peak within the budget. On the
simulated device the real peak of a step is within this for kept,
checkpointed and mixed plans; D2H copies still in flight when backward
begins are not counted (where copies hide behind compute, none are).

Note [Why an exact dynamic program]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Picking one of three modes per layer under a memory cap is a multiple-choice
knapsack. A layer's time and bytes depend on the next layer's mode (the H2D
window, the shared output storage) and on how many checkpointed layers follow
(on-demand and turn copies), so the program runs from the last layer to the
first with the state (mode of the layer, checkpointed layers after it, capped)
and the memory used, in units of a power of two between 1/8192 and 1/4096 of
the stack's largest total.
Bytes are rounded up to units, so a plan never exceeds the budget; for 128
layers the program takes tens of milliseconds. It runs twice, with offloading
allowed and without, since the working set of a plan that offloads is larger
by one input (Note [The memory model]); the faster plan wins. Being exact, more budget never
gives a plan predicted slower.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .profile import LayerProfile, Profile

__all__ = ["LayerPlan", "Mode", "Plan", "fastest_plan", "least_memory", "predict"]

_RESOLUTION = 8192


class Mode(str, enum.Enum):
    """What a layer does with its activations."""

    KEEP = "keep"
    CHECKPOINT = "checkpoint"
    OFFLOAD = "offload"
    PLAIN = "plain"

    @property
    def recomputes(self) -> bool:
        return self in (Mode.CHECKPOINT, Mode.OFFLOAD)


_MODES = (Mode.KEEP, Mode.CHECKPOINT, Mode.OFFLOAD, Mode.PLAIN)


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
        prefetch_depth: inputs copied back ahead of the backward pass.
    """

    layers: tuple[LayerPlan, ...]
    budget_bytes: int
    held_bytes: int
    peak_bytes: int
    step_seconds: float
    tokens: int
    prefetch_depth: int

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
        rows.append(
            f"total: {counts}; held after forward {_mib(self.held_bytes)}, peak {_mib(self.peak_bytes)} "
            f"of {_mib(self.budget_bytes)}; step {self.step_seconds * 1e3:.3f} ms (predicted)"
        )
        return "\n".join(rows)


def _holds_own_input(layer: LayerProfile, mode: Mode | None) -> bool:
    return mode is Mode.CHECKPOINT or (mode is Mode.KEEP and layer.saves_input)


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.2f} MiB"


class _Model:
    """The time and memory models of Notes [The time model] and [The memory model] for one profile."""

    def __init__(self, profile: Profile, prefetch_depth: int) -> None:
        self.layers = profile.layers
        self.copies = profile.copies
        self.arguments = profile.arguments
        self.backward_per_forward = profile.backward_per_forward
        self.recompute_per_forward = profile.recompute_per_forward
        self.depth = prefetch_depth
        planned = [layer for layer in self.layers if layer.planned]
        largest_input = max((layer.input_bytes for layer in self.layers), default=0)
        # The gradient through the stack (in and out of a layer) and the largest gradient buffer a layer's
        # backward pass allocates for what it saved.
        self.gradient_bytes = 2 * largest_input + max(
            (layer.largest_saved_bytes for layer in planned), default=0
        )
        self.recompute_bytes = (
            max((layer.saved_bytes for layer in planned), default=0) + prefetch_depth * largest_input
        )
        self.fetched_bytes = largest_input  # an offloaded layer's own input, back for its recompute
        self.passed_argument_bytes = sum(
            self.arguments[index] for index in {index for layer in planned for index in layer.arguments}
        )

    def allowed(self, layer: LayerProfile) -> tuple[Mode, ...]:
        if not layer.planned:
            return (Mode.PLAIN,)
        return (
            (Mode.KEEP, Mode.CHECKPOINT, Mode.OFFLOAD) if layer.offloadable else (Mode.KEEP, Mode.CHECKPOINT)
        )

    def held(self, index: int, mode: Mode, next_mode: Mode | None) -> int:
        """The bytes Note [The memory model] attributes to layer ``index``'s row."""
        layer = self.layers[index]
        held = layer.own_bytes if mode is Mode.KEEP else 0
        if index == 0 and _holds_own_input(layer, mode):
            held += layer.input_bytes
        keeps_output = mode is Mode.KEEP and layer.saves_output
        after = self.layers[index + 1] if next_mode is not None else None
        if after is None or not after.input_is_previous_output:
            held += layer.output_bytes if keeps_output else 0
        if after is not None:
            shared = keeps_output and after.input_is_previous_output
            if shared or _holds_own_input(after, next_mode):
                held += after.input_bytes
        return held

    def argument_bytes(self, modes: Sequence[Mode]) -> int:
        """Bytes of the argument storages some layer holds in ``modes``."""
        held: set[int] = set()
        for layer, mode in zip(self.layers, modes, strict=True):
            if mode.recomputes:
                held.update(layer.arguments)
            elif mode is Mode.KEEP:
                held.update(layer.saved_arguments)
        return sum(self.arguments[index] for index in held)

    def backward_seconds(self, index: int, mode: Mode) -> float:
        layer = self.layers[index]
        if mode is Mode.PLAIN:
            return 0.0
        recompute = self.recompute_per_forward if mode.recomputes else 0.0
        return layer.forward_seconds * (self.backward_per_forward + recompute)

    def exposed_copy(self, index: int, next_mode: Mode | None, checkpointed_after: int) -> float:
        """Copy time an offloaded layer waits for; ``checkpointed_after`` is capped at depth + 1."""
        layer = self.layers[index]
        copies = self.copies
        turn = copies.overlaps_compute and 1 <= checkpointed_after <= self.depth
        h2d_rate = (
            min(copies.h2d_bytes_per_second, copies.bidirectional_bytes_per_second / 2)
            if turn
            else (copies.h2d_bytes_per_second)
        )
        d2h = layer.input_bytes / copies.d2h_bytes_per_second
        h2d = layer.input_bytes / h2d_rate
        if not copies.overlaps_compute:
            return d2h + h2d
        window = 0.0
        if checkpointed_after > 0 and next_mode is not None:
            window = self.backward_seconds(index + 1, next_mode)
            for later in self.layers[index + 2 : index + 1 + self.depth]:
                window += later.forward_seconds * self.backward_per_forward
        return max(0.0, d2h - layer.forward_seconds) + max(0.0, h2d - window)

    def seconds(
        self, index: int, mode: Mode, next_mode: Mode | None, checkpointed_after: int
    ) -> tuple[float, float]:
        """(time, of which exposed copy time) of layer ``index`` in ``mode``."""
        forward = self.layers[index].forward_seconds
        exposed = self.exposed_copy(index, next_mode, checkpointed_after) if mode is Mode.OFFLOAD else 0.0
        return forward + self.backward_seconds(index, mode) + exposed, exposed

    def reserve(self, modes: Sequence[Mode]) -> int:
        reserve = self.gradient_bytes
        if any(mode.recomputes for mode in modes):
            reserve += self.recompute_bytes
        if Mode.OFFLOAD in modes:
            reserve += self.fetched_bytes
        return reserve


def predict(
    profile: Profile, modes: Sequence[Mode | str], memory_budget: int = 0, *, prefetch_depth: int = 1
) -> Plan:
    """The :class:`Plan` for given modes: what the models predict, whatever the budget.

    Args:
        profile: the measured layers and copies.
        modes: one mode per layer (a :class:`Mode` or its name).
        memory_budget: bytes, recorded in the plan (the prediction does not depend on it).
        prefetch_depth: inputs copied back ahead of the backward pass.

    Raises:
        TypeError: ``profile`` is not a Profile, or ``modes`` not a sequence.
        ValueError: ``modes`` has the wrong length, holds an unknown mode or one
            a layer cannot have, or ``memory_budget`` is not a non-negative int.
    """
    model = _Model(_check_profile(profile, "predict"), _check_depth(prefetch_depth))
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
    for layer, mode in zip(profile.layers, chosen, strict=True):
        if mode not in model.allowed(layer):
            raise ValueError(
                f"modes: layer {layer.index} cannot be {mode.value}; it allows {model.allowed(layer)}"
            )
    return _assemble(profile, model, chosen, memory_budget)


def least_memory(profile: Profile, memory_budget: int = 0, *, prefetch_depth: int = 1) -> Plan:
    """The plan of the least memory the layers can take: every input that can leave the device offloaded.

    Raises:
        TypeError: ``profile`` is not a Profile.
        ValueError: ``memory_budget`` or ``prefetch_depth`` is not a non-negative int.
    """
    model = _Model(_check_profile(profile, "least_memory"), _check_depth(prefetch_depth))
    _check_budget(memory_budget)
    least = tuple(model.allowed(layer)[-1] for layer in profile.layers)
    return _assemble(profile, model, least, memory_budget)


def _assemble(profile: Profile, model: _Model, modes: tuple[Mode, ...], budget: int) -> Plan:
    count = len(modes)
    rows: list[LayerPlan] = []
    held_total = 0
    step = 0.0
    checkpointed_after = 0
    for index in reversed(range(count)):
        next_mode = modes[index + 1] if index + 1 < count else None
        seconds, exposed = model.seconds(index, modes[index], next_mode, checkpointed_after)
        held = model.held(index, modes[index], next_mode)
        rows.append(LayerPlan(profile.layers[index].index, modes[index], held, seconds, exposed))
        held_total += held
        step = seconds + step  # the order the program adds in, so equal plans predict equal times
        if modes[index].recomputes:
            checkpointed_after = min(checkpointed_after + 1, model.depth + 1)
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


def fastest_plan(profile: Profile, memory_budget: int, *, prefetch_depth: int = 1) -> Plan:
    """The fastest modes whose predicted peak activation memory fits ``memory_budget``.

    See Notes [The time model], [The memory model] and [Why an exact dynamic program].

    Args:
        profile: the measured layers and copies.
        memory_budget: device bytes the layers' activations may take at the peak.
        prefetch_depth: inputs copied back ahead of the backward pass.

    Returns:
        The plan; all layers kept if that fits.

    Raises:
        ValueError: the budget is below what the layers need with every input
            offloaded (the message says that minimum), or an argument is invalid.
    """
    _check_budget(memory_budget)
    model = _Model(_check_profile(profile, "fastest_plan"), _check_depth(prefetch_depth))
    if not profile.layers:
        return _assemble(profile, model, (), memory_budget)
    kept = tuple(model.allowed(layer)[0] for layer in profile.layers)
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
    # The working set depends on whether a plan offloads (Note [The memory model]): one program per case.
    plans = [smallest]
    for offloads in (True, False):
        reserve = model.reserve((Mode.OFFLOAD,) if offloads else (Mode.CHECKPOINT,))
        modes = _knapsack(model, memory_budget - reserve - model.passed_argument_bytes, offloads)
        if modes is not None:
            plans.append(_assemble(profile, model, modes, memory_budget))
    return min(plans, key=lambda plan: plan.step_seconds)


def _knapsack(model: _Model, capacity_bytes: int, offloads: bool) -> tuple[Mode, ...] | None:
    """Exact dynamic program of Note [Why an exact dynamic program]; None if nothing fits once rounded.

    ``offloads``: whether layers may be offloaded.
    """
    if capacity_bytes < 0:
        return None

    def allowed(layer: LayerProfile) -> tuple[Mode, ...]:
        return tuple(mode for mode in model.allowed(layer) if offloads or mode is not Mode.OFFLOAD)

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
    for mode in allowed(layers[last]):
        seconds, _ = model.seconds(last, mode, None, 0)
        best[(mode, 0)] = shifted(
            torch.full((capacity + 1,), seconds, dtype=torch.float64), units_of(model.held(last, mode, None))
        )
    choices: list[dict] = [dict() for _ in range(count)]
    for index in reversed(range(count - 1)):
        current: dict[tuple[Mode, int], torch.Tensor] = {}
        pointers: dict[tuple[Mode, int], torch.Tensor] = {}
        options = list(best.items())
        for mode in allowed(layers[index]):
            for option, ((next_mode, after_next), costs) in enumerate(options):
                after = min(after_next + (1 if next_mode.recomputes else 0), model.depth + 1)
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
