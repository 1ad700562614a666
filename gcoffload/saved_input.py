"""A checkpointed layer's input, kept on the device or parked on the host.

Each checkpointed call saves one :class:`SavedInput`. It is linked to the one
saved just before it in the same thread (the *forward chain*), which is how
the backward pass of layer ``i`` knows what to prefetch for layer ``i - 1``.
A per-thread *residency window* keeps the most recent inputs on the device:
they are the first the backward pass needs, so copying them out and straight
back would only cost bus time.

Note [Who owns a SavedInput]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Autograd does. The checkpoint functions hand it to autograd through a
saved-tensors pack hook, so it lives exactly as long as the saved variable:
it is freed right after the layer's backward (or with the graph, if backward
never runs), and then its handle returns the host buffer to the pool. The
chain and the window only hold weak references, so they never keep a layer
input alive; an entry whose graph is gone simply drops out of them.
"""

from __future__ import annotations

import collections
import threading
import weakref
from dataclasses import dataclass

import torch

from .engine import CopyEngine, Handle, close_step, get_engine

__all__ = ["DEFAULT_MIN_OFFLOAD_BYTES", "OffloadOptions", "SavedInput", "save"]

DEFAULT_MIN_OFFLOAD_BYTES = 1 << 20


@dataclass(frozen=True)
class OffloadOptions:
    """How a checkpointed layer's input is kept.

    Args:
        offload: park the input in host memory; False gives plain checkpointing.
        prefetch_depth: in the backward pass of layer ``i``, start copying back
            the inputs of layers ``i-1 .. i-prefetch_depth`` (0: fetch on demand).
        keep_resident: the most recent inputs of a forward pass that stay on the
            device, because backward needs them first.
        min_offload_bytes: inputs smaller than this stay on the device.
    """

    offload: bool = True
    prefetch_depth: int = 1
    keep_resident: int = 1
    min_offload_bytes: int = DEFAULT_MIN_OFFLOAD_BYTES

    def __post_init__(self) -> None:
        if not isinstance(self.offload, bool):
            raise TypeError(f"offload must be a bool, got {self.offload!r}")
        for name in ("prefetch_depth", "keep_resident", "min_offload_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")


class SavedInput:
    """One layer input: resident (``tensor``) or offloaded (``handle``).

    Args:
        engine: the copy engine of the input's device.
        tensor: the layer input, shape ``(batch, seq, hidden)`` for decoders.
        previous: the input saved just before this one in the same thread.
    """

    __slots__ = ("__weakref__", "_fetched", "engine", "handle", "previous", "tensor")

    def __init__(self, engine: CopyEngine, tensor: torch.Tensor, previous: SavedInput | None) -> None:
        self.engine = engine
        self.tensor: torch.Tensor | None = tensor
        self.handle: Handle | None = None
        self._fetched: torch.Tensor | None = None
        self.previous = weakref.ref(previous) if previous is not None else None

    def offload(self) -> None:
        """Starts the copy to host memory; the device tensor is no longer referenced here."""
        if self.tensor is not None:
            self.handle = self.engine.offload(self.tensor)
            self.tensor = None

    def prefetch(self) -> None:
        if self.handle is not None:
            self.engine.prefetch(self.handle)

    def unpack(self) -> torch.Tensor:
        """The input on the device. Repeated calls return the same tensor (retain_graph).

        The first input of a forward pass is the last one backward fetches, so
        fetching it ends the training step for :func:`gcoffload.stats`.
        """
        if self._fetched is None:
            if self.tensor is not None:
                self._fetched, self.tensor = self.tensor, None
                self.engine.count("kept_resident")
            elif self.handle is not None:
                self._fetched = self.engine.fetch(self.handle)
                self.handle = None
            else:
                raise RuntimeError(
                    "gcoffload: this checkpointed layer's saved input was already released; "
                    "run the forward pass again before another backward"
                )
            if self.previous is None:
                close_step()
        return self._fetched

    def start_recompute(self, prefetch_depth: int) -> None:
        """Prefetches the inputs backward needs next; called before this layer's own is fetched."""
        for earlier in self.predecessors(prefetch_depth):
            earlier.prefetch()
        self.engine.count("recomputes")

    def predecessors(self, depth: int) -> list[SavedInput]:
        """Up to ``depth`` inputs saved before this one, nearest first."""
        found: list[SavedInput] = []
        link = self.previous
        while link is not None and len(found) < depth:
            saved = link()
            if saved is None:
                break
            found.append(saved)
            link = saved.previous
        return found

    def release(self) -> None:
        """Drops whatever is held now (used when a layer raises)."""
        if self.handle is not None:
            self.handle.release()
        self.tensor = self.handle = self._fetched = None


class _ForwardChain(threading.local):
    def __init__(self) -> None:
        self.last: weakref.ref[SavedInput] | None = None
        self.window: collections.deque[weakref.ref[SavedInput]] = collections.deque()


_chain = _ForwardChain()


def save(tensor: torch.Tensor, options: OffloadOptions) -> SavedInput:
    """Saves a checkpointed layer's input, links it into this thread's chain, slides the window.

    The input may leave the device if ``options`` allow and it is a floating
    tensor of at least ``min_offload_bytes``. Then it joins the residency
    window, and inputs that fall out of the window are offloaded now, so their
    copy overlaps the layer about to run.
    """
    engine = get_engine(tensor.device)
    engine.count("checkpointed_layers")
    offloads = options.offload and tensor.is_floating_point() and tensor.nbytes >= options.min_offload_bytes
    if options.offload and not offloads:
        engine.count("kept_below_threshold")
    previous = _chain.last() if _chain.last is not None else None
    saved = SavedInput(engine, tensor, previous)
    _chain.last = weakref.ref(saved)
    if offloads:
        _chain.window.append(weakref.ref(saved))
        while len(_chain.window) > options.keep_resident:
            oldest = _chain.window.popleft()()
            if oldest is not None:
                oldest.offload()
    return saved
