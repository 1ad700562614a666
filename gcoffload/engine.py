"""One copy engine per device over the C++ core, and the host-pool settings.

Example:
    >>> engine = gcoffload.get_engine("cuda:0")
    >>> handle = engine.offload(hidden_states)   # D2H on a side stream
    >>> engine.prefetch(handle)                  # H2D issued ahead of time
    >>> hidden_states = engine.fetch(handle)     # ready on the current stream
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any, Protocol

import torch

from . import _ext

__all__ = [
    "CopyEngine",
    "Handle",
    "configure",
    "get_engine",
    "reset_stats",
    "stats",
]

OVER_BUDGET_POLICIES = ("keep", "pageable", "error")
# Counted by the checkpoint layer through CopyEngine.count.
CHECKPOINT_COUNTERS = (
    "checkpointed_layers",  # layer calls that went through a checkpoint
    "plain_layers",  # training-mode calls the selective rule ran without one
    "recomputes",  # layer recomputes in backward
    "kept_resident",  # inputs the residency window kept on the device
    "kept_below_threshold",  # inputs too small to offload
)
# States rather than counts: a step reports them as they were when it ended.
GAUGES = ("live_handles",)
_UNSET: Any = object()


def _half_of_physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return None


class _Settings:
    def __init__(self) -> None:
        self.host_budget_bytes: int | None = _half_of_physical_memory()
        self.over_budget = "keep"
        self.slab_bytes = 256 << 20
        self.max_pending = 32

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


_settings = _Settings()
_lock = threading.Lock()
_pools: dict[str, Any] = {}
_engines: dict[torch.device, CopyEngine] = {}
_steps = 0


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
    placement: str  # "pool", "pageable", "device" (kept by the budget) or "empty"

    def release(self) -> None: ...


class CopyEngine:
    """Moves tensors of one device to host memory and back on side streams.

    One D2H and one H2D stream per device, so both directions of the bus run
    at once and neither blocks compute. Host buffers come from a pool of
    page-locked memory shared by the engines of a device type. On the CPU the
    copies are synchronous and the same code paths run.

    Get instances from :func:`get_engine`; do not construct them directly.
    """

    def __init__(self, impl: Any) -> None:
        self._impl = impl
        self._counters: Counter[str] = Counter(dict.fromkeys(CHECKPOINT_COUNTERS, 0))
        self.device: torch.device = impl.device
        self._step_start = self.stats()
        self._last_step: dict[str, int] | None = None

    def offload(self, tensor: torch.Tensor) -> Handle:
        """Starts copying ``tensor`` to host memory and returns at once.

        The engine keeps ``tensor`` alive until the copy has read it, so the
        caller may drop it right away. Non-contiguous tensors are made
        contiguous on the current stream first; ``fetch`` returns that layout.

        Args:
            tensor: a dense tensor on this engine's device, any dtype and shape.

        Raises:
            TypeError: ``tensor`` is not a tensor.
            RuntimeError: it lives on another device, or the host budget is
                exhausted under ``over_budget="error"``.
        """
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"offload: tensor must be a torch.Tensor, got {type(tensor).__name__}")
        return self._impl.offload(tensor)

    def prefetch(self, handle: Handle) -> bool:
        """Starts copying ``handle``'s tensor back to the device.

        Returns:
            False when no copy was issued: already prefetched or fetched,
            released, or never left the device.
        """
        return self._impl.prefetch(self._check(handle, "prefetch"))

    def fetch(self, handle: Handle) -> torch.Tensor:
        """Returns ``handle``'s tensor on the device, usable on the current stream.

        Copies on demand if ``prefetch`` was not called. The host buffer goes
        back to the pool; a handle can be fetched once.
        """
        return self._impl.fetch(self._check(handle, "fetch"))

    def synchronize(self) -> None:
        """Blocks until every copy issued so far has finished."""
        self._impl.synchronize()

    def reserve(self, nbytes: int) -> None:
        """Allocates host slabs now so that ``nbytes`` can be offloaded without allocating."""
        if not _is_non_negative_int(nbytes):
            raise ValueError(f"reserve: nbytes must be a non-negative int, got {nbytes!r}")
        self._impl.pool.reserve(nbytes)

    def trim(self) -> int:
        """Frees host slabs none of whose buffers is in use; returns the bytes freed."""
        return self._impl.pool.trim()

    def count(self, counter: str, amount: int = 1) -> None:
        """Adds to one of :data:`CHECKPOINT_COUNTERS`, reported by :meth:`stats`."""
        if counter not in self._counters:
            raise ValueError(f"count: unknown counter {counter!r}; expected one of {CHECKPOINT_COUNTERS}")
        self._counters[counter] += amount

    def stats(self) -> dict[str, int]:
        """Copy counters since the last reset, merged with the checkpoint counters."""
        return {**self._impl.stats(), **self._counters}

    def reset_stats(self) -> None:
        """Zeroes the counters; :meth:`last_step` keeps the last finished step."""
        self._impl.reset_stats()
        self._counters = Counter(dict.fromkeys(CHECKPOINT_COUNTERS, 0))
        self._step_start = self.stats()

    def last_step(self) -> dict[str, int] | None:
        """The counters of the last finished training step, None before the first one.

        A step is one forward and backward pass through the checkpointed layers
        (a micro-batch under gradient accumulation). It ends when backward
        fetches the first layer input its forward pass saved, the last copy
        the step makes; everything counted since the previous step ended
        belongs to it.
        """
        return None if self._last_step is None else dict(self._last_step)

    def _end_step(self) -> None:
        now = self.stats()
        self._last_step = {
            name: value if name in GAUGES else value - self._step_start.get(name, 0)
            for name, value in now.items()
        }
        self._step_start = now

    @contextlib.contextmanager
    def trace(self) -> Iterator[list[dict[str, Any]]]:
        """Records every copy (and :meth:`mark`) issued inside the block.

        Yields a list that is filled when the block exits, one dict per entry:
        ``op`` ("offload", "prefetch", "fetch", "pending_wait", "mark"),
        ``stream`` ("d2h", "h2d", "compute"), ``handle_id``, ``nbytes``,
        ``label`` and ``start_ms``/``end_ms`` since the block began (device
        events on a GPU, wall-clock time on the CPU). Exiting synchronises with
        the copies.

        A "fetch" or "pending_wait" entry spans the time the compute stream
        stood still waiting for a copy (H2D for a fetch, the oldest queued D2H
        when more than ``max_pending`` are outstanding): the copy time overlap
        did not hide.
        """
        entries: list[dict[str, Any]] = []
        self._impl.start_trace()
        try:
            yield entries
        finally:
            entries.extend(self._impl.stop_trace())

    def mark(self, label: str) -> None:
        """Adds a point on the compute stream to an active trace (no-op otherwise)."""
        self._impl.mark(label)

    def _check(self, handle: Handle, verb: str) -> Handle:
        if not isinstance(handle, _ext.load().Handle):
            raise TypeError(f"{verb}: handle must come from CopyEngine.offload, got {type(handle).__name__}")
        return handle

    def __repr__(self) -> str:
        return f"CopyEngine(device={self.device})"


def _is_non_negative_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _normalize_device(device: torch.device | str | int | None) -> torch.device:
    if device is None:
        accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
        device = accelerator if accelerator is not None else torch.device("cpu")
    elif isinstance(device, int):
        if not torch.accelerator.is_available():
            raise ValueError(f"get_engine: device index {device} given but no accelerator is available")
        device = torch.device(torch.accelerator.current_accelerator().type, device)
    elif isinstance(device, str):
        try:
            device = torch.device(device)
        except RuntimeError as error:
            raise ValueError(f"get_engine: {device!r} is not a device: {error}") from None
    elif not isinstance(device, torch.device):
        raise TypeError(f"get_engine: device must be a torch.device, str or int, got {type(device).__name__}")
    if device.type == "meta":
        raise ValueError("get_engine: meta tensors hold no data to offload")
    if device.type == "cpu":
        return torch.device("cpu")
    if device.index is None:
        module = torch.get_device_module(device.type)
        device = torch.device(device.type, module.current_device())
    return device


def _pool(device_type: str) -> Any:
    pool = _pools.get(device_type)
    if pool is None:
        pool = _ext.load().PinnedPool(device_type)
        pool.set_budget(_settings.host_budget_bytes)
        pool.set_slab_bytes(_settings.slab_bytes)
        _pools[device_type] = pool
    return pool


def get_engine(device: torch.device | str | int | None = None) -> CopyEngine:
    """The copy engine of ``device`` (created, and the extension built, on first use).

    Args:
        device: ``"cuda:0"``, ``torch.device``, an index on the current
            accelerator, or None for the current accelerator (the CPU if none).
    """
    device = _normalize_device(device)
    engine = _engines.get(device)
    if engine is not None:
        return engine
    with _lock:
        engine = _engines.get(device)
        if engine is None:
            impl = _ext.load().CopyEngine(device, _pool(device.type))
            impl.set_over_budget(_settings.over_budget)
            impl.set_max_pending(_settings.max_pending)
            engine = _engines[device] = CopyEngine(impl)
    return engine


def configure(
    *,
    host_budget_bytes: int | None = _UNSET,
    over_budget: str = _UNSET,
    slab_bytes: int = _UNSET,
    max_pending: int = _UNSET,
) -> dict[str, Any]:
    """Sets how the host pools behave; applies to existing and future engines.

    Args:
        host_budget_bytes: cap on host memory each device type's pool holds.
            None removes the cap. Default: half of physical memory.
        over_budget: what an offload does past the cap: ``"keep"`` leaves the
            tensor on the device (default), ``"pageable"`` copies into ordinary
            host memory (slower), ``"error"`` raises.
        slab_bytes: size of the host allocations buffers are carved from; a
            power of two (default 256 MiB).
        max_pending: offloads whose copy may still be reading their source
            before the compute stream waits for the oldest (default 32).

    Returns:
        The settings now in force.
    """
    if host_budget_bytes not in (_UNSET, None) and not _is_non_negative_int(host_budget_bytes):
        raise ValueError(f"host_budget_bytes must be a non-negative int or None, got {host_budget_bytes!r}")
    if over_budget is not _UNSET and over_budget not in OVER_BUDGET_POLICIES:
        raise ValueError(f"over_budget must be one of {OVER_BUDGET_POLICIES}, got {over_budget!r}")
    if slab_bytes is not _UNSET and not (
        _is_non_negative_int(slab_bytes) and slab_bytes >= 512 and slab_bytes & (slab_bytes - 1) == 0
    ):
        raise ValueError(f"slab_bytes must be a power of two of at least 512, got {slab_bytes!r}")
    if max_pending is not _UNSET and not (_is_non_negative_int(max_pending) and max_pending >= 1):
        raise ValueError(f"max_pending must be a positive int, got {max_pending!r}")

    with _lock:
        for name, value in (
            ("host_budget_bytes", host_budget_bytes),
            ("over_budget", over_budget),
            ("slab_bytes", slab_bytes),
            ("max_pending", max_pending),
        ):
            if value is not _UNSET:
                setattr(_settings, name, value)
        for pool in _pools.values():
            pool.set_budget(_settings.host_budget_bytes)
            pool.set_slab_bytes(_settings.slab_bytes)
        for engine in _engines.values():
            engine._impl.set_over_budget(_settings.over_budget)
            engine._impl.set_max_pending(_settings.max_pending)
        return _settings.as_dict()


def close_step() -> None:
    """Ends the current step on every engine; :func:`stats` then reports it as ``last_step``.

    Called by :class:`~gcoffload.saved_input.SavedInput` when backward fetches
    the first input of a forward pass.
    """
    global _steps
    with _lock:
        for engine in _engines.values():
            engine._end_step()
        _steps += 1


def stats() -> dict[str, Any]:
    """Counters of every engine (keyed by device) and pool (keyed by device type).

    Engine counters (since the last :func:`reset_stats`): ``offloads``,
    ``offloaded_bytes``, ``prefetches``, ``fetches``, ``prefetch_hits``,
    ``on_demand_fetches``, ``fetched_bytes``, ``kept_on_device``,
    ``pageable_spills``, ``pending_waits``, ``live_handles``, and the
    checkpoint layer's counters. Pool counters: ``reserved_bytes``,
    ``in_use_bytes``, ``peak_in_use_bytes``, ``host_alloc_calls``,
    ``reuse_hits``, ``spills``, ``slabs``, ``budget_bytes``.

    ``last_step`` holds each engine's counters for the last finished training
    step alone (see :meth:`CopyEngine.last_step`), ``steps`` how many steps
    have finished.
    """
    return {
        "engines": {str(device): engine.stats() for device, engine in _engines.items()},
        "last_step": {str(device): engine.last_step() for device, engine in _engines.items()},
        "steps": _steps,
        "pools": {device_type: pool.stats() for device_type, pool in _pools.items()},
        "settings": _settings.as_dict(),
    }


def reset_stats() -> None:
    """Zeroes the engine counters and the pools' peaks (not their allocation counts)."""
    for engine in _engines.values():
        engine.reset_stats()
    for pool in _pools.values():
        pool.reset_peak()
