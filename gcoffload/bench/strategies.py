"""The ways of keeping a layer stack's activations that the benchmarks compare."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

from ..checkpointing.options import OffloadOptions
from ..layers.wrap import wrap_layers
from .decoder import run_stack

Forward = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Strategy:
    """One way to run a stack.

    Attributes:
        name: short label used in tables and plots.
        description: one line for the report.
        activate: a context manager factory that yields the forward function.
        held_inputs: layer inputs predicted to stay on the device after the
            forward pass, given the number of layers (None: not predicted).
        engine: whether its copies go through gcoffload's engine (and trace).
    """

    name: str
    description: str
    activate: Callable[[nn.ModuleList], contextlib.AbstractContextManager[Forward]]
    held_inputs: Callable[[int], int] | None
    engine: bool = False


@contextlib.contextmanager
def _no_checkpointing(stack: nn.ModuleList) -> Iterator[Forward]:
    yield lambda hidden_states: run_stack(stack, hidden_states)


@contextlib.contextmanager
def _torch_checkpoint(stack: nn.ModuleList) -> Iterator[Forward]:
    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        for layer in stack:
            hidden_states = torch.utils.checkpoint.checkpoint(layer, hidden_states, use_reentrant=False)
        return hidden_states

    yield forward


@contextlib.contextmanager
def _save_on_cpu(stack: nn.ModuleList) -> Iterator[Forward]:
    """What transformers' ``activation_checkpointing_enable(offload=True)`` does (5.17+)."""

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        pin = hidden_states.device.type != "cpu"
        for layer in stack:
            with torch.autograd.graph.save_on_cpu(pin_memory=pin):
                hidden_states = torch.utils.checkpoint.checkpoint(layer, hidden_states, use_reentrant=False)
        return hidden_states

    yield forward


class _NaiveOffloadedCheckpoint(torch.autograd.Function):
    """The seeds' baseline: the input goes to host memory on the compute stream and comes back
    with a blocking copy when backward needs it; no pool, no prefetch, no RNG restore."""

    @staticmethod
    def forward(ctx: Any, layer: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        ctx.layer = layer
        ctx.device = hidden_states.device
        ctx.saved = hidden_states.to("cpu", non_blocking=True)
        with torch.no_grad():
            return layer(hidden_states)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[None, torch.Tensor]:
        hidden_states = ctx.saved.to(ctx.device).detach().requires_grad_(True)
        with torch.enable_grad():
            output = ctx.layer(hidden_states)
        torch.autograd.backward(output, grad_output)
        return None, hidden_states.grad


@contextlib.contextmanager
def _naive_offload(stack: nn.ModuleList) -> Iterator[Forward]:
    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        for layer in stack:
            hidden_states = _NaiveOffloadedCheckpoint.apply(layer, hidden_states)
        return hidden_states

    yield forward


def _gcoffload(prefetch_depth: int, keep_resident: int) -> Callable[[nn.ModuleList], Any]:
    @contextlib.contextmanager
    def activate(stack: nn.ModuleList) -> Iterator[Forward]:
        with wrap_layers(
            stack,
            OffloadOptions(prefetch_depth=prefetch_depth, keep_resident=keep_resident, min_offload_bytes=0),
        ):
            yield lambda hidden_states: run_stack(stack, hidden_states)

    return activate


KEEP_RESIDENT = 1

STRATEGIES = {
    strategy.name: strategy
    for strategy in (
        Strategy("none", "no checkpointing (every activation kept)", _no_checkpointing, None),
        Strategy(
            "checkpoint",
            "torch.utils.checkpoint, non-reentrant",
            _torch_checkpoint,
            lambda layers: layers + 1,
        ),
        Strategy(
            "save_on_cpu",
            "checkpoint inside torch save_on_cpu(pin_memory=True): transformers offload=True",
            _save_on_cpu,
            lambda layers: 1,
        ),
        Strategy(
            "naive", "seeds' synchronous offload on the compute stream", _naive_offload, lambda layers: 1
        ),
        *(
            Strategy(
                f"gcoffload-d{depth}",
                f"gcoffload, prefetch_depth={depth}, keep_resident={KEEP_RESIDENT}",
                _gcoffload(depth, KEEP_RESIDENT),
                lambda layers: KEEP_RESIDENT + 1,
                engine=True,
            )
            for depth in (0, 1, 2)
        ),
    )
}
