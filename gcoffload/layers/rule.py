"""The selective rule: a layer is checkpointed iff gradients flow through it.

That is, it has a trainable parameter or one of its tensor arguments requires
grad. Layers upstream of every trainable layer (the frozen bottom of a
freeze-tuned model) run plainly: nothing in them requires grad, so autograd
saves nothing for them and checkpointing would only add a recompute. Frozen
layers *downstream* of a trainable one are checkpointed, because their
activations would otherwise be kept for the gradient that flows through them.

A reentrant checkpoint only produces parameter gradients when one of its
inputs requires grad. For a trainable layer whose input does not (LoRA with
frozen embeddings, the first trainable layer of a freeze-tuned model),
gcoffload's own reentrant path anchors its Function in the graph with an empty
tensor (Note [Graph anchor] in checkpoint/reentrant.py); another checkpoint
function wrapped by :func:`selective_checkpoint_function` is called with an
alias of that input that requires grad (``input.detach().requires_grad_()``:
the same memory, a leaf of its own). The caller's tensor is left as it was.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..checkpointing.dispatch import run_plainly
from ..checkpointing.layer_call import LayerCall, resolve_module

__all__ = ["gradients_flow_through", "selective_checkpoint_function", "training"]


def training(module: nn.Module | None) -> bool:
    """Whether a call would build a graph: grad enabled and the module (if known) in training mode."""
    return torch.is_grad_enabled() and (module is None or module.training)


def gradients_flow_through(call: LayerCall, only_trainable: bool = True) -> bool:
    """The rule for a training-mode call; ``only_trainable=False`` checkpoints every such call."""
    if call.requires_grad or not only_trainable:
        return True
        return True
    module = call.module
    return module is not None and any(parameter.requires_grad for parameter in module.parameters())


def selective_checkpoint_function(
    checkpoint_function: Callable[..., Any], *, only_trainable: bool = True
) -> Callable[..., Any]:
    """Wraps any checkpoint function (e.g. ``torch.utils.checkpoint.checkpoint``) with the rule.

    The result has ``checkpoint_function``'s signature. Layers gradients do not
    flow through are called plainly; a trainable layer whose input does not
    require grad gets, in place of its hidden states (its first positional
    tensor, if floating point), an alias that requires grad, so a reentrant
    checkpoint yields parameter gradients.

    Args:
        checkpoint_function: called as ``checkpoint_function(function, *args, **kwargs)``.
        only_trainable: False checkpoints every layer run with grad in training mode.

    Raises:
        TypeError: ``checkpoint_function`` is not callable, or ``only_trainable`` not a bool.
    """
    if not callable(checkpoint_function):
        raise TypeError(
            "selective_checkpoint_function: checkpoint_function must be callable like "
            f"torch.utils.checkpoint.checkpoint, got {checkpoint_function!r}"
        )
    if not isinstance(only_trainable, bool):
        raise TypeError(
            f"selective_checkpoint_function: only_trainable must be a bool, got {only_trainable!r}"
        )

    @functools.wraps(checkpoint_function)
    def selective(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        module = resolve_module(function)
        if not training(module):
            return function(*args, **kwargs)
        call = LayerCall(function, args, kwargs, module=module)
        if not gradients_flow_through(call, only_trainable):
            return run_plainly(call)
        if call.requires_grad:
            return checkpoint_function(function, *args, **kwargs)
        hidden = call.hidden
        with_alias = (
            call.caller_args_with_hidden(args, hidden.detach().requires_grad_(True))
            if hidden is not None and hidden.is_floating_point()
            else None
        )
        if with_alias is None:  # a reentrant checkpoint could not produce parameter gradients
            return run_plainly(call)
        return checkpoint_function(function, *with_alias, **kwargs)

    return selective
