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
    "default_host_budget",
    "get_engine",
    "processes_on_this_node",
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
    "kept_during_capture",  # inputs saved while a graph was being captured
    "kept_layers",  # layer calls the autopilot's plan ran without a checkpoint
    "profiled_layers",  # layer calls the autopilot measured in a profile step
)
# States rather than counts: a step reports them as they were when it ended.
GAUGES = ("live_handles",)
# Set by launchers to the number of processes on this node, in this order of trust.
LOCAL_SIZE_VARIABLES = (
    "LOCAL_WORLD_SIZE",  # torchrun, accelerate launch
    "LOCAL_SIZE",  # the DeepSpeed launcher
    "OMPI_COMM_WORLD_LOCAL_SIZE",  # Open MPI
    "MV2_COMM_WORLD_LOCAL_SIZE",  # MVAPICH2
    "MPI_LOCALNRANKS",  # MPICH and Intel MPI (Hydra)
    "SLURM_NTASKS_PER_NODE",  # srun --ntasks-per-node
)
INT64_MAX = 2**63 - 1
MAX_SLAB_BYTES = 2**62  # the largest power of two the C++ side holds
# Each pending offload keeps its source tensor alive on the device; far more than
# the layers of a step only holds memory back.
MAX_PENDING_LIMIT = 1 << 16
_UNSET: Any = object()
_NODE_SHARE: Any = object()  # the default budget, worked out when first needed


def _half_of_physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return None


def _positive_int(text: str | None) -> int | None:
    try:
        value = int(text) if text is not None else None
    except ValueError:
        return None
    return value if value is not None and value > 0 else None


def processes_on_this_node() -> int:
    """How many processes of this job share this node (1 when not distributed).

    Read from the launcher's environment (:data:`LOCAL_SIZE_VARIABLES`). Failing
    that, a distributed job (``WORLD_SIZE``, or an initialised
    ``torch.distributed``) is assumed to run one process per visible device.
    """
    for name in LOCAL_SIZE_VARIABLES:
        value = _positive_int(os.environ.get(name))
        if value is not None:
            return value
    world_size = _positive_int(os.environ.get("WORLD_SIZE")) or 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world_size = torch.distributed.get_world_size()
    if world_size == 1:
        return 1
    devices = torch.accelerator.device_count() if torch.accelerator.is_available() else 0
    return min(world_size, devices) if devices > 0 else world_size


def default_host_budget() -> int | None:
    """Half of physical memory, shared by the processes of this node (None if unknown)."""
    half = _half_of_physical_memory()
    return None if half is None else half // processes_on_this_node()


class _Settings:
    def __init__(self) -> None:
        self.host_budget_bytes: int | None = _NODE_SHARE
        self.over_budget = "keep"
        self.slab_bytes = 256 << 20
        self.max_pending = 32

    def as_dict(self) -> dict[str, Any]:
        # Resolved late, so that a launcher's torch.distributed setup is seen.
        if self.host_budget_bytes is _NODE_SHARE:
            self.host_budget_bytes = default_host_budget()
        return dict(vars(self))


_settings = _Settings()
_lock = threading.Lock()
_pools: dict[str, Any] = {}
_engines: dict[torch.device, CopyEngine] = {}


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
    source_version: int  # the offloaded tensor's version counter now (Note [Watched versions])

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
        self._tracing = False
        self._trace_lock = threading.Lock()
        self._counters: Counter[str] = Counter(dict.fromkeys(CHECKPOINT_COUNTERS, 0))
        self._uncounted: Counter[str] = Counter()  # copy counts left out of stats(), see uncounted()
        self.device: torch.device = impl.device
        self._step_start = self.stats()
        self._last_step: dict[str, int] | None = None
        self.steps = 0  # training steps finished on this device

    def offload(self, tensor: torch.Tensor) -> Handle:
        """Starts copying ``tensor`` to host memory and returns at once.

        The engine keeps ``tensor`` alive until the copy has read it, so the
        caller may drop it right away. Non-contiguous tensors are made
        contiguous on the current stream first; ``fetch`` returns that layout.

        Args:
            tensor: a plain dense (strided) tensor on this engine's device, any
                shape, any dtype but quantized and sub-byte ones.

        Raises:
            TypeError: ``tensor`` is not a tensor, or of a kind the engine cannot
                copy (sparse, nested, mkldnn, quantized, a tensor subclass, fake
                or functional tensor, a sub-byte dtype). Nothing is allocated.
            RuntimeError: it lives on another device, or no host buffer can be
                had (budget exhausted, or pinned memory refused by the host)
                under ``over_budget="error"``.
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
        """Gives back the host slabs none of whose buffers is in use; returns their bytes.

        On the CPU the memory is freed. An accelerator's host allocator keeps it
        cached and pinned for the process's next pinned allocations;
        ``torch.accelerator.empty_host_cache()`` unpins it (and every other
        unused cached block), which gcoffload never does on its own.
        """
        return self._impl.pool.trim()

    def count(self, counter: str, amount: int = 1) -> None:
        """Adds ``amount`` (a non-negative int) to one of :data:`CHECKPOINT_COUNTERS`.

        Raises:
            ValueError: ``counter`` is unknown or ``amount`` is negative or not an int.
        """
        if counter not in self._counters:
            raise ValueError(f"count: unknown counter {counter!r}; expected one of {CHECKPOINT_COUNTERS}")
        if type(amount) is not int or amount < 0:  # not _is_non_negative_int: this runs per layer call
            raise ValueError(f"count: amount must be a non-negative int, got {amount!r}")
        self._counters[counter] += amount

    def stats(self) -> dict[str, int]:
        """Copy counters since the last reset, merged with the checkpoint counters."""
        copies = self._impl.stats()
        return {**{name: value - self._uncounted[name] for name, value in copies.items()}, **self._counters}

    def reset_stats(self) -> None:
        """Zeroes the counters; :meth:`last_step` keeps the last finished step."""
        self._impl.reset_stats()
        self._counters = Counter(dict.fromkeys(CHECKPOINT_COUNTERS, 0))
        self._uncounted = Counter()
        self._step_start = self.stats()

    @contextlib.contextmanager
    def uncounted(self) -> Iterator[None]:
        """Leaves the copies issued inside the block out of :meth:`stats` and :meth:`last_step`.

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

    def last_step(self) -> dict[str, int] | None:
        """The counters of the last finished training step, None before the first one.

        A step is one forward and backward pass through the checkpointed layers
        (a micro-batch under gradient accumulation). It ends when backward
        fetches the first layer input its forward pass saved, the last copy
        the step makes; everything counted since the previous step ended
        belongs to it.
        """
        return None if self._last_step is None else dict(self._last_step)

    def end_step(self) -> None:
        """Ends the current step on this device; :meth:`last_step` then reports it.

        Called by :class:`~gcoffload.saved_input.SavedInput` when backward
        fetches the first input this device saved in a forward pass.
        """
        now = self.stats()
        self._last_step = {
            name: value if name in GAUGES else value - self._step_start.get(name, 0)
            for name, value in now.items()
        }
        self._step_start = now
        self.steps += 1

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
        settings = _settings.as_dict()
        pool = _ext.load().PinnedPool(device_type)
        pool.set_budget(settings["host_budget_bytes"])
        pool.set_slab_bytes(settings["slab_bytes"])
        _pools[device_type] = pool
    return pool


def get_engine(device: torch.device | str | int | None = None) -> CopyEngine:
    """The copy engine of ``device`` (created, and the extension built, on first use).

    Args:
        device: ``"cuda:0"``, ``torch.device``, an index on the current
            accelerator, or None for the current accelerator (the CPU if none).
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

    Every value is checked before any is stored: a call that raises changes nothing.

    Args:
        host_budget_bytes: cap on host memory each device type's pool holds, up
            to 2**63 - 1; None removes the cap. Default: half of physical
            memory, shared by the processes on this node
            (:func:`processes_on_this_node`). Lowering it gives back unused
            slabs at once and the others as their buffers come back.
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
            the copy (``record_stream``). From 1 to :data:`MAX_PENDING_LIMIT`
            (default 32).

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
    _check_settings(updates)
    with _lock:
        settings = {**_settings.as_dict(), **updates}
        for pool in _pools.values():
            pool.set_budget(settings["host_budget_bytes"])
            pool.set_slab_bytes(settings["slab_bytes"])
        for engine in _engines.values():
            engine._impl.set_over_budget(settings["over_budget"])
            engine._impl.set_max_pending(settings["max_pending"])
        for name, value in updates.items():
            setattr(_settings, name, value)
        return _settings.as_dict()


def _check_settings(updates: dict[str, Any]) -> None:
    budget = updates.get("host_budget_bytes")
    if budget is not None and not (_is_non_negative_int(budget) and budget <= INT64_MAX):
        raise ValueError(f"host_budget_bytes must be None or an int from 0 to 2**63 - 1, got {budget!r}")
    policy = updates.get("over_budget", OVER_BUDGET_POLICIES[0])
    if policy not in OVER_BUDGET_POLICIES:
        raise ValueError(f"over_budget must be one of {OVER_BUDGET_POLICIES}, got {policy!r}")
    slab = updates.get("slab_bytes", MAX_SLAB_BYTES)
    if not (_is_non_negative_int(slab) and 512 <= slab <= MAX_SLAB_BYTES and slab & (slab - 1) == 0):
        raise ValueError(f"slab_bytes must be a power of two from 512 to 2**62, got {slab!r}")
    pending = updates.get("max_pending", 1)
    if not (_is_non_negative_int(pending) and 1 <= pending <= MAX_PENDING_LIMIT):
        raise ValueError(f"max_pending must be an int from 1 to {MAX_PENDING_LIMIT}, got {pending!r}")


def stats() -> dict[str, Any]:
    """Counters of every engine (keyed by device) and pool (keyed by device type).

    Engine counters (since the last :func:`reset_stats`): ``offloads``,
    ``offloaded_bytes``, ``prefetches``, ``fetches``, ``prefetch_hits``,
    ``on_demand_fetches``, ``fetched_bytes``, ``kept_on_device``,
    ``pageable_spills``, ``pending_handoffs``, ``live_handles``, and the
    checkpoint layer's counters. Pool counters: ``reserved_bytes``,
    ``in_use_bytes``, ``peak_in_use_bytes``, ``host_alloc_calls``,
    ``alloc_failures`` (host allocations refused), ``reuse_hits`` (acquires
    served without a host allocation), ``spills``, ``slabs``, ``budget_bytes``.

    ``last_step`` holds each engine's counters for the last finished training
    step alone (see :meth:`CopyEngine.last_step`), ``steps`` how many steps
    have finished (on the device that finished most: a model spread over
    several devices ends each step once on each).
    """
    return {
        "engines": {str(device): engine.stats() for device, engine in _engines.items()},
        "last_step": {str(device): engine.last_step() for device, engine in _engines.items()},
        "steps": max((engine.steps for engine in _engines.values()), default=0),
        "pools": {device_type: pool.stats() for device_type, pool in _pools.items()},
        "settings": _settings.as_dict(),
    }


def reset_stats() -> None:
    """Zeroes the engine counters and the pools' peaks (not their allocation counts)."""
    for engine in _engines.values():
        engine.reset_stats()
    for pool in _pools.values():
        pool.reset_peak()
