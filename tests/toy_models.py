"""Small transformer-like stacks in plain PyTorch, for gradient parity tests."""

from __future__ import annotations

import copy

import torch
from torch import nn

HIDDEN = 32
HEADS = 4
VOCAB = 50


class Block(nn.Module):
    """Pre-norm attention + MLP, dropout everywhere; takes (hidden_states, mask)."""

    def __init__(self, hidden: int = HIDDEN, dropout: float = 0.1) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(hidden)
        self.attention = nn.MultiheadAttention(hidden, HEADS, dropout=dropout, batch_first=True)
        self.mlp_norm = nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(
            nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * hidden, hidden)
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden_states: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        normed = self.attention_norm(hidden_states)
        attended, _ = self.attention(normed, normed, normed, attn_mask=mask, need_weights=False)
        hidden_states = hidden_states + self.dropout(attended)
        return hidden_states + self.mlp(self.mlp_norm(hidden_states))


class TupleBlock(Block):
    """Returns a tuple mixing a tensor, None, a string and a tensor that does not require grad."""

    def forward(self, hidden_states, mask=None):
        output = super().forward(hidden_states, mask)
        return output, None, "aux", output.detach().sum()


class ExtraArgumentBlock(Block):
    """Takes tensors that require grad besides the hidden states, positional, keyword and nested."""

    def forward(self, hidden_states, scale, *, shift, pair):
        first, second = pair
        output = super().forward(hidden_states * scale + shift)
        return output * first.mean() + second.sum()


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int = 4) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.down = nn.Linear(base.in_features, rank, bias=False)
        self.up = nn.Linear(rank, base.out_features, bias=False)
        nn.init.normal_(self.up.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.up(self.down(x))


class Stack(nn.Module):
    """Embedding, a stack of blocks, a head: the shape of a decoder-only LM."""

    def __init__(self, layers: int = 4, block: type[Block] = Block, dropout: float = 0.1) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.ModuleList(block(dropout=dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(HIDDEN)
        self.head = nn.Linear(HIDDEN, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden_states = self.embed(ids)
        mask = causal_mask(ids.shape[1]).to(ids.device)
        for layer in self.layers:
            output = layer(hidden_states, mask)
            hidden_states = output[0] if isinstance(output, tuple) else output
        return self.head(self.norm(hidden_states))


def causal_mask(length: int) -> torch.Tensor:
    return torch.triu(torch.full((length, length), float("-inf")), diagonal=1)


def make_pair(layers: int = 4, block: type[Block] = Block, seed: int = 0) -> tuple[Stack, Stack]:
    """Two identical stacks: a reference and one to checkpoint."""
    torch.manual_seed(seed)
    reference = Stack(layers, block)
    return reference, copy.deepcopy(reference)


def add_lora(model: Stack) -> None:
    """Freezes everything, then adds trainable low-rank adapters to every MLP projection."""
    model.requires_grad_(False)
    for layer in model.layers:
        layer.mlp[0] = LoRALinear(layer.mlp[0])
        layer.mlp[3] = LoRALinear(layer.mlp[3])


def batch(size: int = 2, length: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (size, length), generator=torch.Generator().manual_seed(seed))


def loss_and_grads(model: nn.Module, ids: torch.Tensor, seed: int = 123) -> tuple[torch.Tensor, dict]:
    """One training step's loss and gradients, dropout included, from a fixed RNG state."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    logits = model(ids)
    loss = nn.functional.cross_entropy(logits.flatten(0, 1), ids.roll(-1, dims=1).flatten())
    loss.backward()
    grads = {
        name: parameter.grad.clone()
        for name, parameter in model.named_parameters()
        if parameter.grad is not None
    }
    return loss.detach(), grads
