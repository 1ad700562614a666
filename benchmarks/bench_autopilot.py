"""The autopilot scenario on the test suite's simulated device, for machines without a GPU.

Runs ``gcoffload.bench.autopilot`` (all-checkpoint, all-offload and the
autopilot at three budgets) on ``simdev:0`` (tools/simdevice), whose kernels
and copies take emulated time on worker threads while the host runs ahead, as
on a GPU, and whose caching allocator counts device memory as CUDA's does.
Every kernel takes ``--kernel-us``; copies run at ``--copy-gbps`` each way, so
the step time says how the plan's modes trade recompute and exposed copies,
not how a GPU would run. Writes ``autopilot-simdev.json`` and ``.md``.

Run from the repository root: ``python benchmarks/bench_autopilot.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import simdevice  # the test suite's simulated device

from gcoffload.bench import autopilot, common
from gcoffload.bench.decoder import DecoderShape
from gcoffload.bench.stack_overlap import StackConfig

SHAPE = DecoderShape("simdev-small", hidden=256, intermediate=1024, heads=4, kv_heads=2, depth=8)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--kernel-us", type=float, default=150.0, help="time of every kernel (default: %(default)s)"
    )
    parser.add_argument(
        "--copy-gbps", type=float, default=0.5, help="copy bandwidth each way (default: %(default)s)"
    )
    parser.add_argument(
        "--steps", type=common.positive_int, default=7, help="timed steps per run (default: %(default)s)"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="output directory")
    args = parser.parse_args()

    simdevice.load()
    simdevice.set_copy_timing(d2h_gbps=args.copy_gbps, h2d_gbps=args.copy_gbps, latency_us=10, jitter=0)
    simdevice.set_kernel_time_us(args.kernel_us)
    device = torch.device("simdev:0")
    config = StackConfig(SHAPE, SHAPE.depth, 2, 512)
    result = autopilot.run(config, device, torch.float32, warmup=2, steps=args.steps)
    environment = {
        **common.environment(torch.device("cpu")),
        "device": "simdev:0 (simulated device of tools/simdevice)",
        "kernel_us": args.kernel_us,
        "copy_gbps": args.copy_gbps,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "autopilot-simdev.json").write_text(
        json.dumps({"environment": environment, "autopilot": result}, indent=1, default=str) + "\n"
    )
    summary = (
        "# gcoffload autopilot on the simulated device\n\n"
        f"Simulated device (tools/simdevice) on {environment['device_name']}, torch {environment['torch']}, "
        f"gcoffload {environment['gcoffload']}, {environment['date']}. Every kernel takes "
        f"{args.kernel_us:g} us, copies run at {args.copy_gbps:g} GB/s each way: the times show how the "
        "plans trade recompute against exposed copies, not GPU performance.\n\n"
        + autopilot.report(result)
        + "\n"
    )
    (args.out / "autopilot-simdev.md").write_text(summary)
    print(summary)


if __name__ == "__main__":
    main()
