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
import functools
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import nonreentrant
from .saved_input import DEFAULT_MIN_OFFLOAD_BYTES, OffloadOptions, SavedInput, save

__all__ = ["checkpoint", "reentrant_checkpoint"]


def checkpoint(
    function: Callable[..., Any],
    *args: Any,
    use_reentrant: bool | None = None,
    preserve_rng_state: bool = True,
    context_fn: Callable[[], tuple[Any, Any]] | None = None,
    determinism_check: str = "default",
    debug: bool = False,
    offload: bool = True,
    prefetch_depth: int = 1,
    keep_resident: int = 1,
    min_offload_bytes: int = DEFAULT_MIN_OFFLOAD_BYTES,
    **kwargs: Any,
) -> Any:
    """Checkpoints ``function(*args, **kwargs)`` and parks its input in host memory.

    Installable wherever ``torch.utils.checkpoint.checkpoint`` is: it takes that
    function's keywords. ``preserve_rng_state`` is honoured; ``use_reentrant=False``
    selects the saved-tensor-hooks path (:mod:`gcoffload.nonreentrant`), which
    DDP without ``static_graph`` and FSDP2 need, and there ``context_fn``,
    ``determinism_check`` and ``debug`` reach torch; the reentrant path (the
    default) ignores them.

    Args:
        function: the layer, e.g. a bound ``module.__call__``. A
            ``functools.partial`` is unpacked so that tensors among its
            keywords receive gradients too.
        *args: positional arguments; the first tensor among them is the
            hidden states ``(batch, seq, hidden)`` and is the one offloaded.
        offload, prefetch_depth, keep_resident, min_offload_bytes: see
            :class:`OffloadOptions`.
        **kwargs: keyword arguments for ``function``.

    Returns:
        What ``function`` returns: a tensor or a tuple (tensors, None and other
        objects mixed).

    Raises:
        ValueError: an option is out of range.
        RuntimeError: backward through this call runs after its saved input was
            released, or through ``torch.autograd.grad`` on the reentrant path.
    """
    options = OffloadOptions(offload, prefetch_depth, keep_resident, min_offload_bytes)
    if not callable(function):
        raise TypeError(f"checkpoint: function must be callable, got {type(function).__name__}")
    if not torch.is_grad_enabled():
        return function(*args, **kwargs)
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
        )
    return reentrant_checkpoint(function, args, kwargs, options, preserve_rng_state=preserve_rng_state)


def reentrant_checkpoint(
    function: Callable[..., Any],
    args: Sequence[Any],
    kwargs: dict[str, Any],
    options: OffloadOptions,
    *,
    preserve_rng_state: bool = True,
) -> Any:
    """The reentrant path of :func:`checkpoint`, with validated options."""
    function, args, kwargs = unwrap_partial(function, args, kwargs)
    leaves: list[torch.Tensor] = []
    structure = flatten_arguments((args, kwargs), leaves)
    if not any(leaf.requires_grad for leaf in leaves):
        warnings.warn(
            "gcoffload.checkpoint: no tensor argument requires grad, so the function runs without "
            "checkpointing (parameters it uses still get gradients). Make the input require grad "
            "to checkpoint it; gcoffload.wrap_layers and patch_model do so for trainable layers.",
            stacklevel=3,
        )
        return function(*args, **kwargs)
    hidden_index = 0 if _count_leaves(structure[1][0]) > 0 else None
    call = _Call(function, structure, hidden_index, options, preserve_rng_state)
    packer = _InputPacker()
    try:
        with torch.autograd.graph.saved_tensors_hooks(packer.pack, _unpack):
            return _OffloadedCheckpoint.apply(call, packer, *leaves)
    finally:
        packer.clear()


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


@dataclass(frozen=True)
class _Call:
    function: Callable[..., Any]
    structure: Any
    hidden_index: int | None
    options: OffloadOptions
    preserve_rng_state: bool


class _InputPacker:
    """Hands the SavedInput to autograd in place of the hidden-states tensor.

    See Note [Who owns a SavedInput] in saved_input.py.
    """

    def __init__(self) -> None:
        self.hidden: torch.Tensor | None = None
        self.saved: SavedInput | None = None

    def pack(self, tensor: torch.Tensor) -> Any:
        return self.saved if tensor is self.hidden and self.saved is not None else tensor

    def clear(self) -> None:
        self.hidden = self.saved = None


def _unpack(packed: Any) -> torch.Tensor:
    return packed.unpack() if isinstance(packed, SavedInput) else packed


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
            saved = save(hidden, call.options)
            packer.hidden, packer.saved = hidden, saved
            ctx.saved_input = weakref.ref(saved)
        try:
            with torch.no_grad():
                args, kwargs = _unflatten(call.structure, iter(leaves))
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
        ctx.save_for_backward(*leaves)
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
        needs_grad = ctx.needs_input_grad[2:]
        inputs = [leaf.detach().requires_grad_(needs) for leaf, needs in zip(leaves, needs_grad, strict=True)]
        try:
            with contextlib.ExitStack() as stack:
                if ctx.rng is not None:
                    stack.enter_context(ctx.rng.restored())
                stack.enter_context(ctx.autocast.restored())
                stack.enter_context(torch.enable_grad())
                args, kwargs = _unflatten(call.structure, iter(inputs))
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
        return (None, None, *grads)


class _RngState:
    """CPU and device RNG states at forward time, restored for the recompute."""

    def __init__(self, cpu: torch.Tensor, device_type: str, devices: dict[int, torch.Tensor]) -> None:
        self.cpu = cpu
        self.device_type = device_type
        self.devices = devices

    @classmethod
    def capture(cls, tensors: Sequence[torch.Tensor]) -> _RngState:
        accelerators = {tensor.device for tensor in tensors if tensor.device.type not in ("cpu", "meta")}
        device_type = next(iter(accelerators)).type if accelerators else "cuda"
        module = torch.get_device_module(device_type) if accelerators else None
        devices = {
            device.index: module.get_rng_state(device.index)
            for device in accelerators
            if device.type == device_type
        }
        return cls(torch.get_rng_state(), device_type, devices)

    @contextlib.contextmanager
    def restored(self) -> Iterator[None]:
        with torch.random.fork_rng(devices=list(self.devices), device_type=self.device_type):
            torch.set_rng_state(self.cpu)
            if self.devices:
                module = torch.get_device_module(self.device_type)
                for index, state in self.devices.items():
                    module.set_rng_state(state, index)
            yield


class _AutocastState:
    """Autocast settings of the forward pass, for the device and the CPU."""

    def __init__(self, settings: dict[str, tuple[bool, torch.dtype]], cache_enabled: bool) -> None:
        self.settings = settings
        self.cache_enabled = cache_enabled

    @classmethod
    def capture(cls, tensors: Sequence[torch.Tensor]) -> _AutocastState:
        device_types = {tensor.device.type for tensor in tensors if tensor.device.type != "meta"} | {"cpu"}
        settings = {
            device_type: (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
            for device_type in device_types
        }
        return cls(settings, torch.is_autocast_cache_enabled())

    @contextlib.contextmanager
    def restored(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for device_type, (enabled, dtype) in self.settings.items():
                stack.enter_context(
                    torch.autocast(
                        device_type, dtype=dtype, enabled=enabled, cache_enabled=self.cache_enabled
                    )
                )
            yield


# Arguments are flattened so that every tensor, also inside tuples, lists and
# dicts (Llama's `position_embeddings=(cos, sin)`), is an input of the autograd
# Function and can receive a gradient. Other containers are left whole: a KV
# cache object must stay the same object in the recompute.
_LEAF = object()


def flatten_arguments(value: Any, leaves: list[torch.Tensor]) -> Any:
    """Appends the tensors in ``value`` to ``leaves``; returns the structure to rebuild it."""
    if isinstance(value, torch.Tensor):
        leaves.append(value)
        return _LEAF
    if type(value) in (tuple, list):
        return (type(value), [flatten_arguments(item, leaves) for item in value])
    if type(value) is dict:
        return (dict, {key: flatten_arguments(item, leaves) for key, item in value.items()})
    return ("constant", value)


def _unflatten(structure: Any, leaves: Iterator[torch.Tensor]) -> Any:
    if structure is _LEAF:
        return next(leaves)
    kind, content = structure
    if kind == "constant":
        return content
    if kind is dict:
        return {key: _unflatten(item, leaves) for key, item in content.items()}
    return kind(_unflatten(item, leaves) for item in content)


def _count_leaves(structure: Any) -> int:
    if structure is _LEAF:
        return 1
    kind, content = structure
    if kind == "constant":
        return 0
    items = content.values() if kind is dict else content
    return sum(_count_leaves(item) for item in items)
