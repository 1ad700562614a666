"""Checkpointing and offloading for any stack of PyTorch layers."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from torch import nn

from ..autopilot.autopilot import Autopilot
from ..autopilot.planner import Plan
from ..checkpointing.options import OffloadOptions
from .checkpointer import LayerCheckpointer, check_modes

__all__ = ["WrappedLayers", "wrap_layers"]

_NO_INSTANCE_FORWARD = object()


class _CheckpointedForward:
    """Installed as ``layer.forward``; calls the layer's own forward through the checkpointer."""

    def __init__(self, module: nn.Module, inner: Callable[..., Any], checkpointer: LayerCheckpointer) -> None:
        self.module = module
        self.inner = inner
        self.checkpointer = checkpointer

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.checkpointer.run(self.module, self.inner, args, kwargs)


class WrappedLayers:
    """The layers :func:`wrap_layers` changed; ``unwrap()`` (or leaving a ``with`` block) restores them."""

    def __init__(self, layers: list[nn.Module], previous: list[Any], checkpointer: LayerCheckpointer) -> None:
        self.layers = layers
        self.checkpointer = checkpointer
        self._previous = previous

    @property
    def autopilot(self) -> Autopilot | None:
        """The memory-budget autopilot, if ``memory_budget`` was given."""
        return self.checkpointer.autopilot

    @property
    def plan(self) -> Plan | None:
        """The autopilot's plan for the last forward pass (None without one, or before the first)."""
        autopilot = self.checkpointer.autopilot
        return autopilot.plan_in_force if autopilot is not None else None

    def unwrap(self) -> None:
        """Restores each layer's forward; calling it again does nothing."""
        for layer, previous in zip(self.layers, self._previous, strict=True):
            if isinstance(layer.__dict__.get("forward"), _CheckpointedForward):
                if previous is _NO_INSTANCE_FORWARD:
                    del layer.forward
                else:
                    layer.forward = previous
        self.layers, self._previous = [], []

    def __enter__(self) -> WrappedLayers:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.unwrap()

    def __repr__(self) -> str:
        return f"WrappedLayers({len(self.layers)} layers, {self.checkpointer})"


def wrap_layers(
    layers: Iterable[nn.Module],
    options: OffloadOptions | None = None,
    *,
    only_trainable: bool = True,
    every_n_layers: int = 1,
    use_reentrant: bool = False,
    memory_budget: object = None,
    mode: str | Sequence[str] = "checkpoint",
) -> WrappedLayers:
    """Makes each layer checkpoint itself, with its input parked in host memory (or swap its activations).

    Afterwards the layers are called as usual. In training mode with grad
    enabled, each call goes through the selective rule (see
    :mod:`gcoffload.layers.rule`) and, if checkpointed, through
    :func:`gcoffload.checkpoint`; in eval mode or under ``no_grad`` the layers
    run plainly. The layers' module hooks stay outside the checkpoint.

    Args:
        layers: an ``nn.ModuleList``, ``nn.Sequential`` or any iterable of
            modules, in forward order. Each takes the hidden states
            ``(batch, seq, hidden)`` as its first positional argument.
        options: how checkpointed inputs are kept (default ``OffloadOptions()``:
            offloaded, one prefetched ahead, the last one resident, 1 MiB and
            up); ``OffloadOptions(offload=False)`` is plain checkpointing.
        only_trainable: apply the selective rule; False checkpoints every layer.
        every_n_layers: checkpoint layers ``0, n, 2n, ...`` only.
        use_reentrant: autograd-Function path (True) or saved-tensor hooks (False, the default).
        memory_budget: turns on the autopilot, which picks per layer whether
            to keep its activations, swap them, checkpoint it, or checkpoint
            and offload its input, for the fastest step whose activations fit: bytes, a
            size such as ``"20GiB"``, a fraction of the device's memory such as
            ``0.5``, or ``"auto"`` (free device memory minus 10% and the
            stack's gradients still to come, read at every pass). The first
            step at each new input size is a profile step (see
            :mod:`gcoffload.autopilot.autopilot`); ``WrappedLayers.plan`` is the plan in
            force. Not with ``every_n_layers`` or ``mode``.
        mode: what each layer the selective rule picks does: ``"checkpoint"``
            (recomputed in backward, its input kept as ``options`` say),
            ``"swap"`` (not recomputed: everything it saves for backward
            travels to host memory during the following layers' forward and
            comes back ``prefetch_depth`` layers ahead, see
            :mod:`gcoffload.swapping`) or ``"keep"`` (not recomputed, all saved
            on the device); or one of these per layer.

    Returns:
        A :class:`WrappedLayers`; its ``unwrap()`` restores the layers.

    Raises:
        TypeError: ``layers`` is not an iterable of modules, or ``options`` not an OffloadOptions.
        ValueError: an option is out of range, a mode unknown or not one per
            layer, or a layer is already wrapped.

    Example:
        >>> wrapped = gcoffload.wrap_layers(model.blocks)
        >>> loss = model(batch).sum(); loss.backward()
        >>> wrapped.unwrap()
    """
    if isinstance(layers, nn.Module) and not isinstance(layers, (nn.ModuleList, nn.Sequential)):
        raise TypeError(
            f"layers must be an nn.ModuleList, nn.Sequential or iterable of modules, got "
            f"{type(layers).__name__}; to wrap a single layer pass [layer]"
        )
    try:
        modules = list(layers)
    except TypeError:
        raise TypeError(f"layers must be an iterable of nn.Module, got {type(layers).__name__}") from None
    for position, module in enumerate(modules):
        if not isinstance(module, nn.Module):
            raise TypeError(f"layers[{position}] must be an nn.Module, got {type(module).__name__}")
        if isinstance(module.__dict__.get("forward"), _CheckpointedForward):
            raise ValueError(f"layers[{position}] is already wrapped by gcoffload; unwrap it first")
    if len({id(module) for module in modules}) != len(modules):
        raise ValueError("layers contains the same module twice")

    if isinstance(mode, str):
        check_modes((mode,))
        modes = None if mode == "checkpoint" else (mode,) * len(modules)
    else:
        modes = tuple(mode)
        if len(modes) != len(modules):
            raise ValueError(f"mode: {len(modes)} modes given for {len(modules)} layers; give one per layer")
    options = OffloadOptions() if options is None else options
    if not isinstance(options, OffloadOptions):
        raise TypeError(f"wrap_layers: options must be a gcoffload.OffloadOptions or None, got {options!r}")
    autopilot = None
    if memory_budget is not None:
        stack = nn.ModuleList(modules)
        autopilot = Autopilot(memory_budget, options, len(modules), parameters=stack.parameters)
    checkpointer = LayerCheckpointer(
        options,
        only_trainable=only_trainable,
        every_n_layers=every_n_layers,
        use_reentrant=use_reentrant,
        layer_indices={module: index for index, module in enumerate(modules)},
        autopilot=autopilot,
        modes=modes,
    )
    previous = []
    for module in modules:
        previous.append(module.__dict__.get("forward", _NO_INSTANCE_FORWARD))
        module.forward = _CheckpointedForward(module, module.forward, checkpointer)
    return WrappedLayers(modules, previous, checkpointer)
