"""simdev: a simulated asynchronous accelerator for the test suite.

A test-only torch backend (``PrivateUse1``, renamed ``"simdev"``) that behaves
like a CUDA GPU in every way gcoffload's engine relies on, so that a missing
stream wait produces wrong data on a machine without a GPU:

* streams are worker threads running queued jobs in order; events mark points
  in them; kernels and copies are queued and return at once;
* the caching allocator is stream-ordered and overwrites a freed block with
  0xFF bytes (NaN) in its stream's order;
* host<->device copies with pinned memory take time (latency + bandwidth, one
  DMA engine per direction) before the bytes move;
* RNG is a (seed, offset) pair advanced at queueing time, like CUDA's Philox.

Tests make orderings deterministic with :func:`hold`, which stops a stream
until a ``with`` block exits, and with :func:`set_copy_timing` /
:func:`set_kernel_time_us`, which make copies and kernels slow.

Two devices, ``simdev:0`` and ``simdev:1``. Call :func:`load` once (it builds
the C++ part on first use and caches it); afterwards this module is
``torch.simdev`` and tensors can be created with ``device="simdev"``.

Example:
    >>> import simdevice
    >>> simdevice.load()
    >>> x = torch.ones(3, device="simdev").mul(2)   # queued on the current stream
    >>> host = torch.empty(3, pin_memory=True)       # pinned for simdev
    >>> host.copy_(x, non_blocking=True)             # returns before the data arrives
    >>> simdevice.synchronize()
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import torch

from ._build import BuildError, load_extension

__all__ = [
    "BuildError",
    "Event",
    "Stream",
    "copy_timing",
    "current_device",
    "current_stream",
    "default_stream",
    "device",
    "device_count",
    "empty_cache",
    "fail_pinned_allocation",
    "get_amp_supported_dtype",
    "get_rng_state",
    "get_rng_state_all",
    "graph_capture",
    "hold",
    "host_allocator_registered",
    "host_empty_cache_calls",
    "host_stats",
    "initial_seed",
    "is_available",
    "is_current_stream_capturing",
    "is_initialized",
    "load",
    "manual_seed",
    "manual_seed_all",
    "max_memory_allocated",
    "memory_allocated",
    "memory_reserved",
    "pool_stream",
    "pinned_allocations",
    "reset_kernel_times",
    "reset_peak_memory_stats",
    "seed",
    "seed_all",
    "set_copy_timing",
    "set_device",
    "set_kernel_time_us",
    "set_pinned_limit",
    "set_rng_state",
    "set_rng_state_all",
    "synchronize",
    "timing",
]

NAME = "simdev"

# Default copy model: slow enough that a copy not waited for is still running
# when the next operation reads its destination.
DEFAULT_COPY_TIMING = {"h2d_gbps": 4.0, "d2h_gbps": 4.0, "latency_us": 200.0, "jitter": 0.0, "seed": 0}

_lock = threading.Lock()
_C: ModuleType | None = None
# Read by torch.utils.checkpoint: device RNG states are saved only if True.
_initialized = False
_autograd_error: str | None = None

Device = torch.device | str | int | None


def load() -> ModuleType:
    """Builds (once per source tree), loads and registers simdev; returns this module.

    After the first call ``torch.device("simdev:0")`` works, this module is
    ``torch.simdev``, and tensors have ``.simdev()`` / ``.is_simdev``.

    Raises:
        BuildError: no C++ compiler or ninja, or the build failed.
        RuntimeError: autograd started its device threads before simdev was
            loaded, so backward on simdev cannot run in this process (load
            simdev before the first backward, e.g. from a conftest hook).
    """
    global _C, _initialized, _autograd_error
    with _lock:
        if _C is None:
            extension = load_extension()
            torch.utils.rename_privateuse1_backend(NAME)
            torch._register_device_module(NAME, sys.modules[__name__])
            torch.utils.generate_methods_for_privateuse1_backend()
            _C = extension
            _initialized = True
            extension.set_copy_timing(**DEFAULT_COPY_TIMING)
            _autograd_error = _autograd_thread_error()
        if _autograd_error is not None:
            raise RuntimeError(_autograd_error)
    return sys.modules[__name__]


def _ext() -> ModuleType:
    if _C is None:
        raise RuntimeError("simdev is not loaded; call simdevice.load() first")
    return _C


def _autograd_thread_error() -> str | None:
    # Autograd sizes its per-device worker threads once, at the first backward
    # of the process; a device type registered later has no thread to run on.
    probe = torch.ones(1, device=NAME, requires_grad=True)
    try:
        probe.sum().backward()
    except RuntimeError as error:
        return (
            "simdev was loaded after autograd had started its device threads, so backward "
            "cannot run on simdev in this process. Call simdevice.load() before the first "
            f"backward pass (for pytest: from pytest_configure in conftest.py). ({error})"
        )
    return None


def _index(device: Device) -> int:
    """The device index ``device`` means; None or a bare "simdev" is the current device."""
    if device is None:
        return current_device()
    if isinstance(device, int):
        return device
    device = torch.device(device)
    if device.type != NAME:
        raise ValueError(f"expected a {NAME} device, got {device}")
    return current_device() if device.index is None else device.index


# Device management (the torch.cuda-like interface torch expects of a device module).


def is_available() -> bool:
    """True once :func:`load` succeeded."""
    return _C is not None


def is_initialized() -> bool:
    """True once :func:`load` succeeded."""
    return _initialized


def _is_in_bad_fork() -> bool:
    return False


def device_count() -> int:
    """Number of simulated devices (2)."""
    return _ext().device_count()


def current_device() -> int:
    """Index of the calling thread's current simdev device."""
    return _ext().current_device()


def set_device(device: Device) -> None:
    """Makes ``device`` the calling thread's current simdev device."""
    _ext().set_device(_index(device))


class device:
    """Context manager that makes ``index`` the current simdev device; None is a no-op (as torch.cuda.device).

    Args:
        index: device index, ``"simdev:1"``, or a ``torch.device``.
    """

    def __init__(self, index: Device) -> None:
        self.index = -1 if index is None else _index(index)
        self.previous = -1

    def __enter__(self) -> None:
        self.previous = _ext().exchange_device(self.index)

    def __exit__(self, *exc_info: object) -> None:
        _ext().exchange_device(self.previous)


def synchronize(device: Device = None) -> None:
    """Blocks until every stream of ``device`` has run all the work queued so far.

    Raises:
        RuntimeError: a queued kernel failed since the last synchronisation.
    """
    _ext().synchronize(_index(device))


def Stream(device: Device = None, priority: int = 0) -> torch.Stream:
    """A new stream on ``device``; ``with stream:`` makes it current."""
    return torch.Stream(device=torch.device(NAME, _index(device)), priority=priority)


def Event(enable_timing: bool = False) -> torch.Event:
    """An event for simdev streams; ``enable_timing`` allows ``elapsed_time``, as on CUDA."""
    return torch.Event(device=NAME, enable_timing=enable_timing)


def current_stream(device: Device = None) -> torch.Stream:
    """The calling thread's current stream on ``device``."""
    stream_id, index = _ext().current_stream(_index(device))
    return torch.Stream(stream_id=stream_id, device_index=index, device_type=_ext().DEVICE_TYPE)


def pool_stream(device: Device = None, high_priority: bool = False) -> torch.Stream:
    """The next stream of ``device``'s pool for that priority (round robin, like CUDA's pool).

    The pool holds a few streams per priority, so two calls can return the same
    stream. gcoffload's engine takes its side streams from the high-priority pool.
    """
    stream_id, index = _ext().pool_stream(_index(device), high_priority)
    return torch.Stream(stream_id=stream_id, device_index=index, device_type=_ext().DEVICE_TYPE)


@contextlib.contextmanager
def hold(stream: torch.Stream | None = None, timeout: float | None = None) -> Iterator[Any]:
    """Stops ``stream`` before the work queued inside the ``with`` block until the block exits.

    Makes "this has not run yet" deterministic in tests: work queued inside the
    block on ``stream`` (default: the current stream) waits, other streams go on.
    Synchronising the held stream inside the block would never return, unless
    ``timeout`` is given: then the stream goes on by itself that many seconds
    after reaching the hold, and the yielded object's ``timed_out`` says so.
    A test that expects the host not to wait on the held stream uses it to
    fail instead of hanging when the host does wait.

    Args:
        stream: a simdev stream, e.g. from ``torch.Stream(device="simdev")``.
        timeout: seconds after which the stream goes on by itself; None: never.
    """
    stream = current_stream() if stream is None else stream
    if stream.device.type != NAME:
        raise ValueError(f"hold: expected a {NAME} stream, got {stream}")
    if timeout is not None and not timeout > 0:
        raise ValueError(f"hold: timeout must be positive seconds or None, got {timeout!r}")
    gate = _ext().hold(stream.stream_id, stream.device_index, timeout)
    try:
        yield gate
    finally:
        gate.release()


# Graph capture. Only what a library can observe is simulated: whether the
# current stream is capturing. Work queued during a "capture" runs as usual.

_capturing_streams: set[tuple[int, int]] = set()


@contextlib.contextmanager
def graph_capture(stream: torch.Stream | None = None) -> Iterator[None]:
    """Makes ``stream`` (default: the current stream) report capturing for the ``with`` block.

    Like ``torch.cuda.graph``, the state belongs to the stream, so autograd's
    device thread, which runs backward on the stream the forward ran on, sees
    it too. Queued work still runs; nothing is recorded.
    """
    stream = current_stream() if stream is None else stream
    key = (stream.device_index, stream.stream_id)
    with _lock:
        if key in _capturing_streams:
            raise RuntimeError(f"graph_capture: {stream} is already capturing")
        _capturing_streams.add(key)
    try:
        yield
    finally:
        with _lock:
            _capturing_streams.discard(key)


def is_current_stream_capturing() -> bool:
    """Whether the calling thread's current stream is inside :func:`graph_capture`."""
    stream = current_stream()
    return (stream.device_index, stream.stream_id) in _capturing_streams


def default_stream(device: Device = None) -> torch.Stream:
    """The default stream of ``device``."""
    stream_id, index = _ext().default_stream(_index(device))
    return torch.Stream(stream_id=stream_id, device_index=index, device_type=_ext().DEVICE_TYPE)


def get_amp_supported_dtype() -> list[torch.dtype]:
    """Dtypes torch.autocast accepts for simdev."""
    return [torch.float16, torch.bfloat16]


# Random numbers. See Note [Philox-style RNG] in csrc/generator.h.


def manual_seed(seed: int) -> None:
    """Seeds the current device's generator (offset back to 0)."""
    _ext().manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF, current_device())


def manual_seed_all(seed: int) -> None:
    """Seeds every device's generator (torch.manual_seed calls this)."""
    for index in range(device_count()):
        _ext().manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF, index)


def seed() -> int:
    """Seeds the current device's generator with a random number and returns it."""
    return _ext().seed(current_device())


def seed_all() -> None:
    """Seeds every device's generator with a random number."""
    for index in range(device_count()):
        _ext().seed(index)


def initial_seed() -> int:
    """The seed of the current device's generator."""
    return _ext().initial_seed(current_device())


def get_rng_state(device: Device = NAME) -> torch.Tensor:
    """The generator state of ``device`` as a CPU uint8 tensor (16 bytes: seed, offset)."""
    return _ext().get_rng_state(_index(device))


def set_rng_state(new_state: torch.Tensor, device: Device = NAME) -> None:
    """Restores a state from :func:`get_rng_state` on ``device``."""
    _ext().set_rng_state(new_state.contiguous(), _index(device))


def get_rng_state_all() -> list[torch.Tensor]:
    """The generator states of all devices."""
    return [get_rng_state(index) for index in range(device_count())]


def set_rng_state_all(new_states: list[torch.Tensor]) -> None:
    """Restores the states from :func:`get_rng_state_all`."""
    for index, state in enumerate(new_states):
        set_rng_state(state, index)


# Device memory.


def memory_allocated(device: Device = None) -> int:
    """Bytes in live blocks on ``device`` (sizes rounded up to 512, as on CUDA)."""
    return _ext().memory_stats(_index(device))["allocated_bytes"]


def max_memory_allocated(device: Device = None) -> int:
    """Peak of :func:`memory_allocated` since the last :func:`reset_peak_memory_stats`."""
    return _ext().memory_stats(_index(device))["peak_allocated_bytes"]


def memory_reserved(device: Device = None) -> int:
    """Bytes the caching allocator holds on ``device`` (live and cached blocks)."""
    return _ext().memory_stats(_index(device))["reserved_bytes"]


def reset_peak_memory_stats(device: Device = None) -> None:
    """Resets the peaks (:func:`max_memory_allocated`) to the current values."""
    _ext().reset_peak_memory_stats(_index(device))


def empty_cache() -> None:
    """Synchronises every stream, then frees the cached (unused) blocks of every device."""
    _ext().empty_cache()


# Timing model.


def copy_timing() -> dict[str, Any]:
    """The current host<->device copy model (see :func:`set_copy_timing`)."""
    return _ext().copy_timing()


def set_copy_timing(
    *,
    h2d_gbps: float | None = None,
    d2h_gbps: float | None = None,
    latency_us: float | None = None,
    jitter: float | None = None,
    seed: int | None = None,
) -> dict[str, Any]:
    """Sets how long host<->device copies take; arguments left None keep their value.

    A copy takes ``latency_us + bytes / bandwidth``, times ``1 + jitter * u``
    with ``u`` uniform in [0, 1) from a generator seeded with ``seed``. Each
    device has one DMA engine per direction, so copies in one direction run one
    at a time. Defaults: 4 GB/s each way, 200 µs, no jitter.

    Returns:
        The previous settings, for restoring with ``set_copy_timing(**previous)``.

    Raises:
        ValueError: a bandwidth is not positive, or latency or jitter is negative.
    """
    previous = copy_timing()
    settings = {**previous}
    for name, value in (
        ("h2d_gbps", h2d_gbps),
        ("d2h_gbps", d2h_gbps),
        ("latency_us", latency_us),
        ("jitter", jitter),
        ("seed", seed),
    ):
        if value is not None:
            settings[name] = value
    if settings["h2d_gbps"] <= 0 or settings["d2h_gbps"] <= 0:
        raise ValueError(f"set_copy_timing: bandwidths must be positive, got {settings}")
    if settings["latency_us"] < 0 or settings["jitter"] < 0:
        raise ValueError(f"set_copy_timing: latency_us and jitter must be >= 0, got {settings}")
    _ext().set_copy_timing(**settings)
    return previous


@contextlib.contextmanager
def timing(**settings: Any) -> Iterator[None]:
    """:func:`set_copy_timing` for the duration of a ``with`` block."""
    previous = set_copy_timing(**settings)
    try:
        yield
    finally:
        set_copy_timing(**previous)


def set_kernel_time_us(us: float, op: str | None = None) -> None:
    """Makes each queued kernel take ``us`` microseconds before it runs.

    Args:
        us: simulated kernel time, >= 0 (default for every operator: 0).
        op: an operator such as ``"aten::mul"`` (all overloads) or ``"aten::mul.out"``;
            None sets the default for operators without a time of their own. Structured
            operators reach simdev as their ``out`` overload (torch allocates the result
            and calls it), so name the operator without an overload.
    """
    if us < 0:
        raise ValueError(f"set_kernel_time_us: us must be >= 0, got {us}")
    _ext().set_kernel_time_us(float(us), op)


def reset_kernel_times() -> None:
    """Undoes every :func:`set_kernel_time_us`: queued kernels run as soon as their stream gets to them."""
    _ext().reset_kernel_times()


# Pinned host memory.


def host_allocator_registered() -> bool:
    """True if ``at::getHostAllocator(PrivateUse1)`` is simdev's pinned allocator."""
    return _ext().host_allocator_registered()


def host_empty_cache_calls() -> int:
    """How many times anything called the pinned allocator's ``empty_cache``."""
    return _ext().host_empty_cache_calls()


def pinned_allocations() -> int:
    """How many times anything asked the pinned allocator for memory (cache hits included)."""
    return _ext().pinned_allocations()


def fail_pinned_allocation(n: int = 1) -> None:
    """Makes the ``n``-th pinned allocation from now (1 = the next) raise "out of memory"."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"fail_pinned_allocation: n must be a positive int, got {n!r}")
    _ext().fail_pinned_allocation(n)


def set_pinned_limit(nbytes: int | None) -> None:
    """Caps the pinned bytes held (in use and cached); past it allocation raises. None: no cap."""
    if nbytes is not None and (not isinstance(nbytes, int) or nbytes < 0):
        raise ValueError(f"set_pinned_limit: nbytes must be a non-negative int or None, got {nbytes!r}")
    _ext().set_pinned_limit(nbytes)


def host_stats() -> dict[str, int]:
    """The pinned allocator's counters (allocated/active bytes, host allocations and frees)."""
    return _ext().host_stats()
