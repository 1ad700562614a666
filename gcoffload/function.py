"""The offloaded checkpoint: offload in forward, prefetch + recompute in backward.

:func:`checkpoint` is a drop-in for
``torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=True)``. The
forward pass keeps only the layer's input (the first positional tensor, the
hidden states), hands it to the device's copy engine, and runs the layer under
``no_grad``. The backward pass prefetches the inputs of the layers that come
next in backward order, fetches its own, restores RNG and autocast state like
``torch.utils.checkpoint``, recomputes the layer with grad and backpropagates.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch.utils.checkpoint import noop_context_fn

from . import nonreentrant
from .calls import count_leaves, describe_layer, flatten_call, unflatten, unwrap_partial
from .nonreentrant import DEFAULT_DETERMINISM_MODE
from .saved_input import OffloadOptions, SavedInput, SavedTensor, can_save, save

__all__ = ["checkpoint", "checkpoint_with", "reentrant_checkpoint"]

_DEFAULT_OPTIONS = OffloadOptions()
_OPTION_NAMES = frozenset(("offload", "prefetch_depth", "keep_resident", "min_offload_bytes"))


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
    determinism_check: str = DEFAULT_DETERMINISM_MODE,
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
        use_reentrant: True or None (the default): gcoffload's autograd
            Function; False: torch's non-reentrant checkpoint with the input
            offloaded through saved-tensor hooks (DDP without
            ``static_graph``, FSDP2, ``torch.autograd.grad``). Unlike torch,
            None does not warn, and the reentrant path accepts keyword
            arguments for ``function``.
        preserve_rng_state: restore the CPU and device RNG state for the recompute.
        context_fn, debug: as in torch; only with ``use_reentrant=False``
            (``ValueError`` otherwise, as in torch).
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
            released; or ``torch.autograd.grad`` reached the reentrant path.
    """
    if not isinstance(options, OffloadOptions):
        raise TypeError(f"checkpoint_with: options must be a gcoffload.OffloadOptions, got {options!r}")
    if use_reentrant is not None and not isinstance(use_reentrant, bool):
        raise TypeError(f"checkpoint: use_reentrant must be True, False or None, got {use_reentrant!r}")
    if not callable(function):
        raise TypeError(f"checkpoint: function must be callable, got {type(function).__name__}")
    if kwargs.keys() & _OPTION_NAMES:
        _reject_misplaced_options(function, kwargs)
    if use_reentrant is False:
        return nonreentrant.checkpoint(
            function,
            args,
            kwargs,
            options,
            preserve_rng_state=preserve_rng_state,
            context_fn=context_fn,
            determinism_check=determinism_check,
            debug=debug,
            early_stop=early_stop,
        )
    if context_fn is not noop_context_fn or debug is not False:
        raise ValueError("Passing `context_fn` or `debug` is only supported when use_reentrant=False.")
    if not torch.is_grad_enabled():
        return function(*args, **kwargs)
    return reentrant_checkpoint(function, args, kwargs, options, preserve_rng_state=preserve_rng_state)


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


def reentrant_checkpoint(
    function: Callable[..., Any],
    args: Sequence[Any],
    kwargs: dict[str, Any],
    options: OffloadOptions,
    *,
    preserve_rng_state: bool = True,
    anchored: bool = False,
) -> Any:
    """The reentrant path of :func:`checkpoint`, with validated options.

    ``anchored`` checkpoints even when no argument requires grad (a trainable
    layer behind frozen ones): then an anchor is added, see Note [Graph anchor].
    """
    layer = function
    function, args, kwargs = unwrap_partial(function, args, kwargs)
    leaves: list[torch.Tensor] = []
    structure = flatten_call(args, kwargs, leaves)
    anchored = anchored and not any(leaf.requires_grad for leaf in leaves)
    if anchored:
        leaves.append(torch.empty(0, requires_grad=True))  # Note [Graph anchor]: never saved
    elif not any(leaf.requires_grad for leaf in leaves):
        warnings.warn(
            "gcoffload.checkpoint: no tensor argument requires grad, so the function runs without "
            "checkpointing (parameters it uses still get gradients). Make the input require grad "
            "to checkpoint it; gcoffload.wrap_layers and patch_model do so for trainable layers.",
            stacklevel=3,
        )
        return function(*args, **kwargs)
    hidden_index = 0 if count_leaves(structure[1][0]) > 0 and can_save(leaves[0]) else None
    call = _Call(function, layer, structure, hidden_index, options, preserve_rng_state, anchored)
    packer = _InputPacker(layer)
    try:
        with torch.autograd.graph.saved_tensors_hooks(packer.pack, _unpack):
            return _OffloadedCheckpoint.apply(call, packer, *leaves)
    finally:
        packer.clear()


# Note [Graph anchor]
# ~~~~~~~~~~~~~~~~~~~
# An autograd Function is part of the graph, and its backward (which makes the
# parameter gradients) runs, only if one of its inputs requires grad. A
# trainable layer whose input does not (LoRA behind frozen embeddings, the
# first trainable layer of a freeze-tuned model) could be given an alias of its
# input that requires grad, but that alias would be a leaf, and its
# AccumulateGrad node holds it, and so the input's device memory, until the
# graph is freed: an offloaded input would stay on the device all the same.
# An empty tensor that requires grad, appended after the call's own leaves
# (the function never sees it), anchors the Function in the graph instead.


class _Call(NamedTuple):  # a tuple: built once per layer call, on the hot path
    function: Callable[..., Any]
    layer: Callable[..., Any]  # as the caller passed it, for error messages
    structure: Any
    hidden_index: int | None
    options: OffloadOptions
    preserve_rng_state: bool
    anchored: bool


class _InputPacker:
    """Hands autograd the SavedInput in place of the hidden states, and versions every other input.

    See Note [Who owns a SavedInput] and Note [In-place changes to saved
    inputs] in saved_input.py.
    """

    def __init__(self, layer: Callable[..., Any]) -> None:
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


class _OffloadedCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, call: _Call, packer: _InputPacker, *leaves: torch.Tensor) -> Any:
        ctx.call = call
        ctx.set_materialize_grads(False)
        ctx.rng = _RngState.capture(leaves) if call.preserve_rng_state else None
        ctx.autocast = _AutocastState.capture(leaves)
        ctx.saved_input = None
        saved = None
        if call.hidden_index is not None:
            hidden = leaves[call.hidden_index]
            saved = save(hidden, call.options, call.layer)
            packer.hidden, packer.saved = hidden, saved
            ctx.saved_input = weakref.ref(saved)
        try:
            with torch.no_grad():
                args, kwargs = unflatten(call.structure, iter(leaves))
                outputs = call.function(*args, **kwargs)
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
        ctx.save_for_backward(*(leaves[:-1] if call.anchored else leaves))
        return outputs

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        if not torch.autograd._is_checkpoint_valid():
            raise RuntimeError(
                "gcoffload.checkpoint (reentrant) does not support torch.autograd.grad or "
                "backward(inputs=...); call .backward(), or use use_reentrant=False"
            )
        call: _Call = ctx.call
        saved = ctx.saved_input() if ctx.saved_input is not None else None
        if saved is not None:
            saved.start_recompute(call.options.prefetch_depth)
        leaves = ctx.saved_tensors
        needs_grad = ctx.needs_input_grad[2 : 2 + len(leaves)]
        inputs = [leaf.detach().requires_grad_(needs) for leaf, needs in zip(leaves, needs_grad, strict=True)]
        rng = ctx.rng if ctx.rng is not None else contextlib.nullcontext()
        try:
            with rng, ctx.autocast.restored(), torch.enable_grad():
                args, kwargs = unflatten(call.structure, iter(inputs))
                outputs = call.function(*args, **kwargs)
            if isinstance(outputs, torch.Tensor):
                outputs = (outputs,)
            pairs = [
                (output, grad)
                for output, grad in zip(outputs, grad_outputs, strict=True)
                if isinstance(output, torch.Tensor) and output.requires_grad and grad is not None
            ]
            if pairs:
                torch.autograd.backward([output for output, _ in pairs], [grad for _, grad in pairs])
        except BaseException:
            if saved is not None:
                saved.release()
            raise
        grads = tuple(
            tensor.grad if needs else None for tensor, needs in zip(inputs, needs_grad, strict=True)
        )
        return (None, None, *grads, *((None,) if call.anchored else ()))


class _RngState:
    """CPU and device RNG states at forward time; ``with state:`` restores them for the recompute."""

    def __init__(self, cpu: torch.Tensor, device_type: str, devices: dict[int, torch.Tensor]) -> None:
        self.cpu = cpu
        self.device_type = device_type
        self.devices = devices

    @classmethod
    def capture(cls, tensors: Sequence[torch.Tensor]) -> _RngState:
        if all(tensor.is_cpu for tensor in tensors):  # what follows gives the same, at a cost per layer
            return cls(torch.get_rng_state(), "cuda", {})
        accelerators = {tensor.device for tensor in tensors if tensor.device.type not in ("cpu", "meta")}
        device_type = next(iter(accelerators)).type if accelerators else "cuda"
        module = torch.get_device_module(device_type) if accelerators else None
        devices = {
            device.index: module.get_rng_state(device.index)
            for device in accelerators
            if device.type == device_type
        }
        return cls(torch.get_rng_state(), device_type, devices)

    def __enter__(self) -> None:
        """The forward pass's states inside the block, the current ones again after it (like ``fork_rng``)."""
        module = torch.get_device_module(self.device_type) if self.devices else None
        self._outside = (
            torch.get_rng_state(),
            {index: module.get_rng_state(index) for index in self.devices},
        )
        torch.set_rng_state(self.cpu)
        for index, state in self.devices.items():
            module.set_rng_state(state, index)

    def __exit__(self, *exc_info: object) -> None:
        cpu, devices = self._outside
        torch.set_rng_state(cpu)
        for index, state in devices.items():
            torch.get_device_module(self.device_type).set_rng_state(state, index)


class _AutocastState:
    """Autocast settings of the forward pass, for the device and the CPU."""

    def __init__(self, settings: dict[str, tuple[bool, torch.dtype]], cache_enabled: bool) -> None:
        self.settings = settings
        self.cache_enabled = cache_enabled

    @classmethod
    def capture(cls, tensors: Sequence[torch.Tensor]) -> _AutocastState:
        if all(tensor.is_cpu for tensor in tensors):  # what follows gives the same, at a cost per layer
            cpu = (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))
            return cls({"cpu": cpu}, torch.is_autocast_cache_enabled())
        device_types = {tensor.device.type for tensor in tensors if tensor.device.type != "meta"} | {"cpu"}
        settings = {
            device_type: (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
            for device_type in device_types
        }
        return cls(settings, torch.is_autocast_cache_enabled())

    def restored(self) -> contextlib.AbstractContextManager[Any]:
        """The forward pass's settings inside a ``with`` block; device types already set so are left alone."""
        cache_enabled = torch.is_autocast_cache_enabled()
        differing = [
            torch.autocast(device_type, dtype=dtype, enabled=enabled, cache_enabled=self.cache_enabled)
            for device_type, (enabled, dtype) in self.settings.items()
            if torch.is_autocast_enabled(device_type) != enabled
            or (
                enabled
                and (torch.get_autocast_dtype(device_type) != dtype or cache_enabled != self.cache_enabled)
            )
        ]
        if not differing:
            return _UNCHANGED
        stack = contextlib.ExitStack()
        for autocast in differing:
            autocast.__enter__()
            stack.callback(autocast.__exit__, None, None, None)
        return stack


_UNCHANGED = contextlib.nullcontext()
