"""The copy engine on a real GPU: copies overlap real compute, no memory grows, the pool is pinned.

The stream orderings themselves are tested on every asynchronous device, the
simulated one included, in test_stream_ordering.py.
"""

from __future__ import annotations

import pytest
import torch
from test_engine import same_bytes

pytestmark = pytest.mark.cuda

DEVICE = "cuda:0"


def overlap_ms(interval: tuple[float, float], other: tuple[float, float]) -> float:
    return max(0.0, min(interval[1], other[1]) - max(interval[0], other[0]))


def marks(trace: list[dict]) -> dict[str, float]:
    return {entry["label"]: entry["start_ms"] for entry in trace if entry["op"] == "mark"}


def copy_interval(trace: list[dict], op: str) -> tuple[float, float]:
    (entry,) = [entry for entry in trace if entry["op"] == op]
    return entry["start_ms"], entry["end_ms"]


def busy_compute(size: int = 4096, repeats: int = 40) -> torch.Tensor:
    matrix = torch.randn(size, size, device=DEVICE)
    for _ in range(repeats):
        matrix = torch.tanh(matrix @ matrix)
    return matrix


def test_d2h_copy_overlaps_compute_on_a_side_stream(make_engine):
    engine = make_engine(DEVICE, slab_bytes=1 << 28)
    source = torch.randn(64 << 18, device=DEVICE)  # 64 MiB
    busy_compute(repeats=1)
    torch.cuda.synchronize()
    with engine.trace() as trace:
        handle = engine.offload(source)
        engine.mark("compute_start")
        busy_compute()
        engine.mark("compute_end")
    points = marks(trace)
    d2h = copy_interval(trace, "offload")
    assert trace[0]["stream"] == "d2h"
    shared = overlap_ms(d2h, (points["compute_start"], points["compute_end"]))
    assert shared >= 0.5 * (d2h[1] - d2h[0]), f"D2H {d2h} barely overlaps compute {points}"
    assert same_bytes(engine.fetch(handle), source)


def test_h2d_prefetch_overlaps_compute_on_a_side_stream(make_engine):
    engine = make_engine(DEVICE, slab_bytes=1 << 28)
    source = torch.randn(64 << 18, device=DEVICE)
    handle = engine.offload(source)
    engine.synchronize()
    torch.cuda.synchronize()
    with engine.trace() as trace:
        engine.prefetch(handle)
        engine.mark("compute_start")
        busy_compute()
        engine.mark("compute_end")
    points = marks(trace)
    h2d = copy_interval(trace, "prefetch")
    shared = overlap_ms(h2d, (points["compute_start"], points["compute_end"]))
    assert shared >= 0.5 * (h2d[1] - h2d[0]), f"H2D {h2d} barely overlaps compute {points}"
    assert same_bytes(engine.fetch(handle), source)


def test_no_gpu_or_host_memory_growth_over_1000_round_trips(make_engine):
    engine = make_engine(DEVICE, slab_bytes=1 << 26)
    pool = engine._impl.pool
    # Up to ten round trips are in flight between synchronisations, each buffer
    # returning to the pool behind its H2D copy: reserve room for all of them,
    # so that no count below depends on how fast the bus drains.
    engine.reserve(16 * (4 << 20))
    source = torch.randn(1 << 20, device=DEVICE)
    for _ in range(10):
        engine.fetch(engine.offload(source))
    engine.synchronize()
    torch.cuda.synchronize()
    allocated, host = torch.cuda.memory_allocated(), pool.stats()
    for step in range(1000):
        handle = engine.offload(source)
        if step % 2:
            engine.prefetch(handle)
        fetched = engine.fetch(handle)
        del fetched, handle
        if step % 10 == 9:
            # A training step waits for its results now and then; without it the host
            # would queue copies faster than the bus drains them, and in-flight buffers
            # would rightly need new memory.
            torch.cuda.synchronize()
    engine.synchronize()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == allocated
    after = pool.stats()
    assert after["host_alloc_calls"] == host["host_alloc_calls"]
    assert after["reserved_bytes"] == host["reserved_bytes"]
    assert after["in_use_bytes"] == 0
    assert engine.stats()["live_handles"] == 0


def test_pool_memory_is_pinned(make_engine):
    engine = make_engine(DEVICE)
    handle = engine.offload(torch.randn(1000, device=DEVICE))
    assert handle.placement == "pool"
    slab_bytes = engine._impl.pool.stats()["reserved_bytes"]
    assert slab_bytes > 0
    assert torch.cuda.host_memory_stats()["allocated_bytes.current"] >= slab_bytes
