"""The disk tier on paper: the disk ``capacity`` plans for.

Under ``gcoffload.configure(over_budget="disk")`` the offloaded layer inputs
that do not fit the pinned host budget go to a file on a local NVMe disk,
staged through pinned host memory. The capacity planner puts them where the
autopilot's plan does (Note [The disk tier in the plan] in planner.py): the
earliest layers' inputs
(:func:`~gcoffload.autopilot.disk_time.layers_on_disk`), and times them as
it does (:func:`~gcoffload.autopilot.disk_time.exposed_disk_seconds`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ..autopilot.budget import parse_size
from ..autopilot.profile import DiskRates

__all__ = [
    "DEFAULT_READ_BYTES_PER_SECOND",
    "DEFAULT_WRITE_BYTES_PER_SECOND",
    "Disk",
    "parse_rate",
    "resolve_disk",
]

# One PCIe 4 x4 datacenter NVMe's sequential datasheet rates, rounded: Micron 7450 (U.3) 6.8 GB/s read and
# up to 5.6 GB/s write at its larger capacities, Samsung PM9A3 (U.2) 6.5 and 3.5 GB/s. PCIe 5 drives list
# about twice the read (Samsung PM9D3a: 12 GB/s read, 6.8 GB/s write).
DEFAULT_READ_BYTES_PER_SECOND = 7e9
DEFAULT_WRITE_BYTES_PER_SECOND = 5e9


@dataclass(frozen=True)
class Disk:
    """A local disk for offloaded layer inputs.

    Args:
        capacity_bytes: bytes the inputs may take on it.
        rates: its sequential read and write rates.
    """

    capacity_bytes: int
    rates: DiskRates


def parse_rate(value: object) -> float:
    """Bytes per second from a positive number or a rate such as ``"7GB/s"`` or ``"6.5GiB/s"``.

    Raises:
        ValueError: anything else, with what is accepted.
    """
    rate: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        rate = float(value)
    elif isinstance(value, str):
        size = value.strip()
        size = size[:-2] if size.lower().endswith("/s") else size
        try:
            rate = float(parse_size(size))
        except ValueError:
            rate = None
    if rate is None or not math.isfinite(rate) or rate <= 0:
        raise ValueError(
            f"expected bytes per second (a positive number) or a rate such as '7GB/s', got {value!r}"
        )
    return rate


def resolve_disk(disk_memory: object, disk_bandwidth: object = None) -> Disk:
    """A :class:`Disk` from ``capacity``'s arguments.

    Args:
        disk_memory: its bytes, or a size such as ``"3.84TB"``.
        disk_bandwidth: one rate for reads and writes, a ``(read, write)``
            pair, or ``"7GB/s,5GB/s"``; None for one PCIe 4 datacenter NVMe
            (:data:`DEFAULT_READ_BYTES_PER_SECOND`, :data:`DEFAULT_WRITE_BYTES_PER_SECOND`).

    Raises:
        ValueError: either is unreadable or not positive (the message names it).
    """
    try:
        capacity_bytes = parse_size(disk_memory)
    except ValueError as error:
        raise ValueError(f"disk_memory: {error}") from None
    if disk_bandwidth is None:
        rates: Sequence[object] = (DEFAULT_READ_BYTES_PER_SECOND, DEFAULT_WRITE_BYTES_PER_SECOND)
    elif isinstance(disk_bandwidth, str) and "," in disk_bandwidth:
        rates = disk_bandwidth.split(",")
    elif isinstance(disk_bandwidth, (tuple, list)):
        rates = disk_bandwidth
    else:
        rates = (disk_bandwidth, disk_bandwidth)
    if len(rates) != 2:
        raise ValueError(f"disk_bandwidth: give one rate, or two (read, write), got {disk_bandwidth!r}")
    try:
        read, write = (parse_rate(rate) for rate in rates)
    except ValueError as error:
        raise ValueError(f"disk_bandwidth: {error}") from None
    return Disk(capacity_bytes, DiskRates(read, write))
