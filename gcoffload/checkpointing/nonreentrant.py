"""The non-reentrant path: torch's own checkpoint, with its saved input offloaded.

``torch.utils.checkpoint.checkpoint(use_reentrant=False)`` saves the layer's
positional tensor arguments with ``save_for_backward`` before it installs its
own hooks for the layer's body. Saved-tensor hooks around the whole call
therefore see exactly those inputs, and nothing the layer computes: the hidden
states go through the copy engine (and the forward chain, for prefetching),
the rest is saved as usual. The backward pass runs in the autograd engine
itself, with no nested ``backward`` call, which is what DDP without
``static_graph`` and FSDP2 need.

Inside an outer region that saves tensors its own way (an outer
checkpoint, ``save_on_cpu``) the call is torch's checkpoint alone, nested as
torch nests it: Note [Saving through an outer region] in reentrant.py.

Note [Selective checkpointing inside gcoffload's hooks]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
A ``context_fn`` policy (selective activation checkpointing) makes torch keep
some of the layer's intermediate tensors instead of recomputing them. Up to
torch 2.13 those bypass any saved-tensor hooks around the checkpoint; torch
2.14 asks, with ``respect_saved_tensors_hooks``, whether they should go
through them instead, and will make that the default. The hooks around the
call here are gcoffload's own, which move nothing but the hidden states, so
they pass ``False`` unless the caller chose: the tensors a policy keeps stay
on the device, as torch keeps them, and torch has nothing to warn about. Had
they gone through the hooks, they would have stayed on the device all the same
(packed with their version, like every other saved input).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils.checkpoint
from torch.utils.checkpoint import noop_context_fn

from .layer_call import LayerCall
from .options import OffloadOptions
from .saved_input import SavedInput, SavedTensor, can_save, pop_hooks, push_hooks, save, saving_is_ours

__all__ = ["DEFAULT_TORCH_KEYWORDS", "ROUTES_SELECTIVE_SAVES", "TorchKeywords", "checkpoint"]

# Whether this torch's checkpoint takes respect_saved_tensors_hooks (2.14+).
ROUTES_SELECTIVE_SAVES = (
    "respect_saved_tensors_hooks" in inspect.signature(torch.utils.checkpoint.checkpoint).parameters
)


@dataclass(frozen=True)
class TorchKeywords:
    """``torch.utils.checkpoint.checkpoint``'s own keywords, with torch's defaults and meaning.

    ``respect_saved_tensors_hooks`` exists on torch 2.14+ only (see Note
    [Selective checkpointing inside gcoffload's hooks]).
    """

    preserve_rng_state: bool = True
    context_fn: Callable[[], tuple[Any, Any]] = noop_context_fn
    determinism_check: str = "default"
    debug: bool = False
    early_stop: bool = True
    respect_saved_tensors_hooks: bool | None = None

    def for_torch(self, inside_our_hooks: bool) -> dict[str, Any]:
        """The keywords for torch's non-reentrant checkpoint, run inside gcoffload's hooks or not."""
        keywords = {
            "preserve_rng_state": self.preserve_rng_state,
            "context_fn": self.context_fn,
            "determinism_check": self.determinism_check,
            "debug": self.debug,
            "early_stop": self.early_stop,
        }
        if ROUTES_SELECTIVE_SAVES and self.context_fn is not noop_context_fn:
            respect = self.respect_saved_tensors_hooks
            # Note [Selective checkpointing inside gcoffload's hooks]
            keywords["respect_saved_tensors_hooks"] = (
                False if respect is None and inside_our_hooks else respect
            )
        return keywords


DEFAULT_TORCH_KEYWORDS = TorchKeywords()


def checkpoint(
    call: LayerCall, options: OffloadOptions, keywords: TorchKeywords = DEFAULT_TORCH_KEYWORDS
) -> Any:
    """Runs ``torch.utils.checkpoint.checkpoint(use_reentrant=False)`` with the input offloaded."""
    # The layer's keywords stay apart from torch's, whatever their names.
    function = functools.partial(call.function, **call.kwargs) if call.kwargs else call.function
    if call.meter is not None:  # Note [Counting in the real forward pass] in autopilot/measure.py
        function = functools.partial(_measured, call.meter, function)
    hooks = None
    if saving_is_ours():
        hidden = call.hidden
        hooks = _InputHooks(call.layer, hidden if hidden is not None and can_save(hidden) else None, options)
        push_hooks(hooks.pack, hooks.unpack)
    try:
        return torch.utils.checkpoint.checkpoint(
            function, *call.args, use_reentrant=False, **keywords.for_torch(hooks is not None)
        )
    except BaseException:
        if hooks is not None and hooks.saved is not None:
            hooks.saved.release()
        raise
    finally:
        if hooks is not None:
            pop_hooks()
            # The hooks outlive this call inside autograd's saved variables; they
            # must not keep the hidden states on the device.
            hooks.hidden = None


def _measured(meter: Any, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return meter.run(function, args, kwargs, passthrough=True)


class _InputHooks:
    """Packs the hidden states into a SavedInput and versions every other saved input.

    See Note [In-place changes to saved inputs] in saved_input.py.
    """

    __slots__ = ("hidden", "layer", "options", "saved")

    def __init__(self, layer: object, hidden: torch.Tensor | None, options: OffloadOptions) -> None:
        self.layer = layer
        self.hidden = hidden
        self.options = options
        self.saved: SavedInput | None = None

    def pack(self, tensor: torch.Tensor) -> SavedInput | SavedTensor:
        if tensor is not self.hidden:
            return SavedTensor(tensor, self.layer)
        if self.saved is None:
            self.saved = save(tensor, self.options, self.layer)
        return self.saved

    @staticmethod
    def unpack(packed: SavedInput | SavedTensor) -> torch.Tensor:
        return packed.unpack()
