"""The reentrant path: an autograd Function that offloads in forward and recomputes in backward.

Forward keeps only the layer's tensor arguments: the hidden states as a
:class:`~gcoffload.checkpointing.saved_input.SavedInput` (parked in host memory
when the options allow), the others as they are, and runs the layer under
``no_grad``. Backward prefetches the inputs of the layers that come next in
backward order, fetches its own, restores RNG and autocast state like
``torch.utils.checkpoint``, recomputes the layer with grad and backpropagates
through it with a nested ``torch.autograd.backward``.

Note [Graph anchor]
~~~~~~~~~~~~~~~~~~~
An autograd Function is part of the graph, and its backward (which makes the
parameter gradients) runs, only if one of its inputs requires grad. A
trainable layer whose input does not (LoRA behind frozen embeddings, the
first trainable layer of a freeze-tuned model) could be given an alias of its
input that requires grad, but that alias would be a leaf, and its
AccumulateGrad node holds it, and so the input's device memory, until the
graph is freed: an offloaded input would stay on the device all the same.
An empty tensor that requires grad, appended after the call's own leaves
(the function never sees it), anchors the Function in the graph instead.

Note [Saving through an outer region]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
The Function hands autograd its SavedInput through saved-tensor hooks. Where
hooks are already in force (an outer non-reentrant checkpoint, ``save_on_cpu``,
an activation-offloading context) the tensors the Function saves belong to
that outer region, as they do for ``torch.utils.checkpoint``: an outer
checkpoint saves nothing of them and recomputes them. Where hooks are
disabled (``torch.autograd.graph.disable_saved_tensors_hooks``, as functorch
wrappers do) none can be pushed. In both cases the Function saves its inputs
with ``save_for_backward`` alone, on the device, like torch's reentrant
checkpoint.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from .layer_call import LayerCall, unflatten
from .options import OffloadOptions
from .replay_state import AutocastState, RngState
from .saved_input import SavedInput, SavedTensor, can_save, pop_hooks, push_hooks, save, saving_is_ours

__all__ = ["checkpoint"]

NO_OUTPUT_REQUIRES_GRAD = "none of output has requires_grad=True, this checkpoint() is not necessary"


def checkpoint(
    call: LayerCall, options: OffloadOptions, *, preserve_rng_state: bool = True, anchored: bool = False
) -> Any:
    """Runs ``call`` checkpointed through :class:`_OffloadedCheckpoint`.

    ``anchored`` checkpoints even when no argument requires grad (a trainable
    layer behind frozen ones), see Note [Graph anchor]. The caller has
    checked that some argument requires grad otherwise.
    """
    leaves = call.leaves
    anchored = anchored and not call.requires_grad
    if anchored:
        leaves = [*leaves, torch.empty(0, requires_grad=True)]  # Note [Graph anchor]: never saved
    hidden_index = call.hidden_index
    ours = saving_is_ours()
    if not ours or (hidden_index is not None and not can_save(leaves[hidden_index])):
        hidden_index = None
    state = _Call(
        call.function, call.layer, call.structure, hidden_index, options, preserve_rng_state, anchored
    )
    if not ours:
        return _OffloadedCheckpoint.apply(state, None, call.meter, *leaves)
    packer = _InputPacker(call.layer)
    push_hooks(packer.pack, _unpack)
    try:
        return _OffloadedCheckpoint.apply(state, packer, call.meter, *leaves)
    finally:
        pop_hooks()
        packer.clear()


class _Call(NamedTuple):
    """What backward needs of the call: never its tensors, which would keep the input on the device.

    A tuple: built once per layer call, on the hot path.
    """

    function: Callable[..., Any]
    layer: Callable[..., Any]  # as the caller passed it, for error messages
    structure: Any  # LayerCall.structure: how to rebuild the arguments from the leaves
    hidden_index: int | None
    options: OffloadOptions
    preserve_rng_state: bool
    anchored: bool


class _InputPacker:
    """Hands autograd the SavedInput in place of the hidden states, and versions every other input.

    See Note [Who owns a SavedInput] and Note [In-place changes to saved
    inputs] in saved_input.py.
    """

    __slots__ = ("hidden", "layer", "saved")

    def __init__(self, layer: object) -> None:
        self.layer = layer
        self.hidden: torch.Tensor | None = None
        self.saved: SavedInput | None = None

    def pack(self, tensor: torch.Tensor) -> SavedInput | SavedTensor:
        if tensor is self.hidden and self.saved is not None:
            return self.saved
        return SavedTensor(tensor, self.layer)

    def clear(self) -> None:
        self.hidden = self.saved = None


def _unpack(packed: SavedInput | SavedTensor) -> torch.Tensor:
    return packed.unpack()


def _detached(outputs: Any) -> Any:
    """A measured forward pass's outputs without the graph it built (the Function's own replaces it)."""
    if isinstance(outputs, torch.Tensor):
        return outputs.detach()
    if isinstance(outputs, tuple):
        return tuple(output.detach() if isinstance(output, torch.Tensor) else output for output in outputs)
    return outputs


class _OffloadedCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, state: _Call, packer: _InputPacker | None, meter: Any, *leaves: torch.Tensor
    ) -> Any:
        ctx.state = state
        ctx.set_materialize_grads(False)
        ctx.rng = RngState.capture(leaves) if state.preserve_rng_state else None
        ctx.autocast = AutocastState.capture(leaves)
        ctx.saved_input = None
        saved = None
        if state.hidden_index is not None:
            hidden = leaves[state.hidden_index]
            saved = save(hidden, state.options, state.layer)
            packer.hidden, packer.saved = hidden, saved
            ctx.saved_input = weakref.ref(saved)
        try:
            args, kwargs = unflatten(state.structure, iter(leaves))
            if meter is None:
                with torch.no_grad():
                    outputs = state.function(*args, **kwargs)
            else:  # Note [Counting in the real forward pass] in autopilot/measure.py
                with torch.enable_grad():
                    outputs = meter.run(state.function, args, kwargs, passthrough=False)
                outputs = _detached(outputs)
        except BaseException:
            if saved is not None:
                saved.release()
            raise
        if not isinstance(outputs, (torch.Tensor, tuple)):
            if saved is not None:
                saved.release()
            raise TypeError(
                "gcoffload.checkpoint: the checkpointed function must return a tensor or a tuple, "
                f"got {type(outputs).__name__}"
            )
        ctx.save_for_backward(*(leaves[:-1] if state.anchored else leaves))
        return outputs

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        if not torch.autograd._is_checkpoint_valid():
            raise RuntimeError(
                "When use_reentrant=True, torch.utils.checkpoint is incompatible with .grad() or passing an "
                "`inputs` parameter to .backward(); so is gcoffload's reentrant checkpoint. Call .backward() "
                "without `inputs`, or use use_reentrant=False (gcoffload's default)."
            )
        state: _Call = ctx.state
        saved = ctx.saved_input() if ctx.saved_input is not None else None
        leaves = ctx.saved_tensors  # the SavedInput's unpack prefetches the next inputs, then fetches its own
        needs_grad = ctx.needs_input_grad[3 : 3 + len(leaves)]
        inputs = [leaf.detach().requires_grad_(needs) for leaf, needs in zip(leaves, needs_grad, strict=True)]
        rng = ctx.rng if ctx.rng is not None else contextlib.nullcontext()
        try:
            with rng, ctx.autocast.restored(), torch.enable_grad():
                args, kwargs = unflatten(state.structure, iter(inputs))
                outputs = state.function(*args, **kwargs)
            if isinstance(outputs, torch.Tensor):
                outputs = (outputs,)
            with_grad = [
                (output, grad)
                for output, grad in zip(outputs, grad_outputs, strict=True)
                if isinstance(output, torch.Tensor) and output.requires_grad
            ]
            if not with_grad:
                raise RuntimeError(f"{NO_OUTPUT_REQUIRES_GRAD} (gcoffload.checkpoint, reentrant path)")
            pairs = [(output, grad) for output, grad in with_grad if grad is not None]
            if pairs:
                torch.autograd.backward([output for output, _ in pairs], [grad for _, grad in pairs])
        except BaseException:
            if saved is not None:
                saved.release()
            raise
        grads = tuple(
            tensor.grad if needs else None for tensor, needs in zip(inputs, needs_grad, strict=True)
        )
        return (None, None, None, *grads, *((None,) if state.anchored else ()))
