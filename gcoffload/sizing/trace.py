"""A transformers model built on the meta device and traced: what a training step saves, with no weights.

:class:`MetaModel` builds a model from its config on the meta device (no
weights, no memory, no GPU), with LoRA adapters if asked, and counts its
parameters, gradients and optimizer states. :meth:`MetaModel.trace` runs one
forward pass at a given batch and sequence length and returns a
:class:`ModelTrace`: the autopilot's own :class:`~gcoffload.autopilot.Profile`
of the decoder layers (measured by the same :class:`~gcoffload.autopilot.
profile_step.ProfileStep` a real profile step uses) and what the rest of the
model saves.

Note [Tracing on the meta device]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
A meta tensor has a shape, a dtype and a storage of known size, and no data;
every op runs its shape function only. Saved-tensor hooks fire as they do on a
GPU, so the storages autograd would hold are counted exactly (storages are told
apart by identity, not by address: every meta storage has address 0). These
things differ from a GPU step and are handled here:

* **Attention.** ``scaled_dot_product_attention`` on the meta device takes the
  math path, which saves the ``seq x seq`` score matrix. A GPU takes a fused
  kernel, which saves the query, key, value, output and a float32 log-sum-exp
  per query. The trace sends SDPA to the fused kernel torch has for the CPU
  (``_scaled_dot_product_flash_attention_for_cpu``, which saves exactly
  those; a real CPU step takes it too; a boolean mask becomes an additive one
  of the query's dtype, as SDPA makes it for every kernel), so
  ``attn="sdpa"`` and ``"flash"`` count what the fused kernels hold. ``"flash"`` also builds no mask, as
  FlashAttention needs none (a sliding window is a kernel argument there).
  ``"eager"`` runs transformers' eager attention as it is.
* **Time.** Nothing runs, so there is nothing to time: each layer's forward
  FLOPs are counted (torch's FlopCounterMode, with the fused attention counted
  as its two matmuls, halved when causal), and time is estimated from them.
* **Truth values.** A meta tensor has no data, and transformers reads two
  (whether the batch is packed, and whether SDPA may skip the causal mask);
  the trace reads each as True, which is what a batch of whole sequences (no
  padding, no packing) gives: the batch the planner counts.
  An op whose result depends on values (``nonzero``, ``item``: a mixture of
  experts routing tokens) stops the trace with an error: what it saves
  cannot be counted without data.
* **Autocast.** torch keeps no autocast state for the meta device, and
  transformers before 5.0 turns autocast off around its rotary tables for the
  tensors' device type: in the trace, ``torch.autocast`` reads ``"meta"`` as
  ``"cpu"`` (it is off there, so nothing else changes).
* **Device memory only.** A tensor a model makes on the CPU (Gemma's
  embedding scale, a 0-dim tensor) and saves is host memory: not counted.
* **What outlives the pass.** Tensor arguments the layers share (rotary
  tables, masks) count only if the pass made them: the trace drops its graph
  and looks which of them are still alive, as the profile step does at the
  next pass.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from ..autopilot.measure import storage_key
from ..autopilot.profile import CopyProfile, Profile
from ..autopilot.profile_step import ProfileStep
from ..checkpointing.layer_call import LayerCall, flatten_arguments
from ..checkpointing.options import OffloadOptions
from ..integrations.hf import decoder_layers

__all__ = ["ATTENTION", "MetaModel", "ModelTrace", "Weights"]

ATTENTION = ("sdpa", "eager", "flash")
_FLASH_TRACE = (
    "gcoffload_fused_trace"  # the trace's FlashAttention (no "flash" in it: transformers would import one)
)
_FUSED = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_NO_COPIES = CopyProfile(1.0, 1.0, 1.0, overlaps_compute=True, nbytes=0)  # the capacity model sets its own


@dataclass(frozen=True)
class Weights:
    """What the model holds whatever its activations: parameters, their gradients, AdamW's two states.

    Counted like accelerate's memory estimator counts them: each tensor in its
    own dtype (gradients and AdamW states take the dtype of their parameter,
    as ``torch.optim.AdamW`` allocates them; LoRA adapters are float32 under
    PEFT's defaults).
    """

    parameters: int
    trainable: int
    weight_bytes: int
    gradient_bytes: int
    optimizer_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.gradient_bytes + self.optimizer_bytes


@dataclass(frozen=True)
class ModelTrace:
    """One forward pass of the whole model at ``batch`` x ``seq`` tokens, traced on the meta device.

    Args:
        profile: the decoder layers as the autopilot profiles them, with no
            times (nothing ran: see ``layer_flops``).
        layer_flops: each decoder layer's forward FLOPs.
        other_flops: the forward FLOPs of everything else (embedding, head, loss).
        other_bytes: bytes of the storages saved outside the decoder layers,
            the stack's input and output and the layers' arguments aside.
        other_saves_stack_input, other_saves_stack_output: whether something
            outside the layers saves the first layer's input or the last
            layer's output (a final norm saves the latter in float32 models).
        largest_other_bytes: the largest of those storages (its gradient is
            the head's working set in backward).
        returned_bytes: the storages the step returns (loss, logits), which
            the caller holds until backward.
    """

    batch: int
    seq: int
    profile: Profile
    layer_flops: tuple[int, ...]
    other_flops: int
    other_bytes: int
    other_saves_stack_input: bool
    other_saves_stack_output: bool
    largest_other_bytes: int
    returned_bytes: int

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    @property
    def head_working_set_bytes(self) -> int:
        """The backward working set of the rest of the model: the gradients of its largest storage, twice."""
        return 2 * self.largest_other_bytes


class MetaModel:
    """A transformers causal LM built from ``config`` on the meta device.

    Args:
        config: a transformers ``PretrainedConfig``.
        dtype: the weights' dtype (activations follow it).
        attn: ``"sdpa"``, ``"eager"`` or ``"flash"`` (Note [Tracing on the meta device]).
        lora_rank: LoRA adapters of this rank on every linear layer but the
            head (PEFT's ``"all-linear"``); None for full fine-tuning.

    Raises:
        ValueError: ``attn`` or ``lora_rank`` is not one of those.
        ImportError: transformers (or, with ``lora_rank``, peft) is missing.
    """

    def __init__(self, config: Any, dtype: torch.dtype, attn: str = "sdpa", lora_rank: int | None = None):
        if attn not in ATTENTION:
            raise ValueError(f"attn must be one of {ATTENTION}, got {attn!r}")
        if lora_rank is not None and (
            not isinstance(lora_rank, int) or isinstance(lora_rank, bool) or lora_rank < 1
        ):
            raise ValueError(f"lora_rank must be a positive int (the LoRA rank) or None, got {lora_rank!r}")
        import transformers

        self.attn = attn
        self.dtype = dtype
        if attn == "flash":
            _register_flash_trace()
        implementation = _FLASH_TRACE if attn == "flash" else attn
        config = _training_config(config)
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(
                config, dtype=dtype, attn_implementation=implementation
            )
        if lora_rank is not None:
            model = _with_lora(model, lora_rank)
        model.train()
        self.module = model
        self.layers: list[nn.Module] = decoder_layers(model)
        if not self.layers:
            raise ValueError(f"no decoder layers found in {type(model).__name__}")

    def weights(self) -> Weights:
        """The parameters and, for the trainable ones, their gradients and AdamW states."""
        parameters = list(self.module.parameters())
        trainable = [parameter for parameter in parameters if parameter.requires_grad]

        def nbytes(tensors: list[torch.Tensor]) -> int:
            return sum(tensor.numel() * tensor.element_size() for tensor in tensors)

        return Weights(
            parameters=sum(parameter.numel() for parameter in parameters),
            trainable=sum(parameter.numel() for parameter in trainable),
            weight_bytes=nbytes(parameters),
            gradient_bytes=nbytes(trainable),
            optimizer_bytes=2 * nbytes(trainable),
        )

    def trace(self, batch: int, seq: int, options: OffloadOptions | None = None) -> ModelTrace:
        """One forward pass at ``batch`` x ``seq`` tokens (Note [Tracing on the meta device]).

        ``options`` decides which layer inputs could leave the device (``min_offload_bytes``).
        """
        options = options or OffloadOptions()
        ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
        step = ProfileStep(
            bucket=0,
            tokens=batch * seq,
            budget=0,
            layer_count=len(self.layers),
            min_offload_bytes=options.min_offload_bytes,
        )
        flops = FlopCounterMode(display=False, custom_mapping={_FUSED: _fused_attention_flops})
        recorder = _Recorder(self.module, flops, ids)
        try:
            with recorder.tracing(self.layers, step, options), _meta_autocast(), _AsOnAGpu(), flops:
                output = self.module(input_ids=ids, labels=ids)
        except _ReadsValues as error:
            raise ValueError(
                f"{type(self.module).__name__}'s forward pass reads tensor values ({error}), as a mixture of "
                "experts does to route tokens; a trace without data cannot count what it saves. gcoffload "
                "plan counts models whose saves depend on shapes alone"
            ) from None
        except RuntimeError as error:  # an op the meta device lacks, or a dtype a kernel refuses
            raise ValueError(
                f"tracing {type(self.module).__name__} in {self.dtype} on the meta device failed: {error}"
            ) from None
        returned = _storages(output)
        step.forward_profile(lambda layers: _NO_COPIES)
        stack_input, stack_output = recorder.stack_ends()
        arguments = {key for meter in recorder.meters for key in meter.arguments}
        others = {
            key: nbytes
            for key, nbytes in recorder.outside.items()
            if key not in arguments and key not in (stack_input, stack_output)
        }
        trace = dict(
            batch=batch,
            seq=seq,
            layer_flops=tuple(recorder.flops.get(index, 0) for index in range(len(self.layers))),
            other_flops=flops.get_total_flops() - sum(recorder.flops.values()),
            other_bytes=sum(others.values()),
            other_saves_stack_input=stack_input in recorder.outside,
            other_saves_stack_output=stack_output in recorder.outside,
            largest_other_bytes=max(others.values(), default=0),
            returned_bytes=sum(returned.values()),
        )
        recorder.clear()
        del output, returned
        gc.collect()  # the graph goes: arguments still alive now are the model's own
        profile = step.backward_profile(kept=-1)
        untimed = tuple(replace(layer, forward_seconds=0.0) for layer in profile.layers)
        return ModelTrace(profile=replace(profile, layers=untimed), **trace)


class _Recorder:
    """The trace's bookkeeping: every storage saved outside the layers, and each layer's FLOPs."""

    def __init__(self, model: nn.Module, counter: FlopCounterMode, batch: torch.Tensor) -> None:
        self.counter = counter
        owned = (*model.parameters(), *model.buffers(), batch)  # the model's, and the caller's
        self.excluded = {storage_key(tensor) for tensor in owned}
        self.outside: dict[int, int] = {}  # storage key -> bytes, saved outside the decoder layers
        self.flops: dict[int, int] = {}
        self.meters: list[Any] = []
        self._kept: list[torch.UntypedStorage] = []  # the recorded storages, alive until clear()
        self._layer: int | None = None

    @contextlib.contextmanager
    def tracing(self, layers: list[nn.Module], step: ProfileStep, options: OffloadOptions) -> Iterator[None]:
        for index, layer in enumerate(layers):
            layer.forward = functools.partial(self._run_layer, index, layer, layer.forward, step, options)
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack):
                yield
        finally:
            for layer in layers:
                del layer.forward

    def _run_layer(
        self,
        index: int,
        layer: nn.Module,
        forward: Callable[..., Any],
        step: ProfileStep,
        options: OffloadOptions,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        call = LayerCall(forward, args, kwargs, module=layer, index=index)
        hidden = call.hidden
        meter = step.meter(call, hidden is not None and options.offloads(hidden))
        self.meters.append(meter)
        self._layer = index
        before = self.counter.get_total_flops()
        try:
            output = meter.run(call.function, call.args, call.kwargs, passthrough=True)
        finally:
            self._layer = None
        self.flops[index] = self.counter.get_total_flops() - before
        step.ran(index)
        return output

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._layer is None and tensor.layout == torch.strided and tensor.is_meta:  # device memory only
            storage = tensor.untyped_storage()
            key = storage._cdata
            if key not in self.excluded and storage.nbytes() > 0:
                self.outside[key] = storage.nbytes()
                self._kept.append(storage)
        # Detached: a saved output holding its own grad_fn would keep the graph alive in a cycle.
        return tensor.detach()

    def stack_ends(self) -> tuple[int | None, int | None]:
        """Storage keys of the first layer's input and the last layer's output."""
        first = self.meters[0] if self.meters else None
        last = self.meters[-1] if self.meters else None
        return (first.hidden_key if first else None, last.output_key if last else None)

    def clear(self) -> None:
        self._kept.clear()
        self.meters.clear()


def _unpack(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _storages(value: Any) -> dict[int, int]:
    leaves: list[torch.Tensor] = []
    flatten_arguments(tuple(value.values()) if isinstance(value, dict) else value, leaves)
    return {
        storage_key(leaf): leaf.untyped_storage().nbytes() for leaf in leaves if leaf.layout == torch.strided
    }


class _AsOnAGpu(TorchFunctionMode):
    """Runs SDPA as the fused kernel, and reads a meta truth value as a batch of whole sequences gives it.

    See Note [Tracing on the meta device].
    """

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            return _fused_sdpa(*args, **kwargs)
        if func is torch.Tensor.__bool__ and args[0].is_meta:
            return True
        if (func in _DATA_DEPENDENT or (func is torch.where and len(args) == 1)) and args[0].is_meta:
            raise _ReadsValues(getattr(func, "__name__", str(func)))
        return func(*args, **kwargs)


class _MetaAutocast(torch.autocast):
    """``torch.autocast`` that reads ``device_type="meta"`` as ``"cpu"`` (torch has no meta autocast)."""

    def __init__(self, device_type: str, *args: Any, **kwargs: Any) -> None:
        super().__init__("cpu" if device_type == "meta" else device_type, *args, **kwargs)


@contextlib.contextmanager
def _meta_autocast() -> Iterator[None]:
    """transformers before 5.0 turns autocast off for rotary tables on the tensors' own device type."""
    autocast = torch.autocast
    torch.autocast = _MetaAutocast
    try:
        yield
    finally:
        torch.autocast = autocast


class _ReadsValues(Exception):
    """An op whose result depends on tensor values ran in the trace."""


_DATA_DEPENDENT = {
    torch.nonzero, torch.Tensor.nonzero, torch.argwhere, torch.Tensor.argwhere, torch.masked_select,
    torch.Tensor.masked_select, torch.unique, torch.Tensor.unique, torch.Tensor.item, torch.Tensor.tolist,
}  # fmt: skip


def _fused_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    # The fused kernel takes grouped keys and values as they are (what enable_gqa asks for), and, as
    # scaled_dot_product_attention gives every kernel, a boolean mask as an additive one of the query's dtype.
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=attn_mask.device).masked_fill_(
            attn_mask.logical_not(), float("-inf")
        )
    output, _ = _FUSED(query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)
    return output


def _fused_attention_flops(
    query: torch.Size, key: torch.Size, value: torch.Size, dropout_p: float = 0.0, is_causal: bool = False,
    *args: Any, out_shape: Any = None, **kwargs: Any,
) -> int:  # fmt: skip
    """Two matmuls (scores, then values), half of them skipped when causal."""
    *batch, heads, queries, head_dim = query
    keys, value_dim = key[-2], value[-1]
    flops = 2 * heads * queries * keys * (head_dim + value_dim)
    for size in batch:
        flops *= size
    return flops // 2 if is_causal else flops


def _flash_trace_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """FlashAttention's saves on the meta device: the fused kernel, causal, no mask."""
    output = _fused_sdpa(
        query, key, value, dropout_p=kwargs.get("dropout", 0.0), is_causal=True,
        scale=kwargs.get("scaling"), enable_gqa=True,
    )  # fmt: skip
    return output.transpose(1, 2).contiguous(), None


def _no_mask(*args: Any, **kwargs: Any) -> None:
    return None


@functools.cache
def _register_flash_trace() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(_FLASH_TRACE, _flash_trace_attention)
    AttentionMaskInterface.register(_FLASH_TRACE, _no_mask)


def _training_config(config: Any) -> Any:
    """A copy of ``config`` as a training step runs it: no KV cache."""
    config = copy.deepcopy(config)
    config.use_cache = False
    return config


def _with_lora(model: nn.Module, rank: int) -> nn.Module:
    try:
        import peft
    except ImportError:
        raise ImportError(
            "lora_rank: counting LoRA needs peft; install it (pip install 'gcoffload[hf]') "
            "or leave lora_rank out for full fine-tuning"
        ) from None
    lora = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear")
    return peft.get_peft_model(model, lora)
