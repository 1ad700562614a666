"""The non-reentrant path: torch's own checkpoint, with its saved input offloaded.

``torch.utils.checkpoint.checkpoint(use_reentrant=False)`` saves the layer's
positional tensor arguments with ``save_for_backward`` before it installs its
own hooks for the layer's body. Saved-tensor hooks around the whole call
therefore see exactly those inputs, and nothing the layer computes: the hidden
states go through the copy engine (and the forward chain, for prefetching),
the rest is saved as usual. The backward pass runs in the autograd engine
itself, with no nested ``backward`` call, which is what DDP without
``static_graph`` and FSDP2 need.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.utils.checkpoint

from .saved_input import OffloadOptions, SavedInput, save

__all__ = ["checkpoint"]


def checkpoint(
    function: Callable[..., Any],
    args: Sequence[Any],
    kwargs: dict[str, Any],
    options: OffloadOptions,
    *,
    preserve_rng_state: bool = True,
    context_fn: Callable[[], tuple[Any, Any]] | None = None,
    determinism_check: str = "default",
    debug: bool = False,
) -> Any:
    """Runs ``torch.utils.checkpoint.checkpoint(use_reentrant=False)`` with the input offloaded."""
    hidden = next((arg for arg in args if isinstance(arg, torch.Tensor)), None)
    hooks = _HiddenStatesHooks(hidden, options)
    extra = {"context_fn": context_fn} if context_fn is not None else {}
    try:
        with torch.autograd.graph.saved_tensors_hooks(hooks.pack, hooks.unpack):
            return torch.utils.checkpoint.checkpoint(
                function,
                *args,
                use_reentrant=False,
                preserve_rng_state=preserve_rng_state,
                determinism_check=determinism_check,
                debug=debug,
                **extra,
                **kwargs,
            )
    except BaseException:
        if hooks.saved is not None:
            hooks.saved.release()
        raise
    finally:
        # The hooks outlive this call inside autograd's saved variables; they
        # must not keep the hidden states on the device.
        hooks.hidden = None


class _HiddenStatesHooks:
    """Packs the hidden states into a SavedInput; every other saved tensor passes through."""

    def __init__(self, hidden: torch.Tensor | None, options: OffloadOptions) -> None:
        self.hidden = hidden
        self.options = options
        self.saved: SavedInput | None = None

    def pack(self, tensor: torch.Tensor) -> Any:
        if tensor is not self.hidden:
            return tensor
        if self.saved is None:
            self.saved = save(tensor, self.options)
        return self.saved

    def unpack(self, packed: Any) -> torch.Tensor:
        if not isinstance(packed, SavedInput):
            return packed
        packed.start_recompute(self.options.prefetch_depth)
        return packed.unpack()
