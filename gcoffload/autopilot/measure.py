"""The profile step's measurements: what a layer would save, its times, and the copy bandwidth.

The profile step runs each layer once, as a normal checkpointed step does:
there is no extra run, so buffers (BatchNorm's running statistics) and
module hooks see exactly what a checkpointed step shows them. :class:`LayerMeter`
counts, in the layer's real forward pass, what autograd saves for the layer
body (Note [Counting in the real forward pass]); :class:`BackwardClock` times
the backward pass per layer; :func:`measure_copies` times the copy engine.

Note [Counting in the real forward pass]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Torch's non-reentrant checkpoint runs the layer's forward pass with grad
enabled under its own saved-tensor hooks, which drop what the body saves
(the recompute brings it back). A pack hook pushed inside the body sees
every tensor the layer would save if it were not checkpointed: the meter's
hook records its storage and hands the tensor on to torch's hook. The
reentrant Function runs its forward under ``no_grad``, which saves nothing;
in a profile step it runs that one forward with grad enabled instead, under
a hook that records each storage and keeps nothing. A kept layer's hook hands
autograd a detached alias of each tensor (the same storage; a tensor saved
with its own history would tie the graph to itself in a cycle no collector
sees). The recorded storages stay referenced
until the run ends, so that a freed one's address cannot come back as
another's: the run takes the memory of one kept layer, and keeps nothing
afterwards. Parameters and buffers are not counted (the model holds them in
every mode); the layer's input, output and other tensor arguments are told
apart by storage identity (Note [What a layer holds, by storage] in profile.py).
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from ..checkpointing.layer_call import LayerCall, flatten_arguments
from ..checkpointing.options import DEFAULT_MIN_OFFLOAD_BYTES
from ..engine import CopyEngine, extension
from ..swapping.region import SwapRegion
from .profile import CopyProfile, DiskRates, LayerProfile, Profile

__all__ = ["BackwardClock", "LayerMeter", "measure_copies", "measure_disk", "storage_key"]


def storage_key(tensor: torch.Tensor) -> int:
    """An identity for ``tensor``'s storage, valid while the storage lives (meta storages included)."""
    return tensor.untyped_storage()._cdata


def _tensors(value: Any) -> list[torch.Tensor]:
    leaves: list[torch.Tensor] = []
    flatten_arguments(value, leaves)
    return [leaf for leaf in leaves if leaf.layout == torch.strided]


class LayerMeter:
    """Measures one layer call of the profile step in its real forward pass.

    Only weak references to the call's tensors are kept, so a meter never
    keeps memory alive (and the profile step can tell which arguments outlive
    the pass).

    Args:
        call: the layer call; its hidden states are on the device measured.
        min_offload_bytes: the threshold under which swap leaves a storage on the device.

    Attributes (once :meth:`run` has run): ``saved_keys``, the storages the
    layer saves; ``own_bytes``; ``output_key``, ``output_bytes`` and
    ``output_storage`` (a weak reference) of its first output tensor;
    ``seconds``, its forward time; ``swap``, the profile's swap fields: what
    swap mode would send to host memory and leave on the device, counted by
    the swap region's own rules (:meth:`SwapRegion.travelling`).
    """

    def __init__(self, call: LayerCall, min_offload_bytes: int = DEFAULT_MIN_OFFLOAD_BYTES) -> None:
        hidden = call.hidden
        self.device = hidden.device
        module = call.module
        owned = (*module.parameters(), *module.buffers()) if module is not None else ()
        self._excluded = {storage_key(tensor) for tensor in owned if tensor.layout == torch.strided}
        self.hidden_key = storage_key(hidden)
        self.input_bytes = hidden.untyped_storage().nbytes()
        self.arguments: dict[int, tuple[StorageWeakRef, int]] = {}  # storage key -> (storage, bytes)
        for leaf in call.leaves:
            if leaf is hidden or leaf.layout != torch.strided or leaf.device != self.device:
                continue
            storage = leaf.untyped_storage()
            key = storage._cdata
            if key not in self._excluded and key != self.hidden_key and storage.nbytes() > 0:
                self.arguments.setdefault(key, (StorageWeakRef(storage), storage.nbytes()))
        self.measuring = True
        self._swap = SwapRegion.for_call(call, min_offload_bytes, sizing=True)
        self.swap: dict[str, Any] = {}
        self._saved: dict[int, torch.UntypedStorage] = {}
        self.saved_keys: frozenset[int] = frozenset()
        self.own_bytes = 0
        self.largest_saved_bytes = 0
        self.output_key: int | None = None
        self.output_bytes = 0
        self.output_storage: StorageWeakRef | None = None
        self.seconds = 0.0

    def run(
        self, function: Callable[..., Any], args: tuple, kwargs: dict[str, Any], *, passthrough: bool
    ) -> Any:
        """``function(*args, **kwargs)``: measured the first time, run plainly afterwards (the recompute).

        ``passthrough``: hand each saved tensor on to the hooks outside (or to
        autograd) after counting it; False keeps nothing (Note [Counting in the
        real forward pass]).
        """
        if not self.measuring:
            return function(*args, **kwargs)
        self.measuring = False
        pack, unpack = self._hooks(passthrough)
        start = _timestamp(self.device)
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
                output = function(*args, **kwargs)
            self.seconds = _seconds_between(self.device, start, _timestamp(self.device))
            self._finish(output)
        finally:
            self._saved.clear()
            self._swap.abandon()
        return output

    def _hooks(
        self, passthrough: bool
    ) -> tuple[Callable[[torch.Tensor], Any], Callable[[Any], torch.Tensor]]:
        outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
        if passthrough and outer is not None:
            pack_outer, unpack_outer = outer

            def pack_on(tensor: torch.Tensor) -> Any:
                self._record(tensor)
                return pack_outer(tensor)

            return pack_on, unpack_outer

        def pack(tensor: torch.Tensor) -> Any:
            self._record(tensor)
            # Detached: a saved output holding its own grad_fn would make a cycle through the graph.
            return tensor.detach() if passthrough else None

        return pack, (_identity if passthrough else _never_unpacked)

    def _record(self, tensor: torch.Tensor) -> None:
        if tensor.layout != torch.strided or tensor.device != self.device:
            return
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key not in self._excluded and storage.nbytes() > 0:
            self._saved[key] = storage
            self._swap.pack(tensor)

    def _finish(self, output: Any) -> None:
        self.saved_keys = frozenset(self._saved)
        outputs = _tensors(output)
        if outputs:
            storage = outputs[0].untyped_storage()
            self.output_key = storage._cdata
            self.output_bytes = storage.nbytes()
            self.output_storage = StorageWeakRef(storage)
        shared = {self.hidden_key, self.output_key, *self.arguments}
        self.own_bytes = sum(storage.nbytes() for key, storage in self._saved.items() if key not in shared)
        self.largest_saved_bytes = max(
            (storage.nbytes() for key, storage in self._saved.items() if key not in self.arguments), default=0
        )
        travelling = self._swap.travelling()
        self.swap = {
            "swap_bytes": sum(travelling.values()),
            "swap_resident_bytes": sum(
                storage.nbytes()
                for key, storage in self._saved.items()
                if key not in shared and key not in travelling
            ),
            "input_swapped": self.hidden_key in travelling,
            "output_swapped": self.output_key in travelling,
            "first_needed_swap_bytes": next(reversed(travelling.values()), 0),  # saved last
        }

    def profile(
        self, index: int, offloadable: bool, input_is_previous_output: bool, argument_ids: dict[int, int]
    ) -> LayerProfile:
        """The measured layer, its arguments numbered by ``argument_ids`` (storage key -> id)."""
        return LayerProfile(
            index=index,
            planned=True,
            own_bytes=self.own_bytes,
            input_bytes=self.input_bytes,
            offloadable=offloadable,
            saves_input=self.hidden_key in self.saved_keys,
            saves_output=self.output_key is not None and self.output_key in self.saved_keys,
            forward_seconds=self.seconds,
            output_bytes=self.output_bytes,
            input_is_previous_output=input_is_previous_output,
            arguments=tuple(argument_ids[key] for key in self.arguments),
            saved_arguments=tuple(argument_ids[key] for key in self.arguments if key in self.saved_keys),
            largest_saved_bytes=self.largest_saved_bytes,
            **self.swap,
        )


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _never_unpacked(packed: None) -> torch.Tensor:
    raise RuntimeError("gcoffload: a profile run's graph was used for backward; this is a gcoffload bug")


def _synchronize(device: torch.device) -> None:
    if device.type != "cpu":
        torch.get_device_module(device.type).synchronize(device)


_UNTIMED = ("cpu", "meta")  # no device events: the wall clock (on meta it times nothing real)


def _timestamp(device: torch.device) -> Any:
    """Now: a device event recorded on the current stream on an accelerator, the wall clock on the CPU."""
    if device.type in _UNTIMED:
        return time.perf_counter()
    event = torch.Event(device=device, enable_timing=True)
    event.record()
    return event


def _seconds_between(device: torch.device, start: Any, end: Any) -> float:
    if device.type in _UNTIMED:
        return end - start
    end.synchronize()
    return start.elapsed_time(end) / 1e3


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


def measure_disk(directory: str, nbytes: int = 64 << 20, block_bytes: int = 16 << 20) -> DiskRates:
    """The sequential rates of ``directory`` as the disk tier's file gets them (places rewritten)."""
    measured = extension.load().measure_disk_bandwidth(str(directory), nbytes, block_bytes)
    return DiskRates(measured["read_bytes_per_second"], measured["write_bytes_per_second"])


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
