"""One layer call, taken apart once: the function behind partials, its module, its tensors, its hidden states.

transformers hands the checkpoint function a layer in three shapes (a bound
``layer.__call__``, ``partial(super().__call__, **kwargs)``, and on 5.23+
``partial(forward, self, **kwargs)``), with tensors positional, keyword and
nested in tuples (Llama's ``position_embeddings=(cos, sin)``). A
:class:`LayerCall` is built once per call and passed down: the selective
rule, the checkpoint paths, the autopilot and its profile read it and never
take the call apart again.

The *hidden states* of a call are its first positional argument that is a
tensor (after the arguments a partial bound): ``(batch, seq, hidden)`` for a
decoder layer. It is the one tensor a checkpoint may offload.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["LayerCall", "describe_layer", "flatten_arguments", "resolve_module", "unflatten"]


def resolve_module(function: Callable[..., Any]) -> nn.Module | None:
    """The module behind a layer callable, for the three shapes transformers uses.

    ``layer.__call__`` (bound: transformers <= 4.51),
    ``partial(super().__call__, **kwargs)`` (4.52 - 5.22) and
    ``partial(forward, self, **kwargs)`` (5.23+: the module is the first
    positional argument of the partial).
    """
    while isinstance(function, functools.partial):
        if function.args and isinstance(function.args[0], nn.Module):
            return function.args[0]
        function = function.func
    owner = getattr(function, "__self__", None)
    if isinstance(owner, nn.Module):
        return owner
    return function if isinstance(function, nn.Module) else None


def describe_layer(function: Callable[..., Any]) -> str:
    """A name for error messages: the module's class, else the function's qualified name."""
    module = resolve_module(function)
    if module is not None:
        return type(module).__name__
    while isinstance(function, functools.partial):
        function = function.func
    return getattr(function, "__qualname__", None) or type(function).__name__


# Arguments are flattened so that every tensor, also inside tuples, lists and
# dicts, is an input of the autograd Function and can receive a gradient. Other
# containers are left whole: a KV cache object must stay the same object in the
# recompute.
_LEAF = object()
_CONSTANT = object()
_PLAIN_CALLS: dict[int, Any] = {}  # structures of calls with n tensors and no keywords


def flatten_arguments(value: Any, leaves: list[torch.Tensor]) -> Any:
    """Appends the tensors in ``value`` to ``leaves``; returns the structure to rebuild it."""
    if isinstance(value, torch.Tensor):
        leaves.append(value)
        return _LEAF
    if type(value) in (tuple, list):
        return (type(value), [flatten_arguments(item, leaves) for item in value])
    if type(value) is dict:
        return (dict, {key: flatten_arguments(item, leaves) for key, item in value.items()})
    return (_CONSTANT, value)


def unflatten(structure: Any, leaves: Iterator[torch.Tensor]) -> Any:
    """Rebuilds what :func:`flatten_arguments` flattened, taking tensors from ``leaves`` in order."""
    if structure is _LEAF:
        return next(leaves)
    kind, content = structure
    if kind is _CONSTANT:
        return content
    if kind is dict:
        return {key: unflatten(item, leaves) for key, item in content.items()}
    if kind is tuple and all(item is _LEAF for item in content):
        return tuple(next(leaves) for _ in content)
    return kind([unflatten(item, leaves) for item in content])


class LayerCall:
    """``layer(*args, **kwargs)``, with partials unwrapped and its tensors flattened.

    Attributes:
        layer: the callable as the caller passed it (named in errors).
        function: ``layer`` with every ``functools.partial`` unwrapped.
        args, kwargs: the arguments ``function`` takes, the partials' included.
        module: the module behind ``layer``, if any.
        index: the layer's position in its stack, if known.
        leaves: every tensor in ``(args, kwargs)``, in order.
        structure: how to rebuild ``(args, kwargs)`` from ``leaves`` (:func:`unflatten`).
        hidden_index: the position in ``leaves`` of the hidden states, or None.
        requires_grad: whether any of ``leaves`` requires grad.
        bound: how many of ``args`` the partials bound (they precede the caller's).
        meter: in an autopilot's profile step, what the layer's real forward
            pass runs through to be measured (``meter.run(function, args,
            kwargs, passthrough=...)``); None otherwise.
    """

    __slots__ = (
        "args",
        "bound",
        "function",
        "hidden_index",
        "index",
        "kwargs",
        "layer",
        "leaves",
        "meter",
        "module",
        "requires_grad",
        "structure",
    )

    def __init__(
        self,
        layer: Callable[..., Any],
        args: Sequence[Any],
        kwargs: dict[str, Any],
        *,
        module: nn.Module | None = None,
        index: int | None = None,
    ) -> None:
        self.layer = layer
        self.index = index
        self.meter: Any = None
        function = layer
        args = tuple(args)
        caller_count = len(args)
        while isinstance(function, functools.partial):
            args = (*function.args, *args)
            kwargs = {**function.keywords, **kwargs}
            function = function.func
        if module is None:
            module = resolve_module(layer)
        self.function = function
        self.args = args
        self.kwargs = kwargs
        self.module = module
        self.bound = len(args) - caller_count
        self.hidden_index: int | None = None
        if not kwargs:  # the usual call, tensors only, at the least cost: this runs per layer
            requires_grad = False
            for arg in args:
                if type(arg) is not torch.Tensor:
                    break
                requires_grad = requires_grad or arg.requires_grad
            else:
                self.leaves = list(args)
                self.requires_grad = requires_grad
                self.hidden_index = 0 if args else None
                structure = _PLAIN_CALLS.get(len(args))
                if structure is None:
                    structure = _PLAIN_CALLS[len(args)] = (tuple, [(tuple, [_LEAF] * len(args)), (dict, {})])
                self.structure = structure
                return
        self.leaves = []
        positional = []
        for arg in args:
            if self.hidden_index is None and isinstance(arg, torch.Tensor):
                self.hidden_index = len(self.leaves)
            positional.append(flatten_arguments(arg, self.leaves))
        keyword = flatten_arguments(kwargs, self.leaves)
        self.structure = (tuple, [(tuple, positional), keyword])
        self.requires_grad = any(leaf.requires_grad for leaf in self.leaves)

    @property
    def hidden(self) -> torch.Tensor | None:
        """The hidden states: the first positional tensor argument, or None."""
        return self.leaves[self.hidden_index] if self.hidden_index is not None else None

    def run(self) -> Any:
        """Calls the layer as it was called."""
        return self.function(*self.args, **self.kwargs)

    def caller_args_with_hidden(self, caller_args: tuple, hidden: torch.Tensor) -> tuple | None:
        """The caller's positional arguments with ``hidden`` in place of the hidden states.

        None when the hidden states are not among them (a partial bound them,
        or they are nested in a container).
        """
        if self.hidden_index is None:
            return None
        position = next(
            (place for place, arg in enumerate(self.args) if arg is self.leaves[self.hidden_index]), None
        )
        if position is None or position < self.bound:
            return None
        replaced = list(caller_args)
        replaced[position - self.bound] = hidden
        return tuple(replaced)

    def __repr__(self) -> str:
        return f"LayerCall({describe_layer(self.layer)}, index={self.index}, {len(self.leaves)} tensors)"
