"""Scenario (e): host cost per checkpointed layer, against torch.utils.checkpoint, on the CPU.

A deep stack of tiny MLP blocks on the CPU, where compute is negligible and a
step's time (forward and backward) is the Python and dispatcher work per
layer: the cost a GPU step pays on the host, which hides behind the GPU only
while a layer's kernels take longer. Every variant checkpoints every layer
(gcoffload's inputs stay on the device: this measures bookkeeping, not
copies), and they run interleaved, step by step, in one run, so machine noise
hits each alike. Steps are timed in the CPU time of the thread that runs them
(on the CPU, backward runs on the caller's thread), which another job on the
machine delays far less than the wall clock. Reported per variant: minimum and
median ms per step, the minimum per checkpointed layer, and the ratio of
minima to torch's checkpoint on the same path (reentrant or not).
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..autopilot.planner import predict
from ..checkpointing.options import OffloadOptions
from ..layers.wrap import wrap_layers
from . import common, noise

LAYERS = 48
STEPS = 40
HIDDEN = 64
TOKENS = 16
# Each variant's reference: torch's checkpoint on the same path.
REFERENCES = {True: "torch reentrant", False: "torch non-reentrant"}


class MLPBlock(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.up = nn.Linear(hidden, 4 * hidden)
        self.down = nn.Linear(4 * hidden, hidden)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states + self.down(nn.functional.gelu(self.up(self.norm(hidden_states))))


Forward = Callable[[torch.Tensor], torch.Tensor]


def _torch(use_reentrant: bool) -> Callable[[nn.ModuleList], contextlib.AbstractContextManager[Forward]]:
    @contextlib.contextmanager
    def activate(layers: nn.ModuleList) -> Iterator[Forward]:
        def forward(hidden_states: torch.Tensor) -> torch.Tensor:
            for layer in layers:
                hidden_states = checkpoint(layer, hidden_states, use_reentrant=use_reentrant)
            return hidden_states

        yield forward

    return activate


def _gcoffload(use_reentrant: bool, autopilot: bool = False) -> Callable[..., Any]:
    @contextlib.contextmanager
    def activate(layers: nn.ModuleList) -> Iterator[Forward]:
        def forward(hidden_states: torch.Tensor) -> torch.Tensor:
            for layer in layers:
                hidden_states = layer(hidden_states)
            return hidden_states

        options: dict[str, Any] = {"options": OffloadOptions(offload=False), "use_reentrant": use_reentrant}
        if autopilot:  # every layer planned "checkpoint": the autopilot's bookkeeping on top of a checkpoint
            options = {"memory_budget": 1 << 62, "use_reentrant": use_reentrant}
        with wrap_layers(layers, **options) as wrapped:
            if autopilot:
                hidden = torch.randn(1, TOKENS, HIDDEN, requires_grad=True)
                for _ in range(2):  # the autopilot's first pass, then its profile step
                    forward(hidden).sum().backward()
                (profile,) = wrapped.autopilot.profiles.values()
                wrapped.autopilot.use(predict(profile, ["checkpoint"] * len(layers)))
            yield forward

    return activate


VARIANTS = {
    REFERENCES[True]: _torch(True),
    REFERENCES[False]: _torch(False),
    "gcoffload reentrant": _gcoffload(True),
    "gcoffload non-reentrant": _gcoffload(False),
    "gcoffload reentrant + autopilot": _gcoffload(True, autopilot=True),
    "gcoffload non-reentrant + autopilot": _gcoffload(False, autopilot=True),
}


# What run() announces to ``advance``: setting up each variant, then the interleaved steps.
PHASES = len(VARIANTS) + 1


def run(
    steps: int = STEPS, layers: int = LAYERS, advance: Callable[[str], None] = lambda label: None
) -> dict:
    """Times every variant, interleaved; a JSON-ready dict with a row per variant.

    Announces :data:`PHASES` phases to ``advance``.
    """
    torch.manual_seed(0)
    template = nn.ModuleList(MLPBlock(HIDDEN) for _ in range(layers))
    inputs = torch.randn(1, TOKENS, HIDDEN, requires_grad=True)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    with contextlib.ExitStack() as stack:
        forwards = {}
        for name, activate in VARIANTS.items():
            advance(f"host cost: set up {name}")
            forwards[name] = stack.enter_context(activate(copy.deepcopy(template)))
        advance(f"host cost: {steps} interleaved steps of {len(forwards)} variants, {layers} layers")
        for _ in range(steps):
            for name, forward in forwards.items():
                start = time.thread_time()
                forward(inputs).pow(2).mean().backward()
                times[name].append((time.thread_time() - start) * 1e3)
    rows = [
        {
            "variant": name,
            "min_ms": min(values),
            "median_ms": statistics.median(values),
            "per_layer_us": min(values) / layers * 1e3,
            "vs_torch_same_path": min(values) / min(times[REFERENCES["non-reentrant" not in name]]),
            "noisy": noise.diagnose(values, {}),
        }
        for name, values in times.items()
    ]
    return {"layers": layers, "hidden": HIDDEN, "tokens": TOKENS, "steps": steps, "rows": rows}


COLUMNS = [
    ("variant", "variant", "str"),
    ("min_ms", "min ms/step", "ms"),
    ("median_ms", "median ms/step", "ms"),
    ("per_layer_us", "min us/layer", "ms"),
    ("vs_torch_same_path", "vs torch, same path", "ratio"),
    ("noisy", "noisy", "str"),
]


def report(result: dict[str, Any]) -> str:
    return (
        f"### host cost per checkpointed layer (CPU, {result['layers']} layers of width {result['hidden']}, "
        f"{result['tokens']} tokens, {result['steps']} interleaved steps)\n\n"
        + common.table(result["rows"], COLUMNS)
    )
