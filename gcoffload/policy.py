"""Which layers to checkpoint, and the per-layer checkpoint function that applies it.

The rule: a layer is checkpointed iff gradients flow through it, that is, it
has a trainable parameter or one of its tensor arguments requires grad. Layers
upstream of every trainable layer (the frozen bottom of a freeze-tuned model)
run plainly: nothing in them requires grad, so autograd saves nothing for them
and checkpointing would only add a recompute. Frozen layers *downstream* of a
trainable one are checkpointed, because their activations would otherwise be
kept for the gradient that flows through them.

The reentrant checkpoint only produces parameter gradients when one of its
inputs requires grad. For a trainable layer whose input does not (LoRA with
frozen embeddings, the first trainable layer of a freeze-tuned model),
gcoffload's own reentrant path anchors its Function in the graph with an empty
tensor (Note [Graph anchor] in function.py); another checkpoint function
wrapped by :func:`selective_checkpoint_function` is called with an alias of
that input that requires grad (``input.detach().requires_grad_()``: the same
memory, a leaf of its own). The caller's tensor is left as it was.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from . import nonreentrant
from .autopilot import Autopilot
from .calls import flatten_arguments, resolve_module, unflatten, unwrap_partial
from .engine import get_engine
from .function import reentrant_checkpoint
from .saved_input import OffloadOptions

__all__ = ["LayerCheckpointer", "resolve_module", "selective_checkpoint_function"]


def _tensor_arguments(
    function: Callable[..., Any], args: tuple, kwargs: Mapping[str, Any]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The tensors among a call's positional and keyword arguments, partials unwrapped."""
    if (
        not kwargs
        and type(function) is not functools.partial
        and all(type(arg) is torch.Tensor for arg in args)
    ):
        return list(args), []  # the usual layer call, at no cost
    _, args, kwargs = unwrap_partial(function, args, dict(kwargs))
    positional: list[torch.Tensor] = []
    keyword: list[torch.Tensor] = []
    flatten_arguments(args, positional)
    flatten_arguments(kwargs, keyword)
    return positional, keyword


def selective_checkpoint_function(
    checkpoint_function: Callable[..., Any], *, only_trainable: bool = True
) -> Callable[..., Any]:
    """Wraps any checkpoint function (e.g. ``torch.utils.checkpoint.checkpoint``) with the rule.

    The result has ``checkpoint_function``'s signature. Layers gradients do not
    flow through are called plainly; a trainable layer whose input does not
    require grad gets, in place of its first floating-point positional tensor,
    an alias that requires grad, so a reentrant checkpoint yields parameter
    gradients.

    Args:
        checkpoint_function: called as ``checkpoint_function(function, *args, **kwargs)``.
        only_trainable: False checkpoints every layer run with grad in training mode.
    """

    @functools.wraps(checkpoint_function)
    def selective(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        module = resolve_module(function)
        if not _training(module):
            return function(*args, **kwargs)
        positional, keyword = _tensor_arguments(function, args, kwargs)
        checkpointed_args = _checkpointed_args(
            module, positional, keyword, args, only_trainable, reentrant=True
        )
        if checkpointed_args is None:
            return function(*args, **kwargs)
        return checkpoint_function(function, *checkpointed_args, **kwargs)

    return selective


def _training(module: nn.Module | None) -> bool:
    """Whether a call would build a graph: grad enabled and the module (if known) in training mode."""
    return torch.is_grad_enabled() and (module is None or module.training)


def _checkpointed_args(
    module: nn.Module | None,
    positional: list[torch.Tensor],
    keyword: list[torch.Tensor],
    args: tuple,
    only_trainable: bool,
    *,
    reentrant: bool,
) -> tuple | None:
    """The positional arguments to checkpoint a training call with, or None to run it plainly.

    ``positional`` and ``keyword`` are the call's tensors (:func:`_tensor_arguments`).
    """
    if any(tensor.requires_grad for tensor in (*positional, *keyword)):
        return args
    trainable = module is not None and any(parameter.requires_grad for parameter in module.parameters())
    if only_trainable and not trainable:
        return None
    if not reentrant:
        return args
    return _with_grad_requiring_input(args)


def _with_grad_requiring_input(args: tuple) -> tuple | None:
    """``args`` with the first tensor replaced by an alias that requires grad, if it is floating-point.

    None if there is no such tensor: a reentrant checkpoint could not produce
    parameter gradients then.
    """
    leaves: list[torch.Tensor] = []
    structure = flatten_arguments(args, leaves)
    if not leaves or not leaves[0].is_floating_point():
        return None
    leaves[0] = leaves[0].detach().requires_grad_(True)
    return unflatten(structure, iter(leaves))


class LayerCheckpointer:
    """The per-layer checkpoint function gcoffload installs: the rule plus the offloaded checkpoint.

    Called like ``torch.utils.checkpoint.checkpoint(function, *args, **kwargs)``
    (this is what transformers stores as ``_gradient_checkpointing_func``), or
    with the module known, through :meth:`run`.

    Args:
        options: how the checkpointed inputs are kept (offload, prefetch, window).
        only_trainable: apply the rule; False checkpoints every layer that runs
            with grad in training mode.
        every_n_layers: checkpoint only layers whose index is a multiple of this;
            the others keep their activations.
        use_reentrant: the autograd-Function path (True) or the saved-tensor
            hooks around ``torch.utils.checkpoint(use_reentrant=False)``.
        layer_indices: the position of each layer in its stack, for
            ``every_n_layers`` and the autopilot.
        autopilot: picks keep, checkpoint or offload for each indexed layer
            (then ``options`` only give the prefetch depth and threshold).
    """

    def __init__(
        self,
        options: OffloadOptions,
        *,
        only_trainable: bool = True,
        every_n_layers: int = 1,
        use_reentrant: bool = False,
        layer_indices: Mapping[nn.Module, int] | None = None,
        autopilot: Autopilot | None = None,
    ) -> None:
        if not isinstance(every_n_layers, int) or isinstance(every_n_layers, bool) or every_n_layers < 1:
            raise ValueError(f"every_n_layers must be a positive int, got {every_n_layers!r}")
        if autopilot is not None and every_n_layers != 1:
            raise ValueError(
                "every_n_layers and memory_budget cannot be combined: the autopilot picks which layers "
                "keep their activations; leave every_n_layers at 1"
            )
        for name, flag in (("only_trainable", only_trainable), ("use_reentrant", use_reentrant)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {flag!r}")
        self.options = options
        self.only_trainable = only_trainable
        self.every_n_layers = every_n_layers
        self.use_reentrant = use_reentrant
        self.layer_indices = dict(layer_indices or {})
        self.autopilot = autopilot

    def __call__(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return self.run(resolve_module(function), function, args, kwargs)

    def run(self, module: nn.Module | None, function: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        """Calls ``function(*args, **kwargs)``, the layer ``module``, checkpointed or not."""
        if not _training(module):
            return function(*args, **kwargs)
        index = self.layer_indices.get(module) if module is not None else None
        positional, keyword = _tensor_arguments(function, args, kwargs)
        hidden = positional[0] if positional else None
        checkpointed_args = None
        if index is None or index % self.every_n_layers == 0:
            checkpointed_args = _checkpointed_args(
                module, positional, keyword, args, self.only_trainable, reentrant=False
            )
        autopilot = self.autopilot if index is not None and hidden is not None else None
        if checkpointed_args is None:
            if hidden is not None:
                get_engine(hidden.device).count("plain_layers")
            if autopilot is not None:
                autopilot.observe_plain(index, hidden)
            return function(*args, **kwargs)
        options = self.options
        if autopilot is not None:
            options = autopilot.options_for(index, module, function, args, kwargs, hidden)
            if options is None:
                get_engine(hidden.device).count("kept_layers")
                output = function(*args, **kwargs)
                autopilot.observe_output(index, output)
                return output
        if self.use_reentrant:
            output = reentrant_checkpoint(function, checkpointed_args, kwargs, options, anchored=True)
        else:
            output = nonreentrant.checkpoint(function, checkpointed_args, kwargs, options)
        if autopilot is not None:
            autopilot.observe_output(index, output)
        return output

    def __repr__(self) -> str:
        return (
            f"LayerCheckpointer({self.options}, only_trainable={self.only_trainable}, "
            f"every_n_layers={self.every_n_layers}, use_reentrant={self.use_reentrant}, "
            f"autopilot={self.autopilot})"
        )
