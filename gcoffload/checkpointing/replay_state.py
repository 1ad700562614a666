"""The forward pass's RNG and autocast state, restored for the recompute like torch's checkpoint does."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["AutocastState", "RngState"]


class RngState:
    """CPU and device RNG states at forward time; ``with state:`` restores them for the recompute."""

    def __init__(self, cpu: torch.Tensor, device_type: str, devices: dict[int, torch.Tensor]) -> None:
        self.cpu = cpu
        self.device_type = device_type
        self.devices = devices

    @classmethod
    def capture(cls, tensors: Sequence[torch.Tensor]) -> RngState:
        if all(tensor.is_cpu for tensor in tensors):  # what follows gives the same, at a cost per layer
            return cls(torch.get_rng_state(), "cuda", {})
        accelerators = {tensor.device for tensor in tensors if tensor.device.type not in ("cpu", "meta")}
        device_type = next(iter(accelerators)).type if accelerators else "cuda"
        module = torch.get_device_module(device_type) if accelerators else None
        devices = {
            device.index: module.get_rng_state(device.index)
            for device in accelerators
            if device.type == device_type
        }
        return cls(torch.get_rng_state(), device_type, devices)

    def __enter__(self) -> None:
        """The forward pass's states inside the block, the current ones again after it (like ``fork_rng``)."""
        module = torch.get_device_module(self.device_type) if self.devices else None
        self._outside = (
            torch.get_rng_state(),
            {index: module.get_rng_state(index) for index in self.devices},
        )
        torch.set_rng_state(self.cpu)
        for index, state in self.devices.items():
            module.set_rng_state(state, index)

    def __exit__(self, *exc_info: object) -> None:
        cpu, devices = self._outside
        torch.set_rng_state(cpu)
        for index, state in devices.items():
            torch.get_device_module(self.device_type).set_rng_state(state, index)


class AutocastState:
    """Autocast settings of the forward pass, for the device and the CPU."""

    def __init__(self, settings: dict[str, tuple[bool, torch.dtype]], cache_enabled: bool) -> None:
        self.settings = settings
        self.cache_enabled = cache_enabled

    @classmethod
    def capture(cls, tensors: Sequence[torch.Tensor]) -> AutocastState:
        if all(tensor.is_cpu for tensor in tensors):  # what follows gives the same, at a cost per layer
            cpu = (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))
            return cls({"cpu": cpu}, torch.is_autocast_cache_enabled())
        device_types = {tensor.device.type for tensor in tensors if tensor.device.type != "meta"} | {"cpu"}
        settings = {
            device_type: (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
            for device_type in device_types
        }
        return cls(settings, torch.is_autocast_cache_enabled())

    def restored(self) -> contextlib.AbstractContextManager[Any]:
        """The forward pass's settings inside a ``with`` block; device types already set so are left alone."""
        cache_enabled = torch.is_autocast_cache_enabled()
        differing = [
            torch.autocast(device_type, dtype=dtype, enabled=enabled, cache_enabled=self.cache_enabled)
            for device_type, (enabled, dtype) in self.settings.items()
            if torch.is_autocast_enabled(device_type) != enabled
            or (
                enabled
                and (torch.get_autocast_dtype(device_type) != dtype or cache_enabled != self.cache_enabled)
            )
        ]
        if not differing:
            return _UNCHANGED
        stack = contextlib.ExitStack()
        for autocast in differing:
            autocast.__enter__()
            stack.callback(autocast.__exit__, None, None, None)
        return stack


_UNCHANGED = contextlib.nullcontext()
