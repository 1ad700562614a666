"""What the autopilot knows about a model: plain numbers per layer and per device, and how they are measured.

A :class:`Profile` is measured in one training step (the *profile step*) that
runs every layer checkpointed with its input offloaded, the least device
memory gcoffload can use, so the measuring itself cannot run out of memory.
For each layer, :class:`LayerMeter` runs the layer's forward pass once more as
if it were not checkpointed, under saved-tensor hooks that count what autograd
would save and keep none of it (Note [Counting what autograd saves]); the
copy engine's bandwidth is measured at the size of a layer input
(:func:`measure_copies`). Planning (:mod:`gcoffload.planner`) only reads these
numbers, so it is tested without running a model.

Note [Counting what autograd saves]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
A kept layer holds, from its forward pass to its backward pass, the storages
of the tensors autograd saves for it. The meter's pack hook records each saved
tensor's storage (a saved view holds its whole storage; storages saved twice
count once) and returns a placeholder. The storages stay referenced until the
run ends, so that a freed one's address cannot come back as another's: the
run takes the memory of one recompute, and keeps nothing afterwards. Not counted: the layer's
parameters and buffers, and the storages of its arguments other than the
hidden states (rotary tables, masks), which the model holds whatever each
layer's mode is. The hidden states are counted when the layer saves them
(``saves_input``); when it saves its own output (``saves_output``), a next
layer that keeps its input on the device holds the same storage, which the
planner counts once. The counting run restores the CPU and device RNG
afterwards, so the profile step draws the same dropout masks as any other.
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch

from .calls import flatten_arguments
from .engine import CopyEngine

__all__ = ["BackwardClock", "CopyProfile", "LayerMeter", "LayerProfile", "Profile", "measure_copies"]


@dataclass(frozen=True)
class LayerProfile:
    """One layer of the stack, measured at the profile's token count.

    Args:
        index: the layer's position in its stack.
        planned: False for a layer the selective rule runs plainly (nothing in
            it requires grad): its mode is "plain", not the planner's to pick.
        saved_bytes: device bytes autograd holds for the layer when it is not
            checkpointed (Note [Counting what autograd saves]).
        input_bytes: bytes of its hidden-states input.
        offloadable: whether that input can be parked in host memory (a dense
            floating-point tensor of at least ``min_offload_bytes``).
        saves_input: whether the un-checkpointed layer saves its input.
        saves_output: whether the un-checkpointed layer saves its output.
        forward_seconds: the layer's forward time (device events on an accelerator, the wall
            clock on the CPU).
    """

    index: int
    planned: bool
    saved_bytes: int
    input_bytes: int
    offloadable: bool
    saves_input: bool
    saves_output: bool
    forward_seconds: float

    @classmethod
    def plain(cls, index: int, input_bytes: int = 0) -> LayerProfile:
        """A layer the planner does not plan: run plainly, or never seen by the profile step."""
        return cls(index, False, 0, input_bytes, False, False, False, 0.0)


@dataclass(frozen=True)
class CopyProfile:
    """A device's copy engine, measured at one transfer size.

    Args:
        d2h_bytes_per_second, h2d_bytes_per_second: one direction alone.
        bidirectional_bytes_per_second: both directions at once, in total
            (less than the sum of the two: PCIe and host memory are shared).
        overlaps_compute: whether copies run beside compute (an accelerator's
            side streams) or hold the compute thread (the CPU).
        nbytes: the transfer size measured.
    """

    d2h_bytes_per_second: float
    h2d_bytes_per_second: float
    bidirectional_bytes_per_second: float
    overlaps_compute: bool
    nbytes: int


@dataclass(frozen=True)
class Profile:
    """Everything the planner needs: the layers in forward order, the copies, the token count.

    Args:
        layers: one entry per layer of the stack, in forward order.
        copies: the device's copy bandwidth.
        tokens: tokens per step the layers were measured at (batch x sequence).
        backward_per_forward: a layer's backward time over its forward time
            (measured by :class:`BackwardClock`; 2 for matmuls).
        recompute_per_forward: a checkpointed layer's recompute time over its
            forward time (measured by :class:`BackwardClock`; at most 1).
    """

    layers: tuple[LayerProfile, ...]
    copies: CopyProfile
    tokens: int
    backward_per_forward: float = 2.0
    recompute_per_forward: float = 1.0

    def scaled(self, tokens: int) -> Profile:
        """The profile predicted at ``tokens`` tokens per step, everything linear in tokens.

        Activation bytes and forward times grow at least linearly with tokens
        (attention scores and attention time faster), so scaling a profile
        *down* over-estimates both, which keeps a plan within its budget.
        """
        factor = tokens / self.tokens
        layers = tuple(
            replace(
                layer,
                saved_bytes=int(layer.saved_bytes * factor + 0.5),
                input_bytes=int(layer.input_bytes * factor + 0.5),
                forward_seconds=layer.forward_seconds * factor,
            )
            for layer in self.layers
        )
        return replace(self, layers=layers, tokens=tokens)


def _synchronize(device: torch.device) -> None:
    if device.type != "cpu":
        torch.get_device_module(device.type).synchronize(device)


class LayerMeter:
    """Measures one layer call of the profile step: what it would save un-checkpointed, and its time.

    Args:
        device: the device the layer runs on.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def measure(
        self,
        index: int,
        module: torch.nn.Module | None,
        function: Callable[..., Any],
        args: tuple,
        kwargs: dict[str, Any],
        hidden: torch.Tensor,
        offloadable: bool,
    ) -> LayerProfile:
        """Runs ``function(*args, **kwargs)`` as a kept layer and counts; nothing it makes is kept.

        See Note [Counting what autograd saves].
        """
        excluded = _storages(module.parameters() if module is not None else ())
        excluded |= _storages(module.buffers() if module is not None else ())
        excluded |= _storages(_tensors((args, kwargs))) - {_storage_key(hidden)}
        saved: dict[int, torch.UntypedStorage] = {}

        def pack(tensor: torch.Tensor) -> None:
            key = _storage_key(tensor)
            if key not in excluded and tensor.device == self.device:
                saved[key] = tensor.untyped_storage()

        seconds, output = self._timed(function, args, kwargs, pack)
        outputs = _storages(_tensors(output))
        del output
        saved_bytes = sum(storage.nbytes() for storage in saved.values())
        saves_input = _storage_key(hidden) in saved
        saves_output = bool(outputs & saved.keys())
        saved.clear()
        # Once more, for the time only (the first run may have paid for allocations and caches).
        seconds = min(seconds, self._timed(function, args, kwargs, _discard)[0])
        # The runs' memory is freed in stream order: let that finish before the layer's real call.
        _synchronize(self.device)
        return LayerProfile(
            index=index,
            planned=True,
            saved_bytes=saved_bytes,
            input_bytes=hidden.nbytes,
            offloadable=offloadable,
            saves_input=saves_input,
            saves_output=saves_output,
            forward_seconds=seconds,
        )

    def _timed(
        self,
        function: Callable[..., Any],
        args: tuple,
        kwargs: dict[str, Any],
        pack: Callable[[torch.Tensor], None],
    ) -> tuple[float, Any]:
        """Runs the layer with grad under ``pack``, with the RNG restored afterwards; (seconds, output).

        Timed by device events on an accelerator (the stream idle before), by the wall clock on the CPU.
        """
        with _rng_restored(self.device):
            _synchronize(self.device)
            start = _timestamp(self.device)
            with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, _never_unpacked):
                output = function(*args, **kwargs)
            return _seconds_between(self.device, start, _timestamp(self.device)), output


def _timestamp(device: torch.device) -> Any:
    """Now: a device event recorded on the current stream on an accelerator, the wall clock on the CPU."""
    if device.type == "cpu":
        return time.perf_counter()
    event = torch.Event(device=device, enable_timing=True)
    event.record()
    return event


def _seconds_between(device: torch.device, start: Any, end: Any) -> float:
    if device.type == "cpu":
        return end - start
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def _discard(tensor: torch.Tensor) -> None:
    return None


def _never_unpacked(packed: None) -> torch.Tensor:
    raise RuntimeError("gcoffload: a profile run's graph was used for backward; this is a gcoffload bug")


def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def _storages(tensors: Any) -> set[int]:
    return {_storage_key(tensor) for tensor in tensors if tensor.layout == torch.strided}


def _tensors(value: Any) -> list[torch.Tensor]:
    """The tensors in a layer's arguments or output, found the way the checkpoint paths find them."""
    leaves: list[torch.Tensor] = []
    flatten_arguments(value, leaves)
    return leaves


@contextlib.contextmanager
def _rng_restored(device: torch.device) -> Iterator[None]:
    """Puts the CPU and ``device``'s RNG back as they were, so the counting run draws nothing."""
    devices = [device.index] if device.type != "cpu" else []
    device_type = device.type if device.type != "cpu" else "cuda"
    with torch.random.fork_rng(devices=devices, device_type=device_type):
        yield


class BackwardClock:
    """Times the profile step's backward pass per layer, from when gradients reach layer outputs.

    A hook on layer ``i``'s output fires when backward reaches layer ``i``;
    the hook on layer ``i - 1``'s output, when layer ``i``'s backward
    (recompute, fetch and backward) is done. The marks are device events on
    an accelerator (recorded on the stream the backward pass runs on, so they
    time the device's work) and wall time on the CPU. The profile step keeps
    its last layer (its activations are needed first, so keeping them costs no
    more memory than recomputing them): that layer times a backward pass
    alone, the others a recompute and a backward pass. A recompute may cost
    less than a forward pass: torch's non-reentrant checkpoint stops as soon
    as it has what backward needs.

    Args:
        device: the device the layers run on.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.marks: dict[int, Any] = {}

    def watch(self, index: int, output: Any) -> None:
        """Marks the moment backward reaches ``output``, layer ``index``'s output."""
        tensor = next((tensor for tensor in _tensors(output) if tensor.requires_grad), None)
        if tensor is not None:
            tensor.register_hook(functools.partial(self._mark, index))

    def _mark(self, index: int, grad: torch.Tensor) -> None:
        self.marks[index] = _timestamp(self.device)

    def calibrate(self, profile: Profile, kept: int) -> Profile:
        """``profile`` with its backward and recompute times per forward time, where measured.

        Args:
            kept: the index of the layer the profile step kept.
        """
        backward = {layer.index: self._seconds(layer) for layer in profile.layers}
        kept_layer = profile.layers[kept] if 0 <= kept < len(profile.layers) else None
        if kept_layer is None or backward.get(kept) is None:
            return profile
        backward_per_forward = min(max(backward[kept] / kept_layer.forward_seconds, 0.5), 8.0)
        recomputes = [
            (seconds / layer.forward_seconds - backward_per_forward)
            for layer, seconds in ((layer, backward[layer.index]) for layer in profile.layers)
            if seconds is not None and layer.index != kept
        ]
        recompute_per_forward = (
            min(max(statistics.median(recomputes), 0.2), 1.5) if recomputes else profile.recompute_per_forward
        )
        return replace(
            profile, backward_per_forward=backward_per_forward, recompute_per_forward=recompute_per_forward
        )

    def _seconds(self, layer: LayerProfile) -> float | None:
        start, end = self.marks.get(layer.index), self.marks.get(layer.index - 1)
        if start is None or end is None or not layer.planned or layer.forward_seconds <= 0:
            return None
        return _seconds_between(self.device, start, end)


def measure_copies(engine: CopyEngine, nbytes: int, repeats: int = 3) -> CopyProfile:
    """Times the engine's copies of ``nbytes`` (best of ``repeats``): out, back, and both at once.

    Goes through the engine itself (its pool, streams and events), so the
    figures are what a checkpointed layer's copies get; they are left out of
    the engine's counters.
    """
    with engine.uncounted():
        return _time_copies(engine, max(nbytes, 1 << 16), repeats)


def _time_copies(engine: CopyEngine, nbytes: int, repeats: int) -> CopyProfile:
    device = engine.device
    outgoing = torch.empty(nbytes, dtype=torch.uint8, device=device)
    returning = torch.empty(nbytes, dtype=torch.uint8, device=device)
    d2h = h2d = both = float("inf")
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        handle = engine.offload(outgoing)
        engine.synchronize()
        d2h = min(d2h, time.perf_counter() - start)

        start = time.perf_counter()
        engine.fetch(handle)
        _synchronize(device)
        h2d = min(h2d, time.perf_counter() - start)

        incoming = engine.offload(returning)
        engine.synchronize()
        start = time.perf_counter()
        handle = engine.offload(outgoing)
        engine.prefetch(incoming)
        engine.synchronize()
        both = min(both, time.perf_counter() - start)
        handle.release()
        incoming.release()
    return CopyProfile(
        d2h_bytes_per_second=nbytes / max(d2h, 1e-9),
        h2d_bytes_per_second=nbytes / max(h2d, 1e-9),
        bidirectional_bytes_per_second=2 * nbytes / max(both, 1e-9),
        overlaps_compute=device.type != "cpu",
        nbytes=nbytes,
    )
