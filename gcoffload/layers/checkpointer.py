"""The per-layer checkpoint function gcoffload installs: the selective rule, the autopilot, the checkpoint."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from ..autopilot.autopilot import Autopilot
from ..checkpointing import dispatch
from ..checkpointing.layer_call import LayerCall, resolve_module
from ..checkpointing.options import OffloadOptions
from ..swapping import run_swapped
from .rule import gradients_flow_through, training

__all__ = ["LAYER_MODES", "LayerCheckpointer", "check_modes"]

# What a layer the selective rule picks does: checkpointed (its input offloaded as the options say),
# swapped (not recomputed; its saved activations parked in host memory) or kept (all saved on the device).
LAYER_MODES = ("checkpoint", "swap", "keep")


def check_modes(modes: Sequence[str]) -> None:
    """Raises ValueError, naming the modes there are, if one of ``modes`` is not in :data:`LAYER_MODES`."""
    unknown = sorted({str(mode) for mode in modes} - set(LAYER_MODES))
    if unknown:
        raise ValueError(f"mode must be one of {list(LAYER_MODES)} (or one per layer), got {unknown}")


class LayerCheckpointer:
    """Decides, per layer call, whether to checkpoint it and how, and runs it.

    Called like ``torch.utils.checkpoint.checkpoint(function, *args, **kwargs)``
    (this is what transformers stores as ``_gradient_checkpointing_func``), or
    with the module known, through :meth:`run`.

    Args:
        options: how the checkpointed inputs are kept (offload, prefetch, window).
        only_trainable: apply the selective rule (:mod:`gcoffload.layers.rule`);
            False checkpoints every layer that runs with grad in training mode.
        every_n_layers: checkpoint only layers whose index is a multiple of this;
            the others keep their activations.
        use_reentrant: the autograd-Function path (True) or the saved-tensor
            hooks around ``torch.utils.checkpoint(use_reentrant=False)``.
        layer_indices: the position of each layer in its stack, for
            ``every_n_layers`` and the autopilot.
        autopilot: picks keep, checkpoint, offload or swap for each indexed
            layer (then ``options`` only give the prefetch depth and threshold).
        modes: what each indexed layer the rule picks does, one of
            :data:`LAYER_MODES` per index (None: all ``checkpoint``).

    Attributes:
        checkpoint: runs a call checkpointed with the options given, on this
            checkpointer's path (:func:`gcoffload.checkpointing.dispatch.path`).

    Raises:
        TypeError: ``options`` is not an OffloadOptions, or a flag not a bool.
        ValueError: ``every_n_layers`` is not a positive int, or is combined with
            an autopilot, as are ``modes``; or a mode is unknown.
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
        modes: Sequence[str] | None = None,
    ) -> None:
        if not isinstance(options, OffloadOptions):
            raise TypeError(f"LayerCheckpointer: options must be a gcoffload.OffloadOptions, got {options!r}")
        if not isinstance(every_n_layers, int) or isinstance(every_n_layers, bool) or every_n_layers < 1:
            raise ValueError(f"every_n_layers must be a positive int, got {every_n_layers!r}")
        if autopilot is not None and every_n_layers != 1:
            raise ValueError(
                "every_n_layers and memory_budget cannot be combined: the autopilot picks which layers "
                "keep their activations; leave every_n_layers at 1"
            )
        if modes is not None:
            if autopilot is not None:
                raise ValueError("modes and memory_budget cannot be combined: the autopilot picks the modes")
            check_modes(modes)
        if autopilot is not None and not isinstance(autopilot, Autopilot):
            raise TypeError(
                f"LayerCheckpointer: autopilot must be a gcoffload Autopilot or None, got {autopilot!r}"
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
        self.modes = tuple(modes) if modes is not None else None
        self.checkpoint = dispatch.path(use_reentrant)

    def __call__(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return self.run(resolve_module(function), function, args, kwargs)

    def run(self, module: nn.Module | None, function: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        """Calls ``function(*args, **kwargs)``, the layer ``module``, checkpointed or not."""
        if not training(module):
            return function(*args, **kwargs)
        index = self.layer_indices.get(module)
        call = LayerCall(function, args, kwargs, module=module, index=index)
        checkpointed = (index is None or index % self.every_n_layers == 0) and gradients_flow_through(
            call, self.only_trainable
        )
        if self.autopilot is not None and index is not None and call.hidden is not None:
            return self.autopilot.run(call, checkpointed, self.checkpoint)
        if not checkpointed:
            return dispatch.run_plainly(call)
        mode = self.modes[index] if self.modes is not None and index is not None else "checkpoint"
        if mode == "swap":
            return run_swapped(call, self.options)
        if mode == "keep":
            return dispatch.run_plainly(call)
        return self.checkpoint(call, self.options)

    def __repr__(self) -> str:
        return (
            f"LayerCheckpointer({self.options}, only_trainable={self.only_trainable}, "
            f"every_n_layers={self.every_n_layers}, use_reentrant={self.use_reentrant}, "
            f"autopilot={self.autopilot}, modes={self.modes})"
        )
