"""One copy engine per device, one host pool per device type, and the settings they share.

Nothing here builds the C++ extension until an engine or a pool is first
needed: :func:`existing_engines` and :func:`pool_stats` report only what
exists, so plain checkpointing (``offload=False``) never touches it.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from . import extension
from .copy_engine import CopyEngine
from .host_settings import HostSettings

__all__ = ["configure", "existing_engines", "get_engine", "pool_stats", "settings"]

_UNSET: Any = object()
_settings = HostSettings()
_lock = threading.Lock()
_pools: dict[str, Any] = {}
_engines: dict[torch.device, CopyEngine] = {}


def _normalize_device(device: torch.device | str | int | None) -> torch.device:
    if device is None:
        accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
        device = accelerator if accelerator is not None else torch.device("cpu")
    elif isinstance(device, int) and not isinstance(device, bool):
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
    try:
        module = torch.get_device_module(device.type)
        count = module.device_count() if module.is_available() else 0
    except (RuntimeError, AttributeError, AssertionError):
        count = 0
    if count == 0:
        raise ValueError(
            f"get_engine: device {str(device)!r} is not available in this process (torch "
            f"{torch.__version__} sees no {device.type} device); offload from a device that exists, "
            "or pass 'cpu'"
        )
    index = module.current_device() if device.index is None else device.index
    if not 0 <= index < count:
        raise ValueError(
            f"get_engine: device {str(device)!r} is not available: there are {count} {device.type} device(s)"
        )
    return torch.device(device.type, index)


def _pool(device_type: str) -> Any:
    pool = _pools.get(device_type)
    if pool is None:
        current = _settings.as_dict()
        pool = extension.load().PinnedPool(device_type)
        pool.set_budget(current["host_budget_bytes"])
        pool.set_slab_bytes(current["slab_bytes"])
        _pools[device_type] = pool
    return pool


def get_engine(device: torch.device | str | int | None = None) -> CopyEngine:
    """The copy engine of ``device`` (created, and the extension built, on first use).

    Args:
        device: ``"cuda:0"``, ``torch.device``, an index on the current
            accelerator, or None for the current accelerator (the CPU if none).

    Raises:
        ValueError: the device does not exist in this process.
        RuntimeError: the C++ extension cannot be built (no compiler); plain
            checkpointing (``offload=False``) works without it.
    """
    if isinstance(device, torch.device):  # a tensor's device: already normalised if known
        engine = _engines.get(device)
        if engine is not None:
            return engine
    device = _normalize_device(device)
    engine = _engines.get(device)
    if engine is not None:
        return engine
    with _lock:
        engine = _engines.get(device)
        if engine is None:
            impl = extension.load().CopyEngine(device, _pool(device.type))
            impl.set_over_budget(_settings.over_budget)
            impl.set_max_pending(_settings.max_pending)
            engine = _engines[device] = CopyEngine(impl)
    return engine


def existing_engines() -> dict[torch.device, CopyEngine]:
    """The engines created so far, by device (creates none)."""
    return dict(_engines)


def pool_stats() -> dict[str, dict[str, int]]:
    """The counters of the host pools created so far, by device type."""
    return {device_type: pool.stats() for device_type, pool in _pools.items()}


def reset_pool_peaks() -> None:
    for pool in _pools.values():
        pool.reset_peak()


def settings() -> dict[str, Any]:
    """The host settings in force (see :func:`configure`)."""
    return _settings.as_dict()


def configure(
    *,
    host_budget_bytes: int | None = _UNSET,
    over_budget: str = _UNSET,
    slab_bytes: int = _UNSET,
    max_pending: int = _UNSET,
) -> dict[str, Any]:
    """Sets how the host pools behave; applies to existing and future engines.

    Every value is checked before any is stored: a call that raises changes nothing.

    Args:
        host_budget_bytes: cap on host memory each device type's pool holds, up
            to 2**63 - 1; None removes the cap. Default: half of physical
            memory, shared by the processes on this node
            (:func:`~gcoffload.engine.host_settings.processes_on_this_node`).
            Lowering it gives back unused slabs at once and the others as
            their buffers come back.
        over_budget: what an offload does past the cap, or when the host
            refuses pinned memory: ``"keep"`` leaves the tensor on the device
            (default), ``"pageable"`` copies into ordinary host memory
            (slower), ``"error"`` raises.
        slab_bytes: the largest host allocation the pool grows by, a power of
            two from 512 to 2**62 (default 256 MiB). Slabs start at 1 MiB (or
            slab_bytes if smaller) and double with demand.
        max_pending: tensors whose copy may still read or write them that
            the engine holds itself; past this many, the oldest goes to the
            device's caching allocator, which reuses its memory only after
            the copy (``record_stream``). From 1 to 65536 (default 32).

    Returns:
        The settings now in force.

    Raises:
        ValueError: a value is out of range; the message names it.
    """
    updates = {
        name: value
        for name, value in (
            ("host_budget_bytes", host_budget_bytes),
            ("over_budget", over_budget),
            ("slab_bytes", slab_bytes),
            ("max_pending", max_pending),
        )
        if value is not _UNSET
    }
    HostSettings.check(updates)
    with _lock:
        current = {**_settings.as_dict(), **updates}
        for pool in _pools.values():
            pool.set_budget(current["host_budget_bytes"])
            pool.set_slab_bytes(current["slab_bytes"])
        for engine in _engines.values():
            engine._impl.set_over_budget(current["over_budget"])
            engine._impl.set_max_pending(current["max_pending"])
        for name, value in updates.items():
            setattr(_settings, name, value)
        return _settings.as_dict()
