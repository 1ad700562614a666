"""The disk tier's cost in a training step, on the test suite's simulated device with this machine's disk.

A stack of ``--layers`` layers runs on ``simdev:0`` (tools/simdevice), whose
kernels and copies take emulated time on worker threads while the host runs
ahead, as on a GPU, under the RAM tier (every input offloaded to pinned host
memory, no budget) and the disk tier (host budget 0: every offloaded input
goes through pinned staging to an unnamed file in ``--disk-dir``, on this
machine's real disk, and comes back from it).

Each layer is one multiply-add over hidden states of ``--tokens`` x
``--hidden`` (float32): its own arithmetic is small next to the emulated
kernel time, which is set so that a layer's forward pass takes ``--ratio``
times as long as writing its input to the disk, or reading it, whichever is
slower at the disk's measured bandwidth (``measure_disk_bandwidth`` in blocks
of one input). A layer's backward pass (recompute and backward) takes longer
still. Copies run at 25 GB/s each way, so the bus is not what limits.

After the forward pass the host waits for the device, in both runs, as a loop
that reads its loss would: otherwise the host, far ahead of the device,
reaches backward before the writes are done, and the tier hands most inputs
back from staging without reading them. Staging holds four inputs (as the
default 512 MiB holds four of a Llama-8B-like layer at 16k tokens), so a step
cannot stay in pinned memory.

The two tiers run in alternating rounds (the disk is shared with other jobs
and drifts). Per round and tier: median step time, the disk tier's ratio to
the RAM tier's round, and the disk tier's ``hidden_fraction`` and
``stall_seconds`` per step (on an asynchronous device these count the host's
waits, which the device's queue may hide: the step time is the measure).
Writes ``disk-simdev.json`` and ``.md``.

Run from the repository root: ``python benchmarks/bench_disk.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import simdevice  # the test suite's simulated device

from gcoffload.bench import common, disk
from gcoffload.bench.decoder import run_stack
from gcoffload.checkpointing import counters
from gcoffload.checkpointing.options import OffloadOptions
from gcoffload.engine import extension
from gcoffload.layers.wrap import wrap_layers

BUS_GBPS = 25.0
STAGED_INPUTS = 4
CALIBRATIONS = 4  # kernel times tried at most, each corrected from the forward time measured
ROUNDS = 2
OPTIONS = OffloadOptions(min_offload_bytes=0)


class MultiplyAdd(nn.Module):
    """``hidden_states * weight + bias`` in one kernel: a layer whose time is the emulated kernel time."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.bias = nn.Parameter(torch.zeros(hidden))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.bias, hidden_states, self.weight)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--ratio",
        type=float,
        default=2.0,
        help="a layer's forward time over its input's disk time (default: %(default)s)",
    )
    parser.add_argument("--layers", type=common.positive_int, default=8, help="default: %(default)s")
    parser.add_argument("--tokens", type=common.positive_int, default=2048, help="default: %(default)s")
    parser.add_argument("--hidden", type=common.positive_int, default=512, help="default: %(default)s")
    parser.add_argument(
        "--steps", type=common.positive_int, default=7, help="timed steps per round (default: %(default)s)"
    )
    parser.add_argument(
        "--disk-dir",
        type=Path,
        help="directory on the disk to use (default: $GCOFFLOAD_DISK_DIR, else a temporary directory "
        "under the current one)",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="output directory")
    args = parser.parse_args()

    simdevice.load()
    simdevice.set_copy_timing(d2h_gbps=BUS_GBPS, h2d_gbps=BUS_GBPS, latency_us=10, jitter=0)
    device = torch.device("simdev:0")
    torch.manual_seed(0)
    stack = nn.ModuleList(MultiplyAdd(args.hidden) for _ in range(args.layers)).to(device)
    inputs = torch.randn(1, args.tokens, args.hidden, device=device, requires_grad=True)
    output_grad = torch.randn_like(inputs)
    input_bytes = inputs.nbytes

    def step() -> None:
        stack.zero_grad(set_to_none=True)
        inputs.grad = None
        output = run_stack(stack, inputs)
        common.synchronize(device)  # see the module's docstring
        output.backward(output_grad)

    with common.one_thread_on_the_cpu(torch.device("cpu")), disk.directory(args.disk_dir) as where:
        disk_dir = str(where)
        filesystem = disk.filesystem(where)
        bandwidth = extension.load().measure_disk_bandwidth(disk_dir, 16 * input_bytes, input_bytes)
        slower = min(bandwidth["write_bytes_per_second"], bandwidth["read_bytes_per_second"])
        disk_ms = input_bytes / slower * 1e3
        print(
            f"disk: {bandwidth}; one input ({input_bytes / common.MIB:g} MiB) takes {disk_ms:.2f} ms",
            flush=True,
        )
        kernel_us, forward_ms = _calibrate(args.ratio * disk_ms, lambda: _forward_ms(stack, inputs, device))
        print(f"kernel time {kernel_us:.0f} us: a layer's forward pass takes {forward_ms:.2f} ms", flush=True)
        tiers = {
            "RAM tier": {"host_budget_bytes": None, "over_budget": "keep"},
            "disk tier": {
                "host_budget_bytes": 0,
                "over_budget": "disk",
                "disk_dir": disk_dir,
                "disk_staging_bytes": STAGED_INPUTS * (input_bytes + common.MIB),
            },
        }
        rows, reference = [], None
        for index in range(ROUNDS):
            for name, settings in tiers.items():
                print(f"round {index + 1}: {name}", flush=True)
                row, gradients = _measure(name, settings, stack, step, inputs, device, args.steps)
                reference = reference or gradients
                row.update(round=index + 1, gradients_equal=all(map(torch.equal, gradients, reference)))
                rows.append(row)
        environment = {  # inside the run's one torch thread
            **common.environment(torch.device("cpu")),
            "device": "simdev:0 (simulated device of tools/simdevice)",
            "disk_dir": disk_dir,
            "filesystem": filesystem,
        }
    for row in rows:
        ram = next(other for other in rows if other["round"] == row["round"] and other["tier"] == "RAM tier")
        row["vs_ram"] = row["median_ms"] / ram["median_ms"]
    pooled = {
        name: statistics.median(ms for row in rows if row["tier"] == name for ms in row["times_ms"])
        for name in tiers
    }
    result = {
        "layers": args.layers,
        "input_bytes": input_bytes,
        "disk_bandwidth": bandwidth,
        "disk_ms_per_input": disk_ms,
        "kernel_us": kernel_us,
        "forward_ms_per_layer": forward_ms,
        "compute_vs_disk": forward_ms / disk_ms,
        "bus_gbps": BUS_GBPS,
        "staging_bytes": tiers["disk tier"]["disk_staging_bytes"],
        "rows": rows,
        "median_ms": pooled,
        "disk_vs_ram": pooled["disk tier"] / pooled["RAM tier"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "disk-simdev.json").write_text(
        json.dumps({"environment": environment, "disk": result}, indent=1, default=str) + "\n"
    )
    summary = _summary(environment, result)
    (args.out / "disk-simdev.md").write_text(summary)
    print(summary)


def _forward_ms(stack: nn.ModuleList, inputs: torch.Tensor, device: torch.device) -> float:
    """A layer's forward time (ms), the median of three passes without grad."""
    times = []
    for _ in range(3):
        common.synchronize(device)
        start = time.perf_counter()
        with torch.no_grad():
            run_stack(stack, inputs)
        common.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3 / len(stack))
    return statistics.median(times)


def _calibrate(target_ms: float, forward_ms: Callable[[], float]) -> tuple[float, float]:
    """The kernel time (us) at which a layer's forward pass takes ``target_ms``, and the time measured at it.

    Corrected from each measurement (the layer's own arithmetic and the queue add to the kernel time);
    stops within 5% of the target, never below it.
    """
    kernel_us = target_ms * 1e3
    for _ in range(CALIBRATIONS):
        simdevice.set_kernel_time_us(kernel_us)
        measured = forward_ms()
        if 1.0 <= measured / target_ms <= 1.05:
            break
        kernel_us *= target_ms / measured * 1.02
    return kernel_us, measured


def _measure(
    name: str,
    settings: dict[str, Any],
    stack: nn.ModuleList,
    step: Callable[[], None],
    inputs: torch.Tensor,
    device: torch.device,
    steps: int,
) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """One tier's timed steps after two warm-up ones, its counters per step, and the last step's gradients."""
    with disk.host_settings(**settings), wrap_layers(stack, OPTIONS):
        common.time_steps(step, device, warmup=2, steps=0)
        counters.reset_stats()
        times = common.time_steps(step, device, warmup=0, steps=steps)
        row = {
            "tier": name,
            "times_ms": times,
            "median_ms": statistics.median(times),
            **disk.tier_per_step(device, steps),
        }
    gradients = [inputs.grad.cpu(), *(parameter.grad.cpu() for parameter in stack.parameters())]
    return row, gradients


COLUMNS = [
    ("round", "round", "str"),
    ("tier", "tier", "str"),
    ("median_ms", "step ms", "ms"),
    ("vs_ram", "vs RAM tier", "ratio"),
    ("disk_spills_per_step", "to disk / step", "str"),
    ("read_bytes_per_step", "read MiB / step", "mib"),
    ("stall_ms_per_step", "stall ms / step", "ms"),
    ("hidden_fraction", "hidden", "frac"),
    ("gradients_equal", "gradients equal", "str"),
]


def _summary(environment: dict[str, Any], result: dict[str, Any]) -> str:
    bandwidth = result["disk_bandwidth"]
    return (
        "# gcoffload disk tier on the simulated device\n\n"
        f"Simulated device (tools/simdevice) on {environment['device_name']} ({environment['cpu_count']} "
        f"cores), torch {environment['torch']}, gcoffload {environment['gcoffload']}, "
        f"{environment['date']}; the disk is this machine's ({environment['disk_dir']}, "
        f"{environment['filesystem']}, "
        f"{'O_DIRECT' if bandwidth['direct'] else 'buffered'}): "
        f"{bandwidth['write_bytes_per_second'] / 1e9:.2f} GB/s write, "
        f"{bandwidth['read_bytes_per_second'] / 1e9:.2f} GB/s read in blocks of one input "
        f"({result['input_bytes'] / common.MIB:g} MiB: {result['disk_ms_per_input']:.2f} ms the slower way). "
        f"{result['layers']} layers; every kernel takes {result['kernel_us']:.0f} us, so a layer's forward "
        f"pass takes {result['forward_ms_per_layer']:.2f} ms, {result['compute_vs_disk']:.2f}x its input's "
        f"disk time; copies at {result['bus_gbps']:g} GB/s each way; staging "
        f"{result['staging_bytes'] / common.MIB:g} MiB. Emulated kernel and copy times, not GPU "
        "performance. Stall and hidden count the host's waits for the tier (for staging in forward, for "
        "reads in backward), which the device's queue may hide: the step time is the measure.\n\n"
        f"**disk tier / RAM tier, median step over both rounds: {result['disk_vs_ram']:.3f}x** "
        f"({result['median_ms']['disk tier']:.1f} ms against {result['median_ms']['RAM tier']:.1f} ms)\n\n"
        + common.table(result["rows"], COLUMNS)
        + "\n"
    )


if __name__ == "__main__":
    main()
