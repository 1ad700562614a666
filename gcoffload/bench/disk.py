"""Scenario (g): the disk tier, its throughput against the raw disk, and a training step on it.

Throughput: the directory's raw sequential bandwidth
(``measure_disk_bandwidth``: an O_DIRECT ``pwrite``/``pread`` loop of one
aligned buffer over an unnamed file, its places written once before the timed
pass, as the tier rewrites its own) next to the engine's disk tier
moving ``tensors`` tensors of ``tensor_bytes`` under a host budget of 0, so
that every one goes to disk. The write rate counts from the first offload
until ``engine.synchronize()`` returns; the read rate from the first
``read_ahead`` (of every tensor, in backward order) until the last ``fetch``
has its tensor on the device, which includes the copies out of staging (on
the CPU, memcpys into new tensors). Every tensor must come back equal. Raw
and engine measurements alternate ``rounds`` times, since a disk shared with
other jobs drifts, and their medians are compared. An untimed engine round
comes first: the staging buffers are allocated and the file grows once. The
tier's own counters are reported beside them: bytes over the seconds its I/O
threads spent in transfers.

Training: a decoder stack with dropout after every layer (inside the
checkpoint, so each recompute must draw the same mask), run without
checkpointing, with every input offloaded to host memory under no budget
(the RAM tier), and with a host budget of ``host_budget_bytes`` that sends
most inputs to the disk tier. Every step is seeded alike; each run's
gradients must equal those without checkpointing. Per run: median step time
and its ratio to the RAM tier, and for the disk tier, per step, the inputs it
spilled and read ahead, the bytes it wrote and read, the time training waited
for it (``stall_seconds``) and the share of its transfer time nobody waited
for (``hidden_fraction``).

The disk's directory is ``--disk-dir``, else ``$GCOFFLOAD_DISK_DIR``, else a
temporary directory under the current one (not the system's, which may be
tmpfs); its filesystem, and whether it took O_DIRECT, are reported with the
numbers.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpointing import counters
from ..checkpointing.options import OffloadOptions
from ..engine import extension, get_engine, registry
from ..engine.host_settings import DISK_DIR_ENV
from ..layers.wrap import wrap_layers
from . import common, noise
from .decoder import LLAMA_1B, SMOKE, build_stack, training_step
from .stack_overlap import StackConfig

DROPOUT = 0.1
SEED = 0  # every step draws the same dropout masks, so the runs' gradients can be compared
OPTIONS = OffloadOptions(min_offload_bytes=0)
RUNS = ("no checkpointing", "RAM tier", "disk tier")
PHASES = 1 + len(RUNS)  # the throughput, then each training run


@dataclass(frozen=True)
class DiskConfig:
    """The sizes of the disk scenario.

    Attributes:
        raw_bytes: bytes the raw measurement writes and reads.
        block_bytes: bytes per ``pwrite`` and ``pread`` call of the raw measurement.
        tensor_bytes: size of each tensor the engine moves.
        tensors: how many tensors the engine moves.
        rounds: alternations of the raw and the engine measurement.
        stack: the training run's decoder stack.
        host_budget_bytes: the training run's host budget on the disk tier.
    """

    raw_bytes: int
    block_bytes: int
    tensor_bytes: int
    tensors: int
    rounds: int
    stack: StackConfig
    host_budget_bytes: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "raw_bytes": self.raw_bytes,
            "block_bytes": self.block_bytes,
            "tensor_bytes": self.tensor_bytes,
            "tensors": self.tensors,
            "rounds": self.rounds,
            "stack": self.stack.as_dict(),
            "host_budget_bytes": self.host_budget_bytes,
        }


MIB = common.MIB
# The training stacks: two inputs fit the host budget, the other offloaded ones go to disk.
GPU_CONFIG = DiskConfig(1024 * MIB, 64 * MIB, 128 * MIB, 4, 3, StackConfig(LLAMA_1B, 16, 4, 2048), 64 * MIB)
SMOKE_CONFIG = DiskConfig(32 * MIB, 16 * MIB, 16 * MIB, 2, 1, StackConfig(SMOKE, 4, 1, 256), MIB // 4)
CPU_FULL_CONFIG = DiskConfig(256 * MIB, 64 * MIB, 64 * MIB, 4, 3, StackConfig(SMOKE, 8, 2, 256), MIB)


def run(
    config: DiskConfig,
    device: torch.device,
    dtype: torch.dtype,
    disk_dir: Path | None,
    warmup: int,
    steps: int,
    advance: Callable[[str], None] = lambda label: None,
) -> dict[str, Any]:
    """Measures the throughput and the three training runs in ``disk_dir`` (see :func:`directory`)."""
    with directory(disk_dir) as where:
        advance("disk: throughput of the raw disk and of the engine")
        throughput = measure_throughput(config, device, where)
        training = measure_training(config, device, dtype, where, warmup, steps, advance)
    return {
        "config": config.as_dict(),
        "directory": str(where),
        "filesystem": filesystem(where),
        "dtype": str(dtype),
        "throughput": throughput,
        "training": training,
    }


@contextlib.contextmanager
def directory(given: Path | None) -> Iterator[Path]:
    """``given``, else ``$GCOFFLOAD_DISK_DIR``, else a new directory under the current one (removed after)."""
    chosen = given or os.environ.get(DISK_DIR_ENV)
    if chosen:
        yield Path(chosen)
        return
    with tempfile.TemporaryDirectory(prefix="gcoffload-disk-bench-", dir=Path.cwd()) as made:
        yield Path(made)


def filesystem(path: Path) -> str | None:
    """``"ext4 on /dev/vda"``: the type and source of the mount that holds ``path`` (None if unknown)."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:  # not Linux
        return None
    resolved = path.resolve()
    holding = [
        (Path(point), kind, source)
        for source, point, kind, *_ in (line.split() for line in mounts)
        if resolved.is_relative_to(point)
    ]
    if not holding:
        return None
    _, kind, source = max(holding, key=lambda mount: len(mount[0].parts))
    return f"{kind} on {source}"


@contextlib.contextmanager
def host_settings(**settings: Any) -> Iterator[None]:
    """``gcoffload.configure(**settings)`` inside the block, the settings in force before it after."""
    before = registry.settings()
    registry.configure(**settings)
    try:
        yield
    finally:
        registry.configure(**before)


def measure_throughput(config: DiskConfig, device: torch.device, where: Path) -> dict[str, Any]:
    """The raw disk against the engine's disk tier, both ways, ``config.rounds`` times alternately."""
    torch.manual_seed(SEED)
    tensors = [torch.randn(config.tensor_bytes // 4, device=device) for _ in range(config.tensors)]
    # Staging for every tensor at once: the read-aheads are not cut short by the staging limit.
    staging = config.tensors * (config.tensor_bytes + MIB)
    rounds = []
    with host_settings(
        host_budget_bytes=0, over_budget="disk", disk_dir=str(where), disk_staging_bytes=staging
    ):
        _engine_round(tensors, device)  # untimed: the staging buffers' and the file's first growth
        for _ in range(config.rounds):
            raw = extension.load().measure_disk_bandwidth(str(where), config.raw_bytes, config.block_bytes)
            rounds.append(
                {**_engine_round(tensors, device), **{f"raw_{key}": value for key, value in raw.items()}}
            )
    total = config.tensors * config.tensor_bytes
    medians = {
        key: statistics.median(row[key] for row in rounds)
        for key in (
            "raw_write_bytes_per_second",
            "raw_read_bytes_per_second",
            "write_bytes_per_second",
            "read_bytes_per_second",
            "io_write_bytes_per_second",
            "io_read_bytes_per_second",
        )
    }
    return {
        "bytes": total,
        "rounds": rounds,
        **medians,
        "write_vs_raw": medians["write_bytes_per_second"] / medians["raw_write_bytes_per_second"],
        "read_vs_raw": medians["read_bytes_per_second"] / medians["raw_read_bytes_per_second"],
        "raw_direct": all(row["raw_direct"] for row in rounds),
        "direct": all(row["direct"] for row in rounds),
        "all_on_disk": all(row["on_disk"] == config.tensors for row in rounds),
        "equal": all(row["equal"] for row in rounds),
    }


def _engine_round(tensors: Sequence[torch.Tensor], device: torch.device) -> dict[str, Any]:
    """Every tensor to the disk tier and back, each way timed; the tier's own counters of the round."""
    engine = get_engine(device)
    engine.synchronize()
    registry.reset_pool_peaks()  # and the tier's counters
    total = sum(tensor.nbytes for tensor in tensors)
    start = time.perf_counter()
    handles = [engine.offload(tensor) for tensor in tensors]
    engine.synchronize()
    write_seconds = time.perf_counter() - start
    on_disk = sum(handle.placement == "disk" for handle in handles)

    backward = handles[::-1]
    start = time.perf_counter()
    for handle in backward:
        engine.read_ahead(handle)
    returned = [engine.fetch(handle) for handle in backward]
    common.synchronize(device)
    read_seconds = time.perf_counter() - start
    tier = registry.disk_stats()[device.type]
    equal = all(torch.equal(back, sent) for back, sent in zip(returned, reversed(tensors), strict=True))
    return {
        "write_bytes_per_second": total / write_seconds,
        "read_bytes_per_second": total / read_seconds,
        "io_write_bytes_per_second": tier["write_bytes_per_second"],
        "io_read_bytes_per_second": tier["read_bytes_per_second"],
        "reads": tier["reads"],
        "direct": tier["direct"],
        "on_disk": on_disk,
        "equal": equal,
    }


def dropout_stack(config: StackConfig, device: torch.device, dtype: torch.dtype) -> nn.ModuleList:
    """The decoder stack of ``config``, each layer followed by dropout that its checkpoint covers."""
    stack = build_stack(config.shape, config.layers, device, dtype)
    return nn.ModuleList(nn.Sequential(layer, nn.Dropout(DROPOUT)) for layer in stack).train()


def measure_training(
    config: DiskConfig,
    device: torch.device,
    dtype: torch.dtype,
    where: Path,
    warmup: int,
    steps: int,
    advance: Callable[[str], None],
) -> dict[str, Any]:
    """The three training runs (:data:`RUNS`), each compared with the first's gradients."""
    stack = dropout_stack(config.stack, device, dtype)
    inputs, output_grad = config.stack.tensors(device, dtype)
    step = training_step(stack, inputs, output_grad)

    def seeded_step() -> None:
        torch.manual_seed(SEED)
        step()

    settings: dict[str, dict[str, Any] | None] = {
        "no checkpointing": None,
        "RAM tier": {"host_budget_bytes": None, "over_budget": "keep"},
        "disk tier": {
            "host_budget_bytes": config.host_budget_bytes,
            "over_budget": "disk",
            "disk_dir": str(where),
        },
    }
    rows, reference = [], None
    for name, configured in settings.items():
        advance(f"disk {config.stack.label}: {name}")
        with contextlib.ExitStack() as scope:
            if configured is not None:
                scope.enter_context(host_settings(**configured))
                scope.enter_context(wrap_layers(stack, OPTIONS))
            common.time_steps(seeded_step, device, warmup=warmup, steps=0)
            counters.reset_stats()
            times = common.time_steps(seeded_step, device, warmup=0, steps=steps)
            gradients = [inputs.grad, *(parameter.grad for parameter in stack.parameters())]
            row = {"run": name, "median_ms": statistics.median(times), "step_ms": common.spread(times)}
            if configured is not None:
                row.update(tier_per_step(device, steps))
        if reference is None:
            reference = [gradient.clone() for gradient in gradients]
        else:
            row.update(_compared(gradients, reference))
        row["noisy"] = noise.diagnose(times, {})
        rows.append(row)
    noise.mark_implausible(rows, "run")
    ram = next(row for row in rows if row["run"] == "RAM tier")["median_ms"]
    for row in rows:
        row["vs_ram"] = row["median_ms"] / ram
    return {"label": config.stack.label, "dropout": DROPOUT, "runs": rows}


def tier_per_step(device: torch.device, steps: int) -> dict[str, Any]:
    """What the engine and the disk tier did per timed step (the tier's, where it is in use)."""
    get_engine(device).synchronize()
    stats = counters.stats()
    copies = stats["devices"][str(device)]
    row = {
        "offloads_per_step": copies["offloads"] / steps,
        "disk_spills_per_step": copies["disk_spills"] / steps,
        "read_aheads_per_step": copies["read_aheads"] / steps,
    }
    tier = stats["disks"].get(device.type)
    if tier is not None:
        row.update(
            written_bytes_per_step=tier["written_bytes"] / steps,
            read_bytes_per_step=tier["read_bytes"] / steps,
            stall_ms_per_step=tier["stall_seconds"] * 1e3 / steps,
            hidden_fraction=tier["hidden_fraction"],
            direct=tier["direct"],
        )
    return row


def _compared(gradients: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> dict[str, Any]:
    """Whether ``gradients`` equal ``reference`` bit for bit, and by how much they differ at most."""
    pairs = list(zip(gradients, reference, strict=True))
    return {
        "gradients_equal": all(torch.equal(got, expected) for got, expected in pairs),
        "max_gradient_difference": max((got - expected).abs().max().item() for got, expected in pairs),
    }


THROUGHPUT_COLUMNS = [
    ("way", "way", "str"),
    ("raw", "raw GB/s", "gbps"),
    ("engine", "engine GB/s", "gbps"),
    ("ratio", "engine / raw", "ratio"),
    ("io", "tier's I/O threads GB/s", "gbps"),
]
TRAINING_COLUMNS = [
    ("run", "run", "str"),
    ("median_ms", "step ms", "ms"),
    ("vs_ram", "vs RAM tier", "ratio"),
    ("gradients_equal", "gradients equal", "str"),
    ("offloads_per_step", "offloads / step", "str"),
    ("disk_spills_per_step", "to disk / step", "str"),
    ("read_aheads_per_step", "read ahead / step", "str"),
    ("written_bytes_per_step", "written MiB / step", "mib"),
    ("read_bytes_per_step", "read MiB / step", "mib"),
    ("stall_ms_per_step", "stall ms / step", "ms"),
    ("hidden_fraction", "hidden", "frac"),
    ("noisy", "noisy", "str"),
]


def _gigabytes(per_second: float | None) -> float | None:
    return None if per_second is None else per_second / 1e9


def report(result: dict[str, Any]) -> str:
    """The throughput table, then the training runs' table."""
    config, throughput, training = result["config"], result["throughput"], result["training"]
    direct = (
        "O_DIRECT" if throughput["direct"] else "buffered (no O_DIRECT: tmpfs or the like; memory's rates)"
    )
    ways = [
        {
            "way": way,
            "raw": throughput[f"raw_{way}_bytes_per_second"] / 1e9,
            "engine": throughput[f"{way}_bytes_per_second"] / 1e9,
            "ratio": throughput[f"{way}_vs_raw"],
            "io": _gigabytes(throughput[f"io_{way}_bytes_per_second"]),
        }
        for way in ("write", "read")
    ]
    budget = common.format_value(config["host_budget_bytes"], "mib")
    sizes = {
        name: common.format_value(config[name], "bytes")
        for name in ("tensor_bytes", "raw_bytes", "block_bytes")
    }
    return "\n".join(
        [
            f"### disk tier, {result['directory']} ({result['filesystem']}, {direct})",
            "",
            f"**throughput**: {config['tensors']} tensors of {sizes['tensor_bytes']}, host budget 0 (all on "
            f"disk: {throughput['all_on_disk']}), against the raw disk ({sizes['raw_bytes']} in "
            f"{sizes['block_bytes']} blocks, rewriting its file's places as the tier does); medians "
            f"of {config['rounds']} alternating rounds; the data came back equal: {throughput['equal']}",
            "",
            common.table(ways, THROUGHPUT_COLUMNS),
            "",
            f"**training**, {training['label']} with dropout {training['dropout']:g} after every layer "
            f"({result['dtype']}): the RAM tier has no host budget, the disk tier {budget} MiB",
            "",
            common.table(training["runs"], TRAINING_COLUMNS),
        ]
    )
