"""Stream orderings on asynchronous devices: the simulated one everywhere, a GPU where there is one.

Each test arranges for a missing wait to show as wrong bytes. ``stalled``
keeps the compute stream from running what is queued inside the block (on
simdev it holds the stream; on CUDA it queues a long spin), so copies that
wait for the compute stream cannot start while the host goes on queueing, and
work on other streams runs at once. ``python tests/simdevice/mutations.py``
removes each ordering point of the engine in turn and shows these tests fail.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import threading
import time
import weakref
from collections.abc import Iterator

import pytest
import simdevice
import torch
from conftest import ASYNC_DEVICES
from test_engine import same_bytes
from toy_models import Stack, batch, causal_mask, loss_and_grads, make_pair

import gcoffload
from gcoffload.checkpointing import counters

NUMEL = 1 << 18  # 1 MiB of float32: one whole first slab of a fresh pool
SPIN_CYCLES = 50_000_000  # some tens of ms of a busy CUDA compute stream
HANG_SECONDS = 20.0  # how long a call may take before a test calls it blocked: a hang guard, not a bound

on_async_devices = pytest.mark.parametrize("device", ASYNC_DEVICES)
on_simdev = pytest.mark.parametrize("device", [pytest.param("simdev:0", marks=pytest.mark.simdev)])


def device_module(device: str):
    return torch.get_device_module(torch.device(device).type)


def synchronize(device: str) -> None:
    device_module(device).synchronize(torch.device(device))


def current_stream(device: str) -> torch.Stream:
    return device_module(device).current_stream(torch.device(device))


def new_stream(device: str) -> torch.Stream:
    return torch.Stream(device=torch.device(device))


@contextlib.contextmanager
def stalled(device: str) -> Iterator[None]:
    """Work queued on ``device``'s current stream inside the block runs only after the host leaves it."""
    if torch.device(device).type == "cuda":
        torch.cuda._sleep(SPIN_CYCLES)
        yield
    else:
        with simdevice.hold(current_stream(device), timeout=HANG_SECONDS) as held:
            yield
        assert not held.timed_out, "the host waited for the stalled stream"


def filled(value: float, device: str) -> torch.Tensor:
    return torch.full((NUMEL,), value, device=device)


def random_values(count: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(NUMEL, generator=generator) for _ in range(count)]


# Each ordering point, shown by a copy that would read or write the wrong bytes.


@on_async_devices
def test_an_offload_waits_for_the_kernel_that_writes_its_source(make_engine, device):
    engine = make_engine(device)
    ones = filled(1.0, device)
    with stalled(device):
        source = ones * 3  # queued behind the stall
        handle = engine.offload(source)
    assert same_bytes(engine.fetch(handle).cpu(), torch.full((NUMEL,), 3.0))


@on_async_devices
@pytest.mark.parametrize("max_pending", [1, 32])
@pytest.mark.parametrize("owner", ["compute stream", "other stream"])
def test_a_source_freed_and_reused_right_after_offload_stays_intact(make_engine, device, max_pending, owner):
    # The source's memory belongs to the stream that allocated it; `other stream`
    # is not stalled, so whatever it queues runs at once.
    engine = make_engine(device, slab_bytes=1 << 26, max_pending=max_pending)
    expected = random_values(6)
    allocating = new_stream(device) if owner == "other stream" else current_stream(device)
    with allocating:
        sources = [values.to(device) for values in expected]
    current_stream(device).wait_stream(allocating)
    handles = []
    with stalled(device):  # the D2H copies wait for the compute stream
        while sources:
            source = sources.pop(0)
            handles.append(engine.offload(source))
            del source
            with allocating:
                torch.empty(NUMEL, device=device).fill_(float("nan"))  # would reuse a dropped source
    for handle, values in zip(handles, expected, strict=True):
        assert same_bytes(engine.fetch(handle).cpu(), values)
    if max_pending == 1:
        assert engine.stats()["pending_handoffs"] >= 5, "each offload found the previous copy still queued"


@on_async_devices
def test_a_dropped_prefetched_handle_keeps_its_destination_until_the_copy_ends(make_engine, device):
    engine = make_engine(device)
    handle = engine.offload(filled(7.0, device))
    engine.synchronize()
    with stalled(device):
        engine.prefetch(handle)  # the H2D copy waits for the compute stream
        del handle
        reused = torch.empty(NUMEL, device=device).fill_(-1.0)
    synchronize(device)
    assert bool((reused == -1.0).all().item()), "the H2D copy wrote into memory that was handed out again"


@on_async_devices
def test_a_prefetch_waits_for_the_d2h_copy_that_fills_its_buffer(make_engine, device):
    engine = make_engine(device)
    slow_d2h = simdevice.timing(d2h_gbps=0.05) if device.startswith("simdev") else contextlib.nullcontext()
    with slow_d2h:  # the D2H copy takes ~20 ms on simdev, the H2D copy < 1 ms
        handle = engine.offload(filled(5.0, device))
        engine.prefetch(handle)
        fetched = engine.fetch(handle)
    assert same_bytes(fetched.cpu(), torch.full((NUMEL,), 5.0))


@on_async_devices
def test_a_fetched_tensor_is_complete_for_the_next_kernel(make_engine, device):
    engine = make_engine(device)
    handle = engine.offload(filled(2.0, device))
    engine.synchronize()
    doubled = engine.fetch(handle) * 2  # queued on the compute stream right behind the fetch
    assert same_bytes(doubled.cpu(), torch.full((NUMEL,), 4.0))


@on_async_devices
def test_a_fetch_destination_reusing_memory_compute_still_reads_waits_for_compute(make_engine, device):
    engine = make_engine(device)
    handle = engine.offload(filled(9.0, device))
    engine.synchronize()
    with stalled(device):
        pending_input = filled(1.0, device)
        result = pending_input + 1  # queued: still reads pending_input's memory
        del pending_input  # free for the compute stream's next allocation: the fetch's destination
        fetched = engine.fetch(handle)
    assert same_bytes(result.cpu(), torch.full((NUMEL,), 2.0))
    assert same_bytes(fetched.cpu(), torch.full((NUMEL,), 9.0))


@on_async_devices
@pytest.mark.parametrize("next_offload_from", ["compute stream", "other stream"])
def test_a_host_buffer_is_not_reused_while_an_h2d_copy_reads_it(make_engine, device, next_offload_from):
    engine = make_engine(device, slab_bytes=1 << 20)
    first, second = filled(1.0, device), filled(2.0, device)
    handle = engine.offload(first)
    engine.synchronize()
    stream = current_stream(device) if next_offload_from == "compute stream" else new_stream(device)
    stream.wait_stream(current_stream(device))
    with stalled(device):
        fetched = engine.fetch(handle)  # its H2D copy waits for the stall; the buffer returns to the pool
        del handle
        with stream:
            second_handle = engine.offload(second)  # needs a buffer of the same size
    assert same_bytes(fetched.cpu(), first.cpu())
    assert same_bytes(engine.fetch(second_handle).cpu(), second.cpu())


# Traced timings.


def busy(device: str, ms: float) -> None:
    """Queues about ``ms`` of work on the compute stream."""
    if torch.device(device).type == "cuda":
        torch.cuda._sleep(int(SPIN_CYCLES * ms / 50))
    else:
        simdevice.set_kernel_time_us(ms * 1000, "aten::neg")
        torch.empty(1, device=device).neg_()
        simdevice.reset_kernel_times()


@on_async_devices
def test_traced_copies_and_stalls_follow_the_device_timeline(make_engine, device):
    engine = make_engine(device)
    latency_ms = 5.0
    timing = simdevice.timing(latency_us=latency_ms * 1000) if device.startswith("simdev") else None
    with timing or contextlib.nullcontext():
        hidden, exposed = engine.offload(filled(1.0, device)), engine.offload(filled(2.0, device))
        engine.synchronize()
        with engine.trace() as trace:
            engine.prefetch(hidden)
            engine.mark("compute_start")
            busy(device, 40)
            engine.mark("compute_end")
            engine.fetch(hidden)  # its copy finished while compute ran
            engine.fetch(exposed)  # on demand: compute stands still for the whole copy
    copies = {entry["handle_id"]: entry for entry in trace if entry["op"] == "prefetch"}
    stalls = {entry["handle_id"]: entry for entry in trace if entry["op"] == "fetch"}
    marks = {entry["label"]: entry["start_ms"] for entry in trace if entry["op"] == "mark"}

    def span(entry: dict) -> float:
        return entry["end_ms"] - entry["start_ms"]

    if timing is not None:
        assert all(span(entry) >= latency_ms for entry in copies.values()), copies
    assert copies[hidden.id]["start_ms"] < marks["compute_end"], "the prefetch did not overlap compute"
    assert span(stalls[hidden.id]) < 0.1 * span(copies[hidden.id]), (stalls, copies)
    assert span(stalls[exposed.id]) >= 0.8 * span(copies[exposed.id]), (stalls, copies)


# Both checkpoint paths: gradients equal to no checkpointing, bit for bit.


def recompute_threads(model: Stack) -> set[int]:
    """Records the threads each layer's recompute (forward with grad, inside backward) runs on."""
    threads: set[int] = set()

    def record(module, args) -> None:
        if torch.is_grad_enabled() and torch._C._current_graph_task_id() != -1:
            threads.add(threading.get_ident())

    for layer in model.layers:
        layer.mlp.register_forward_pre_hook(record)  # inside the checkpoint, unlike the layer's own hooks
    return threads


@on_async_devices
@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize(("prefetch_depth", "keep_resident"), [(1, 1), (1, 0), (2, 0)])
@pytest.mark.parametrize("stream", ["default stream", "side stream"])
def test_checkpoint_gradients_equal_no_checkpointing(
    device, use_reentrant, prefetch_depth, keep_resident, stream
):
    reference, model = make_pair(layers=5)
    reference.to(device)
    model.to(device)
    ids = batch().to(device)
    expected_loss, expected_grads = loss_and_grads(reference, ids)
    engine = gcoffload.get_engine(device)
    engine.reset_stats()
    threads = recompute_threads(model)
    side = new_stream(device) if stream == "side stream" else current_stream(device)
    side.wait_stream(current_stream(device))
    with (
        side,
        gcoffload.wrap_layers(
            model.layers,
            gcoffload.OffloadOptions(
                prefetch_depth=prefetch_depth, keep_resident=keep_resident, min_offload_bytes=0
            ),
            use_reentrant=use_reentrant,
        ),
    ):
        loss, grads = loss_and_grads(model, ids)
    synchronize(device)
    assert torch.equal(loss.cpu(), expected_loss.cpu())
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        assert torch.equal(grad.cpu(), expected_grads[name].cpu()), name
    stats = engine.stats()
    assert stats["offloads"] == 5 - keep_resident
    assert stats["fetches"] == stats["offloads"]
    # The last layer's input is the first backward needs: prefetched by no one.
    assert stats["prefetch_hits"] == stats["offloads"] - (keep_resident == 0)
    assert threads and threading.get_ident() not in threads, "backward ran on the calling thread"


# Defects found by reviewing the device path; each test failed before its fix.


@on_simdev
def test_a_pageable_offload_returns_while_its_copy_waits(make_engine, device):
    engine = make_engine(device, budget=0, over_budget="pageable")
    source = filled(3.0, device)
    with simdevice.hold(current_stream(device), timeout=HANG_SECONDS) as held:  # the copy waits for it
        handle = engine.offload(source)
    assert not held.timed_out, "offload blocked the calling thread until its device-to-pageable copy had run"
    assert handle.placement == "pageable"
    assert same_bytes(engine.fetch(handle).cpu(), source.cpu())


@on_simdev
def test_a_pageable_fetch_lets_other_python_threads_run(make_engine, device):
    engine = make_engine(device, budget=0, over_budget="pageable")
    handle = engine.offload(filled(4.0, device))
    engine.synchronize()
    ticks: list[float] = []
    stop = threading.Event()

    def tick() -> None:
        while not stop.is_set():
            ticks.append(time.monotonic())
            time.sleep(0.001)

    ticker = threading.Thread(target=tick)
    ticker.start()
    try:
        with simdevice.timing(latency_us=300_000):  # the H2D copy takes 0.3 s
            start = time.monotonic()
            fetched = engine.fetch(handle)
            end = time.monotonic()
    finally:
        stop.set()
        ticker.join()
    assert sum(start < t < end for t in ticks) >= 10, "fetch held the GIL while it waited for its copy"
    assert same_bytes(fetched.cpu(), torch.full((NUMEL,), 4.0))


@on_simdev
def test_offloads_never_empty_the_host_allocators_cache(make_engine, device):
    engine = make_engine(device, budget=1 << 20, slab_bytes=1 << 20)
    calls = simdevice.host_empty_cache_calls()
    for numel in (NUMEL // 4, 2 * NUMEL, NUMEL // 4, 4 * NUMEL):  # the large ones exceed the budget
        source = torch.ones(numel, device=device)
        assert same_bytes(engine.fetch(engine.offload(source)).cpu(), source.cpu())
        engine.synchronize()
    assert engine.stats()["kept_on_device"] == 2
    assert simdevice.host_empty_cache_calls() == calls, "the pool emptied torch's whole pinned-memory cache"


@on_simdev
def test_engine_copies_do_not_queue_behind_the_shared_stream_pool(make_engine, device):
    engine = make_engine(device)
    source = filled(6.0, device)
    pool = {stream.stream_id: stream for stream in (simdevice.pool_stream(device, True) for _ in range(8))}
    with contextlib.ExitStack() as holds:  # every high-priority pool stream stops
        gates = [
            holds.enter_context(simdevice.hold(stream, timeout=HANG_SECONDS)) for stream in pool.values()
        ]
        fetched = engine.fetch(engine.offload(source)).cpu()  # waits for both copies
    assert not any(gate.timed_out for gate in gates), "the engine's copies queued behind torch's stream pool"
    assert same_bytes(fetched, source.cpu())


@on_simdev
def test_inputs_stay_on_the_device_while_the_stream_captures_a_graph(device):
    reference, model = make_pair(layers=5)
    reference.to(device)
    model.to(device)
    ids = batch().to(device)
    expected_loss, _ = loss_and_grads(reference, ids)
    gcoffload.reset_stats()
    with gcoffload.wrap_layers(model.layers, gcoffload.OffloadOptions(keep_resident=0, min_offload_bytes=0)):
        with simdevice.graph_capture():
            loss, _ = loss_and_grads(model, ids)
        assert torch.equal(loss.cpu(), expected_loss.cpu())
        stats = gcoffload.stats()["devices"][device]
        assert stats["offloads"] == stats["prefetches"] == 0
        assert stats["kept_during_capture"] == 5

        model.train()
        hidden_states = model.layers[0](model.embed(ids), causal_mask(ids.shape[1]).to(device))
        with simdevice.graph_capture(), pytest.raises(RuntimeError, match="offloaded before graph capture"):
            hidden_states.sum().backward()


class SplitStack(Stack):
    """Layers 0-1 on simdev:0, 2-3 on simdev:1: a model split over two devices in one process."""

    def __init__(self) -> None:
        super().__init__(layers=4)

    def place(self) -> SplitStack:
        self.embed.to("simdev:0")
        for index, layer in enumerate(self.layers):
            layer.to(f"simdev:{index // 2}")
        self.norm.to("simdev:1")
        self.head.to("simdev:1")
        return self

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden_states = self.embed(ids.to("simdev:0"))
        for index, layer in enumerate(self.layers):
            device = f"simdev:{index // 2}"
            hidden_states = layer(hidden_states.to(device), causal_mask(ids.shape[1]).to(device))
        return self.head(self.norm(hidden_states))


@pytest.mark.simdev
def test_each_device_has_its_own_forward_chain():
    torch.manual_seed(0)
    reference = SplitStack().place()
    model = copy.deepcopy(reference)
    ids = batch().to("simdev:1")
    expected_loss, expected_grads = loss_and_grads(reference, ids)
    devices = [f"simdev:{index}" for index in (0, 1)]
    gcoffload.reset_stats()
    steps = [counters.steps(device) for device in devices]
    with gcoffload.wrap_layers(model.layers, gcoffload.OffloadOptions(keep_resident=1, min_offload_bytes=0)):
        loss, grads = loss_and_grads(model, ids)
    assert torch.equal(loss.cpu(), expected_loss.cpu())
    for name, grad in grads.items():
        assert torch.equal(grad.cpu(), expected_grads[name].cpu()), name
    for index, device in enumerate(devices):
        stats = gcoffload.stats()["devices"][device]
        # Two layers per device: the last stays in its device's window, the first is offloaded
        # and prefetched by the second's backward, on its own device's thread.
        assert (stats["offloads"], stats["kept_resident"], stats["prefetch_hits"]) == (1, 1, 1), (
            index,
            stats,
        )
        assert counters.steps(device) == steps[index] + 1, f"{device} did not end its step"


class FailingLastLayer(torch.nn.Module):
    """The model's last layer raises: the forward pass's graph is dropped while its copies are in flight."""

    def forward(self, hidden_states: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        raise RuntimeError("the last layer failed")


@on_simdev
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_a_dropped_graph_is_released_while_its_copies_are_in_flight(device, use_reentrant):
    torch.manual_seed(0)
    model = Stack(layers=4).to(device)
    model.layers.append(FailingLastLayer())
    ids = batch().to(device)
    mask = causal_mask(ids.shape[1]).to(device)  # made before the stall: a copy from the host would wait

    def forward() -> torch.Tensor:
        hidden_states = model.embed(ids)
        for layer in model.layers:
            hidden_states = layer(hidden_states, mask)
        return hidden_states

    inputs: list[weakref.ref[torch.Tensor]] = []
    for layer in model.layers:
        layer.register_forward_pre_hook(lambda module, args: inputs.append(weakref.ref(args[0])))
    gc.collect()
    gcoffload.reset_stats()
    synchronize(device)
    before = device_module(device).memory_allocated(torch.device(device))
    with (
        gcoffload.wrap_layers(
            model.layers,
            gcoffload.OffloadOptions(keep_resident=0, min_offload_bytes=0),
            use_reentrant=use_reentrant,
        ),
        stalled(device),
    ):  # the offload copies wait for the compute stream: none can finish
        with pytest.raises(RuntimeError, match="the last layer failed"):
            forward()
        gc.collect()
        stats = gcoffload.stats()["devices"][device]
        assert stats["offloads"] == 5, "every layer's input was on its way to the host"
        assert stats["live_handles"] == 0, "the dropped graph's saved inputs are released"
        assert len(inputs) == 5 and all(ref() is None for ref in inputs), "no layer input is kept alive"
        held = device_module(device).memory_allocated(torch.device(device)) - before
        assert held == 0, "the inputs' device memory went back to the allocator"
    synchronize(device)
