"""A Llama-shaped decoder stack with random weights, sized like real models."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..engine import get_engine


@dataclass(frozen=True)
class DecoderShape:
    """Dimensions of one decoder layer (grouped-query attention, SwiGLU MLP)."""

    name: str
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    depth: int  # layers of the model the shape is taken from

    @property
    def parameters_per_layer(self) -> int:
        head_dim = self.hidden // self.heads
        attention = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_heads * head_dim
        return attention + 3 * self.hidden * self.intermediate + 2 * self.hidden

    def activation_bytes_per_layer(self, tokens: int, element_size: int) -> int:
        """About what one layer saves for backward when it is not checkpointed.

        The norms' outputs, query/key/value, the attention output, the residual
        sums, and the MLP's gate, up, activation and product.
        """
        key_value = 2 * self.kv_heads * (self.hidden // self.heads)
        return tokens * element_size * (6 * self.hidden + key_value + 4 * self.intermediate)

    def as_dict(self) -> dict:
        return {**asdict(self), "parameters_per_layer": self.parameters_per_layer}


LLAMA_1B = DecoderShape("llama-1b-like", hidden=2048, intermediate=8192, heads=32, kv_heads=8, depth=16)
LLAMA_8B = DecoderShape("llama-8b-like", hidden=4096, intermediate=14336, heads=32, kv_heads=8, depth=32)
SMOKE = DecoderShape("smoke", hidden=256, intermediate=1024, heads=4, kv_heads=2, depth=4)


class DecoderLayer(nn.Module):
    """Pre-norm attention (causal SDPA) and SwiGLU MLP with residuals.

    It marks the start and end of its forward pass (and of its recompute) on
    the copy engine's trace, which is how the timeline shows compute next to
    the copies. Marks cost nothing when no trace is running.
    """

    def __init__(self, shape: DecoderShape, index: int) -> None:
        super().__init__()
        self.index = index
        self.heads, self.kv_heads = shape.heads, shape.kv_heads
        self.head_dim = shape.hidden // shape.heads
        self.attention_norm = nn.RMSNorm(shape.hidden)
        self.q_proj = nn.Linear(shape.hidden, shape.hidden, bias=False)
        self.k_proj = nn.Linear(shape.hidden, shape.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(shape.hidden, shape.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(shape.hidden, shape.hidden, bias=False)
        self.mlp_norm = nn.RMSNorm(shape.hidden)
        self.gate_proj = nn.Linear(shape.hidden, shape.intermediate, bias=False)
        self.up_proj = nn.Linear(shape.hidden, shape.intermediate, bias=False)
        self.down_proj = nn.Linear(shape.intermediate, shape.hidden, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        engine = get_engine(hidden_states.device)
        # A layer that runs while autograd's engine executes a backward pass is being
        # recomputed, on either checkpoint path; grad mode cannot tell (the
        # non-reentrant path runs its forward pass with grad enabled).
        phase = "recompute" if torch._C._current_graph_task_id() != -1 else "forward"
        engine.mark(f"{phase}:{self.index}:start")
        batch, length, _ = hidden_states.shape
        normed = self.attention_norm(hidden_states)
        query = self.q_proj(normed).view(batch, length, self.heads, self.head_dim).transpose(1, 2)
        key = self.k_proj(normed).view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
        value = self.v_proj(normed).view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
        attended = nn.functional.scaled_dot_product_attention(
            query, key, value, is_causal=True, enable_gqa=True
        )
        hidden_states = hidden_states + self.o_proj(attended.transpose(1, 2).reshape(batch, length, -1))
        normed = self.mlp_norm(hidden_states)
        mlp = self.down_proj(nn.functional.silu(self.gate_proj(normed)) * self.up_proj(normed))
        output = hidden_states + mlp
        engine.mark(f"{phase}:{self.index}:end")
        return output


def build_stack(shape: DecoderShape, layers: int, device: torch.device, dtype: torch.dtype) -> nn.ModuleList:
    """``layers`` decoder layers with random weights, in training mode."""
    torch.manual_seed(0)
    with torch.device(device):
        stack = nn.ModuleList(DecoderLayer(shape, index) for index in range(layers))
    for parameter in stack.parameters():
        if parameter.ndim > 1:
            nn.init.normal_(parameter, std=0.02)
    return stack.to(dtype).train()


def run_stack(stack: nn.ModuleList, hidden_states: torch.Tensor) -> torch.Tensor:
    for layer in stack:
        hidden_states = layer(hidden_states)
    return hidden_states


def training_step(
    stack: nn.ModuleList, inputs: torch.Tensor, output_grad: torch.Tensor
) -> Callable[[], None]:
    """One forward and backward pass through ``stack``, with the gradients of the last one dropped first."""

    def step() -> None:
        stack.zero_grad(set_to_none=True)
        inputs.grad = None
        run_stack(stack, inputs).backward(output_grad)

    return step
