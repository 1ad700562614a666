"""What swap should do on a GPU, on paper: real model configs traced on the meta device, then planned.

For each config and length, the decoder layers are traced on the meta device
(``gcoffload.sizing``: exact bytes per storage, FLOPs per layer), each layer's
forward time is its FLOPs at ``--mfu`` of the GPU's dense BF16 peak, and the
copies run at the given link bandwidths (one way; both ways at once 1.74x, the
ratio of the project's PCIe 5 reference figures). The planner then gives, at
the least-memory budget (every input offloaded) and ``--room`` GiB above it, the
predicted step time of the decoder layers under plain checkpointing, every
input offloaded, and the autopilot with swap, and which layers swap. Nothing
here ran on a GPU: the times are estimates, the bytes are exact.

Run from the repository root: ``python benchmarks/swap_on_paper.py``.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch

from gcoffload.autopilot.planner import fastest_plan, least_memory, predict
from gcoffload.autopilot.profile import CopyProfile
from gcoffload.checkpointing.options import OffloadOptions
from gcoffload.sizing.hardware import GPUS
from gcoffload.sizing.model_source import load_config
from gcoffload.sizing.trace import MetaModel

CONFIGS = Path(__file__).resolve().parents[1] / "tests" / "configs"
LINKS = {"H100 PCIe 5 (50 GB/s)": 50e9, "GH200 C2C (350 GB/s)": 350e9}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["llama-3.1-8b", "qwen3-8b"])
    parser.add_argument("--tokens", nargs="+", type=int, default=[4096, 16384, 65536, 131072])
    parser.add_argument("--room", type=float, default=2.0, help="GiB over the least memory (default: 2)")
    parser.add_argument(
        "--host",
        type=float,
        default=128.0,
        help="pinned host GiB per GPU (default: 128, an 8-GPU node's "
        "2 TiB halved, gcoffload's default share)",
    )
    parser.add_argument("--mfu", type=float, default=0.4)
    args = parser.parse_args()
    gpu = GPUS["H100 80GB"]
    flops_per_second = gpu.peak_flops * args.mfu
    print(
        f"H100 dense BF16 {gpu.peak_flops / 1e12:.0f} TFLOP/s at {args.mfu:.0%}; "
        "batch 1, bf16, SDPA, full fine-tuning"
    )
    print()
    print(
        "| model | tokens | link | swap MiB/layer | input MiB | fwd ms/layer | copy/fwd | "
        "checkpoint ms | offload ms | autopilot ms (least memory) | vs ckpt | "
        f"autopilot ms (+{args.room:g} GiB, host ≤ {args.host:g} GiB) | host GiB | vs ckpt |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        model = MetaModel(load_config(str(CONFIGS / f"{name}.json")), torch.bfloat16, "sdpa")
        for tokens in args.tokens:
            trace = model.trace(1, tokens, OffloadOptions())
            layers = tuple(
                replace(layer, forward_seconds=flops / flops_per_second)
                for layer, flops in zip(trace.profile.layers, trace.layer_flops, strict=True)
            )
            for link_name, link in LINKS.items():
                copies = CopyProfile(link, link, 1.74 * link, True, layers[0].input_bytes)
                profile = replace(trace.profile, layers=layers, copies=copies)
                count = len(layers)
                checkpoint = predict(profile, ["checkpoint"] * count)
                least = least_memory(profile)
                tight = fastest_plan(profile, least.peak_bytes)
                roomy = fastest_plan(
                    profile, least.peak_bytes + int(args.room * 2**30), host_budget=int(args.host * 2**30)
                )
                swapped = sum(layer.swap_bytes for layer in layers) / count
                forward = sum(layer.forward_seconds for layer in layers) / count
                ratio = swapped / link / forward
                print(
                    f"| {name} | {tokens} | {link_name} | {swapped / 2**20:.0f} "
                    f"| {layers[0].input_bytes / 2**20:.0f} "
                    f"| {forward * 1e3:.2f} | {ratio:.2f} | {checkpoint.step_seconds * 1e3:.0f} "
                    f"| {least.step_seconds * 1e3:.0f} | {tight.step_seconds * 1e3:.0f} "
                    f"({_modes(tight)}) | {tight.step_seconds / checkpoint.step_seconds:.2f} "
                    f"| {roomy.step_seconds * 1e3:.0f} ({_modes(roomy)}) | {roomy.host_bytes / 2**30:.0f} "
                    f"| {roomy.step_seconds / checkpoint.step_seconds:.2f} |"
                )


def _modes(plan) -> str:
    return ", ".join(f"{count} {mode}" for mode, count in plan.counts().items())


if __name__ == "__main__":
    main()
