"""gcoffload's command line: build the C++ extension, print the setup, run the benchmark suite."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
import time
from typing import Any

import torch

from . import __version__, _ext, engine
from .bench import common, suite


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def build(args: argparse.Namespace) -> int:
    """Builds the extension now instead of on first use."""
    start = time.perf_counter()
    _ext.load()
    info = _ext.extension_info()
    print(f"extension ready in {time.perf_counter() - start:.1f} s: {info.library}")
    return 0


def info(args: argparse.Namespace) -> int:
    """Prints versions, the device, the extension's state and the pool counters."""
    extension = _ext.extension_info()
    device = engine.get_engine().device if extension.built else None
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
        "extension": {
            "built": extension.built,
            "path": str(extension.library),
            "sources": str(extension.source_dir),
        },
        "engine_device": str(device) if device is not None else None,
        "stats": engine.stats() if extension.built else None,
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gcoffload", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "build", help="build the C++ extension now", description="Builds the C++ extension now."
    ).set_defaults(run=build)
    info_parser = commands.add_parser(
        "info",
        help="versions, device, extension and pool state",
        description="Prints versions, the device, the extension's state and the pool counters.",
    )
    info_parser.add_argument("--json", action="store_true", help="print JSON instead of indented lines")
    info_parser.set_defaults(run=info)
    bench_parser = commands.add_parser(
        "bench",
        help="run the benchmark suite (a small smoke run without a GPU)",
        description=common.help_text(suite.__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    suite.add_arguments(bench_parser)
    bench_parser.set_defaults(run=lambda args: suite.main(args, bench_parser))
    # A subcommand's unknown arguments come back to this parser, which would answer with its own usage.
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        commands.choices[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
