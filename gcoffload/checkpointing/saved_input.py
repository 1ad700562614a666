"""A checkpointed layer's input, kept on the device or parked on the host.

Each checkpointed call saves one :class:`SavedInput`. It is linked to the one
saved just before it on the same device by the same thread (the *forward
chain*), which is how the backward pass of layer ``i`` knows what to prefetch
for layer ``i - 1``. A *residency window* per chain keeps the most recent inputs
on the device: they are the first the backward pass needs, so copying them out
and straight back would only cost bus time.

Note [Who owns a SavedInput]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Autograd does. The checkpoint functions hand it to autograd through a
saved-tensors pack hook, so it lives exactly as long as the saved variable:
it is freed right after the layer's backward (or with the graph, if backward
never runs), and then its handle returns the host buffer to the pool. The
chain and the window only hold weak references, so they never keep a layer
input alive; an entry whose graph is gone simply drops out of them.

Note [One chain per device and thread]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Autograd runs the backward pass of a device's nodes on that device's own
thread, with the stream each node's forward ran on made current. A prefetch
allocates its destination on the current stream of the handle's device
(Note [Destination allocated on the compute stream] in csrc/copy_engine.cpp),
so it must be issued from a backward node of the same device: there the
current stream is the one that will use and free the tensor. Chaining inputs
across devices (a model split over cuda:0 and cuda:1 in one thread) would
have cuda:1's backward thread prefetch cuda:0's input onto whatever stream
is current for cuda:0 on that thread. So each device has its own chain and
window; the first input of each chain ends the step on its device.

Note [Graph capture]
~~~~~~~~~~~~~~~~~~~~
While the current stream records a graph (CUDA graphs, ``torch.cuda.graph``),
nothing may query an event and every buffer a replay touches is baked into
the graph, so an offload's host buffer could not be reused and its copy's
events would break the capture. Inputs saved while capturing therefore stay on
the device (counted as ``kept_during_capture``), and the window does not
slide; prefetches are not issued. An input offloaded before the capture began
cannot be fetched inside it: that raises, naming the fix.

Note [In-place changes to saved inputs]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Autograd raises when a tensor it saved was changed in place before backward
used it, by comparing the tensor's version counter with the one it saved. A
saved-tensor pack hook turns that check off, and an offloaded input is no
longer even referenced. So every tensor a checkpoint saves records its version
when saved, and unpacking compares: a resident input and every other saved
tensor read ``tensor._version``, an offloaded input asks its handle, which
watches the source's version counter without keeping its memory. The hidden
states are versioned when the checkpoint call starts, on both paths: a layer
that changes its own input in place during the forward pass raises too (the
reentrant path of torch.utils.checkpoint would recompute from the changed
values), because an offload copy may be reading that input at that moment.
"""

from __future__ import annotations

import weakref
from collections import Counter

import torch

from ..engine import CopyEngine, Handle, get_engine
from . import counters
from .forward_chain import ChainUnit, chain_of, link, predecessors
from .layer_call import describe_layer
from .options import OffloadOptions

__all__ = [
    "SavedInput",
    "SavedTensor",
    "can_save",
    "capturing",
    "prefetch_predecessors",
    "pop_hooks",
    "push_hooks",
    "raise_modified_in_place",
    "save",
    "saving_is_ours",
]

# torch.autograd.graph.saved_tensors_hooks without its Python frames: both paths push and pop per layer.
push_hooks = torch._C._autograd._push_saved_tensors_default_hooks
pop_hooks = torch._C._autograd._pop_saved_tensors_default_hooks
_hooks_enabled = torch._C._autograd._saved_tensors_hooks_is_enabled
_top_hooks = torch._C._autograd._top_saved_tensors_default_hooks


def saving_is_ours() -> bool:
    """Whether a checkpoint may push its own saved-tensor hooks.

    Not where another region's hooks are in force, nor where hooks are
    disabled: Note [Saving through an outer region] in reentrant.py.
    """
    return _hooks_enabled() and _top_hooks(False) is None


class SavedInput:
    """One layer input: resident (``tensor``) or offloaded (``handle``).

    Args:
        tensor: the layer input, shape ``(batch, seq, hidden)`` for decoders.
        layer: the checkpointed callable, named in errors.
        counts: the device's layer counters.
        prefetch_depth: how many of the inputs saved before this one to prefetch when it is unpacked.
        device: ``tensor.device``.
        disk_read_ahead: how many inputs before those to read ahead from the disk tier.
        to_disk: whether the input goes straight to the disk tier when offloaded.
    """

    __slots__ = (
        "__weakref__",
        "_fetched",
        "counts",
        "device",
        "disk_read_ahead",
        "engine",
        "handle",
        "layer",
        "prefetch_depth",
        "previous",
        "tensor",
        "to_disk",
        "version",
    )

    def __init__(
        self,
        tensor: torch.Tensor,
        layer: object,
        counts: Counter[str],
        prefetch_depth: int,
        device: torch.device,
        disk_read_ahead: int = 0,
        to_disk: bool = False,
    ) -> None:
        self.device = device
        self.disk_read_ahead = disk_read_ahead
        self.to_disk = to_disk
        self.counts = counts
        self.prefetch_depth = prefetch_depth
        self.engine: CopyEngine | None = None  # the device's copy engine, once the input is offloaded
        self.layer = layer
        self.tensor: torch.Tensor | None = tensor
        self.handle: Handle | None = None
        self._fetched: torch.Tensor | None = None
        self.version = tensor._version
        self.previous: weakref.ref | None = None  # set by forward_chain.link

    def offload(self) -> None:
        """Starts the copy to host memory; the device tensor is no longer referenced here."""
        if self.tensor is not None:
            self.engine = get_engine(self.device)
            self.handle = self.engine.offload(self.tensor, to_disk=self.to_disk)
            self.tensor = None

    @property
    def waiting(self) -> bool:
        return self.handle is not None

    def prefetch(self) -> None:
        if self.handle is not None:
            self.engine.prefetch(self.handle)

    def read_ahead(self) -> None:
        if self.handle is not None:
            self.engine.read_ahead(self.handle)

    def unpack(self) -> torch.Tensor:
        """The input on the device, for its layer's recompute. Repeated calls return the same tensor.

        The recompute starts here: before fetching its own input, it starts
        copying back the inputs of the ``prefetch_depth`` layers saved before
        it, which backward needs next. The first input a forward pass saved on
        a device is the last one backward fetches there, so fetching it ends
        the device's training step for :func:`gcoffload.stats`.

        Raises:
            RuntimeError: the input was changed in place since it was saved
                (Note [In-place changes to saved inputs]), or already released.
        """
        if self.tensor is None and self.handle is None:
            raise RuntimeError(
                "gcoffload: this checkpointed layer's saved input was already released; "
                "run the forward pass again before another backward"
            )
        current = self.tensor._version if self.tensor is not None else self.handle.source_version
        if current != self.version:
            shape = self.handle.shape if self.tensor is None else tuple(self.tensor.shape)
            dtype = self.handle.dtype if self.tensor is None else self.tensor.dtype
            what = f"{dtype} tensor of shape {list(shape)}"
            raise_modified_in_place(what, current, self.version, self.layer)
        self.counts["recomputes"] += 1
        if self._fetched is None:
            prefetch_predecessors(self, self.prefetch_depth, self.device, self.disk_read_ahead)
            if self.tensor is not None:
                self._fetched = self.tensor
                self.counts["kept_resident"] += 1
            else:
                if capturing(self.device):
                    raise RuntimeError(
                        "gcoffload: a layer input offloaded before graph capture began cannot be fetched "
                        "while the stream is capturing (Note [Graph capture]). Capture whole training "
                        "steps: run the forward pass inside the capture too."
                    )
                self._fetched = self.engine.fetch(self.handle)
                self.handle.release()  # holds nothing now but the version it watches
            if self.previous is None:
                counters.end_step(self.device)
        return self._fetched

    def release(self) -> None:
        """Drops whatever is held now (used when a layer raises)."""
        if self.handle is not None:
            self.handle.release()
        self.tensor = self.handle = self._fetched = None


class SavedTensor:
    """Any other tensor a checkpoint saves, with its version at save time.

    Saved-tensor hooks turn off autograd's own check for in-place changes, so
    the checkpoint paths pack every tensor they save into one of these (or a
    :class:`SavedInput`) and check on unpack.
    """

    __slots__ = ("layer", "tensor", "version")

    def __init__(self, tensor: torch.Tensor, layer: object) -> None:
        self.tensor = tensor
        self.layer = layer
        self.version = tensor._version

    def unpack(self) -> torch.Tensor:
        current = self.tensor._version
        if current != self.version:
            raise_modified_in_place(self.tensor.type(), current, self.version, self.layer)
        return self.tensor


def raise_modified_in_place(what: str, current: int, expected: int, layer: object) -> None:
    """Raises autograd's error for a saved tensor changed in place, naming gcoffload and the layer."""
    raise RuntimeError(
        "one of the variables needed for gradient computation has been modified by an inplace "
        f"operation: [{what}] is at version {current}; expected version {expected} instead. "
        f"gcoffload: it is an input of the checkpointed layer {describe_layer(layer)}, changed in place "
        "after the checkpoint saved it (by the layer itself during its forward pass, or by code that ran "
        "afterwards), so the recompute in backward would see other values than the forward pass did. "
        "Change a clone instead (x = x.clone()) before modifying it in place."
    )


def prefetch_predecessors(unit: ChainUnit, depth: int, device: torch.device, read_ahead: int = 0) -> None:
    """Starts copying back the ``depth`` units linked before ``unit``: backward needs them next.

    The ``read_ahead`` units before those start coming off the disk tier, if
    it holds them, into pinned staging. Nothing is issued while ``device``'s
    stream captures a graph (Note [Graph capture]).
    """
    nearest = predecessors(unit, depth + read_ahead)
    waiting = [(distance, earlier) for distance, earlier in enumerate(nearest) if earlier.waiting]
    if waiting and not capturing(device):
        for distance, earlier in waiting:
            if distance < depth:  # a unit's distance in the chain, whatever the kinds between
                earlier.prefetch()
            else:
                earlier.read_ahead()


def capturing(device: torch.device) -> bool:
    """Whether ``device``'s current stream is recording a graph; see Note [Graph capture]."""
    if device.type == "cpu":
        return False
    query = getattr(torch.get_device_module(device.type), "is_current_stream_capturing", None)
    return query is not None and bool(query())


def can_save(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` can be a :class:`SavedInput`: dense data on a device with a copy engine.

    Meta, sparse, nested and quantized tensors, and tensor subclasses (DTensor,
    fake and functional tensors), are saved as they are, like
    torch.utils.checkpoint saves them.
    """
    return (
        type(tensor) in _PLAIN_TYPES
        and tensor.layout is torch.strided
        and not tensor.is_meta
        and not tensor.is_nested
        and not tensor.is_quantized
    )


_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def save(tensor: torch.Tensor, options: OffloadOptions, layer: object) -> SavedInput:
    """Saves a checkpointed layer's input, links it into this thread's chain, slides the window.

    The input may leave the device if ``options`` allow and it is a floating
    tensor of at least ``min_offload_bytes``. Then it joins the residency
    window, and inputs that fall out of the window are offloaded now, so their
    copy overlaps the layer about to run.

    Args:
        tensor: a tensor for which :func:`can_save` holds.
        options: how the input is kept.
        layer: the checkpointed callable, named in errors.
    """
    device = tensor.device
    counts = counters.of(device)
    counts["checkpointed_layers"] += 1
    offloads = options.offload and options.offloads(tensor)
    if options.offload and not offloads:
        counts["kept_below_threshold"] += 1
    if offloads and capturing(device):
        counts["kept_during_capture"] += 1
        offloads = False
    chain = chain_of(device)
    saved = SavedInput(
        tensor, layer, counts, options.prefetch_depth, device, options.disk_read_ahead, options.to_disk
    )
    link(chain, saved)
    if offloads:
        chain.window.append(weakref.ref(saved))
        while len(chain.window) > options.keep_resident:
            oldest = chain.window.popleft()()
            if oldest is not None:
                oldest.offload()
    return saved
