"""What a layer call is made of: the function behind partials, its module, its tensor arguments.

transformers hands the checkpoint function a layer in three shapes (a bound
``layer.__call__``, ``partial(super().__call__, **kwargs)``, and on 5.23+
``partial(forward, self, **kwargs)``), with tensors positional, keyword and
nested in tuples (Llama's ``position_embeddings=(cos, sin)``). The checkpoint
paths and the selective rule look at calls through these helpers only.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "count_leaves",
    "describe_layer",
    "flatten_arguments",
    "flatten_call",
    "resolve_module",
    "unflatten",
    "unwrap_partial",
]


def unwrap_partial(
    function: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]
) -> tuple[Callable[..., Any], tuple, dict[str, Any]]:
    """The same call with the arguments ``functools.partial`` layers had bound moved into it."""
    args = tuple(args)
    while isinstance(function, functools.partial):
        args = (*function.args, *args)
        kwargs = {**function.keywords, **kwargs}
        function = function.func
    return function, args, kwargs


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


def flatten_call(args: tuple, kwargs: dict[str, Any], leaves: list[torch.Tensor]) -> Any:
    """:func:`flatten_arguments` of ``(args, kwargs)``, at no cost for the usual call (tensors only)."""
    if not kwargs and all(type(arg) is torch.Tensor for arg in args):
        leaves.extend(args)
        structure = _PLAIN_CALLS.get(len(args))
        if structure is None:
            structure = _PLAIN_CALLS[len(args)] = (tuple, [(tuple, [_LEAF] * len(args)), (dict, {})])
        return structure
    return flatten_arguments((args, kwargs), leaves)


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


def count_leaves(structure: Any) -> int:
    """How many tensors a structure from :func:`flatten_arguments` holds."""
    if structure is _LEAF:
        return 1
    kind, content = structure
    if kind is _CONSTANT:
        return 0
    items = content.values() if kind is dict else content
    return sum(count_leaves(item) for item in items)
