"""What each layer runs with under a plan: the offload options of its mode, or None to keep it."""

from __future__ import annotations

from ..checkpointing.options import OffloadOptions
from .planner import Mode, Plan

__all__ = ["ModeOptions"]


class ModeOptions:
    """The options of each mode, made from the user's, and the ones per layer of the plan in force.

    The autopilot keeps no residency window (``keep_resident`` is 0: an input to
    keep on the device is a ``checkpoint`` layer), and with ``offload=False``
    it offers only keep or checkpoint.

    Args:
        options: the user's options; their prefetch depth and threshold carry over.
    """

    def __init__(self, options: OffloadOptions) -> None:
        checkpoint = OffloadOptions(False, options.prefetch_depth, 0, options.min_offload_bytes)
        offload = OffloadOptions(True, options.prefetch_depth, 0, options.min_offload_bytes)
        # The first pass, profile steps, and layers a plan has no mode for (a plain layer checkpointed
        # after all, one the profile step never saw) take the least memory the options allow.
        self.least_memory = offload if options.offload else checkpoint
        self._by_mode = {Mode.KEEP: None, Mode.CHECKPOINT: checkpoint, Mode.OFFLOAD: offload}
        self._planned: tuple[OffloadOptions | None, ...] = ()

    def follow(self, plan: Plan | None) -> None:
        """Layers run as ``plan`` says from now on (None: every layer in the least memory)."""
        modes = plan.modes if plan is not None else ()
        self._planned = tuple(self._by_mode.get(mode, self.least_memory) for mode in modes)

    def for_layer(self, index: int) -> OffloadOptions | None:
        """The options layer ``index`` is checkpointed with, or None to keep it."""
        return self._planned[index] if index < len(self._planned) else self.least_memory
