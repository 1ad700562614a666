"""``python -m gcoffload plan MODEL``: how many tokens fit, per strategy, before renting the GPU."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from .disk import DEFAULT_READ_BYTES_PER_SECOND, DEFAULT_WRITE_BYTES_PER_SECOND
from .estimate import DEFAULT_MFU, DEFAULT_RESERVE, Strategy, capacity
from .hardware import GPUS
from .report import plot, text
from .trace import ATTENTION

__all__ = ["add_arguments", "main", "parse_tokens"]

DESCRIPTION = (
    "Counts, from a model's config alone (no weights, no GPU), the device memory a training step takes under "
    "each strategy (no checkpointing, torch checkpointing, transformers' offload=True, gcoffload's offload "
    "and autopilot) and the longest context each fits, with pinned host memory and a disk as given. "
    "Activation, host and disk bytes are exact; the peak and times are estimates and say so."
)
_TOKENS = re.compile(r"^\s*(\d+)\s*([kKmM]?)\s*$")


def _count(value: str) -> int:
    match = _TOKENS.match(value)
    if match is None:
        raise argparse.ArgumentTypeError(f"expected a token count such as 8192, 8k or 1m, got {value!r}")
    number, unit = int(match.group(1)), match.group(2).lower()
    return number * {"": 1, "k": 1024, "m": 1024 * 1024}[unit]


def parse_tokens(value: str) -> list[int]:
    """``8192`` / ``8k``: one length; ``4k:64k``: the powers of two from the first to the last."""
    if ":" not in value:
        return [_count(value)]
    first, last = (_count(part) for part in value.split(":", 1))
    if not 0 < first <= last:
        raise argparse.ArgumentTypeError(f"--tokens: a range goes from a positive length up, got {value!r}")
    lengths = [first]
    while lengths[-1] * 2 <= last:
        lengths.append(lengths[-1] * 2)
    return lengths if lengths[-1] == last else [*lengths, last]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model", help="a config.json, a model directory, or a hub id (only its config is read)"
    )
    parser.add_argument(
        "--tokens", type=parse_tokens, default=[8192],
        help="tokens per sequence to report: 8192, 8k, or a range 4k:128k (powers of two); default 8k",
    )  # fmt: skip
    parser.add_argument("--batch", type=int, default=1, help="sequences per step (default 1)")
    parser.add_argument(
        "--dtype", default="bfloat16", help="weights and activations: bfloat16, float16, float32"
    )
    parser.add_argument(
        "--gpu", "--gpu-memory", dest="gpu", default="H100 80GB",
        help=f"one of {', '.join(repr(name) for name in GPUS)}, or a memory size such as 80GiB "
        "(default H100 80GB)",
    )  # fmt: skip
    parser.add_argument(
        "--host-memory", default=None, help="pinned host memory allowed, e.g. 256GiB (default: no limit)"
    )
    parser.add_argument(
        "--disk", default=None, metavar="SIZE",
        help="a local NVMe disk for the offloaded layer inputs that do not fit --host-memory, earliest "
        "layers first, e.g. 3.84TB (default: no disk)",
    )  # fmt: skip
    parser.add_argument(
        "--disk-bandwidth", default=None, metavar="RATE[,WRITE]",
        help=f"the disk's sequential rate, e.g. 7GB/s, or read,write such as 7GB/s,5GB/s (default "
        f"{DEFAULT_READ_BYTES_PER_SECOND / 1e9:g}GB/s read, {DEFAULT_WRITE_BYTES_PER_SECOND / 1e9:g}GB/s "
        "write: one PCIe 4 datacenter NVMe)",
    )  # fmt: skip
    parser.add_argument(
        "--lora", type=int, default=None, metavar="R",
        help="LoRA of rank R on every linear layer (PEFT 'all-linear'); default: full fine-tuning",
    )  # fmt: skip
    parser.add_argument(
        "--attn", choices=ATTENTION, default="sdpa", help="attention implementation (default sdpa)"
    )
    parser.add_argument(
        "--mfu", type=float, default=DEFAULT_MFU,
        help=f"fraction of the GPU's peak FLOP/s a step reaches, for time estimates (default {DEFAULT_MFU})",
    )  # fmt: skip
    parser.add_argument(
        "--link-gbps", type=float, default=None, help="host link GB/s one way, instead of the GPU's"
    )
    parser.add_argument(
        "--reserve", default=DEFAULT_RESERVE,
        help="device memory left for the CUDA context, workspaces and fragmentation (default 2GiB)",
    )  # fmt: skip
    parser.add_argument(
        "--granularity", type=int, default=1024, help="longest contexts in steps of (default 1024)"
    )
    parser.add_argument(
        "--max-seq", type=int, default=None, help="where the search stops (default 8x the config's)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument(
        "--plot", type=Path, default=None, metavar="PNG", help="also plot tokens against device GiB"
    )


def main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        answer = capacity(
            args.model,
            args.tokens,
            batch=args.batch,
            gpu=args.gpu,
            dtype=args.dtype,
            lora_rank=args.lora,
            attn=args.attn,
            host_memory=args.host_memory,
            disk_memory=args.disk,
            disk_bandwidth=args.disk_bandwidth,
            mfu=args.mfu,
            link_bytes_per_second=args.link_gbps * 1e9 if args.link_gbps is not None else None,
            reserve_bytes=args.reserve,
            granularity=args.granularity,
            max_seq=args.max_seq,
            strategies=tuple(Strategy),
        )
    except (ValueError, ImportError) as error:
        parser.error(str(error))
    print(json.dumps(answer.to_dict(), indent=2) if args.json else text(answer))
    if args.plot is not None:
        print(f"plot: {plot(answer, args.plot)}")
    return 0
