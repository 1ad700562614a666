"""The public checkpoint functions, and the one dispatch to the reentrant and non-reentrant paths.

:func:`checkpoint` is a drop-in for ``torch.utils.checkpoint.checkpoint``; the
hidden states (the first positional tensor) are handed to the device's copy
engine in forward and fetched back, one layer ahead, in backward. :func:`run`
is where every checkpointed layer call, a user's or the
:class:`~gcoffload.layers.checkpointer.LayerCheckpointer`'s, picks its path.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.checkpoint import noop_context_fn

from . import counters, nonreentrant, reentrant
from .layer_call import LayerCall, describe_layer
from .nonreentrant import DEFAULT_TORCH_KEYWORDS, ROUTES_SELECTIVE_SAVES, TorchKeywords
from .options import OffloadOptions

__all__ = ["checkpoint", "checkpoint_with", "path", "run", "run_plainly"]

_DEFAULT_OPTIONS = OffloadOptions()
_OPTION_NAMES = frozenset(
    ("offload", "prefetch_depth", "keep_resident", "min_offload_bytes", "disk_read_ahead", "to_disk")
)


def checkpoint(function: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
    """Checkpoints ``function(*args, **kwargs)`` and parks its input in host memory.

    A drop-in for ``torch.utils.checkpoint.checkpoint``: it takes that
    function's keywords with their meaning (see :func:`checkpoint_with`, which
    this calls with the default :class:`OffloadOptions`), and passes every
    other keyword on to ``function``.

    Example:
        >>> out = gcoffload.checkpoint(layer, hidden_states, mask, use_reentrant=False)
    """
    return checkpoint_with(_DEFAULT_OPTIONS, function, *args, **kwargs)


def checkpoint_with(
    options: OffloadOptions,
    function: Callable[..., Any],
    /,
    *args: Any,
    use_reentrant: bool | None = None,
    preserve_rng_state: bool = True,
    context_fn: Callable[[], tuple[Any, Any]] = noop_context_fn,
    determinism_check: str = "default",
    debug: bool = False,
    early_stop: bool = True,
    **kwargs: Any,
) -> Any:
    """:func:`checkpoint` with gcoffload's options first, where no keyword of ``function`` can meet them.

    ``functools.partial(checkpoint_with, options)`` is a checkpoint function
    for any place that takes one (transformers' ``gradient_checkpointing_func``).

    Args:
        options: how the input is kept (offload, prefetch depth, residency window, threshold).
        function: the layer, e.g. a bound ``module.__call__``. A
            ``functools.partial`` is unpacked so that tensors among its
            keywords receive gradients too.
        *args: positional arguments; the first tensor among them is the
            hidden states ``(batch, seq, hidden)`` and is the one offloaded.
        use_reentrant: True: gcoffload's autograd Function; False: torch's
            non-reentrant checkpoint with the input offloaded through
            saved-tensor hooks (DDP without ``static_graph``, FSDP2,
            ``torch.autograd.grad``). None: as torch does, a warning and the
            reentrant path. Unlike torch's, the reentrant path accepts
            keyword arguments for ``function``.
        preserve_rng_state: restore the CPU and device RNG state for the recompute.
        context_fn, debug: as in torch; only with ``use_reentrant=False``
            (``ValueError`` otherwise, as in torch). On torch 2.14+,
            ``respect_saved_tensors_hooks`` too: see Note [Selective
            checkpointing inside gcoffload's hooks] in nonreentrant.py.
        determinism_check, early_stop: as in torch; ignored on the reentrant path, as in torch.
        **kwargs: keyword arguments for ``function``.

    Returns:
        What ``function`` returns: a tensor or a tuple (tensors, None and other
        objects mixed).

    Raises:
        TypeError: ``options`` is not an OffloadOptions, ``use_reentrant`` not a
            bool or None, ``function`` not callable, or a keyword named like an
            option is passed to a function that does not take it.
        ValueError: ``context_fn`` or ``debug`` with the reentrant path.
        RuntimeError: in backward, a saved input was changed in place, or was
            released; ``torch.autograd.grad`` reached the reentrant path; or,
            on the reentrant path, no output of the recompute requires grad.
    """
    if not isinstance(options, OffloadOptions):
        raise TypeError(f"checkpoint_with: options must be a gcoffload.OffloadOptions, got {options!r}")
    if use_reentrant is not None and not isinstance(use_reentrant, bool):
        raise TypeError(f"checkpoint: use_reentrant must be True, False or None, got {use_reentrant!r}")
    if not callable(function):
        raise TypeError(f"checkpoint: function must be callable, got {type(function).__name__}")
    if kwargs.keys() & _OPTION_NAMES:
        _reject_misplaced_options(function, kwargs)
    keywords = TorchKeywords(
        preserve_rng_state,
        context_fn,
        determinism_check,
        debug,
        early_stop,
        # torch's keyword where this torch has it (2.14+); before, like torch, it is the function's.
        kwargs.pop("respect_saved_tensors_hooks", None) if ROUTES_SELECTIVE_SAVES else None,
    )
    if use_reentrant is None:
        warnings.warn(
            "gcoffload.checkpoint: the use_reentrant parameter should be passed explicitly, as "
            "torch.utils.checkpoint asks. Without it gcoffload, like torch, takes the reentrant path; "
            "use_reentrant=False is recommended.",
            stacklevel=3 if options is _DEFAULT_OPTIONS else 2,
        )
        use_reentrant = True
    if use_reentrant:
        if (
            context_fn is not noop_context_fn
            or debug is not False
            or keywords.respect_saved_tensors_hooks is not None
        ):
            raise ValueError(
                "Passing `context_fn`, `debug`, or `respect_saved_tensors_hooks` is only supported when "
                "use_reentrant=False."
            )
        if not torch.is_grad_enabled():
            return function(*args, **kwargs)
    call = LayerCall(function, args, kwargs)
    if use_reentrant and not call.requires_grad:
        warnings.warn(
            "gcoffload.checkpoint: no tensor argument requires grad, so the function runs without "
            "checkpointing (parameters it uses still get gradients). Make the input require grad "
            "to checkpoint it; gcoffload.wrap_layers and patch_model do so for trainable layers.",
            stacklevel=3 if options is _DEFAULT_OPTIONS else 2,
        )
        return call.run()
    return run(call, options, use_reentrant=use_reentrant, keywords=keywords)


def run(
    call: LayerCall,
    options: OffloadOptions,
    *,
    use_reentrant: bool,
    anchored: bool = False,
    keywords: TorchKeywords = DEFAULT_TORCH_KEYWORDS,
) -> Any:
    """Runs ``call`` checkpointed on the path ``use_reentrant`` names, with validated arguments.

    ``anchored``: on the reentrant path, checkpoint even when no argument
    requires grad (Note [Graph anchor] in reentrant.py).
    """
    if use_reentrant:
        return reentrant.checkpoint(
            call, options, preserve_rng_state=keywords.preserve_rng_state, anchored=anchored
        )
    return nonreentrant.checkpoint(call, options, keywords)


def path(use_reentrant: bool) -> Callable[[LayerCall, OffloadOptions], Any]:
    """:func:`run` with its path chosen once, for a caller that checkpoints every layer the same way.

    The reentrant path anchors calls no argument of which requires grad (Note [Graph anchor]).
    """
    if use_reentrant:
        return functools.partial(reentrant.checkpoint, anchored=True)
    return nonreentrant.checkpoint


def _reject_misplaced_options(function: Callable[..., Any], kwargs: dict[str, Any]) -> None:
    """Raises if a keyword named like one of gcoffload's options would reach a function without it."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return
    if any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters):
        return
    accepted = {parameter.name for parameter in parameters}
    for name in sorted((kwargs.keys() & _OPTION_NAMES) - accepted):
        raise TypeError(
            f"checkpoint: the keyword {name}= would be passed on to {describe_layer(function)}, which does "
            f"not take it. gcoffload's options go first: gcoffload.checkpoint_with("
            f"gcoffload.OffloadOptions({name}=...), function, *args)."
        )


def run_plainly(call: LayerCall) -> Any:
    """Runs a training-mode call the selective rule does not checkpoint, and counts it."""
    hidden = call.hidden
    if hidden is not None:
        counters.count(hidden.device, "plain_layers")
    return call.run()
