"""The GPUs the planner knows by name, and what it assumes of each (datasheet figures, not measurements).

Memory is the total ``nvidia-smi`` reports for the card; the planner leaves
``reserve_bytes`` of it to the CUDA context, library workspaces and the
allocator's fragmentation. FLOP/s are the dense BF16 tensor-core peak of the
datasheet; a step reaches a fraction of it (``mfu``). The host link is PCIe
x16: one way as measured with pinned memory on a PCIe 5 H100 (the
reference figures of this project's design notes), half that on PCIe 4, and
both ways at once 1.74 times one way (the PCIe 5 ratio, assumed for PCIe 4).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..autopilot.budget import parse_size
from ..autopilot.profile import CopyProfile

__all__ = ["GPUS", "Gpu", "resolve_gpu"]

_MIB = 2**20
_PCIE5 = 50e9
_PCIE4 = 25e9
_BOTH_WAYS = 1.74


@dataclass(frozen=True)
class Gpu:
    """A device to plan for.

    Args:
        name: how tables name it.
        memory_bytes: its total memory.
        peak_flops: dense BF16 FLOP/s (0 when unknown: no time estimates).
        link_bytes_per_second: host link, one way.
    """

    name: str
    memory_bytes: int
    peak_flops: float
    link_bytes_per_second: float

    def copies(self) -> CopyProfile:
        """The host link as the planner's time model reads it."""
        one_way = self.link_bytes_per_second
        return CopyProfile(one_way, one_way, _BOTH_WAYS * one_way, overlaps_compute=True, nbytes=0)


GPUS = {
    gpu.name: gpu
    for gpu in (
        Gpu("H100 80GB", 81559 * _MIB, 989e12, _PCIE5),
        Gpu("H200", 143771 * _MIB, 989e12, _PCIE5),
        Gpu("A100 80GB", 81920 * _MIB, 312e12, _PCIE4),
        Gpu("A100 40GB", 40960 * _MIB, 312e12, _PCIE4),
        Gpu("L40S", 46068 * _MIB, 362e12, _PCIE4),
        Gpu("RTX 4090", 24564 * _MIB, 165e12, _PCIE4),
    )
}


def _simple(name: str) -> str:
    return "".join(character for character in name.lower() if character.isalnum())


def resolve_gpu(gpu: object, link_bytes_per_second: float | None = None) -> Gpu:
    """A :class:`Gpu` from a name in :data:`GPUS` (any case, any spacing), a size (``"80GiB"``) or bytes.

    A size gives a device of that memory with the H100's compute and link
    (change the link with ``link_bytes_per_second``).

    Raises:
        ValueError: ``gpu`` is none of those, or the link speed is not positive.
    """
    if isinstance(gpu, Gpu):
        chosen = gpu
    else:
        names = {_simple(name): known for name, known in GPUS.items()}
        chosen = names.get(_simple(gpu)) if isinstance(gpu, str) else None
        if chosen is None:
            try:
                nbytes = parse_size(gpu)
            except ValueError:
                nbytes = None
            if not nbytes:
                raise ValueError(
                    f"gpu must be one of {', '.join(GPUS)} or a memory size such as '80GiB', got {gpu!r}"
                )
            reference = GPUS["H100 80GB"]
            chosen = Gpu(
                f"{nbytes / 2**30:.1f} GiB GPU", nbytes, reference.peak_flops, reference.link_bytes_per_second
            )
    if link_bytes_per_second is not None:
        if isinstance(link_bytes_per_second, bool) or not link_bytes_per_second > 0:
            raise ValueError(
                f"link_bytes_per_second must be a positive number, got {link_bytes_per_second!r}"
            )
        chosen = replace(chosen, link_bytes_per_second=float(link_bytes_per_second))
    return chosen
