"""A swap region: saved-tensor hooks that park what autograd saves in host memory, storage by storage.

Inside a region nothing is recomputed: autograd saves what it always saves,
and each saved tensor that may leave the device (:func:`swappable`) becomes a
view of a :class:`~gcoffload.swapping.swapped_storage.SwappedStorage`. A
storage is offloaded once, when the region closes (a swapped layer: every view
of the layer's storages is known by then) or when ``keep_pending`` newer
storages have been saved since (a region around arbitrary code, where a
storage saved long ago gets no new views). Everything else is saved as it is,
with its version checked on unpack.

Note [What a region never swaps]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Parameters and views of them (a linear layer saves its weight), the storages
the caller names as held anyway (a swapped layer's parameters, buffers, and
tensor arguments other than its hidden states: rotary tables and masks, which
every layer saves, would travel once per layer), tensors that are not floating
point (dropout masks, indices) or of a kind the copy engine cannot copy, and
everything saved while the device's stream captures a graph, stay on the
device. So does a storage whose span is below ``min_offload_bytes``. A region
only pushes its hooks where no other region's are in force (an outer
checkpoint, ``save_on_cpu``): there the tensors belong to the outer region, as
in torch.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable, Iterator

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

from ..checkpointing import counters
from ..checkpointing.forward_chain import chain_of, link
from ..checkpointing.layer_call import LayerCall
from ..checkpointing.saved_input import SavedTensor, can_save, capturing, pop_hooks, push_hooks
from ..engine import get_engine
from .swapped_storage import SwappedGroup, SwappedStorage, SwappedView

__all__ = ["SwapRegion", "swappable"]


def swappable(tensor: torch.Tensor) -> bool:
    """Whether a saved ``tensor`` may be swapped: dense floating-point data, not a parameter or its view."""
    return (
        tensor.is_floating_point()
        and type(tensor) is torch.Tensor
        and tensor.layout is torch.strided
        and not tensor.is_nested
        and not isinstance(tensor._base, torch.nn.Parameter)
    )


class SwapRegion:
    """The pack and unpack hooks of one region, and the storages it has not offloaded yet.

    Args:
        layer: the callable (or a description) named in errors.
        prefetch_depth: units of the forward chain before a group to prefetch
            when backward reaches it (Note [When swapped storages come back]).
        min_offload_bytes: storages whose saved span is smaller stay on the device.
        keep_pending: offload a storage once this many newer ones were saved;
            None: when the region closes.
        held_anyway: tensors whose storages are never swapped (Note [What a region never swaps]).
        prefetched: whether the units after a group prefetch it, or only its own
            backward pass does (Note [When swapped storages come back]).
        sizing: only count what would travel (:meth:`travelling`), meta tensors
            included; nothing is offloaded (the autopilot's profile, the capacity planner).
    """

    def __init__(
        self,
        layer: object,
        *,
        prefetch_depth: int,
        min_offload_bytes: int,
        keep_pending: int | None = None,
        held_anyway: Iterable[torch.Tensor] = (),
        prefetched: bool = True,
        sizing: bool = False,
    ) -> None:
        self.layer = layer
        self.prefetched = prefetched
        self.sizing = sizing
        self.prefetch_depth = prefetch_depth
        self.min_offload_bytes = min_offload_bytes
        self.keep_pending = keep_pending
        self._held_anyway = {
            tensor.untyped_storage()._cdata
            for tensor in held_anyway
            if isinstance(tensor, torch.Tensor) and tensor.layout is torch.strided and not tensor.is_meta
        }
        self._pending: dict[int, SwappedStorage] = {}  # storage key -> storage, oldest first
        # Offloaded storages by key, while their device storage lives: a later view inside their span
        # (with the same contents) joins them instead of travelling again.
        self._offloaded: dict[int, tuple[StorageWeakRef, weakref.ref[SwappedStorage], int]] = {}
        self._groups: list[weakref.ref[SwappedGroup]] = []
        self.swapped_bytes = 0

    @classmethod
    def for_call(
        cls, call: LayerCall, min_offload_bytes: int, *, prefetch_depth: int = 0, **keywords: bool
    ) -> SwapRegion:
        """The region of one layer call: its parameters, buffers and arguments other than the hidden
        states are held anyway (Note [What a region never swaps]). ``keywords``: ``prefetched``, ``sizing``.
        """
        module = call.module
        owned = (*module.parameters(), *module.buffers()) if isinstance(module, nn.Module) else ()
        hidden = call.hidden
        return cls(
            call.layer,
            prefetch_depth=prefetch_depth,
            min_offload_bytes=min_offload_bytes,
            held_anyway=(*owned, *(leaf for leaf in call.leaves if leaf is not hidden)),
            **keywords,
        )

    @contextlib.contextmanager
    def active(self) -> Iterator[SwapRegion]:
        """The region's hooks in force inside the block.

        When the block ends the region closes (its pending storages leave); when
        it raises, everything the region saved is released.
        """
        push_hooks(self.pack, self.unpack)
        try:
            yield self
        except BaseException:
            pop_hooks()
            self.abandon()
            raise
        pop_hooks()
        self.close()

    def pack(self, tensor: torch.Tensor) -> SwappedView | SavedTensor:
        if not swappable(tensor) or not (self.sizing or (can_save(tensor) and not capturing(tensor.device))):
            return SavedTensor(tensor, self.layer)
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._held_anyway or storage.nbytes() == 0:
            return SavedTensor(tensor, self.layer)
        swapped = self._pending.get(key)
        if swapped is None:
            swapped = self._still_offloaded(key, storage, tensor)
            if swapped is not None:
                view = SwappedView(swapped, tensor, self.layer)
                if swapped.covers(view):
                    view.let_go()
                    return view
            swapped = self._pending[key] = SwappedStorage(storage, tensor.device)
            if self.keep_pending is not None and len(self._pending) > self.keep_pending:
                oldest = next(iter(self._pending))
                self._offload([self._pending.pop(oldest)])
        view = SwappedView(swapped, tensor, self.layer)
        swapped.add(view)
        return view

    @staticmethod
    def unpack(packed: SwappedView | SavedTensor) -> torch.Tensor:
        return packed.unpack()

    def travelling(self) -> dict[int, int]:
        """Sizing: the bytes each storage that would travel moves, by storage key; then forgets them."""
        pending, self._pending = self._pending, {}
        return {key: swapped.nbytes for key, swapped in pending.items() if self._travels(swapped)}

    def _travels(self, swapped: SwappedStorage) -> bool:
        return swapped.nbytes >= max(self.min_offload_bytes, 1)

    def close(self) -> None:
        """Offloads every storage still pending, as one group."""
        pending, self._pending = list(self._pending.values()), {}
        self._offload(pending)
        self._offloaded.clear()

    def abandon(self) -> None:
        """Releases everything the region saved (its layer raised): nothing stays on the device or host."""
        for swapped in self._pending.values():
            for reference in swapped.views:
                view = reference()
                if view is not None:
                    view.release()
        self._pending.clear()
        self._offloaded.clear()
        for reference in self._groups:
            group = reference()
            if group is not None:
                group.release()

    def _still_offloaded(
        self, key: int, storage: torch.UntypedStorage, tensor: torch.Tensor
    ) -> SwappedStorage | None:
        entry = self._offloaded.get(key)
        if entry is None:
            return None
        weak_storage, weak_swapped, version = entry
        swapped = weak_swapped()
        if weak_storage.expired() or weak_storage.cdata != storage._cdata or swapped is None:
            return None
        return swapped if tensor._version == version and swapped.handle is not None else None

    def _offload(self, storages: list[SwappedStorage]) -> None:
        """Offloads the storages worth moving, one group per device, linked into the device's chain."""
        by_device: dict[torch.device, list[SwappedStorage]] = {}
        for swapped in storages:
            if self._travels(swapped):
                by_device.setdefault(swapped.device, []).append(swapped)
        for device, moving in by_device.items():
            counts = counters.of(device)
            group = SwappedGroup(moving, device, self.prefetch_depth, counts, prefetched=self.prefetched)
            link(chain_of(device), group)
            self._groups.append(weakref.ref(group))
            engine = get_engine(device)
            for swapped in moving:
                weak_storage = StorageWeakRef(swapped.storage)
                version = swapped.version()
                swapped.offload(engine, group)
                self.swapped_bytes += swapped.nbytes
                if self.keep_pending is not None:
                    self._offloaded[weak_storage.cdata] = (weak_storage, weakref.ref(swapped), version)
            counts["swapped_storages"] += len(moving)
