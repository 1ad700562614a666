"""The simulated device (tests/simdevice): streams, events, allocators, copies, kernels, RNG, gcoffload.

Ordering is made deterministic with ``simdevice.hold(stream)``, which stops a
stream until the block exits, and with simulated copy latencies far longer than
the host needs to queue the next operation.
"""

from __future__ import annotations

import copy
import threading

import pytest
import simdevice
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from toy_models import Stack, batch, causal_mask, loss_and_grads

N = 1 << 14  # elements per test tensor: 64 KiB of float32


pytestmark = pytest.mark.simdev  # conftest loads simdev, or skips when it cannot be built


def new_stream() -> torch.Stream:
    return simdevice.Stream()


def event(timing: bool = False) -> torch.Event:
    return simdevice.Event(enable_timing=timing)


def poisoned(tensor: torch.Tensor) -> bool:
    """True if every element holds the 0xFF poison of a freed or fresh block (NaN for floats)."""
    return bool(tensor.cpu().isnan().all())


# Registration.


def test_registered_as_the_privateuse1_device() -> None:
    assert torch._C._get_privateuse1_backend_name() == "simdev"
    assert torch.simdev is simdevice
    assert simdevice.is_available() and simdevice.device_count() == 2
    x = torch.ones(2, device="simdev:1")
    assert x.device == torch.device("simdev", 1) and x.is_simdev
    assert simdevice.host_allocator_registered()
    assert torch.empty(8, pin_memory=True).is_pinned()
    assert torch.ones(8).pin_memory().is_pinned()
    assert not torch.empty(8).is_pinned()


def test_autocast_queries_and_disabled_region() -> None:
    with torch.autocast("simdev", enabled=False):
        assert not torch.is_autocast_enabled("simdev")
        doubled = torch.ones(2, device="simdev") * 2
    assert torch.equal(doubled.cpu(), torch.full((2,), 2.0))
    assert torch.get_autocast_dtype("simdev") in simdevice.get_amp_supported_dtype()


# Streams and events.


def test_a_stream_runs_its_jobs_in_order() -> None:
    stream = new_stream()
    x = torch.zeros(N, device="simdev")
    stream.wait_stream(simdevice.current_stream())
    with simdevice.hold(stream), stream:
        for step in range(20):
            x.mul_(2).add_(step)
    stream.synchronize()
    expected = torch.zeros(N)
    for step in range(20):
        expected.mul_(2).add_(step)
    assert torch.equal(x.cpu(), expected)


def test_streams_run_concurrently_with_each_other_and_the_host() -> None:
    held, free = new_stream(), new_stream()
    a = torch.zeros(N, device="simdev")
    b = torch.zeros(N, device="simdev")
    simdevice.synchronize()
    with simdevice.hold(held):
        with held:
            a.add_(1)
        with free:
            b.add_(1)
        free.synchronize()  # returns while `held` is stopped
        assert not held.query()
        assert torch.equal(b.cpu(), torch.ones(N))
    held.synchronize()
    assert torch.equal(a.cpu(), torch.ones(N))


def test_event_wait_orders_two_streams() -> None:
    producer, consumer = new_stream(), new_stream()
    x = torch.empty(N, device="simdev")
    simdevice.synchronize()
    with simdevice.hold(producer):
        with producer:
            x.fill_(3.0)
            filled = event()
            filled.record()
        with consumer:
            unordered = x.clone()
            cloned = event()
            cloned.record()
        cloned.synchronize()  # the consumer ran while the producer was stopped
        with consumer:
            consumer.wait_event(filled)
            ordered = x.clone()
        assert not consumer.query()
    consumer.synchronize()
    assert poisoned(unordered)
    assert torch.equal(ordered.cpu(), torch.full((N,), 3.0))


def test_a_slow_copy_is_not_visible_from_another_stream_without_a_wait() -> None:
    simdevice.set_copy_timing(latency_us=200_000)
    host = torch.arange(N, dtype=torch.float32).pin_memory()
    copier, reader = new_stream(), new_stream()
    x = torch.empty(N, device="simdev")
    simdevice.synchronize()
    with copier:
        x.copy_(host, non_blocking=True)
        arrived = event()
        arrived.record()
    with reader:
        early = x.clone()
        reader.wait_event(arrived)
        late = x.clone()
    reader.synchronize()
    assert poisoned(early)
    assert torch.equal(late.cpu(), host)


def test_an_event_never_recorded_is_complete() -> None:
    stream = new_stream()
    fresh = event()
    assert fresh.query()
    stream.wait_event(fresh)
    stream.synchronize()


def test_event_timing_measures_queued_work_and_needs_enable_timing() -> None:
    simdevice.set_copy_timing(latency_us=30_000)
    x = torch.ones(N, device="simdev")
    host = torch.empty(N, pin_memory=True)
    start, end, untimed = event(timing=True), event(timing=True), event()
    start.record()
    host.copy_(x, non_blocking=True)
    end.record()
    untimed.record()
    end.synchronize()
    untimed.synchronize()
    assert start.elapsed_time(end) >= 30.0
    with pytest.raises((RuntimeError, ValueError), match="enable_timing"):
        untimed.elapsed_time(end)


def test_pool_streams_are_shared_round_robin() -> None:
    high = [simdevice.pool_stream(high_priority=True) for _ in range(16)]
    low = [simdevice.pool_stream() for _ in range(16)]
    assert len({s.stream_id for s in high}) < len(high)  # two requests can share a stream
    assert not {s.stream_id for s in high} & {s.stream_id for s in low}
    assert new_stream() != new_stream()
    assert simdevice.default_stream().stream_id == 0


def test_the_current_stream_is_per_thread() -> None:
    stream = new_stream()
    seen = []
    with stream:
        thread = threading.Thread(target=lambda: seen.append(simdevice.current_stream()))
        thread.start()
        thread.join()
        assert simdevice.current_stream() == stream
    assert seen == [simdevice.default_stream()]
    assert simdevice.current_stream() == simdevice.default_stream()


def test_queued_kernels_take_their_simulated_time() -> None:
    simdevice.set_kernel_time_us(30_000, op="aten::mul")
    x = torch.ones(N, device="simdev")
    start, end = event(timing=True), event(timing=True)
    start.record()
    doubled = x * 2
    end.record()
    assert not end.query()
    end.synchronize()
    assert start.elapsed_time(end) >= 30.0
    assert torch.equal(doubled.cpu(), torch.full((N,), 2.0))


def test_kernel_errors_surface_at_the_next_synchronisation() -> None:
    weight = torch.randn(4, 3, device="simdev")
    ids = torch.tensor([0, 9], device="simdev")
    F.embedding(ids, weight)  # returns: the kernel runs later
    with pytest.raises(RuntimeError, match="index out of range"):
        simdevice.synchronize()
    assert torch.equal((weight * 1).cpu(), weight.cpu())  # raised once; the device goes on


# The caching allocator.


def test_a_freed_block_is_reused_at_once_by_its_stream_only() -> None:
    x = torch.empty(N, device="simdev")
    address = x.data_ptr()
    allocated = simdevice.memory_allocated()
    del x
    assert simdevice.memory_allocated() == allocated - N * 4
    with new_stream():
        other = torch.empty(N, device="simdev")
    assert other.data_ptr() != address
    assert torch.empty(N, device="simdev").data_ptr() == address


@pytest.mark.parametrize("reused", [False, True])
def test_a_freed_block_is_poisoned_in_stream_order(reused: bool) -> None:
    reader = new_stream()
    x = torch.full((N,), 1.0, device="simdev")
    address = x.data_ptr()
    simdevice.synchronize()
    with simdevice.hold(reader):
        with reader:
            seen = x.clone()  # reads x later without keeping it alive, like a CUDA kernel
        del x
        if reused:
            y = torch.full((N,), 2.0, device="simdev")
            assert y.data_ptr() == address
        simdevice.default_stream().synchronize()
    reader.synchronize()
    if reused:
        assert torch.equal(seen.cpu(), torch.full((N,), 2.0))
    else:
        assert poisoned(seen)


def test_record_stream_keeps_a_block_until_the_other_stream_is_done() -> None:
    reader = new_stream()
    x = torch.full((N,), 1.0, device="simdev")
    address = x.data_ptr()
    simdevice.synchronize()
    with simdevice.hold(reader):
        with reader:
            seen = x.clone()
        x.record_stream(reader)
        del x
        y = torch.full((N,), 2.0, device="simdev")
        assert y.data_ptr() != address
        simdevice.default_stream().synchronize()
    reader.synchronize()
    assert torch.equal(seen.cpu(), torch.ones(N))
    assert torch.empty(N, device="simdev").data_ptr() == address


def test_memory_counters() -> None:
    base = simdevice.memory_allocated()
    simdevice.reset_peak_memory_stats()
    x = torch.empty(1000, device="simdev")  # 4000 bytes, rounded up to 4096
    assert simdevice.memory_allocated() == base + 4096
    assert simdevice.max_memory_allocated() == base + 4096
    del x
    assert simdevice.memory_allocated() == base
    assert simdevice.max_memory_allocated() == base + 4096
    simdevice.reset_peak_memory_stats()
    assert simdevice.max_memory_allocated() == base
    assert simdevice.memory_reserved() >= base + 4096
    assert torch.accelerator.memory_allocated(0) == base  # served by the same allocator


# Copies.


def test_a_nonblocking_copy_to_pinned_memory_returns_before_the_data_arrives() -> None:
    x = torch.arange(N, dtype=torch.float32, device="simdev")
    host = torch.zeros(N, pin_memory=True)
    with simdevice.hold():
        host.copy_(x, non_blocking=True)
        assert not simdevice.current_stream().query()
        assert torch.equal(host, torch.zeros(N))
    simdevice.synchronize()
    assert torch.equal(host, torch.arange(N, dtype=torch.float32))


def test_a_nonblocking_copy_from_pinned_memory_lands_in_stream_order() -> None:
    host = torch.arange(N, dtype=torch.float32).pin_memory()
    x = torch.empty(N, device="simdev")
    reader = new_stream()
    simdevice.synchronize()
    with simdevice.hold():
        x.copy_(host, non_blocking=True)
        with reader:
            early = x.clone()
        reader.synchronize()
    assert poisoned(early)
    assert torch.equal(x.cpu(), host)


def test_blocking_and_pageable_copies_are_complete_on_return() -> None:
    simdevice.set_copy_timing(latency_us=20_000)
    host = torch.randn(N)
    x = host.to("simdev")
    assert torch.equal(x.cpu(), host)
    pinned = torch.empty(N, pin_memory=True)
    pinned.copy_(x)
    assert torch.equal(pinned, host)
    pageable = torch.empty(N)
    pageable.copy_(x, non_blocking=True)  # D2H into pageable memory waits, as on CUDA
    assert torch.equal(pageable, host)


def test_a_nonblocking_copy_from_pageable_memory_snapshots_the_source() -> None:
    source = torch.ones(N)
    x = torch.empty(N, device="simdev")
    with simdevice.hold():
        x.copy_(source, non_blocking=True)
        source.fill_(5.0)
    assert torch.equal(x.cpu(), torch.ones(N))


def test_copies_in_one_direction_take_turns_and_directions_overlap() -> None:
    simdevice.set_copy_timing(latency_us=60_000, h2d_gbps=1000.0, d2h_gbps=1000.0)
    x = torch.ones(N, device="simdev")
    y = torch.empty(N, device="simdev")
    hosts = [torch.empty(N, pin_memory=True) for _ in range(2)]
    first, second = new_stream(), new_stream()
    for stream in (first, second):
        stream.wait_stream(simdevice.current_stream())

    def copy_pair(directions: tuple[str, str]) -> float:
        start, end = event(timing=True), event(timing=True)
        start.record(first)
        for stream, host, direction in zip((first, second), hosts, directions, strict=True):
            with stream:
                if direction == "d2h":
                    host.copy_(x, non_blocking=True)
                else:
                    y.copy_(host, non_blocking=True)
        second.wait_stream(first)
        end.record(second)
        end.synchronize()
        return start.elapsed_time(end)

    assert copy_pair(("d2h", "d2h")) >= 120.0
    assert copy_pair(("d2h", "h2d")) < 110.0


DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.complex64,
]


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trips_keep_every_value(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    values = torch.randint(-100, 100, (6, 7, 5), generator=generator)
    values = (values % 2 if dtype == torch.bool else values).to(dtype)
    for host in (
        values,
        values.transpose(0, 2),
        values[::2, 1:, ::3],
        values[0].expand(3, 7, 5),
        values[0, 0, 0],
    ):
        device = host.to("simdev")
        assert torch.equal(device.cpu(), host)
        pinned = torch.empty(host.shape, dtype=dtype, pin_memory=True)
        pinned.copy_(device, non_blocking=True)
        simdevice.synchronize()
        assert torch.equal(pinned, host)
    device = values.to("simdev")
    assert torch.equal(device.transpose(0, 2).cpu(), values.transpose(0, 2))
    assert torch.equal(device[1::2, :, 1].cpu(), values[1::2, :, 1])
    assert torch.equal(device.to(torch.float64).cpu(), values.to(torch.float64))
    assert torch.equal(device.to("simdev:1").cpu(), values)


# Kernels: CPU results, host-side operators, RNG.


def forward_backward(fn, inputs: list[torch.Tensor], device: str) -> list[torch.Tensor]:
    """``fn``'s output and the gradients of its floating-point inputs, computed on ``device``."""
    moved = [t.detach().to(device).requires_grad_(t.is_floating_point()) for t in inputs]
    output = fn(*moved)
    upstream = torch.linspace(-1, 1, output.numel()).reshape(output.shape).to(device)
    output.backward(upstream)
    return [output.detach().cpu()] + [t.grad.cpu() for t in moved if t.is_floating_point()]


H = 32
OPERATORS = {
    "elementwise": (lambda x, y: (x * y + x.sin() - y.exp() / 3).relu().pow(2), [(4, H), (4, H)]),
    "broadcast": (lambda x, y: x / (y.abs() + 1) + 2.5, [(4, 1, H), (3, H)]),
    "matmul": (lambda x, w: x @ w, [(2, 4, H), (H, 2 * H)]),
    "linear": (lambda x, w, b: F.linear(x, w, b), [(2, 4, H), (2 * H, H), (2 * H,)]),
    "layer_norm": (lambda x, w, b: F.layer_norm(x, (H,), w, b), [(2, 4, H), (H,), (H,)]),
    "softmax": (lambda x: x.softmax(-1) * x.log_softmax(0), [(4, H)]),
    "gelu": (lambda x: F.gelu(x), [(4, H)]),
    "attention": (
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        [(2, 4, 8, 16)] * 3,
    ),
    "reductions": (lambda x: torch.cat([x.sum(0), x.mean(1), x.amax(0), x.std(1)]), [(H, H)]),
    "shapes": (lambda x: x.t().reshape(-1, 8).unsqueeze(0).flip(-1)[:, ::2].contiguous(), [(H, H)]),
}


@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_operators_and_their_backward_equal_the_cpu(name: str) -> None:
    fn, shapes = OPERATORS[name]
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(shape, generator=generator) for shape in shapes]
    for cpu, simdev in zip(
        forward_backward(fn, inputs, "cpu"), forward_backward(fn, inputs, "simdev"), strict=True
    ):
        assert torch.equal(cpu, simdev)


def test_embedding_and_cross_entropy_equal_the_cpu() -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(50, H, generator=generator)
    head = torch.randn(50, H, generator=generator)
    ids = torch.randint(0, 50, (2, 16), generator=generator)

    def loss(weight: torch.Tensor, head: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        logits = F.embedding(ids, weight) @ head.t()
        return F.cross_entropy(logits.flatten(0, 1), ids.roll(-1, dims=1).flatten())

    for cpu, simdev in zip(
        forward_backward(loss, [weight, head, ids], "cpu"),
        forward_backward(loss, [weight, head, ids], "simdev"),
        strict=True,
    ):
        assert torch.equal(cpu, simdev)


def test_data_dependent_operators_wait_for_the_stream() -> None:
    simdevice.set_kernel_time_us(10_000)
    x = torch.tensor([0.0, 3.0, 0.0, 5.0], device="simdev") * 2
    assert torch.equal(x.nonzero().cpu(), torch.tensor([[1], [3]]))
    assert torch.equal(x[x > 0].cpu(), torch.tensor([6.0, 10.0]))
    assert torch.equal(torch.unique(x).cpu(), torch.tensor([0.0, 6.0, 10.0]))
    assert x.sum().item() == 16.0
    assert torch.equal(x, x.clone())


def test_dropout_is_reproducible_from_the_rng_state() -> None:
    x = torch.ones(N, device="simdev", requires_grad=True)
    state = torch.simdev.get_rng_state()
    first = F.dropout(x, 0.5)
    assert not torch.equal(torch.simdev.get_rng_state(), state)  # advanced when queued
    torch.simdev.set_rng_state(state)
    again = F.dropout(x, 0.5)
    other = F.dropout(x, 0.5)
    assert torch.equal(first.cpu(), again.cpu())
    assert not torch.equal(first.cpu(), other.cpu())
    kept = first.detach().cpu() != 0
    assert 0.45 < kept.float().mean().item() < 0.55
    assert torch.equal(first.detach().cpu()[kept], torch.full((int(kept.sum()),), 2.0))
    first.sum().backward()
    assert torch.equal(x.grad.cpu(), first.detach().cpu())


@pytest.mark.filterwarnings("ignore:SIMDEV reports that you have 2 available devices")
def test_manual_seed_and_fork_rng_reach_the_simdev_generator() -> None:
    torch.manual_seed(7)
    first = torch.rand(8, device="simdev").cpu()
    torch.manual_seed(7)
    assert torch.equal(torch.rand(8, device="simdev").cpu(), first)
    assert simdevice.initial_seed() == 7
    before = torch.simdev.get_rng_state()
    with torch.random.fork_rng(device_type="simdev"):
        torch.rand(8, device="simdev")
    assert torch.equal(torch.simdev.get_rng_state(), before)


# Devices, autograd, training.


def test_two_devices() -> None:
    with simdevice.device(1):
        assert simdevice.current_device() == 1
        x = torch.arange(8.0, device="simdev")
    assert simdevice.current_device() == 0
    assert x.device == torch.device("simdev:1")
    assert simdevice.memory_allocated(1) > 0
    y = x.to("simdev:0")
    assert torch.equal((y * 2).cpu(), torch.arange(8.0) * 2)
    with pytest.raises(RuntimeError, match="same device"):
        x + y


def test_backward_runs_on_the_autograd_device_thread() -> None:
    x = torch.ones(4, device="simdev", requires_grad=True)
    threads = []
    y = x * 2
    y.register_hook(lambda grad: threads.append(threading.get_ident()))
    y.sum().backward()
    assert threads and threads[0] != threading.get_ident()
    assert torch.equal(x.grad.cpu(), torch.full((4,), 2.0))


class DeviceStack(Stack):
    """toy_models.Stack with the causal mask on the input's device; optionally checkpoints each layer."""

    def __init__(self, use_reentrant: bool | None = None, dropout: float = 0.1) -> None:
        super().__init__(dropout=dropout)
        self.use_reentrant = use_reentrant

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden_states = self.embed(ids)
        mask = causal_mask(ids.shape[1]).to(ids.device)
        for layer in self.layers:
            if self.use_reentrant is None:
                hidden_states = layer(hidden_states, mask)
            else:
                hidden_states = checkpoint(layer, hidden_states, mask, use_reentrant=self.use_reentrant)
        return self.head(self.norm(hidden_states))


def test_a_training_step_equals_the_cpu_without_dropout() -> None:
    torch.manual_seed(0)
    model = DeviceStack(dropout=0.0)
    ids = batch()
    cpu_loss, cpu_grads = loss_and_grads(model, ids)
    loss, grads = loss_and_grads(copy.deepcopy(model).to("simdev"), ids.to("simdev"))
    assert torch.equal(loss.cpu(), cpu_loss)
    assert all(torch.equal(grads[name].cpu(), grad) for name, grad in cpu_grads.items())


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpointing_with_dropout_gives_the_gradients_of_no_checkpointing(use_reentrant: bool) -> None:
    torch.manual_seed(0)
    model = DeviceStack().to("simdev")
    ids = batch().to("simdev")
    loss, grads = loss_and_grads(model, ids)
    checkpointed = copy.deepcopy(model)
    checkpointed.use_reentrant = use_reentrant
    checkpointed_loss, checkpointed_grads = loss_and_grads(checkpointed, ids)
    assert torch.equal(checkpointed_loss.cpu(), loss.cpu())
    assert all(torch.equal(checkpointed_grads[name].cpu(), grad.cpu()) for name, grad in grads.items())


# Pinned memory and gcoffload's engine on simdev.


def test_a_pinned_allocation_can_be_made_to_fail() -> None:
    calls = simdevice.pinned_allocations()
    simdevice.fail_pinned_allocation(2)
    torch.empty(64, pin_memory=True)
    with pytest.raises(RuntimeError, match="out of memory"):
        torch.empty(64, pin_memory=True)
    torch.empty(64, pin_memory=True)
    assert simdevice.pinned_allocations() == calls + 3


def test_the_pinned_limit_refuses_new_host_memory() -> None:
    simdevice.set_pinned_limit(simdevice.host_stats()["allocated_bytes"])
    try:
        with pytest.raises(RuntimeError, match="out of memory"):
            torch.empty(1 << 24, pin_memory=True)
    finally:
        simdevice.set_pinned_limit(None)


def test_gcoffload_pools_simdev_pinned_memory(make_engine) -> None:
    engine = make_engine("simdev:0", slab_bytes=1 << 20)
    calls = simdevice.pinned_allocations()
    engine.reserve(1 << 20)
    assert simdevice.pinned_allocations() == calls + 1
    assert engine.trim() == 1 << 20


def test_host_cache_emptying_is_counted() -> None:
    calls = simdevice.host_empty_cache_calls()
    torch.accelerator.empty_host_cache()
    assert simdevice.host_empty_cache_calls() == calls + 1


@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.bool])
def test_gcoffload_round_trip_on_simdev_is_byte_exact(
    make_engine, dtype: torch.dtype, prefetch: bool
) -> None:
    engine = make_engine("simdev:0")
    generator = torch.Generator().manual_seed(0)
    expected = [
        torch.randint(0, 2 if dtype == torch.bool else 100, shape, generator=generator).to(dtype)
        for shape in [(N,), (7, 13, 5), (64, 33), ()]
    ]
    sources = [t.to("simdev") for t in expected]
    handles = [engine.offload(source) for source in sources]
    del sources
    clobber = [torch.full(t.shape, 1, dtype=dtype, device="simdev") for t in expected]  # reuses their blocks
    if prefetch:
        for handle in reversed(handles):
            engine.prefetch(handle)
    fetched = [engine.fetch(handle) for handle in handles]
    assert all(torch.equal(f.cpu(), e) for f, e in zip(fetched, expected, strict=True))
    assert len(clobber) == len(expected)
    stats = engine.stats()
    assert stats["fetches"] == len(handles)
    assert stats["prefetch_hits"] == (len(handles) if prefetch else 0)
