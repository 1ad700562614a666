"""The default suite behind ``python -m gcoffload bench``.

On a GPU: copy bandwidth from 1 MiB to 1 GiB; Llama-1B-like and Llama-8B-like
stacks (as many layers as plain checkpointing fits in free memory, up to the
model's 16 and 32) at 1x4096, 4x2048 and 1x16384 tokens under every strategy;
a transformers Llama step. Without a GPU: a small smoke run of
the same code on the CPU, whose timings say nothing about GPU performance.

Writes ``results.json``, ``summary.md`` and PNGs into the output directory.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..engine import get_engine
from . import common, copy_bandwidth, hf_step, plots, stack_overlap
from .decoder import LLAMA_1B, LLAMA_8B, SMOKE
from .stack_overlap import StackConfig
from .strategies import STRATEGIES


@dataclass(frozen=True)
class Suite:
    name: str
    copy_sizes: tuple[int, ...]
    stacks: tuple[StackConfig, ...]
    hf: hf_step.HFConfig
    dtype: torch.dtype
    warmup: int
    steps: int


GPU_SUITE = Suite(
    "gpu",
    copy_bandwidth.GPU_SIZES,
    tuple(
        StackConfig(shape, shape.depth, batch, length)
        for shape in (LLAMA_1B, LLAMA_8B)
        for batch, length in ((1, 4096), (4, 2048), (1, 16384))
    ),
    hf_step.GPU_CONFIG,
    torch.bfloat16,
    warmup=10,
    steps=20,
)
SMOKE_SUITE = Suite(
    "cpu-smoke",
    copy_bandwidth.SMOKE_SIZES,
    (StackConfig(SMOKE, 4, 2, 256),),
    hf_step.SMOKE_CONFIG,
    torch.float32,
    warmup=2,
    steps=5,
)
SCENARIOS = ("copy", "stack", "hf")
SMOKE_NOTE = (
    "CPU smoke run: no GPU was found, so a small configuration ran on the CPU, where every copy is a "
    "synchronous memcpy. Its timings check that the suite works; they say nothing about GPU performance."
)


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m gcoffload bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=Path("gcoffload-bench"), help="output directory")
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument(
        "--shapes", nargs="+", choices=[LLAMA_1B.name, LLAMA_8B.name], help="GPU stacks to run"
    )
    parser.add_argument("--tokens", nargs="+", help="GPU batch shapes to run, e.g. 4x2048")
    parser.add_argument("--warmup", type=int, help="untimed steps per strategy")
    parser.add_argument("--steps", type=int, help="timed steps per strategy")
    return parser.parse_args(argv)


def _select(suite: Suite, args: argparse.Namespace) -> list[StackConfig]:
    stacks = list(suite.stacks)
    if args.shapes:
        stacks = [config for config in stacks if config.shape.name in args.shapes]
    if args.tokens:
        stacks = [config for config in stacks if f"{config.batch}x{config.length}" in args.tokens]
    return stacks


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    device = get_engine().device
    suite = SMOKE_SUITE if device.type == "cpu" else GPU_SUITE
    warmup = suite.warmup if args.warmup is None else args.warmup
    steps = suite.steps if args.steps is None else args.steps
    stacks = _select(suite, args) if "stack" in args.scenarios else []
    run_hf = "hf" in args.scenarios and all(
        importlib.util.find_spec(name) for name in ("transformers", "peft")
    )
    if device.type == "cpu":
        print(SMOKE_NOTE, file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)

    total = (len(suite.copy_sizes) if "copy" in args.scenarios else 0) + len(stacks) * len(STRATEGIES)
    total += 2 * len(hf_step.STRATEGIES) if run_hf else 0
    results: dict[str, Any] = {"environment": common.environment(device), "suite": suite.name}
    if device.type == "cpu":
        results["note"] = SMOKE_NOTE
    with tqdm(total=total, desc="gcoffload bench", unit="run", file=sys.stderr) as progress:

        def advance(label: str) -> None:
            progress.set_postfix_str(label)
            progress.update()

        if "copy" in args.scenarios:
            results["copy_bandwidth"] = copy_bandwidth.run(suite.copy_sizes, device, advance)
        results["stacks"], results["stacks_that_did_not_fit"] = [], []
        for config in stacks:
            # Fitted now, not up front: the previous stack's memory is free again.
            fitted = config.fitted(suite.dtype, common.free_bytes(device))
            if fitted.layers == 0:
                results["stacks_that_did_not_fit"].append(config.label)
                progress.update(len(STRATEGIES))
                continue
            results["stacks"].append(
                stack_overlap.run(
                    fitted, list(STRATEGIES.values()), device, suite.dtype, warmup, steps, advance
                )
            )
        if run_hf:
            results["hf_step"] = hf_step.run(suite.hf, device, suite.dtype, warmup, steps, advance)
        elif "hf" in args.scenarios:
            results["hf_step"] = {"skipped": "needs transformers and peft: pip install 'gcoffload[hf]'"}

    written = _write(results, args.out)
    print(_summary(results))
    print("\nwrote " + ", ".join(str(path) for path in written))
    return 0


def _summary(results: dict[str, Any]) -> str:
    environment = results["environment"]
    parts = [
        f"# gcoffload benchmark ({results['suite']})",
        "",
        f"{environment['device_name']} ({environment['device']}), torch {environment['torch']}, "
        f"transformers {environment['transformers']}, gcoffload {environment['gcoffload']}, "
        f"{environment['date']}",
    ]
    if "note" in results:
        parts += ["", f"**{results['note']}**"]
    if "copy_bandwidth" in results:
        parts += ["", copy_bandwidth.report(results["copy_bandwidth"])]
    parts += ["\n" + stack_overlap.report(result) for result in results["stacks"]]
    if results.get("stacks_that_did_not_fit"):
        parts += [
            "",
            "Not one layer fitted in device memory: " + ", ".join(results["stacks_that_did_not_fit"]),
        ]
    hf = results.get("hf_step")
    if hf:
        parts += ["", hf_step.report(hf) if "rows" in hf else f"transformers step skipped: {hf['skipped']}"]
    return "\n".join(parts)


def _write(results: dict[str, Any], out: Path) -> list[Path]:
    written = [out / "results.json", out / "summary.md"]
    written[0].write_text(json.dumps(results, indent=1, default=str) + "\n")
    written[1].write_text(_summary(results) + "\n")
    if importlib.util.find_spec("matplotlib") is None:
        print("PNG plots skipped: matplotlib is missing (pip install 'gcoffload[bench]')", file=sys.stderr)
        return written
    for index, result in enumerate(results["stacks"]):
        slug = f"{index}-{result['config']['name']}-{result['config']['batch']}x{result['config']['length']}"
        plots.strategies(result, out / f"strategies-{slug}.png")
        written.append(out / f"strategies-{slug}.png")
        if result["timeline"]:
            plots.timeline(
                result["timeline"], f"gcoffload-d1 step: {result['label']}", out / f"timeline-{slug}.png"
            )
            written.append(out / f"timeline-{slug}.png")
    return written
