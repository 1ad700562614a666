"""The default suite behind ``python -m gcoffload bench``.

On a GPU: copy bandwidth from 1 MiB to 1 GiB; Llama-1B-like and Llama-8B-like
stacks (as many layers as plain checkpointing fits in free memory, up to the
model's 16 and 32) at 1x4096, 4x2048 and 1x16384 tokens under every strategy;
a transformers Llama step; the memory-budget autopilot at three budgets on the
Llama-1B-like stack at 4x2048 tokens against all-checkpoint and all-offload;
swap on the same stack at the least memory (all-checkpoint, all-offload, the
autopilot without and with swap, all-swap); the disk tier's throughput
against the raw disk (4 tensors of 128 MiB) and a training step of the same
stack with 64 MiB of host budget and the rest on disk; the host cost per
checkpointed layer against torch.utils.checkpoint (always on the CPU, where it
is all there is to measure).

Without a GPU: a small smoke run of the same code and every scenario on the
CPU, whose timings say nothing about GPU performance (about 26 s on 2 idle
cores, extension built); ``--full`` runs the larger CPU sizes of earlier smoke
runs (the stack and the autopilot at 2x256 tokens, one more warm-up step, the
disk tier moving 4 tensors of 64 MiB three times, the host cost over 40 steps;
about twice as long). On the CPU the suite
runs torch on one intra-op thread: with one thread per core, another job on the
same cores stalls torch's thread pool at every barrier and a step takes 20-30
times as long, which says nothing about the strategies.

Progress goes to stderr as one line per phase. Writes ``results.json``,
``summary.md`` and PNGs into the output directory.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..engine import get_engine
from ..engine.host_settings import DISK_DIR_ENV
from . import autopilot, common, copy_bandwidth, disk, hf_step, host_cost, noise, plots, stack_overlap, swap
from .decoder import LLAMA_1B, LLAMA_8B, SMOKE
from .stack_overlap import StackConfig
from .strategies import STRATEGIES

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass(frozen=True)
class Suite:
    name: str
    title: str
    copy_sizes: tuple[int, ...]
    stacks: tuple[StackConfig, ...]
    hf: hf_step.HFConfig
    autopilot: StackConfig
    dtype: torch.dtype
    warmup: int
    steps: int
    disk: disk.DiskConfig
    host_layers: int = host_cost.LAYERS
    host_steps: int = host_cost.STEPS


GPU_SUITE = Suite(
    "gpu",
    "GPU suite",
    copy_bandwidth.GPU_SIZES,
    tuple(
        StackConfig(shape, shape.depth, batch, length)
        for shape in (LLAMA_1B, LLAMA_8B)
        for batch, length in ((1, 4096), (4, 2048), (1, 16384))
    ),
    hf_step.GPU_CONFIG,
    StackConfig(LLAMA_1B, LLAMA_1B.depth, 4, 2048),
    torch.bfloat16,
    warmup=10,
    steps=20,
    disk=disk.GPU_CONFIG,
)
# The default without a GPU: every scenario, small enough to run in well under a minute on
# 2 idle cores. The same code paths as the full sizes; half the tokens and fewer steps.
SMOKE_SUITE = Suite(
    "cpu-smoke",
    "CPU smoke run",
    copy_bandwidth.SMOKE_SIZES,
    (StackConfig(SMOKE, 4, 1, 256),),
    hf_step.SMOKE_CONFIG,
    StackConfig(SMOKE, 4, 1, 256),
    torch.float32,
    warmup=1,
    steps=5,
    disk=disk.SMOKE_CONFIG,
    host_steps=20,
)
# --full without a GPU: the CPU sizes of earlier smoke runs (benchmarks/results/*-cpu-smoke).
CPU_FULL_SUITE = Suite(
    "cpu-full",
    "full CPU run",
    copy_bandwidth.SMOKE_SIZES,
    (StackConfig(SMOKE, 4, 2, 256),),
    hf_step.SMOKE_CONFIG,
    StackConfig(SMOKE, 4, 2, 256),
    torch.float32,
    warmup=2,
    steps=5,
    disk=disk.CPU_FULL_CONFIG,
)
SUITES = (GPU_SUITE, SMOKE_SUITE, CPU_FULL_SUITE)
SCENARIOS = ("copy", "stack", "hf", "autopilot", "swap", "disk", "host")
CPU_NOTE = (
    "{title}: no GPU was found, so a small configuration ran on the CPU (one torch thread), where every "
    "copy is a synchronous memcpy. Its timings check that the suite works; they say nothing about GPU "
    "performance."
)
SMOKE_NOTE = CPU_NOTE.format(title=SMOKE_SUITE.title)
SMOKE_TITLE = "CPU smoke run (timings say nothing about GPU performance)"
HF_MISSING = "needs transformers and peft: pip install 'gcoffload[hf]'"


def _shape(config: StackConfig) -> str:
    return config.shape.name


def _tokens(config: StackConfig) -> str:
    return f"{config.batch}x{config.length}"


def _names(suite: Suite, name_of: Callable[[StackConfig], str]) -> list[str]:
    return list(dict.fromkeys(map(name_of, suite.stacks)))


def _per_device(value_of: Callable[[Suite], object]) -> str:
    """An option's defaults for its help: "<GPU suite's> on a GPU, <smoke run's> on the CPU (...)"."""
    smoke, full = value_of(SMOKE_SUITE), value_of(CPU_FULL_SUITE)
    return f"{value_of(GPU_SUITE)} on a GPU, {smoke} on the CPU" + (
        f" ({full} with --full)" if full != smoke else ""
    )


def select_suite(device: torch.device, full: bool) -> Suite:
    """The suite to run: the GPU suite on a GPU; on the CPU the smoke run, or its full sizes."""
    if device.type != "cpu":
        return GPU_SUITE
    return CPU_FULL_SUITE if full else SMOKE_SUITE


def _batch_shape(text: str) -> str:
    if re.fullmatch(r"[1-9]\d*x[1-9]\d*", text) is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not BATCHxLENGTH, e.g. 4x2048")
    return text


def _output_directory(text: str) -> Path:
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a file; give a directory (created if missing)")
    return path


def _existing_directory(text: str) -> Path:
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is not a directory; give one that exists")
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the suite's options to ``parser``."""
    shapes = _per_device(lambda suite: ", ".join(_names(suite, _shape)))
    tokens = _per_device(lambda suite: ", ".join(_names(suite, _tokens)))
    parser.add_argument(
        "--out",
        type=_output_directory,
        default=Path("gcoffload-bench"),
        metavar="DIR",
        help="where results.json, summary.md and the PNGs go (default: %(default)s)",
    )
    parser.add_argument(
        "--scenarios",
        nargs="+",
        choices=SCENARIOS,
        help="what to run: copy (pinned copy bandwidth), stack (a Llama-shaped stack under every "
        "strategy), hf (a transformers Llama step), autopilot (the memory-budget autopilot at three "
        "budgets), swap (swap against checkpointing and offloading at the least memory), disk (the "
        "disk tier against the raw disk, and a training step on it), host (host cost per "
        "checkpointed layer on the CPU); default: all, hf where transformers and peft are installed",
    )
    parser.add_argument(
        "--disk-dir",
        type=_existing_directory,
        metavar="DIR",
        help=f"where the disk scenario writes, on the disk to measure (default: ${DISK_DIR_ENV}, else a "
        "temporary directory under the current one)",
    )
    parser.add_argument(
        "--shapes",
        nargs="+",
        choices=list(dict.fromkeys(name for suite in SUITES for name in _names(suite, _shape))),
        metavar="SHAPE",
        help=f"stacks to run: {shapes} (default: all)",
    )
    parser.add_argument(
        "--tokens",
        nargs="+",
        type=_batch_shape,
        metavar="BATCHxLENGTH",
        help=f"batch shapes of the stacks to run: {tokens} (default: all)",
    )
    parser.add_argument(
        "--full",
        action="store_true",
        help="without a GPU, run the larger CPU sizes instead of the smoke run: the stack and the "
        f"autopilot at {', '.join(_names(CPU_FULL_SUITE, _tokens))} tokens, "
        f"{CPU_FULL_SUITE.warmup} warm-up and {CPU_FULL_SUITE.steps} timed steps, the host cost over "
        f"{CPU_FULL_SUITE.host_layers} layers and {CPU_FULL_SUITE.host_steps} steps (about twice as "
        "long); on a GPU the full suite always runs",
    )
    parser.add_argument(
        "--warmup",
        type=common.non_negative_int,
        metavar="N",
        help=f"untimed steps per strategy (default: {_per_device(lambda suite: suite.warmup)})",
    )
    parser.add_argument(
        "--steps",
        type=common.positive_int,
        metavar="N",
        help=f"timed steps per strategy (default: {_per_device(lambda suite: suite.steps)})",
    )


def _hf_installed() -> bool:
    return all(importlib.util.find_spec(name) for name in ("transformers", "peft"))


def _stacks(
    suite: Suite, scenarios: Sequence[str], args: argparse.Namespace, parser: argparse.ArgumentParser
) -> list[StackConfig]:
    """The stacks of ``suite`` that --shapes and --tokens select; a parser error for any it lacks."""
    if "stack" not in scenarios:
        if args.shapes or args.tokens:
            parser.error("--shapes and --tokens choose stacks, but --scenarios leaves out stack")
        return []
    stacks = list(suite.stacks)
    for option, chosen, name_of in (("--shapes", args.shapes, _shape), ("--tokens", args.tokens, _tokens)):
        available = _names(suite, name_of)
        lacking = [name for name in chosen or () if name not in available]
        if lacking:
            hint = ""
            if suite is SMOKE_SUITE and all(name in _names(CPU_FULL_SUITE, name_of) for name in lacking):
                hint = " (--full runs it)"
            elif suite is not GPU_SUITE:
                hint = " (the larger stacks need a GPU)"
            parser.error(
                f"argument {option}: the {suite.title} has no {', '.join(lacking)}; "
                f"choose from {', '.join(available)}{hint}"
            )
        if chosen:
            stacks = [config for config in stacks if name_of(config) in chosen]
    return stacks


def main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Runs the scenarios ``args`` select (see :func:`add_arguments`); ``parser`` reports what cannot run."""
    device = get_engine().device
    suite = select_suite(device, args.full)
    scenarios = args.scenarios or SCENARIOS
    hf_installed = _hf_installed()
    if args.scenarios and "hf" in args.scenarios and not hf_installed:
        parser.error(f"argument --scenarios: hf {HF_MISSING}")
    stacks = _stacks(suite, scenarios, args, parser)
    warmup = suite.warmup if args.warmup is None else args.warmup
    steps = suite.steps if args.steps is None else args.steps
    run_hf = "hf" in scenarios and hf_installed
    note = CPU_NOTE.format(title=suite.title) if device.type == "cpu" else None
    if note is not None:
        print(note, file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)

    total = (len(suite.copy_sizes) if "copy" in scenarios else 0) + len(stacks) * len(STRATEGIES)
    total += 2 * len(hf_step.STRATEGIES) if run_hf else 0
    total += autopilot.RUNS if "autopilot" in scenarios else 0
    total += 1 + len(swap.RUNS) if "swap" in scenarios else 0
    total += disk.PHASES if "disk" in scenarios else 0
    total += host_cost.PHASES if "host" in scenarios else 0
    progress = common.Progress(total + 1)  # and writing the results
    results: dict[str, Any] = {"environment": None, "suite": suite.name}
    if note is not None:
        results["note"] = note
    with common.one_thread_on_the_cpu(device):
        results["environment"] = common.environment(device)  # with the run's thread count
        _run(results, suite, scenarios, stacks, run_hf, args.disk_dir, device, warmup, steps, progress)
    progress("write results.json, summary.md and PNGs")
    written = _write(results, args.out)
    progress.finish()
    print(_summary(results))
    print("\nwrote " + ", ".join(str(path) for path in written))
    return 0


def _run(
    results: dict[str, Any],
    suite: Suite,
    scenarios: Sequence[str],
    stacks: Sequence[StackConfig],
    run_hf: bool,
    disk_dir: Path | None,
    device: torch.device,
    warmup: int,
    steps: int,
    advance: common.Progress,
) -> None:
    """Runs the selected scenarios into ``results``, each phase announced to ``advance``."""
    if "copy" in scenarios:
        results["copy_bandwidth"] = copy_bandwidth.run(suite.copy_sizes, device, advance)
    results["stacks"], results["stacks_that_did_not_fit"] = [], []
    for config in stacks:
        # Fitted now, not up front: the previous stack's memory is free again.
        fitted = config.fitted(suite.dtype, common.free_bytes(device))
        if fitted.layers == 0:
            results["stacks_that_did_not_fit"].append(config.label)
            advance(f"stack {config.label}: not one layer fits, skipped", phases=len(STRATEGIES))
            continue
        results["stacks"].append(
            stack_overlap.run(fitted, list(STRATEGIES.values()), device, suite.dtype, warmup, steps, advance)
        )
    if run_hf:
        results["hf_step"] = hf_step.run(suite.hf, device, suite.dtype, warmup, steps, advance)
    elif "hf" in scenarios:
        results["hf_step"] = {"skipped": HF_MISSING}
    if "autopilot" in scenarios:
        fitted = suite.autopilot.fitted(suite.dtype, common.free_bytes(device))
        results["autopilot"] = autopilot.run(fitted, device, suite.dtype, warmup, steps, advance)
    if "swap" in scenarios:
        fitted = suite.autopilot.fitted(suite.dtype, common.free_bytes(device))
        results["swap"] = swap.run(fitted, device, suite.dtype, warmup, steps, advance)
    if "disk" in scenarios:
        results["disk"] = disk.run(suite.disk, device, suite.dtype, disk_dir, warmup, steps, advance)
    if "host" in scenarios:
        results["host_cost"] = host_cost.run(suite.host_steps, suite.host_layers, advance)


def _noisy_measurements(results: dict[str, Any]) -> list[str]:
    """Where the run looks noisy and why (see :mod:`.noise`), one line each."""
    measured = [(f"copy {row['size']}", row) for row in results.get("copy_bandwidth", [])]
    for stack in results["stacks"]:
        measured.append((f"{stack['label']} raw copy", stack["raw_copy"]))
        measured += [(f"{stack['label']} {row['strategy']}", row) for row in stack["strategies"]]
    hf_rows = results.get("hf_step", {}).get("rows", [])
    measured += [(f"transformers {row['mode']} {row['strategy']}", row) for row in hf_rows]
    measured += [(f"autopilot {row['run']}", row) for row in results.get("autopilot", {}).get("runs", [])]
    for bus in results.get("swap", {}).get("buses", []):
        measured += [(f"swap {row['run']}", row) for row in bus["runs"]]
    measured += [
        (f"disk {row['run']}", row) for row in results.get("disk", {}).get("training", {}).get("runs", [])
    ]
    measured += [(f"host cost {row['variant']}", row) for row in results.get("host_cost", {}).get("rows", [])]
    return [f"{where}: {row['noisy']}" for where, row in measured if row.get("noisy")]


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
    noisy = _noisy_measurements(results)
    if noisy:
        parts += [
            "",
            f"**noisy: these measurements scatter, or take over {noise.MAX_STEP_RATIO:g}x as long as rows "
            f"that do the same work (which the work cannot explain); {noise.ADVICE}.**",
            *(f"- {line}" for line in noisy),
        ]
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
    if "autopilot" in results:
        parts += ["", autopilot.report(results["autopilot"])]
    if "swap" in results:
        parts += ["", swap.report(results["swap"])]
    if "disk" in results:
        parts += ["", disk.report(results["disk"])]
    if "host_cost" in results:
        parts += ["", host_cost.report(results["host_cost"])]
    return "\n".join(parts)


def _write(results: dict[str, Any], out: Path) -> list[Path]:
    written = [out / "results.json", out / "summary.md"]
    written[0].write_text(json.dumps(results, indent=1, default=str) + "\n")
    written[1].write_text(_summary(results) + "\n")
    if importlib.util.find_spec("matplotlib") is None:
        print("PNG plots skipped: matplotlib is missing (pip install 'gcoffload[bench]')", file=sys.stderr)
        return written
    for name, figure in _figures(results).items():
        plots.save(figure, out / name)
        written.append(out / name)
    return written


def _figures(results: dict[str, Any]) -> dict[str, Figure]:
    """The PNGs of a run by file name: per stack, the strategies and gcoffload-d1's timeline."""
    smoke = f"{SMOKE_TITLE}: " if results["environment"]["smoke_run"] else ""
    figures = {}
    for index, result in enumerate(results["stacks"]):
        slug = f"{index}-{result['config']['name']}-{result['config']['batch']}x{result['config']['length']}"
        figures[f"strategies-{slug}.png"] = plots.strategies(result, smoke + result["label"])
        if result["timeline"]:
            figures[f"timeline-{slug}.png"] = plots.timeline(
                result["timeline"], f"{smoke}gcoffload-d1 step: {result['label']}"
            )
    return figures
