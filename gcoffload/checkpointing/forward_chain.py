"""The forward chain: what a device saved, in forward order, so that backward knows what comes next.

Every unit a forward pass parks in host memory, a checkpointed layer's
:class:`~gcoffload.checkpointing.saved_input.SavedInput` or a swapped layer's
:class:`~gcoffload.swapping.swapped_storage.SwappedGroup`, is linked to the
unit saved just before it on the same device by the same thread. The backward
pass meets the units in reverse order: when it reaches one, it prefetches the
``prefetch_depth`` units linked before it, which it needs next, whatever their
kind, and has the disk tier read the ``disk_read_ahead`` units before those
into pinned staging. The first unit of a chain is the last one backward fetches on its
device: fetching it ends the device's training step for :func:`gcoffload.stats`.

The chain holds weak references only: autograd owns the units (Note [Who owns
a SavedInput] in saved_input.py), and a unit whose graph is gone drops out.
One chain per device and thread: Note [One chain per device and thread] in
saved_input.py.
"""

from __future__ import annotations

import collections
import threading
import weakref
from typing import Protocol

import torch

__all__ = ["ChainUnit", "ForwardChain", "chain_of", "link", "predecessors"]


class ChainUnit(Protocol):
    """What the chain links: a unit that can start copying itself back to the device."""

    previous: weakref.ref[ChainUnit] | None

    @property
    def waiting(self) -> bool:
        """Whether :meth:`prefetch` would copy something back (an input on the host, a prefetched group)."""
        ...

    def prefetch(self) -> None: ...

    def read_ahead(self) -> None:
        """Starts reading what the disk tier holds of the unit into pinned staging (no-op otherwise)."""
        ...


class ForwardChain:
    """The last unit saved on one device by one thread, and that device's residency window of inputs."""

    __slots__ = ("last", "window")

    def __init__(self) -> None:
        self.last: weakref.ref[ChainUnit] | None = None
        self.window: collections.deque[weakref.ref[ChainUnit]] = collections.deque()


class _Chains(threading.local):
    def __init__(self) -> None:
        self.by_device: dict[torch.device, ForwardChain] = {}


_chains = _Chains()


def chain_of(device: torch.device) -> ForwardChain:
    """This thread's chain for ``device``."""
    by_device = _chains.by_device
    chain = by_device.get(device)
    if chain is None:
        chain = by_device[device] = ForwardChain()
    return chain


def link(chain: ForwardChain, unit: ChainUnit) -> None:
    """Makes ``unit`` the chain's last, linked after the one that was."""
    last = chain.last
    earlier = last() if last is not None else None
    unit.previous = weakref.ref(earlier) if earlier is not None else None
    chain.last = weakref.ref(unit)


def predecessors(unit: ChainUnit, depth: int) -> list[ChainUnit]:
    """Up to ``depth`` units linked before ``unit``, nearest first."""
    found: list[ChainUnit] = []
    link_to = unit.previous
    while link_to is not None and len(found) < depth:
        earlier = link_to()
        if earlier is None:
            break
        found.append(earlier)
        link_to = earlier.previous
    return found
