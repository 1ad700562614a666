"""What gcoffload counted, per device: the checkpoint layer's counters, training steps, and the copies.

The checkpoint paths count here; the copy engines count their copies in C++.
:func:`stats` merges both, per device. Counting needs no engine, so plain
checkpointing (``offload=False``) counts too without the C++ extension.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

from ..engine import registry
from ..engine.copy_engine import GAUGES

__all__ = ["LAYER_COUNTERS", "count", "end_step", "last_step", "of", "reset_stats", "stats", "steps"]

LAYER_COUNTERS = (
    "checkpointed_layers",  # layer calls that went through a checkpoint
    "plain_layers",  # training-mode calls the selective rule ran without one
    "recomputes",  # layer recomputes in backward
    "kept_resident",  # inputs the residency window kept on the device
    "kept_below_threshold",  # inputs too small to offload
    "kept_during_capture",  # inputs saved while a graph was being captured
    "kept_layers",  # layer calls the autopilot's plan ran without a checkpoint
    "profiled_layers",  # layer calls the autopilot measured in a profile step
    "swapped_layers",  # layer calls run in swap mode: not checkpointed, saved activations swapped
    "swapped_storages",  # storages swap regions sent to host memory
)


class _Device:
    """The counters of one device and its step accounting."""

    __slots__ = ("counts", "finished_steps", "last_step", "step_start")

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter(dict.fromkeys(LAYER_COUNTERS, 0))
        self.finished_steps = 0
        self.last_step: dict[str, int] | None = None
        self.step_start: dict[str, int] = {}


_devices: dict[torch.device, _Device] = {}


def _device(device: torch.device) -> _Device:
    counters = _devices.get(device)
    if counters is None:
        counters = _devices.setdefault(device, _Device())
    return counters


def count(device: torch.device, counter: str, amount: int = 1) -> None:
    """Adds ``amount`` to one of :data:`LAYER_COUNTERS` of ``device``."""
    _device(device).counts[counter] += amount


def of(device: torch.device) -> Counter[str]:
    """``device``'s layer counters, to add to directly on the hot path (they stay the same object)."""
    return _device(device).counts


def _totals(device: torch.device) -> dict[str, int]:
    engine = registry.existing_engines().get(device)
    copies = engine.stats() if engine is not None else {}
    return {**copies, **_device(device).counts}


def end_step(device: torch.device) -> None:
    """Ends the current training step on ``device``; :func:`last_step` then reports it.

    A step is one forward and backward pass through the checkpointed layers
    (a micro-batch under gradient accumulation). It ends when backward
    fetches the first layer input its forward pass saved on the device, the
    last copy the step makes; everything counted since the previous step
    ended belongs to it.
    """
    counters = _device(device)
    now = _totals(device)
    counters.last_step = {
        name: value if name in GAUGES else value - counters.step_start.get(name, 0)
        for name, value in now.items()
    }
    counters.step_start = now
    counters.finished_steps += 1


def last_step(device: torch.device | str) -> dict[str, int] | None:
    """The counters of ``device``'s last finished training step, None before the first one."""
    counters = _devices.get(torch.device(device))
    return None if counters is None or counters.last_step is None else dict(counters.last_step)


def steps(device: torch.device | str) -> int:
    """How many training steps have finished on ``device``."""
    counters = _devices.get(torch.device(device))
    return 0 if counters is None else counters.finished_steps


def stats() -> dict[str, Any]:
    """Counters of every device gcoffload has seen and of every host pool.

    ``devices`` (since the last :func:`reset_stats`), per device: the
    checkpoint layer's counters (:data:`LAYER_COUNTERS`) and, where the device
    has a copy engine, its copies: ``offloads``, ``offloaded_bytes``,
    ``prefetches``, ``fetches``, ``prefetch_hits``, ``on_demand_fetches``,
    ``fetched_bytes``, ``kept_on_device``, ``pageable_spills``,
    ``disk_spills``, ``read_aheads``, ``pending_handoffs``, ``live_handles``.

    ``pools``, per device type: ``reserved_bytes``, ``in_use_bytes``,
    ``peak_in_use_bytes``, ``host_alloc_calls``, ``alloc_failures`` (host
    allocations refused), ``reuse_hits`` (acquires served without a host
    allocation), ``spills``, ``slabs``, ``budget_bytes``.

    ``disks``, per device type while ``over_budget="disk"``: the disk tier's
    ``bytes_on_disk`` (and peak), its writes and reads (count, bytes, seconds
    and bytes per second), ``stall_seconds`` (training threads waiting for
    it), ``hidden_fraction`` (the share of its transfer time nobody waited
    for), staging bytes, and its directory and whether it bypasses the page
    cache (``direct``); see :func:`~gcoffload.engine.registry.disk_stats`.

    ``last_step`` holds each device's counters for the last finished training
    step alone (see :func:`end_step`), ``steps`` how many steps have finished
    (on the device that finished most: a model spread over several devices
    ends each step once on each). ``settings``: the host settings in force.
    """
    devices = list(dict.fromkeys([*_devices, *registry.existing_engines()]))
    return {
        "devices": {str(device): _totals(device) for device in devices},
        "last_step": {str(device): last_step(device) for device in devices},
        "steps": max((counters.finished_steps for counters in _devices.values()), default=0),
        "pools": registry.pool_stats(),
        "disks": registry.disk_stats(),
        "settings": registry.settings(),
    }


def reset_stats() -> None:
    """Zeroes the counters and the pools' peaks (not their allocation counts); :func:`last_step` stays."""
    for engine in registry.existing_engines().values():
        engine.reset_stats()
    registry.reset_pool_peaks()
    for device, counters in _devices.items():
        counters.counts.update({name: -value for name, value in counters.counts.items()})
        counters.step_start = _totals(device)
