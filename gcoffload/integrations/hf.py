"""HuggingFace integration: one call makes a transformers model, PEFT and the Trainer use gcoffload.

:func:`patch_model` installs a :class:`~gcoffload.policy.LayerCheckpointer` as
the model's per-layer checkpoint function and replaces, on the instance, the
entry points everything else goes through: ``gradient_checkpointing_enable``
(transformers <= 5.22, PEFT, LLaMA-Factory) and ``activation_checkpointing_enable``
(5.23+, the Trainer). :func:`unpatch_model` puts the model back as it was.
:func:`prepare_model_for_training` is a drop-in for LLaMA-Factory's function of
the same name.

Supported: transformers 4.46 to 5.x. Nothing here imports transformers at
module level; a model is recognised by what it has.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import inspect
import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from ..autopilot.autopilot import Autopilot
from ..autopilot.planner import Plan
from ..checkpointing.dispatch import checkpoint_with
from ..checkpointing.options import OffloadOptions
from ..layers.checkpointer import LayerCheckpointer

__all__ = [
    "decoder_layers",
    "offloaded_checkpoint_function",
    "patch_model",
    "prepare_model_for_training",
    "unpatch_model",
]

logger = logging.getLogger(__name__)

_PATCH_ATTRIBUTE = "_gcoffload_patch"
_PLAN_ATTRIBUTE = "gcoffload_plan"


class _Unset(enum.Enum):
    """An attribute the model did not have (an enum member: it survives pickling as itself)."""

    TOKEN = 0


_NOT_SET = _Unset.TOKEN
# transformers names the forward hook that makes embedding outputs require grad like this in every version.
_INPUT_GRADS_HOOK_NAME = "make_inputs_require_grads"
_LAYERNORM_NAMES = ("norm", "ln")
# What transformers' _set_gradient_checkpointing sets on each module.
_CHECKPOINTING_ATTRIBUTES = ("gradient_checkpointing", "_gradient_checkpointing_func")


@dataclass
class _Patch:
    """What patch_model changed on a model, to apply calls and to undo them."""

    options: OffloadOptions
    only_trainable: bool
    use_reentrant: bool
    every_n_layers: int
    layer_indices: dict[nn.Module, int]
    replaced: dict[str, Any]  # entry point -> previous instance attribute, or _NOT_SET
    checkpointing_before: dict[nn.Module, tuple[Any, Any]]  # module -> instance (flag, function) or _NOT_SET
    input_grads_requested: bool = False
    autopilot: Autopilot | None = None


def patch_model(
    model: nn.Module,
    options: OffloadOptions | None = None,
    *,
    only_trainable: bool = True,
    use_reentrant: bool = False,
    every_n_layers: int = 1,
    memory_budget: object = None,
) -> nn.Module:
    """Makes ``model`` checkpoint its layers through gcoffload, now and whenever asked again.

    Enables gradient checkpointing with gcoffload's checkpoint function. The
    config is left as it was (transformers turns the KV cache off itself while
    checkpointing layers in training), so ``save_pretrained`` writes the
    model's own settings. Later calls of
    ``gradient_checkpointing_enable`` / ``activation_checkpointing_enable`` (by
    the Trainer, PEFT or you) land in gcoffload with these options. Their
    ``gradient_checkpointing_kwargs`` may pick ``use_reentrant``; their
    ``every_n_layers`` (if not 1) and ``offload=True`` apply as well. While
    patched, ``enable_input_require_grads`` is a no-op: the selective rule
    makes exactly the inputs that need it require grad.

    A patched model pickles (``torch.save``, ``pickle``) and deep-copies; the
    copy comes back patched, with the same options and plans (a profile step
    in progress starts afresh). :func:`unpatch_model` restores the model.

    Args:
        model: a transformers ``PreTrainedModel``, a PEFT ``PeftModel``, or any
            module containing one. A model PEFT wraps later stays patched.
        options: how checkpointed layer inputs are kept (default
            ``OffloadOptions()``: offloaded to pinned host memory);
            ``OffloadOptions(offload=False)`` is plain checkpointing.
        only_trainable: skip layers gradients do not flow through.
        use_reentrant: True for the autograd-Function path; the default, False,
            is the saved-tensor hooks around torch's non-reentrant checkpoint,
            which also works under DDP without ``static_graph``, FSDP2 and
            ``torch.autograd.grad``. A ``use_reentrant`` the Trainer or PEFT
            passes in ``gradient_checkpointing_kwargs`` wins.
        every_n_layers: checkpoint layers ``0, n, 2n, ...`` only.
        memory_budget: turns on the autopilot (see :func:`gcoffload.wrap_layers`):
            per decoder layer, keep, swap, checkpoint or offload, for the fastest
            step whose activations fit the budget (bytes, ``"20GiB"``, a
            fraction of device memory, or ``"auto"``: free device memory minus
            10% and the model's gradients still to come, read at every
            pass). The plan in force is
            ``model.gcoffload_plan``; each new plan is logged once (logger
            ``gcoffload.autopilot``, level INFO). Not with ``every_n_layers``.

    Returns:
        ``model`` itself.

    Raises:
        TypeError: no transformers model inside ``model``, or ``options`` is
            not an OffloadOptions.
        ValueError: the model does not support gradient checkpointing, or an
            option is out of range.
    """
    options = OffloadOptions() if options is None else options
    if not isinstance(options, OffloadOptions):
        raise TypeError(f"patch_model: options must be a gcoffload.OffloadOptions or None, got {options!r}")
    base = _pretrained_model(model)
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(base).__name__} does not support gradient checkpointing")
    if "value" in inspect.signature(base._set_gradient_checkpointing).parameters:
        raise ValueError(
            f"{type(base).__name__} uses the checkpointing format of transformers < 4.35 "
            "(`_set_gradient_checkpointing(module, value)`), which cannot take a checkpoint function"
        )
    layers = decoder_layers(base)
    autopilot = (
        Autopilot(
            memory_budget,
            options,
            len(layers),
            on_plan=functools.partial(_show_plan, base),
            parameters=base.parameters,
        )
        if memory_budget is not None
        else None
    )
    # Validates the remaining options before anything on the model changes.
    LayerCheckpointer(
        options,
        only_trainable=only_trainable,
        every_n_layers=every_n_layers,
        use_reentrant=use_reentrant,
        autopilot=autopilot,
    )
    if hasattr(base, _PATCH_ATTRIBUTE):
        unpatch_model(base)

    patch = _Patch(
        options=options,
        only_trainable=only_trainable,
        use_reentrant=use_reentrant,
        every_n_layers=every_n_layers,
        layer_indices={layer: index for index, layer in enumerate(layers)},
        replaced={},
        checkpointing_before={
            module: tuple(module.__dict__.get(name, _NOT_SET) for name in _CHECKPOINTING_ATTRIBUTES)
            for module in base.modules()
            if hasattr(module, "gradient_checkpointing")
        },
        input_grads_requested=_input_grads_hook_active(base),
        autopilot=autopilot,
    )
    if patch.input_grads_requested:
        base.disable_input_require_grads()
    setattr(base, _PATCH_ATTRIBUTE, patch)
    base.__dict__[_PLAN_ATTRIBUTE] = None
    for name, replacement in (
        ("gradient_checkpointing_enable", _gradient_checkpointing_enable),
        ("activation_checkpointing_enable", _activation_checkpointing_enable),
        ("enable_input_require_grads", _enable_input_require_grads),
    ):
        if hasattr(type(base), name):
            patch.replaced[name] = base.__dict__.get(name, _NOT_SET)
            # A partial of a module-level function pickles by reference; a bound method would not.
            setattr(base, name, functools.partial(replacement, base))
    _enable(base, patch, {})
    return model


def unpatch_model(model: nn.Module) -> nn.Module:
    """Restores the entry points and the checkpointing state from before :func:`patch_model`.

    Raises:
        ValueError: ``model`` was not patched.
    """
    base = _pretrained_model(model)
    patch: _Patch | None = base.__dict__.get(_PATCH_ATTRIBUTE)
    if patch is None:
        raise ValueError(f"{type(base).__name__} is not patched by gcoffload")
    for name, previous in patch.replaced.items():
        if previous is _NOT_SET:
            delattr(base, name)
        else:
            setattr(base, name, previous)
    for module, values in patch.checkpointing_before.items():
        for name, value in zip(_CHECKPOINTING_ATTRIBUTES, values, strict=True):
            if value is _NOT_SET:
                module.__dict__.pop(name, None)
            else:
                setattr(module, name, value)
    delattr(base, _PATCH_ATTRIBUTE)
    base.__dict__.pop(_PLAN_ATTRIBUTE, None)
    if patch.input_grads_requested:
        base.enable_input_require_grads()
    return model


def _gradient_checkpointing_enable(
    self: nn.Module, gradient_checkpointing_kwargs: dict[str, Any] | None = None, **kwargs: Any
) -> None:
    """gcoffload's gradient checkpointing (installed by ``gcoffload.patch_model``)."""
    _enable(self, self.__dict__[_PATCH_ATTRIBUTE], {**(gradient_checkpointing_kwargs or {}), **kwargs})


def _activation_checkpointing_enable(
    self: nn.Module,
    activation_checkpointing_kwargs: dict[str, Any] | None = None,
    every_n_layers: int = 1,
    offload: bool = False,
) -> None:
    """gcoffload's activation checkpointing (installed by ``gcoffload.patch_model``)."""
    request = {
        **(activation_checkpointing_kwargs or {}),
        "every_n_layers": every_n_layers,
        "offload": offload,
    }
    _enable(self, self.__dict__[_PATCH_ATTRIBUTE], request)


def _enable_input_require_grads(self: nn.Module) -> None:
    """A no-op while gcoffload is installed: its selective rule sets requires_grad where needed.

    The request is remembered, and honoured by ``gcoffload.unpatch_model``.
    """
    self.__dict__[_PATCH_ATTRIBUTE].input_grads_requested = True


def _enable(base: nn.Module, patch: _Patch, request: dict[str, Any]) -> None:
    use_reentrant = request.get("use_reentrant", patch.use_reentrant)
    if use_reentrant and _fsdp2_enabled():
        warnings.warn(
            "gcoffload: FSDP2 is enabled (ACCELERATE_USE_FSDP=true, FSDP_VERSION=2), which the reentrant "
            "checkpoint does not support; using the non-reentrant path.",
            stacklevel=3,
        )
        use_reentrant = False
    every_n_layers = request.get("every_n_layers", 1)
    options = patch.options
    if request.get("offload") and not options.offload:
        options = dataclasses.replace(options, offload=True)
    checkpointer = LayerCheckpointer(
        options,
        only_trainable=patch.only_trainable,
        every_n_layers=every_n_layers if every_n_layers != 1 else patch.every_n_layers,
        use_reentrant=bool(use_reentrant),
        layer_indices=patch.layer_indices,
        autopilot=patch.autopilot,
    )
    base._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=checkpointer)


def _show_plan(base: nn.Module, plan: Plan) -> None:
    base.__dict__[_PLAN_ATTRIBUTE] = plan


def offloaded_checkpoint_function(
    options: OffloadOptions | None = None, *, use_reentrant: bool = True
) -> Callable[..., Any]:
    """gcoffload's checkpoint with options bound, for any place that takes a checkpoint function.

    The counterpart of LLaMA-Factory's ``get_unsloth_gradient_checkpointing_func``:
    ``model._set_gradient_checkpointing(gradient_checkpointing_func=offloaded_checkpoint_function())``.
    Combine with :func:`gcoffload.layers.selective_checkpoint_function` for the
    selective rule. The result is ``functools.partial(gcoffload.checkpoint_with,
    options, use_reentrant=use_reentrant)``: a ``use_reentrant`` its caller
    passes wins, and every other keyword besides torch's checkpoint keywords
    reaches the layer.

    Args:
        options: how checkpointed inputs are kept (default ``OffloadOptions()``).
        use_reentrant: the path when the caller does not name one (default: the
            reentrant one, like the function it replaces).

    Raises:
        TypeError: ``options`` is not an OffloadOptions, or ``use_reentrant`` not a bool.
    """
    options = OffloadOptions() if options is None else options
    if not isinstance(options, OffloadOptions):
        raise TypeError(f"offloaded_checkpoint_function: options must be an OffloadOptions, got {options!r}")
    if not isinstance(use_reentrant, bool):
        raise TypeError(f"offloaded_checkpoint_function: use_reentrant must be a bool, got {use_reentrant!r}")
    return functools.partial(checkpoint_with, options, use_reentrant=use_reentrant)


@dataclass
class TrainingSettings:
    """The fields of LLaMA-Factory's ``ModelArguments`` that prepare_model_for_training reads."""

    upcast_layernorm: bool = False
    disable_gradient_checkpointing: bool = False
    use_unsloth_gc: bool = False  # here: offload checkpointed inputs through gcoffload
    use_reentrant_gc: bool = True
    upcast_lmhead_output: bool = False

    @classmethod
    def from_arguments(cls, model_args: Any, overrides: dict[str, Any]) -> TrainingSettings:
        names = {item.name for item in fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(
                f"prepare_model_for_training: unknown settings {unknown}; expected some of {sorted(names)}"
            )
        values = {name: getattr(model_args, name) for name in names if hasattr(model_args, name)}
        return cls(**{**values, **overrides})


def prepare_model_for_training(
    model: nn.Module,
    model_args: Any = None,
    *,
    options: OffloadOptions | None = None,
    memory_budget: object = None,
    **overrides: Any,
) -> nn.Module:
    """A drop-in for LLaMA-Factory's ``prepare_model_for_training``, with gcoffload's checkpointing.

    Args:
        model: a transformers model (or a module containing one).
        model_args: any object with some of ``upcast_layernorm``,
            ``disable_gradient_checkpointing``, ``use_unsloth_gc`` (here: offload
            to host memory), ``use_reentrant_gc``, ``upcast_lmhead_output``.
            Missing fields take LLaMA-Factory's defaults.
        options: how the patched model keeps checkpointed inputs. Default:
            ``OffloadOptions(offload=use_unsloth_gc)``; given, they are used as
            they are, ``offload`` included.
        memory_budget: turns on the autopilot (see :func:`patch_model`); with
            ``use_unsloth_gc`` false it keeps or checkpoints, never offloads.
        **overrides: the same settings as keywords; they win over ``model_args``.

    Does, in order: casts 1-D norm weights to float32 (``upcast_layernorm``);
    unless ``disable_gradient_checkpointing``, :func:`patch_model` with the
    selective rule (which switches to the non-reentrant path under FSDP2, with a
    warning, on every enable); casts the output embedding's output to
    float32 (``upcast_lmhead_output``).

    Returns:
        ``model`` itself.
    """
    settings = TrainingSettings.from_arguments(model_args, overrides)
    base = _pretrained_model(model)

    if settings.upcast_layernorm:
        for name, parameter in base.named_parameters():
            if parameter.ndim == 1 and any(part in name for part in _LAYERNORM_NAMES):
                parameter.data = parameter.data.to(torch.float32)
        logger.info("gcoffload: upcast layernorm weights to float32")

    if not settings.disable_gradient_checkpointing:
        if getattr(base, "supports_gradient_checkpointing", False):
            options = OffloadOptions(offload=settings.use_unsloth_gc) if options is None else options
            patch_model(model, options, use_reentrant=settings.use_reentrant_gc, memory_budget=memory_budget)
            logger.info("gcoffload: gradient checkpointing enabled (offload=%s)", options.offload)
        else:
            warnings.warn(f"{type(base).__name__} does not support gradient checkpointing.", stacklevel=2)

    if settings.upcast_lmhead_output:
        output_layer = base.get_output_embeddings()
        if isinstance(output_layer, nn.Linear) and output_layer.weight.dtype != torch.float32:
            output_layer.register_forward_hook(_output_to_float32)
            logger.info("gcoffload: upcast lm_head outputs to float32")
    return model


def _output_to_float32(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output.to(torch.float32)


def _pretrained_model(model: nn.Module) -> nn.Module:
    """The outermost transformers model in ``model`` (itself, or the one a PEFT wrapper holds).

    Looked up on the class: a PEFT wrapper forwards unknown attributes to the
    model it wraps, so it seems to have them all.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    for module in model.modules():
        if hasattr(type(module), "_set_gradient_checkpointing") and hasattr(module, "config"):
            return module
    raise TypeError(f"no transformers PreTrainedModel found in {type(model).__name__}")


def decoder_layers(base: nn.Module) -> list[nn.Module]:
    """The repeated blocks, in forward order: transformers' GradientCheckpointingLayer
    instances where it has them (4.52+), else the longest ModuleList."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer

        layers = [module for module in base.modules() if isinstance(module, GradientCheckpointingLayer)]
    except ImportError:  # transformers < 4.52
        layers = []
    if layers:
        return layers
    lists = [module for module in base.modules() if isinstance(module, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def _input_grads_hook_active(base: nn.Module) -> bool:
    embeddings = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    hooks = getattr(embeddings, "_forward_hooks", {})
    return any(getattr(hook, "__name__", "") == _INPUT_GRADS_HOOK_NAME for hook in hooks.values())


def _fsdp2_enabled() -> bool:
    return (
        os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
        and os.environ.get("FSDP_VERSION", "1") == "2"
    )
