"""Command line: ``python -m gcoffload {build,info,bench}``."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
import time

import torch

from . import __version__, _ext, engine


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
        for key, value in report.items():
            if isinstance(value, dict):
                print(f"{key}:")
                for sub_key, sub_value in value.items():
                    print(f"  {sub_key}: {sub_value}")
            else:
                print(f"{key}: {value}")
    return 0


def bench(args: argparse.Namespace) -> int:
    """Runs the benchmark suite (a CPU smoke run without a GPU)."""
    from .bench import suite

    return suite.main(args.rest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gcoffload", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "bench", help="run the benchmark suite (see: python -m gcoffload bench --help)", add_help=False
    ).set_defaults(run=bench)
    commands.add_parser("build", help="build the C++ extension now").set_defaults(run=build)
    info_parser = commands.add_parser("info", help="versions, device, extension and pool state")
    info_parser.add_argument("--json", action="store_true", help="print JSON")
    info_parser.set_defaults(run=info)
    # The suite parses its own options, so they are passed through untouched.
    args, args.rest = parser.parse_known_args(argv)
    if args.rest and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(args.rest)}")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
