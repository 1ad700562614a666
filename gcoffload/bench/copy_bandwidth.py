"""Scenario (a): raw pinned copies against the engine's, per direction and both at once.

For each size: a raw ``copy_`` between device memory and a pinned host tensor
on a side stream (D2H, H2D, and both at once on two streams), then the same
through the engine (``offload``; ``prefetch`` + ``fetch``; an offload and a
prefetch issued together). Device events time the raw copies, the engine's
trace times its own. On the CPU both are memcpy: a smoke run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..engine import get_engine
from . import common, noise

GPU_SIZES = tuple(common.MIB << shift for shift in range(0, 11, 2))  # 1 MiB .. 1 GiB
SMOKE_SIZES = (common.MIB, 4 * common.MIB, 16 * common.MIB)
DIRECTIONS = {"d2h": "D2H", "h2d": "H2D", "both": "both"}


def raw_copy_ms(nbytes: int, device: torch.device, direction: str, repeats: int = 5) -> float:
    """Median time of one raw pinned copy of ``nbytes`` in ``direction`` ("d2h", "h2d" or "both").

    Each direction runs on its own side stream and is timed with events on
    that stream, from the first copy's start to the last one's end, as the
    engine's trace times its copies.
    """
    on_device = device.type != "cpu"
    device_buffers = [torch.empty(nbytes, dtype=torch.uint8, device=device) for _ in range(2)]
    host_buffers = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=on_device) for _ in range(2)]
    work = []
    if direction in ("d2h", "both"):
        work.append((host_buffers[0], device_buffers[0]))
    if direction in ("h2d", "both"):
        work.append((device_buffers[1], host_buffers[1]))
    if not on_device:
        return statistics.median(_wall_clock_ms(work) for _ in range(repeats + 1))
    streams = [torch.cuda.Stream(device) for _ in work]

    def once() -> float:
        torch.cuda.synchronize(device)
        current = torch.cuda.current_stream(device)
        events = []
        for stream, (destination, source) in zip(streams, work, strict=True):
            stream.wait_stream(current)
            with torch.cuda.stream(stream):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                destination.copy_(source, non_blocking=True)
                end.record()
            events.append((start, end))
        torch.cuda.synchronize(device)
        origin = events[0][0]
        return max(origin.elapsed_time(end) for _, end in events) - min(
            origin.elapsed_time(start) for start, _ in events
        )

    once()
    return statistics.median(once() for _ in range(repeats))


def _wall_clock_ms(work: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    start = time.perf_counter()
    for destination, source in work:
        destination.copy_(source)
    return (time.perf_counter() - start) * 1e3


def engine_copy_ms(nbytes: int, device: torch.device, direction: str, repeats: int = 5) -> float:
    """Median time of the engine's copy of ``nbytes``, from its own trace (first issue to last finish)."""
    engine = get_engine(device)
    sources = [torch.empty(nbytes, dtype=torch.uint8, device=device) for _ in range(2)]
    times = []
    for _ in range(repeats + 1):
        parked = engine.offload(sources[1])
        engine.synchronize()
        common.synchronize(device)
        with engine.trace() as trace:
            if direction in ("d2h", "both"):
                handle = engine.offload(sources[0])
            if direction in ("h2d", "both"):
                engine.prefetch(parked)
            engine.synchronize()
        copies = [entry for entry in trace if entry["op"] in ("offload", "prefetch")]
        times.append(max(entry["end_ms"] for entry in copies) - min(entry["start_ms"] for entry in copies))
        if direction in ("d2h", "both"):
            engine.fetch(handle)
        engine.fetch(parked)
    return statistics.median(times[1:])


def run(
    sizes: Sequence[int], device: torch.device, advance: Callable[[str], None] = lambda label: None
) -> list[dict]:
    rows = []
    for nbytes in sizes:
        advance(f"copy {nbytes // common.MIB} MiB")
        row: dict[str, Any] = {"bytes": nbytes, "size": f"{nbytes // common.MIB} MiB"}
        for direction in DIRECTIONS:
            moved = 2 * nbytes if direction == "both" else nbytes
            row[f"raw_{direction}_gbps"] = common.gbps(moved, raw_copy_ms(nbytes, device, direction))
            row[f"engine_{direction}_gbps"] = common.gbps(moved, engine_copy_ms(nbytes, device, direction))
            if row[f"raw_{direction}_gbps"] and row[f"engine_{direction}_gbps"]:
                row[f"{direction}_vs_raw"] = row[f"engine_{direction}_gbps"] / row[f"raw_{direction}_gbps"]
        row["noisy"] = noise.diagnose(
            gbps={
                f"{kind} {name}": row[f"{kind}_{direction}_gbps"]
                for kind in ("raw", "engine")
                for direction, name in DIRECTIONS.items()
            }
        )
        rows.append(row)
    get_engine(device).trim()
    return rows


COLUMNS = [
    ("size", "size", "str"),
    ("raw_d2h_gbps", "raw D2H GB/s", "gbps"),
    ("engine_d2h_gbps", "engine D2H", "gbps"),
    ("d2h_vs_raw", "D2H/raw", "frac"),
    ("raw_h2d_gbps", "raw H2D", "gbps"),
    ("engine_h2d_gbps", "engine H2D", "gbps"),
    ("h2d_vs_raw", "H2D/raw", "frac"),
    ("raw_both_gbps", "raw both", "gbps"),
    ("engine_both_gbps", "engine both", "gbps"),
    ("both_vs_raw", "both/raw", "frac"),
    ("noisy", "noisy", "str"),
]


def report(rows: list[dict]) -> str:
    return "### copy bandwidth\n\n" + common.table(rows, COLUMNS)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=common.help_text(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes-mib",
        type=common.positive_int,
        nargs="+",
        help="copy sizes in MiB (default: 1 MiB to 1 GiB on a GPU, 1 to 16 MiB on the CPU)",
    )
    args = parser.parse_args(argv)
    device = get_engine().device
    default = GPU_SIZES if device.type != "cpu" else SMOKE_SIZES
    sizes = [size * common.MIB for size in args.sizes_mib] if args.sizes_mib else default
    with common.one_thread_on_the_cpu(device):
        print(report(run(sizes, device)))
