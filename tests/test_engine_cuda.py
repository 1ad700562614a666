"""The copy engine on a real GPU: side streams, overlap, source lifetimes, no leaks."""

from __future__ import annotations

import pytest
import torch
from test_engine import same_bytes

pytestmark = pytest.mark.cuda

DEVICE = "cuda:0"
SPIN_CYCLES = 50_000_000  # keeps the compute stream busy for some tens of ms


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


def test_a_traced_fetch_spans_the_time_compute_waited_for_its_copy(make_engine):
    engine = make_engine(DEVICE, slab_bytes=1 << 28)
    source = torch.randn(64 << 18, device=DEVICE)
    hidden, exposed = engine.offload(source), engine.offload(source)
    engine.synchronize()
    torch.cuda.synchronize()
    with engine.trace() as trace:
        engine.prefetch(hidden)
        busy_compute()
        engine.fetch(hidden)  # its copy finished while compute ran
        engine.fetch(exposed)  # on demand: compute stands still for the whole copy
    stalls = {entry["handle_id"]: entry for entry in trace if entry["op"] == "fetch"}
    copies = {entry["handle_id"]: entry for entry in trace if entry["op"] == "prefetch"}

    def span(entry: dict) -> float:
        return entry["end_ms"] - entry["start_ms"]

    assert span(stalls[hidden.id]) < 0.1 * span(copies[hidden.id]), (stalls, copies)
    assert span(stalls[exposed.id]) >= 0.8 * span(copies[exposed.id]), (stalls, copies)


@pytest.mark.parametrize("max_pending", [1, 32])
def test_source_freed_and_reused_right_after_offload_stays_intact(make_engine, max_pending):
    engine = make_engine(DEVICE, slab_bytes=1 << 26, max_pending=max_pending)
    torch.manual_seed(0)
    sources = [torch.randn(4 << 20, device=DEVICE) for _ in range(6)]
    expected = [source.cpu() for source in sources]
    torch.cuda.synchronize()
    handles = []
    while sources:
        # The D2H copy waits for the compute stream, which is busy spinning; the
        # source is dropped and its memory requested again before the copy runs.
        torch.cuda._sleep(SPIN_CYCLES)
        source = sources.pop(0)
        handles.append(engine.offload(source))
        del source
        torch.empty(4 << 20, device=DEVICE).fill_(float("nan"))
    for handle, reference in zip(handles, expected, strict=True):
        assert same_bytes(engine.fetch(handle).cpu(), reference)
    if max_pending == 1:
        assert engine.stats()["pending_waits"] >= 5, "each offload found the previous copy still queued"


def test_dropped_prefetched_handle_keeps_its_destination_until_the_copy_ends(make_engine):
    engine = make_engine(DEVICE, slab_bytes=1 << 26)
    handle = engine.offload(torch.full((4 << 20,), 7.0, device=DEVICE))
    engine.synchronize()
    torch.cuda._sleep(SPIN_CYCLES)
    engine.prefetch(handle)  # the H2D copy waits behind the spin
    del handle
    reused = torch.empty(4 << 20, device=DEVICE).fill_(-1.0)
    torch.cuda.synchronize()
    assert bool((reused == -1.0).all()), "the H2D copy wrote into memory that was handed out again"


def test_no_gpu_or_host_memory_growth_over_1000_round_trips(make_engine):
    engine = make_engine(DEVICE, slab_bytes=1 << 24)
    pool = engine._impl.pool
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
