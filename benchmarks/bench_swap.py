"""The swap scenario on the test suite's simulated device, at three bus speeds, for machines without a GPU.

Runs ``gcoffload.bench.swap`` (plain checkpointing, every input offloaded,
the autopilot without and with swap, every layer swapped; all at the least
memory) on ``simdev:0`` (tools/simdevice), whose kernels and copies take
emulated time on worker threads while the host runs ahead, as on a GPU, and
whose caching allocator counts device memory as CUDA's does. Every kernel
takes ``--kernel-us``; the copy bandwidth is set, each way, so that copying
one layer's swapped activations takes 0.3x, 1x and 3x its forward time. The
times show how the plans trade recompute against copies, not how a GPU would
run. Writes ``swap-simdev.json`` and ``.md``.

Run from the repository root: ``python benchmarks/bench_swap.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import simdevice  # the test suite's simulated device

from gcoffload.bench import common, swap
from gcoffload.bench.decoder import DecoderShape
from gcoffload.bench.stack_overlap import StackConfig

# Small enough that the emulated kernel times, not the host's own arithmetic and memcpy on its two
# cores, make the step time: the bus ratios are then what simdev's copy timing says.
SHAPE = DecoderShape("simdev-tiny", hidden=128, intermediate=512, heads=4, kv_heads=2, depth=8)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--kernel-us", type=float, default=800.0, help="time of every kernel (default: %(default)s)"
    )
    parser.add_argument(
        "--bus",
        type=float,
        nargs="+",
        default=list(swap.BUS_RATIOS),
        help="bus speeds: copy time of a "
        "layer's swapped activations over its forward time (default: %(default)s)",
    )
    parser.add_argument(
        "--steps", type=common.positive_int, default=7, help="timed steps per run (default: %(default)s)"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="output directory")
    args = parser.parse_args()

    simdevice.load()
    simdevice.set_kernel_time_us(args.kernel_us)

    def set_bandwidth(bytes_per_second: float) -> None:
        gbps = bytes_per_second / 1e9
        simdevice.set_copy_timing(d2h_gbps=gbps, h2d_gbps=gbps, latency_us=10, jitter=0)

    device = torch.device("simdev:0")
    config = StackConfig(SHAPE, SHAPE.depth, 2, 256)
    result = swap.run(
        config,
        device,
        torch.float32,
        warmup=2,
        steps=args.steps,
        bus_ratios=args.bus,
        set_bandwidth=set_bandwidth,
        advance=lambda label: print(label, flush=True),
    )
    environment = {
        **common.environment(torch.device("cpu")),
        "device": "simdev:0 (simulated device of tools/simdevice)",
        "kernel_us": args.kernel_us,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "swap-simdev.json").write_text(
        json.dumps({"environment": environment, "swap": result}, indent=1, default=str) + "\n"
    )
    summary = (
        "# gcoffload swap on the simulated device\n\n"
        f"Simulated device (tools/simdevice) on {environment['device_name']}, torch {environment['torch']}, "
        f"gcoffload {environment['gcoffload']}, {environment['date']}. Every kernel takes "
        f"{args.kernel_us:g} us; each bus speed sets the copy bandwidth (each way) so that one layer's "
        "swapped activations take that multiple of its forward time to copy one way. The times show how "
        "the plans trade recompute against copies, not GPU performance.\n\n" + swap.report(result) + "\n"
    )
    (args.out / "swap-simdev.md").write_text(summary)
    print(summary)


if __name__ == "__main__":
    main()
