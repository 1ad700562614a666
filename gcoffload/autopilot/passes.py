"""Which layer calls begin a forward pass.

Note [Which calls are a pass]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
The autopilot sees layer calls in training mode with grad enabled, each with
its index in the stack. A call whose index is not above the previous call's
begins a new forward pass; the bucket is chosen at the first call of a pass.
Recomputes in backward do not come through the checkpointer, and evaluation
(``no_grad`` or ``eval()``) does not either.
"""

from __future__ import annotations

__all__ = ["PassTracker"]


class PassTracker:
    """Tells, from the layer indices of successive calls, where a forward pass begins."""

    def __init__(self) -> None:
        self._last_index: int | None = None

    def begins_pass(self, index: int) -> bool:
        """Whether the call of layer ``index`` begins a pass (Note [Which calls are a pass])."""
        previous, self._last_index = self._last_index, index
        return previous is None or index <= previous

    def restart(self) -> None:
        """The next call begins a pass, whatever its index."""
        self._last_index = None
