"""The offloaded checkpoint on a real GPU: bf16 parity, memory after forward, prefetch overlap."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import counted
from torch import nn

import gcoffload

pytestmark = pytest.mark.cuda

DEVICE = torch.device("cuda:0")


class MarkedMLPBlock(nn.Module):
    """A residual MLP block that marks its forward and recompute on the engine's trace."""

    def __init__(self, index: int, hidden: int, expansion: int = 4) -> None:
        super().__init__()
        self.index = index
        self.up = nn.Linear(hidden, expansion * hidden)
        self.down = nn.Linear(expansion * hidden, hidden)
        self.dropout = nn.Dropout(0.1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        engine = gcoffload.get_engine(hidden_states.device)
        phase = "recompute" if torch.is_grad_enabled() else "forward"
        engine.mark(f"{phase}:{self.index}:start")
        output = hidden_states + self.dropout(self.down(nn.functional.gelu(self.up(hidden_states))))
        engine.mark(f"{phase}:{self.index}:end")
        return output


def make_stack(layers: int, hidden: int, dtype: torch.dtype) -> nn.ModuleList:
    torch.manual_seed(0)
    return nn.ModuleList(MarkedMLPBlock(index, hidden) for index in range(layers)).to(DEVICE, dtype)


def run(stack: nn.ModuleList, inputs: torch.Tensor) -> torch.Tensor:
    hidden_states = inputs
    for layer in stack:
        hidden_states = layer(hidden_states)
    return hidden_states


def test_bf16_gradients_match_no_checkpointing():
    reference = make_stack(6, 1024, torch.bfloat16)
    stack = copy.deepcopy(reference)
    inputs = torch.randn(4, 512, 1024, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    results = []
    for model, wrap in ((reference, False), (stack, True)):
        inputs.grad = None
        wrapped = (
            gcoffload.wrap_layers(model, gcoffload.OffloadOptions(min_offload_bytes=0)) if wrap else None
        )
        torch.manual_seed(1)
        run(model, inputs).float().pow(2).mean().backward()
        results.append([inputs.grad.clone(), *(parameter.grad.clone() for parameter in model.parameters())])
        if wrapped is not None:
            wrapped.unwrap()
    for grad, expected in zip(*results, strict=True):
        torch.testing.assert_close(grad, expected, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("keep_resident", [0, 1, 2])
def test_memory_held_after_forward_is_the_window_plus_the_output(keep_resident):
    layers, shape = 8, (2, 2048, 1024)
    stack = make_stack(layers, shape[-1], torch.bfloat16)
    inputs = torch.randn(*shape, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    layer_input_bytes = inputs.nbytes
    engine = counted(DEVICE)

    def held_after_forward(wrap_options: dict) -> int:
        with gcoffload.wrap_layers(stack, gcoffload.OffloadOptions(min_offload_bytes=0), **wrap_options):
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            output = run(stack, inputs)
            engine.synchronize()
            torch.cuda.synchronize()
            held = torch.cuda.memory_allocated() - before
            output.float().mean().backward()
        return held

    plain = held_after_forward({"offload": False})
    offloaded = held_after_forward({"keep_resident": keep_resident})
    assert plain >= layers * layer_input_bytes
    assert offloaded <= (keep_resident + 1) * layer_input_bytes + (1 << 20), (offloaded, layer_input_bytes)


def test_prefetch_of_the_previous_input_overlaps_the_current_recompute():
    layers = 6
    stack = make_stack(layers, 4096, torch.bfloat16)
    inputs = torch.randn(1, 4096, 4096, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    engine = counted(DEVICE)
    with gcoffload.wrap_layers(
        stack, gcoffload.OffloadOptions(keep_resident=1, prefetch_depth=1, min_offload_bytes=0)
    ):
        run(stack, inputs).float().mean().backward()  # warm-up: pool, allocator, kernels
        torch.cuda.synchronize()
        engine.reset_stats()
        with engine.trace() as trace:
            run(stack, inputs).float().mean().backward()
    marks = {entry["label"]: entry["start_ms"] for entry in trace if entry["op"] == "mark"}
    offloads = [entry["handle_id"] for entry in trace if entry["op"] == "offload"]
    prefetches = {entry["handle_id"]: entry for entry in trace if entry["op"] == "prefetch"}
    assert len(offloads) == layers - 1
    for layer in range(layers - 2, 0, -1):
        copy_entry = prefetches[offloads[layer - 1]]
        window = (marks[f"recompute:{layer}:start"], marks[f"recompute:{layer - 1}:start"])
        shared = max(0.0, min(copy_entry["end_ms"], window[1]) - max(copy_entry["start_ms"], window[0]))
        duration = copy_entry["end_ms"] - copy_entry["start_ms"]
        assert shared >= 0.5 * duration, f"layer {layer}: H2D {copy_entry} outside {window}"
    stats = engine.stats()
    assert stats["on_demand_fetches"] == 0
