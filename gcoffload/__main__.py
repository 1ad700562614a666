"""gcoffload's command line: build the extension, print the setup, run the benchmark, plan a model's
memory, run LLaMA-Factory."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
import time
from typing import Any

import torch

from . import __version__
from .checkpointing import counters
from .engine import extension, registry

BENCH_DESCRIPTION = (
    "Runs the benchmark suite. On a GPU: copy bandwidth, Llama-shaped stacks under every strategy, a "
    "transformers step, the autopilot and the host cost. Without one: a small CPU smoke run whose timings "
    "say nothing about GPU performance. Writes results.json, summary.md and PNGs. --help lists the options."
)


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def build(args: argparse.Namespace) -> int:
    """Builds the extension now instead of on first use."""
    start = time.perf_counter()
    extension.load()
    print(f"extension ready in {time.perf_counter() - start:.1f} s: {extension.extension_info().library}")
    return 0


def info(args: argparse.Namespace) -> int:
    """Prints versions, the device, the extension's state, the host settings and the counters so far."""
    built = extension.extension_info()
    accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    report = {
        "gcoffload": __version__,
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "python": sys.version.split()[0],
        "device": str(accelerator) if accelerator is not None else "cpu (no accelerator)",
        "device_name": (
            torch.cuda.get_device_name() if accelerator is not None and accelerator.type == "cuda" else None
        ),
        "extension": {"built": built.built, "path": str(built.library), "sources": str(built.source_dir)},
        "settings": registry.settings(),
        "disk_tier": registry.disk_stats() or "off (configure(over_budget='disk', disk_dir=...) turns it on)",
        "stats": counters.stats(),
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_indented(report)
    return 0


def _print_indented(mapping: dict[str, Any], depth: int = 0) -> None:
    """``key: value`` lines, a nested mapping's lines indented under its key."""
    for key, value in mapping.items():
        if isinstance(value, dict):
            print(f"{'  ' * depth}{key}:")
            _print_indented(value, depth + 1)
        else:
            print(f"{'  ' * depth}{key}: {value}")


def _llamafactory(args: argparse.Namespace) -> int:
    from .integrations import llamafactory

    return llamafactory.main(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gcoffload", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "build", help="build the C++ extension now", description="Builds the C++ extension now."
    ).set_defaults(run=build)
    info_parser = commands.add_parser(
        "info",
        help="versions, device, extension and counters",
        description="Prints versions, the device, the extension's state and the counters.",
    )
    info_parser.add_argument("--json", action="store_true", help="print JSON instead of indented lines")
    info_parser.set_defaults(run=info)
    from .bench import suite

    bench_parser = commands.add_parser(
        "bench",
        help="run the benchmark suite (a small smoke run without a GPU)",
        description=BENCH_DESCRIPTION,
    )
    suite.add_arguments(bench_parser)
    bench_parser.set_defaults(run=lambda args: suite.main(args, bench_parser))
    from .sizing import cli as plan_cli

    plan_parser = commands.add_parser(
        "plan",
        help="how many tokens fit, per strategy, from a model's config (no GPU, no weights)",
        description=plan_cli.DESCRIPTION,
    )
    plan_cli.add_arguments(plan_parser)
    plan_parser.set_defaults(run=lambda args: plan_cli.main(args, plan_parser))
    from .integrations import llamafactory

    llamafactory_parser = commands.add_parser(
        "llamafactory",
        help="LLaMA-Factory's train command with gcoffload's checkpointing",
        description=llamafactory.__doc__.split("\n\n")[0],
    )
    llamafactory.add_arguments(llamafactory_parser)
    llamafactory_parser.set_defaults(run=_llamafactory)
    # A subcommand's unknown arguments come back to this parser, which would answer with its own usage.
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        commands.choices[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        status = args.run(args)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader left (`... | head`): point stdout at nothing so the exit flush stays quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return status


if __name__ == "__main__":
    sys.exit(main())
