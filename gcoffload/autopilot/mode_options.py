"""What each layer runs with under a plan: its mode, and the offload options of that mode."""

from __future__ import annotations

from dataclasses import replace

from ..checkpointing.options import OffloadOptions
from .planner import Mode, Plan

__all__ = ["ModeOptions"]


class ModeOptions:
    """The options of each mode, made from the user's, and the mode of each layer under the plan in force.

    The autopilot keeps no residency window (``keep_resident`` is 0: an input to
    keep on the device is a ``checkpoint`` layer), and with ``offload=False``
    it offers only keep or checkpoint: offloading and swapping both need the
    copy engine.

    Args:
        options: the user's options; their prefetch depth and threshold carry over.
    """

    def __init__(self, options: OffloadOptions) -> None:
        checkpoint = OffloadOptions(False, options.prefetch_depth, 0, options.min_offload_bytes)
        offload = OffloadOptions(
            True, options.prefetch_depth, 0, options.min_offload_bytes, options.disk_read_ahead
        )
        self.moves = options.offload  # offload and swap may be planned
        # The first pass, profile steps, and layers a plan has no mode for (a plain layer checkpointed
        # after all, one the profile step never saw) take the least memory the options allow.
        self.least_memory = (Mode.OFFLOAD, offload) if options.offload else (Mode.CHECKPOINT, checkpoint)
        self._by_mode = {
            Mode.KEEP: None,
            Mode.CHECKPOINT: checkpoint,
            Mode.OFFLOAD: offload,
            Mode.SWAP: offload,
        }
        self._planned: tuple[tuple[Mode, OffloadOptions | None], ...] = ()
        self.swap_prefetch = True

    def follow(self, plan: Plan | None) -> None:
        """Layers run as ``plan`` says from now on (None: every layer in the least memory)."""
        modes = plan.modes if plan is not None else ()
        by_mode = self._by_mode
        to_disk = None
        if plan is not None and plan.disk_layers:
            # Note [The disk tier in the plan]: as far ahead as the measured disk needs.
            moving = replace(by_mode[Mode.OFFLOAD], disk_read_ahead=plan.disk_read_ahead)
            by_mode = {**by_mode, Mode.OFFLOAD: moving, Mode.SWAP: moving}
            to_disk = replace(moving, to_disk=True)
        self._planned = tuple(
            (mode, to_disk if position in plan.disk_layers else by_mode[mode])
            if mode in by_mode
            else self.least_memory
            for position, mode in enumerate(modes)
        )
        self.swap_prefetch = plan.swap_prefetch if plan is not None else True

    def for_layer(self, index: int) -> tuple[Mode, OffloadOptions | None]:
        """The mode of layer ``index`` and the options it runs with (None: kept)."""
        return self._planned[index] if index < len(self._planned) else self.least_memory
