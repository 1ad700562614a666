"""How a checkpointed layer's input is kept: :class:`OffloadOptions`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["DEFAULT_MIN_OFFLOAD_BYTES", "OffloadOptions"]

DEFAULT_MIN_OFFLOAD_BYTES = 1 << 20


@dataclass(frozen=True)
class OffloadOptions:
    """How a checkpointed layer's input is kept.

    Args:
        offload: park the input in host memory; False gives plain checkpointing,
            which never needs the C++ extension.
        prefetch_depth: in the backward pass of layer ``i``, start copying back
            the inputs of layers ``i-1 .. i-prefetch_depth`` (0: fetch on demand).
        keep_resident: the most recent inputs of a forward pass that stay on the
            device, because backward needs them first.
        min_offload_bytes: inputs smaller than this stay on the device (default
            1 MiB: a tiny model's inputs are all smaller, so it offloads nothing).
        to_disk: under ``over_budget="disk"``, the input goes straight to the
            disk tier, leaving host memory to later layers, whose inputs
            backward needs sooner. The autopilot sets it for the earliest
            layers whose inputs the host budget cannot hold.
        disk_read_ahead: inputs the disk tier holds (``over_budget="disk"``) are
            read into pinned staging this many layers further ahead than
            ``prefetch_depth``, within ``disk_staging_bytes`` (0: read when
            the prefetch needs them). The autopilot sets it from the measured
            disk bandwidth.

    Raises:
        TypeError: ``offload`` or ``to_disk`` is not a bool.
        ValueError: another field is not a non-negative int.
    """

    offload: bool = True
    prefetch_depth: int = 1
    keep_resident: int = 1
    min_offload_bytes: int = DEFAULT_MIN_OFFLOAD_BYTES
    disk_read_ahead: int = 4
    to_disk: bool = False

    def __post_init__(self) -> None:
        for flag in ("offload", "to_disk"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"{flag} must be a bool, got {getattr(self, flag)!r}")
        for name in ("prefetch_depth", "disk_read_ahead", "keep_resident", "min_offload_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")

    def offloads(self, tensor: torch.Tensor) -> bool:
        """Whether a saved ``tensor`` may leave the device.

        Offload must be on, and the tensor floating point and at least ``min_offload_bytes``.
        """
        return (
            self.offload
            and tensor.is_floating_point()
            and tensor.numel() * tensor.element_size() >= self.min_offload_bytes
        )
