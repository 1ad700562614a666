"""A swapped storage: the bytes of one device storage that saved views cover, parked in host memory.

Autograd saves tensors, but a layer's saved tensors are mostly views: q, k and
v sliced out of one projection, transposes, ``expand``-ed masks. So the unit
of transfer is a *storage*: every view saved of it becomes a
:class:`SwappedView` of one :class:`SwappedStorage`, which sends the byte span
the views cover (not the whole storage, when a small view is all that is
saved) to host memory once, and brings it back once. Each view is rebuilt on
return with its own dtype, shape, strides and offset. The storages a region
parks together form a :class:`SwappedGroup`, one unit of the forward chain.

Note [Swapped storages and their views]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Autograd owns the views (the saved-tensor pack hook returns them); a view
holds its storage and a storage its group, so a group lives exactly as long as
the last view saved of it, and then its handles give the host buffers back.
Until its region offloads it, a view holds its tensor, so the storage stays on
the device and a backward pass that comes first (``torch.autograd.grad``
inside the region) reads it there. When the region offloads the storage, the
views let go of their tensors: from then on the copy engine holds the device
memory until the copy has read it, and frees it then, unless the model still
uses it. The span is widened to 16-byte boundaries, so every view's offset in
it is a whole number of its elements.

Note [In-place changes to swapped tensors]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
A saved-tensor hook turns autograd's check for in-place changes off, and a
swapped tensor is no longer referenced. So a view records its tensor's version
when saved, and when its region lets go of the tensor it keeps the version
counter alone (``watch_version``: a small shared object, not the memory).
Unpacking compares, and raises autograd's error if the tensor was changed in
place after it was saved, in the layer or after it.

Note [When swapped storages come back]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
When backward unpacks the first view of a group, the group first prefetches
the ``prefetch_depth`` units linked before it in the forward chain (inputs of
checkpointed layers and swapped groups alike: the ones backward needs next),
then issues the H2D copies of all its own storages in reverse forward order,
the order backward uses them, and fetches the one it needs: the compute
stream waits for that copy alone, and the rest land while backward works
through the layer. A group's storages therefore take as much device memory in
its backward pass as a recompute of the layer would.
"""

from __future__ import annotations

import weakref
from collections import Counter

import torch

from ..checkpointing import counters
from ..checkpointing.saved_input import capturing, prefetch_predecessors, raise_modified_in_place
from ..engine import CopyEngine, Handle, extension

__all__ = ["SwappedGroup", "SwappedStorage", "SwappedView"]

_ALIGNMENT = 16  # bytes; a multiple of every element size


class SwappedView:
    """One saved tensor: a view of a :class:`SwappedStorage`, rebuilt on unpack.

    Args:
        storage: the swapped storage the tensor is a view of.
        tensor: the saved tensor, held until its region offloads the storage.
        layer: the swapped callable, named in errors.
    """

    __slots__ = (
        "__weakref__",
        "dtype",
        "layer",
        "offset",
        "size",
        "storage",
        "stride",
        "tensor",
        "version",
        "watch",
    )

    def __init__(self, storage: SwappedStorage, tensor: torch.Tensor, layer: object) -> None:
        self.storage = storage
        self.tensor: torch.Tensor | None = tensor
        self.layer = layer
        self.dtype = tensor.dtype
        self.size = tuple(tensor.shape)
        self.stride = tuple(tensor.stride())
        self.offset = tensor.storage_offset() * tensor.element_size()  # bytes into the storage
        self.version = tensor._version
        self.watch = None  # the version counter alone, once the tensor is let go

    def let_go(self) -> None:
        """Keeps the tensor's version counter and drops the tensor (its storage is being offloaded)."""
        if self.tensor is not None:
            self.watch = extension.load().watch_version(self.tensor)
            self.tensor = None

    def byte_span(self) -> tuple[int, int]:
        """The bytes of the storage this view reads: ``[start, end)``; empty for an empty view."""
        if any(extent == 0 for extent in self.size):
            return self.offset, self.offset
        itemsize = self.dtype.itemsize
        last = sum((extent - 1) * step for extent, step in zip(self.size, self.stride, strict=True))
        return self.offset, self.offset + (last + 1) * itemsize

    def unpack(self) -> torch.Tensor:
        """The saved tensor, on the device: itself, or rebuilt from its storage's copy.

        Raises:
            RuntimeError: the tensor was changed in place since it was saved
                (Note [In-place changes to swapped tensors]), or its group was
                released (a layer raised; the graph cannot be used).
        """
        tensor = self.tensor
        current = tensor._version if tensor is not None else self.watch.current if self.watch else None
        if current is None:
            raise RuntimeError(
                "gcoffload: this swapped layer's saved activations were already released (the layer "
                "raised during its forward pass); run the forward pass again before backward"
            )
        if current != self.version:
            what = f"{self.dtype} tensor of shape {list(self.size)}"
            raise_modified_in_place(what, current, self.version, self.layer)
        if tensor is not None:
            return tensor
        storage, start = self.storage.fetch()
        rebuilt = torch.empty(0, dtype=self.dtype, device=storage.device)
        with torch.no_grad():
            rebuilt.set_(storage, (self.offset - start) // self.dtype.itemsize, self.size, self.stride)
        return rebuilt

    def release(self) -> None:
        self.tensor = self.watch = None


class SwappedStorage:
    """The span of one device storage that saved views cover: on the device, then on the host, then back.

    Args:
        storage: the device storage.
        device: its device.
    """

    __slots__ = (
        "__weakref__",
        "device",
        "end",
        "engine",
        "fetched",
        "group",
        "handle",
        "start",
        "storage",
        "views",
    )

    def __init__(self, storage: torch.UntypedStorage, device: torch.device) -> None:
        self.storage: torch.UntypedStorage | None = storage
        self.device = device
        self.start = self.end = 0
        self.views: list[weakref.ref[SwappedView]] = []
        self.group: SwappedGroup | None = None
        self.engine: CopyEngine | None = None
        self.handle: Handle | None = None
        self.fetched: torch.UntypedStorage | None = None

    def add(self, view: SwappedView) -> None:
        """Widens the span to cover ``view``."""
        start, end = view.byte_span()
        if not self.views:
            self.start, self.end = start, end
        elif end > start:
            self.start, self.end = min(self.start, start), max(self.end, end)
        self.views.append(weakref.ref(view))

    @property
    def nbytes(self) -> int:
        """Bytes that travel: the span widened to 16-byte boundaries within the storage."""
        start, end = self._aligned()
        return end - start

    def _aligned(self) -> tuple[int, int]:
        start = self.start - self.start % _ALIGNMENT
        end = -(-self.end // _ALIGNMENT) * _ALIGNMENT
        if self.storage is not None:
            end = min(end, self.storage.nbytes())
        return start, max(end, start)

    def version(self) -> int:
        """The version of the first view still holding its tensor (0 if none does)."""
        for reference in self.views:
            view = reference()
            if view is not None and view.tensor is not None:
                return view.tensor._version
        return 0

    def covers(self, view: SwappedView) -> bool:
        start, end = view.byte_span()
        return self.start <= start and end <= self.end

    def offload(self, engine: CopyEngine, group: SwappedGroup) -> None:
        """Starts the copy of the span to host memory; the views let go of their tensors."""
        start, end = self._aligned()
        self.start, self.end = start, end
        with torch.no_grad():
            span = torch.empty(0, dtype=torch.uint8, device=self.device)
            span.set_(self.storage, start, (end - start,), (1,))
        self.engine = engine
        self.group = group
        self.handle = engine.offload(span)
        self.storage = None
        for reference in self.views:
            view = reference()
            if view is not None:
                view.let_go()

    def prefetch(self) -> None:
        if self.handle is not None:
            self.engine.prefetch(self.handle)

    def read_ahead(self) -> None:
        if self.handle is not None:
            self.engine.read_ahead(self.handle)

    def fetch(self) -> tuple[torch.UntypedStorage, int]:
        """The span back on the device (fetched once, then reused), and its start in the old storage."""
        if self.fetched is None:
            if self.handle is None:
                raise RuntimeError(
                    "gcoffload: this swapped layer's saved activations were already released (the layer "
                    "raised); run the forward pass again before backward"
                )
            group = self.group
            group.unpacking()
            if capturing(self.device):
                raise RuntimeError(
                    "gcoffload: activations swapped before graph capture began cannot be fetched while the "
                    "stream is capturing. Capture whole training steps: run the forward pass inside the "
                    "capture too."
                )
            self.fetched = self.engine.fetch(self.handle).untyped_storage()
            self.handle.release()
            self.handle = None
            if group.previous is None and not group.step_ended:  # the first unit of the chain
                group.step_ended = True
                counters.end_step(self.device)
        return self.fetched, self.start

    def release(self) -> None:
        if self.handle is not None:
            self.handle.release()
        self.handle = self.fetched = self.storage = None


class SwappedGroup:
    """The storages one region offloaded together: one unit of the forward chain.

    Args:
        storages: the storages, in the order they were saved.
        device: their device.
        prefetch_depth: units before this one to prefetch when backward reaches it.
        counts: the device's layer counters.
        prefetched: whether the units after it prefetch it (else its own backward pass does).
    """

    __slots__ = (
        "__weakref__",
        "counts",
        "device",
        "prefetch_depth",
        "prefetched",
        "previous",
        "started",
        "step_ended",
        "storages",
    )

    def __init__(
        self,
        storages: list[SwappedStorage],
        device: torch.device,
        prefetch_depth: int,
        counts: Counter[str],
        *,
        prefetched: bool = True,
    ) -> None:
        self.prefetched = prefetched
        self.storages = [weakref.ref(storage) for storage in storages]
        self.device = device
        self.prefetch_depth = prefetch_depth
        self.counts = counts
        self.previous: weakref.ref | None = None  # set by forward_chain.link
        self.started = False
        self.step_ended = False

    @property
    def waiting(self) -> bool:
        return self.prefetched

    def prefetch(self) -> None:
        """A later unit's backward pass asks for the group: copies it back if the group is prefetched."""
        if self.waiting:
            self._copy_back()

    def read_ahead(self) -> None:
        """An input's backward pass asks further ahead: the disk tier reads what it holds of the group."""
        if self.waiting:
            for reference in reversed(self.storages):
                storage = reference()
                if storage is not None:
                    storage.read_ahead()

    def _copy_back(self) -> None:
        """Starts copying every storage of the group back, last saved first (the order backward needs)."""
        for reference in reversed(self.storages):
            storage = reference()
            if storage is not None:
                storage.prefetch()

    def unpacking(self) -> None:
        """Backward has reached the group: Note [When swapped storages come back]."""
        if self.started:
            return
        self.started = True
        prefetch_predecessors(self, self.prefetch_depth, self.device)
        if not capturing(self.device):
            self._copy_back()

    def release(self) -> None:
        for reference in self.storages:
            storage = reference()
            if storage is not None:
                storage.release()
