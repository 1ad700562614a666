"""How the host pools behave: the pinned budget, what goes past it, slab size, pending copies, the disk tier.

Settings are process-wide and shared by every engine of a device type. The
default budget is one node's: half of physical memory divided by the
processes on the node (:func:`processes_on_this_node`), worked out when first
needed, so that a launcher's ``torch.distributed`` setup is seen. The disk
tier's directory defaults to ``$GCOFFLOAD_DISK_DIR``.
"""

from __future__ import annotations

import os
from typing import Any

import torch

__all__ = [
    "DISK_DIR_ENV",
    "DISK_FALLBACK_POLICIES",
    "LOCAL_SIZE_VARIABLES",
    "MAX_PENDING_LIMIT",
    "OVER_BUDGET_POLICIES",
    "HostSettings",
    "default_host_budget",
    "processes_on_this_node",
]

OVER_BUDGET_POLICIES = ("keep", "pageable", "error", "disk")
# What an offload does when the disk tier cannot take it (past its budget, or after a failed write).
DISK_FALLBACK_POLICIES = ("error", "keep", "pageable")
DISK_DIR_ENV = "GCOFFLOAD_DISK_DIR"
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
# Each pending offload keeps its source's memory alive on the device; far more
# than the layers of a step only holds memory back.
MAX_PENDING_LIMIT = 1 << 16
_NODE_SHARE: Any = object()  # the default budget, worked out when first needed
_FROM_ENVIRONMENT: Any = object()  # the default disk_dir, read when first needed


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


def _is_non_negative_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class HostSettings:
    """The settings in force; :meth:`check` validates an update before anything is stored."""

    def __init__(self) -> None:
        self.host_budget_bytes: int | None = _NODE_SHARE
        self.over_budget = "keep"
        self.slab_bytes = 256 << 20
        self.max_pending = 32
        self.disk_dir: str | None = _FROM_ENVIRONMENT
        self.disk_budget_bytes: int | None = None
        self.disk_staging_bytes = 512 << 20
        self.disk_fallback = "error"
        self.disk_checksums = False

    def as_dict(self) -> dict[str, Any]:
        # Resolved late, so that a launcher's torch.distributed setup is seen.
        if self.host_budget_bytes is _NODE_SHARE:
            self.host_budget_bytes = default_host_budget()
        if self.disk_dir is _FROM_ENVIRONMENT:
            self.disk_dir = os.environ.get(DISK_DIR_ENV) or None
        return dict(vars(self))

    @staticmethod
    def check(updates: dict[str, Any]) -> None:
        """Raises ValueError, naming the setting and what it accepts, for the first bad value."""
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
        directory = updates.get("disk_dir")
        if directory is not None and not isinstance(directory, (str, os.PathLike)):
            raise ValueError(f"disk_dir must be None or a path to a directory, got {directory!r}")
        disk_budget = updates.get("disk_budget_bytes")
        if disk_budget is not None and not (_is_non_negative_int(disk_budget) and disk_budget <= INT64_MAX):
            raise ValueError(
                f"disk_budget_bytes must be None or an int from 0 to 2**63 - 1, got {disk_budget!r}"
            )
        staging = updates.get("disk_staging_bytes", 1)
        if not (_is_non_negative_int(staging) and 1 <= staging <= INT64_MAX):
            raise ValueError(f"disk_staging_bytes must be an int from 1 to 2**63 - 1, got {staging!r}")
        fallback = updates.get("disk_fallback", DISK_FALLBACK_POLICIES[0])
        if fallback not in DISK_FALLBACK_POLICIES:
            raise ValueError(f"disk_fallback must be one of {DISK_FALLBACK_POLICIES}, got {fallback!r}")
        checksums = updates.get("disk_checksums", False)
        if not isinstance(checksums, bool):
            raise ValueError(f"disk_checksums must be True or False, got {checksums!r}")
