"""The copy engine of one device: moves tensors to host memory and back on side streams.

Example:
    >>> engine = gcoffload.get_engine("cuda:0")
    >>> handle = engine.offload(hidden_states)   # D2H on a side stream
    >>> engine.prefetch(handle)                  # H2D issued ahead of time
    >>> hidden_states = engine.fetch(handle)     # ready on the current stream
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any, Protocol

import torch

from . import extension
from .host_settings import INT64_MAX

__all__ = ["GAUGES", "CopyEngine", "Handle"]

# States rather than counts: a step reports them as they were when it ended.
GAUGES = ("live_handles",)


class Handle(Protocol):
    """The receipt for one offloaded tensor (a C++ object).

    Dropping the last reference, or calling ``release()``, returns its host
    buffer to the pool once the copies that touch it have finished.
    """

    id: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    state: str  # "offloaded", "prefetched", "fetched" or "released"
    placement: str  # "pool", "pageable", "disk", "device" (kept by the budget) or "empty"
    source_version: int  # the offloaded tensor's version counter now (Note [Watched versions])

    def release(self) -> None: ...


class CopyEngine:
    """Moves tensors of one device to host memory and back on side streams.

    One D2H and one H2D stream per device, so both directions of the bus run
    at once and neither blocks compute. Host buffers come from a pool of
    page-locked memory shared by the engines of a device type. On the CPU the
    copies are synchronous and the same code paths run.

    Get instances from :func:`gcoffload.get_engine`; do not construct them directly.
    """

    def __init__(self, impl: Any) -> None:
        self._impl = impl
        self._tracing = False
        self._trace_lock = threading.Lock()
        self._uncounted: Counter[str] = Counter()  # copy counts left out of stats(), see uncounted()
        self.device: torch.device = impl.device

    def offload(self, tensor: torch.Tensor, *, to_disk: bool = False) -> Handle:
        """Starts copying ``tensor`` to host memory and returns at once.

        The engine keeps ``tensor`` alive until the copy has read it, so the
        caller may drop it right away. Non-contiguous tensors are made
        contiguous on the current stream first; ``fetch`` returns that layout.

        Args:
            tensor: a plain dense (strided) tensor on this engine's device, any
                shape, any dtype but quantized and sub-byte ones.
            to_disk: under ``over_budget="disk"``, straight to the disk tier,
                leaving the host budget to later tensors (to the host pool if
                the tier cannot take it); ignored otherwise.

        Raises:
            TypeError: ``tensor`` is not a tensor, or of a kind the engine cannot
                copy (sparse, nested, mkldnn, quantized, a tensor subclass, fake
                or functional tensor, a sub-byte dtype). Nothing is allocated.
            RuntimeError: it lives on another device, or no host buffer can be
                had (budget exhausted, or pinned memory refused by the host)
                under ``over_budget="error"``, or the disk tier cannot take
                it under ``disk_fallback="error"``.
        """
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"offload: tensor must be a torch.Tensor, got {type(tensor).__name__}")
        return self._impl.offload(tensor, to_disk)

    def prefetch(self, handle: Handle) -> bool:
        """Starts copying ``handle``'s tensor back to the device.

        Returns:
            False when no copy was issued: already prefetched or fetched,
            released, or never left the device.
        """
        return self._impl.prefetch(self._check(handle, "prefetch"))

    def read_ahead(self, handle: Handle) -> bool:
        """Starts reading ``handle`` from the disk tier into pinned staging, ahead of :meth:`prefetch`.

        Returns:
            False when nothing was issued: not on disk, already in staging,
            or the staging limit (``disk_staging_bytes``) reached.
        """
        return self._impl.read_ahead(self._check(handle, "read_ahead"))

    def fetch(self, handle: Handle) -> torch.Tensor:
        """Returns ``handle``'s tensor on the device, usable on the current stream.

        Copies on demand if ``prefetch`` was not called. The host buffer goes
        back to the pool; a handle can be fetched once.
        """
        return self._impl.fetch(self._check(handle, "fetch"))

    def synchronize(self) -> None:
        """Blocks until every copy issued so far, and every disk transfer, has finished."""
        self._impl.synchronize()

    def reserve(self, nbytes: int) -> None:
        """Allocates host slabs now so that ``nbytes`` can be offloaded without allocating."""
        if not (isinstance(nbytes, int) and not isinstance(nbytes, bool) and 0 <= nbytes <= INT64_MAX):
            raise ValueError(f"reserve: nbytes must be an int from 0 to 2**63 - 1, got {nbytes!r}")
        self._impl.pool.reserve(nbytes)

    def trim(self) -> int:
        """Gives back the host slabs none of whose buffers is in use; returns their bytes.

        On the CPU the memory is freed. An accelerator's host allocator keeps it
        cached and pinned for the process's next pinned allocations;
        ``torch.accelerator.empty_host_cache()`` unpins it (and every other
        unused cached block), which gcoffload never does on its own.
        """
        return self._impl.pool.trim()

    def stats(self) -> dict[str, int]:
        """The copy counters since the last reset (see :func:`gcoffload.stats` for their meaning)."""
        copies = self._impl.stats()
        return {name: value - self._uncounted[name] for name, value in copies.items()}

    def reset_stats(self) -> None:
        """Zeroes the copy counters."""
        self._impl.reset_stats()
        self._uncounted = Counter()

    @contextlib.contextmanager
    def uncounted(self) -> Iterator[None]:
        """Leaves the copies issued inside the block out of :meth:`stats` and the step counters.

        For copies that are not a model's, such as the autopilot's bandwidth
        measurement. Copies other threads issue on this engine meanwhile are
        left out too.
        """
        before = self._impl.stats()
        try:
            yield
        finally:
            for name, value in self._impl.stats().items():
                if name not in GAUGES:
                    self._uncounted[name] += value - before[name]

    @contextlib.contextmanager
    def trace(self) -> Iterator[list[dict[str, Any]]]:
        """Records every copy (and :meth:`mark`) issued inside the block.

        Yields a list that is filled when the block exits, one dict per entry:
        ``op`` ("offload", "prefetch", "fetch", "mark"),
        ``stream`` ("d2h", "h2d", "compute"), ``handle_id``, ``nbytes``,
        ``label`` and ``start_ms``/``end_ms`` since the block began (device
        events on a GPU, wall-clock time on the CPU). Exiting synchronises with
        the copies.

        A "fetch" entry spans the time the compute stream stood still waiting
        for the H2D copy: the copy time overlap did not hide. Copies to and
        from pageable memory (``over_budget="pageable"``) are not traced.

        Raises:
            RuntimeError: a trace of this engine is already active (blocks
                cannot be nested, nor run from two threads at once).
        """
        with self._trace_lock:
            if self._tracing:
                raise RuntimeError(
                    f"trace: a trace of {self} is already active; engine.trace() blocks cannot "
                    "be nested or overlap. Read the entries you need from the outer block's list."
                )
            self._tracing = True
        entries: list[dict[str, Any]] = []
        try:
            self._impl.start_trace()
            try:
                yield entries
            finally:
                entries.extend(self._impl.stop_trace())
        finally:
            self._tracing = False

    def mark(self, label: str) -> None:
        """Adds a point on the compute stream to an active trace (no-op otherwise)."""
        self._impl.mark(label)

    def _check(self, handle: Handle, verb: str) -> Handle:
        if not isinstance(handle, extension.load().Handle):
            raise TypeError(f"{verb}: handle must come from CopyEngine.offload, got {type(handle).__name__}")
        return handle

    def __repr__(self) -> str:
        return f"CopyEngine(device={self.device})"
