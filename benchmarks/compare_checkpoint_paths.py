"""The reentrant and non-reentrant checkpoint paths side by side: host cost and peak memory.

Host cost: the bench suite's host scenario (``gcoffload.bench.host_cost``: tiny
MLP blocks on the CPU, where a step's time is the Python and dispatcher work
per layer, variants interleaved). Peak memory: an 8-layer stack of the same
blocks on the test suite's simulated device (tools/simdevice), whose caching
allocator counts device memory as CUDA's does.

Run from the repository root: ``python benchmarks/compare_checkpoint_paths.py``.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import gcoffload
from gcoffload.bench import host_cost
from gcoffload.bench.host_cost import MLPBlock

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import simdevice  # the test suite's simulated device

VARIANTS = ("torch-reentrant", "torch-nonreentrant", "gcoffload-reentrant", "gcoffload-nonreentrant")


class CheckpointedStack(nn.Module):
    def __init__(self, layers: int, hidden: int, variant: str) -> None:
        super().__init__()
        self.layers = nn.ModuleList(MLPBlock(hidden) for _ in range(layers))
        self.variant = variant
        if variant.startswith("gcoffload"):
            gcoffload.wrap_layers(
                self.layers,
                gcoffload.OffloadOptions(min_offload_bytes=0),
                use_reentrant=variant.endswith("-reentrant"),
            )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            if self.variant.startswith("torch"):
                hidden_states = checkpoint(
                    layer, hidden_states, use_reentrant=self.variant == "torch-reentrant"
                )
            else:
                hidden_states = layer(hidden_states)
        return hidden_states


def stacks(device: str, layers: int, hidden: int) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    template = CheckpointedStack(layers, hidden, "torch-reentrant").to(device)
    built = {}
    for variant in VARIANTS:
        stack = CheckpointedStack(layers, hidden, variant).to(device)
        stack.load_state_dict(copy.deepcopy(template.state_dict()))
        built[variant] = stack
    return built


def peak_memory(layers: int = 8, hidden: int = 256, tokens: int = 512) -> None:
    simdevice.load()
    device = "simdev:0"
    built = stacks(device, layers, hidden)
    inputs = torch.randn(1, tokens, hidden, device=device, requires_grad=True)
    print(
        f"peak device memory, simulated device, {layers} layers, "
        f"layer input {tokens * hidden * 4 / 2**20:.2f} MiB"
    )
    for variant in VARIANTS:
        for _ in range(2):  # the second step, after the pool and allocator warmed up
            simdevice.synchronize()
            simdevice.reset_peak_memory_stats()
            start = simdevice.memory_allocated()
            built[variant](inputs).pow(2).mean().backward()
            simdevice.synchronize()
        print(
            f"  {variant:24} {(simdevice.max_memory_allocated() - start) / 2**20:7.2f} MiB "
            "above the step's start"
        )


if __name__ == "__main__":
    peak_memory()  # simdev must be loaded before the process's first backward
    print(host_cost.report(host_cost.run()))
