"""One copy engine per device, one host pool and disk tier per device type, and the settings they share.

Nothing here builds the C++ extension until an engine or a pool is first
needed: :func:`existing_engines` and :func:`pool_stats` report only what
exists, so plain checkpointing (``offload=False``) never touches it.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import torch

from . import extension
from .copy_engine import CopyEngine
from .host_settings import DISK_DIR_ENV, HostSettings

__all__ = ["configure", "disk_stats", "existing_engines", "get_engine", "pool_stats", "settings"]

_UNSET: Any = object()
_settings = HostSettings()
_lock = threading.Lock()
_pools: dict[str, Any] = {}
_engines: dict[torch.device, CopyEngine] = {}
_tiers: dict[str, Any] = {}  # the disk tier of each device type, while over_budget is "disk"
_faults: Any = None  # the tiers' fault injector (a test hook), made with the first tier
_DISK_SETTINGS = ("over_budget", "disk_dir", "disk_budget_bytes", "disk_staging_bytes", "disk_checksums")


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


def _open_tier(device_type: str, current: dict[str, Any]) -> Any:
    """A new disk tier for ``device_type`` under the ``current`` settings (its file is created now).

    Raises:
        ValueError: no ``disk_dir`` is set.
        RuntimeError: the file cannot be created there; the message says why.
    """
    if current["disk_dir"] is None:
        raise ValueError(
            f"over_budget='disk' needs a directory on a local disk: pass disk_dir=... to "
            f"gcoffload.configure or set {DISK_DIR_ENV}"
        )
    return extension.load().DiskTier(
        device_type,
        os.fspath(current["disk_dir"]),
        current["disk_budget_bytes"],
        current["disk_staging_bytes"],
        current["disk_checksums"],
        _fault_injector(),
    )


def _fault_injector() -> Any:
    """Test hook: the tiers' fault injector; ``arm`` it to make their file calls fail."""
    global _faults
    if _faults is None:
        _faults = extension.load().FaultInjector()
    return _faults


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
            current = _settings.as_dict()
            if current["over_budget"] == "disk" and device.type not in _tiers:
                _tiers[device.type] = _open_tier(device.type, current)
            impl.set_disk_tier(_tiers.get(device.type), current["disk_fallback"])
            impl.set_over_budget(current["over_budget"])
            impl.set_max_pending(current["max_pending"])
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
    for tier in _tiers.values():
        tier.reset_stats()


def disk_stats() -> dict[str, dict[str, Any]]:
    """The disk tiers in use, by device type: their counters, and the rates and hidden share they give.

    ``write_bytes_per_second`` and ``read_bytes_per_second`` are the bytes
    moved over the I/O threads' time in transfers; ``hidden_fraction`` is the
    share of that time no training thread waited for (None before any
    transfer).
    """
    report = {}
    for device_type, tier in _tiers.items():
        stats = tier.stats()
        busy = stats["write_seconds"] + stats["read_seconds"]
        stats["write_bytes_per_second"] = _rate(stats["written_bytes"], stats["write_seconds"])
        stats["read_bytes_per_second"] = _rate(stats["read_bytes"], stats["read_seconds"])
        stats["hidden_fraction"] = max(0.0, 1.0 - stats["stall_seconds"] / busy) if busy > 0 else None
        report[device_type] = stats
    return report


def _rate(nbytes: int, seconds: float) -> float | None:
    return nbytes / seconds if seconds > 0 else None


def settings() -> dict[str, Any]:
    """The host settings in force (see :func:`configure`)."""
    return _settings.as_dict()


def configure(
    *,
    host_budget_bytes: int | None = _UNSET,
    over_budget: str = _UNSET,
    slab_bytes: int = _UNSET,
    max_pending: int = _UNSET,
    disk_dir: str | os.PathLike | None = _UNSET,
    disk_budget_bytes: int | None = _UNSET,
    disk_staging_bytes: int = _UNSET,
    disk_fallback: str = _UNSET,
    disk_checksums: bool = _UNSET,
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
            (slower), ``"error"`` raises, ``"disk"`` writes it to a file in
            ``disk_dir`` (README "Past host memory: the disk tier").
        slab_bytes: the largest host allocation the pool grows by, a power of
            two from 512 to 2**62 (default 256 MiB). Slabs start at 1 MiB (or
            slab_bytes if smaller) and double with demand.
        max_pending: tensors whose copy may still read or write them that
            the engine holds itself; past this many, the oldest goes to the
            device's caching allocator, which reuses its memory only after
            the copy (``record_stream``). From 1 to 65536 (default 32).
        disk_dir: the directory, on a local disk, of the disk tier's file
            (default ``$GCOFFLOAD_DISK_DIR``). The file has no name, so
            nothing is left there when the process ends, however it ends.
        disk_budget_bytes: cap on the bytes the disk tier holds per device
            type; None (default) for as much as the disk takes.
        disk_staging_bytes: pinned host memory, beyond the host budget, that
            transfers to and from the disk go through (default 512 MiB); it
            grows to hold at least one tensor.
        disk_fallback: what an offload does when the disk tier cannot take it
            (its budget is full, or a write failed): ``"error"`` raises
            (default), ``"keep"`` and ``"pageable"`` as for ``over_budget``.
        disk_checksums: hash every tensor written to the disk and check it
            when read back (a debug mode; default False).

    Returns:
        The settings now in force.

    Raises:
        ValueError: a value is out of range; the message names it.
        RuntimeError: the disk tier's file cannot be created in ``disk_dir``
            (missing or read-only directory); the message says why.
    """
    updates = {
        name: value
        for name, value in (
            ("host_budget_bytes", host_budget_bytes),
            ("over_budget", over_budget),
            ("slab_bytes", slab_bytes),
            ("max_pending", max_pending),
            ("disk_dir", disk_dir),
            ("disk_budget_bytes", disk_budget_bytes),
            ("disk_staging_bytes", disk_staging_bytes),
            ("disk_fallback", disk_fallback),
            ("disk_checksums", disk_checksums),
        )
        if value is not _UNSET
    }
    HostSettings.check(updates)
    with _lock:
        current = {**_settings.as_dict(), **updates}
        tiers = dict(_tiers)
        if any(name in updates for name in _DISK_SETTINGS):
            # Opened before anything is stored: a directory that cannot take the file changes nothing.
            in_use = {engine.device.type for engine in _engines.values()}
            tiers = {}
            if current["over_budget"] == "disk":
                # With no engine yet, a tier opened and dropped checks the directory.
                tiers = {device_type: _open_tier(device_type, current) for device_type in in_use or ("cpu",)}
                tiers = {device_type: tier for device_type, tier in tiers.items() if device_type in in_use}
        for pool in _pools.values():
            pool.set_budget(current["host_budget_bytes"])
            pool.set_slab_bytes(current["slab_bytes"])
        _tiers.clear()
        _tiers.update(tiers)
        for engine in _engines.values():
            engine._impl.set_disk_tier(_tiers.get(engine.device.type), current["disk_fallback"])
            engine._impl.set_over_budget(current["over_budget"])
            engine._impl.set_max_pending(current["max_pending"])
        for name, value in updates.items():
            setattr(_settings, name, value)
        return _settings.as_dict()
