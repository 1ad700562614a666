"""The autopilot's memory budget: bytes, a size like ``"20GiB"``, a fraction of device memory, or ``"auto"``.

The budget is the device memory the checkpointed layers' activations may take
at the peak: what autograd holds from their forward to their backward pass,
plus the backward pass's working set. Weights, gradients and optimizer states
are not part of it.

Note [What "auto" leaves free]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
``"auto"`` is read when a pass begins, when the previous step's activations
are freed: the device's free memory (the caching allocator's unused blocks
count as free), less a margin of 10% of the device, less the gradients still
to come (trainable parameters without a ``.grad`` yet: after ``zero_grad()``
they are allocated again in backward, while the activations are held).
Optimizer states that do not exist yet (the first optimizer step comes after
several passes under gradient accumulation) cannot be foreseen; that is why the
autopilot reads ``"auto"`` again at the start of every pass and plans anew
when the budget has shrunk below the plan in force (never upward, so that the
plan does not swing with the allocator's cache).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch

__all__ = ["AUTO_MARGIN", "MemoryBudget", "device_memory", "gradient_bytes_to_come", "parse_size"]

AUTO_MARGIN = 0.1  # of the device's memory, left free under memory_budget="auto"
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_MAX_BYTES = 2**63 - 1
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


@dataclass(frozen=True)
class MemoryBudget:
    """A memory budget as the user gave it; :meth:`resolve` turns it into bytes for a device.

    Exactly one of ``nbytes``, ``fraction`` and ``auto`` is set.
    """

    nbytes: int | None = None
    fraction: float | None = None
    auto: bool = False

    @classmethod
    def parse(cls, value: object) -> MemoryBudget:
        """Reads ``memory_budget=``: an int of bytes, ``"20GiB"``/``"512MB"``, a float in (0, 1], ``"auto"``.

        A string holds any of them (``"0.5"`` is a fraction, ``"1024"`` bytes), as a command line gives them.

        Raises:
            ValueError: anything else, with what is accepted.
        """
        if isinstance(value, MemoryBudget):
            return value
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_BYTES:
            return cls(nbytes=value)
        if isinstance(value, float) and 0.0 < value <= 1.0:
            return cls(fraction=value)
        if isinstance(value, str):
            if value.strip().lower() == "auto":
                return cls(auto=True)
            match = _SIZE.match(value)
            if match is not None and not match.group(2) and "." in match.group(1):
                return cls.parse(float(match.group(1)))  # "0.5" from a command line: a fraction
            nbytes = _size_in_bytes(value)
            if nbytes is not None:
                return cls(nbytes=nbytes)
        raise ValueError(
            f"memory_budget must be bytes (an int from 0 to 2**63 - 1), a size such as '20GiB' or '512MB' "
            f"(at most 2**63 - 1 bytes), a fraction of "
            f"the device's memory in (0, 1] such as 0.5, or 'auto' (free memory minus "
            f"{AUTO_MARGIN:.0%}); got {value!r}"
        )

    def resolve(self, device: torch.device, still_to_come: int = 0) -> int:
        """The budget in bytes on ``device`` (``auto`` and fractions read the device's memory now).

        ``still_to_come``: bytes the step will allocate besides the activations
        (:func:`gradient_bytes_to_come`), left free by ``auto`` (Note [What "auto" leaves free]).
        """
        if self.nbytes is not None:
            return self.nbytes
        free, total = device_memory(device)
        if self.fraction is not None:
            return int(total * self.fraction)
        return max(0, free - int(total * AUTO_MARGIN) - still_to_come)

    def __str__(self) -> str:
        if self.nbytes is not None:
            return f"{self.nbytes / 2**30:.2f} GiB"
        return f"{self.fraction:.0%} of device memory" if self.fraction is not None else "auto"


def parse_size(value: object) -> int:
    """Bytes from an int or a size such as ``"80GiB"``, ``"512MB"`` or ``"1024"``.

    Raises:
        ValueError: anything else, with what is accepted.
    """
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_BYTES:
        return value
    nbytes = _size_in_bytes(value) if isinstance(value, str) else None
    if nbytes is None:
        raise ValueError(
            f"expected bytes (an int from 0 to 2**63 - 1) or a size such as '80GiB' or '512MB', got {value!r}"
        )
    return nbytes


def _size_in_bytes(value: str) -> int | None:
    match = _SIZE.match(value)
    if match is None or match.group(2).lower() not in _UNITS:
        return None
    nbytes = float(match.group(1)) * _UNITS[match.group(2).lower()]
    return int(nbytes) if math.isfinite(nbytes) and nbytes <= _MAX_BYTES else None


def device_memory(device: torch.device) -> tuple[int, int]:
    """(free, total) bytes of ``device``; free counts memory the caching allocator holds unused.

    Raises:
        ValueError: the device cannot tell; give ``memory_budget`` in bytes then.
    """
    if device.type == "cpu":
        return _host_memory()
    try:
        if hasattr(torch.accelerator, "get_memory_info"):
            free, total = torch.accelerator.get_memory_info(device)
            cached = torch.accelerator.memory_reserved(device) - torch.accelerator.memory_allocated(device)
        else:  # torch before 2.10: the device's own module (torch.cuda, torch.xpu)
            module = torch.get_device_module(device.type)
            free, total = module.mem_get_info(device)
            cached = module.memory_reserved(device) - module.memory_allocated(device)
    except (RuntimeError, AttributeError, NotImplementedError) as error:
        raise ValueError(
            f"memory_budget: the free memory of {device} cannot be read ({error}); "
            "give memory_budget in bytes"
        ) from None
    return free + max(cached, 0), total


def gradient_bytes_to_come(parameters: Iterable[torch.Tensor], device: torch.device) -> int:
    """Bytes of the gradients that trainable ``parameters`` on ``device`` will get but have not yet.

    A parameter sharded as a DTensor (FSDP2) counts its local shard.
    """
    seen: set[int] = set()
    total = 0
    for parameter in parameters:
        if not parameter.requires_grad or parameter.grad is not None or id(parameter) in seen:
            continue
        seen.add(id(parameter))
        local = parameter.to_local() if hasattr(parameter, "to_local") else parameter
        if local.device == device:
            total += local.numel() * local.element_size()
    return total


def _host_memory() -> tuple[int, int]:
    page = os.sysconf("SC_PAGE_SIZE")
    total = page * os.sysconf("SC_PHYS_PAGES")
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, total
    except OSError:
        pass
    return page * os.sysconf("SC_AVPHYS_PAGES"), total
