"""The copy engine and its host pool: round trips, reuse, budgets, lifetimes, threads."""

from __future__ import annotations

import gc
import threading
import warnings

import pytest
import torch
from conftest import DEVICES
from torch.utils._pytree import tree_map

import gcoffload
from gcoffload.engine import host_settings as engine_module

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool, torch.complex64]
SHAPES = [(), (1,), (3,), (1023,), (4097,), (7, 13, 5), (0,), (4, 0, 3)]


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, device: str, seed: int = 0) -> torch.Tensor:
    """Arbitrary bit patterns (NaNs and infs included) of the given shape and dtype."""
    generator = torch.Generator().manual_seed(seed)
    numel = torch.Size(shape).numel()
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (numel * itemsize,), dtype=torch.uint8, generator=generator)
    if dtype == torch.bool:
        raw = raw % 2
    return raw.view(dtype).reshape(shape).to(device)


def unsupported_tensor(kind: str) -> torch.Tensor:
    """A tensor of a kind the copy engine cannot offload."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's beta / prototype / deprecation notices
        return _make_unsupported_tensor(kind)


def _make_unsupported_tensor(kind: str) -> torch.Tensor:
    dense = torch.randn(4, 4)
    if kind.startswith("sparse_"):
        layout = kind.removeprefix("sparse_")
        blocks = (2, 2) if layout in ("bsr", "bsc") else None
        return dense.to_sparse(layout=getattr(torch, f"sparse_{layout}"), blocksize=blocks)
    if kind == "mkldnn":
        return dense.to_mkldnn()
    if kind.startswith("nested"):
        layout = torch.jagged if kind == "nested_jagged" else torch.strided
        return torch.nested.nested_tensor([torch.randn(2, 3), torch.randn(3, 3)], layout=layout)
    if kind == "quantized":
        return torch.quantize_per_tensor(dense, 0.1, 0, torch.qint8)
    if kind == "sub_byte_dtype":
        return torch.zeros(8, dtype=torch.uint8).view(torch.int3)
    if kind == "functional":
        return torch._to_functional_tensor(dense)
    if kind == "fake":
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode():
            return torch.empty(4)
    if kind == "wrapper_subclass":
        return WrapperTensor(dense)
    raise AssertionError(kind)


class WrapperTensor(torch.Tensor):
    """A __torch_dispatch__ subclass whose data lives in another tensor (as DTensor's does)."""

    @staticmethod
    def __new__(cls, elem: torch.Tensor) -> WrapperTensor:
        return torch.Tensor._make_wrapper_subclass(cls, elem.shape, dtype=elem.dtype, device=elem.device)

    def __init__(self, elem: torch.Tensor) -> None:
        self.elem = elem

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        def unwrap(value):
            return value.elem if isinstance(value, WrapperTensor) else value

        return func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs or {}))


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.shape == b.shape
        and a.dtype == b.dtype
        and torch.equal(a.reshape(-1).view(torch.uint8).cpu(), b.reshape(-1).view(torch.uint8).cpu())
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_round_trip_is_byte_exact(make_engine, device, dtype, shape):
    engine = make_engine(device)
    original = random_tensor(shape, dtype, device)
    expected = original.clone()
    handle = engine.offload(original)
    assert handle.shape == shape and handle.dtype == dtype
    assert handle.nbytes == original.numel() * original.element_size()
    del original
    fetched = engine.fetch(handle)
    assert fetched.device == torch.device(device)
    assert same_bytes(fetched, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_prefetch_then_fetch_is_a_hit(make_engine, device):
    engine = make_engine(device)
    tensor = random_tensor((257, 33), torch.float32, device)
    handle = engine.offload(tensor)
    assert handle.state == "offloaded" and handle.placement == "pool"
    assert engine.prefetch(handle) is True
    assert engine.prefetch(handle) is False, "a second prefetch must not copy again"
    assert handle.state == "prefetched"
    assert same_bytes(engine.fetch(handle), tensor)
    assert handle.state == "fetched"
    stats = engine.stats()
    assert stats["prefetches"] == 1 and stats["prefetch_hits"] == 1 and stats["on_demand_fetches"] == 0
    assert stats["offloaded_bytes"] == stats["fetched_bytes"] == tensor.nbytes


def test_fetch_without_prefetch_copies_on_demand(make_engine):
    engine = make_engine()
    tensor = random_tensor((100,), torch.float16, "cpu")
    assert same_bytes(engine.fetch(engine.offload(tensor)), tensor)
    stats = engine.stats()
    assert stats["on_demand_fetches"] == 1 and stats["prefetch_hits"] == 0


def test_non_contiguous_input_comes_back_contiguous_with_equal_values(make_engine):
    engine = make_engine()
    base = random_tensor((16, 24), torch.float32, "cpu")
    view = base.t()[::2]
    assert not view.is_contiguous()
    fetched = engine.fetch(engine.offload(view))
    assert fetched.is_contiguous()
    assert same_bytes(fetched, view.contiguous())


def test_buffers_are_reused_across_steps(make_engine):
    engine = make_engine(slab_bytes=1 << 16)
    pool = engine._impl.pool
    shapes = [(64, 33), (64, 33), (17,), (300, 7)]

    def step(seed: int) -> None:
        tensors = [random_tensor(shape, torch.float32, "cpu", seed + i) for i, shape in enumerate(shapes)]
        handles = [engine.offload(tensor) for tensor in tensors]
        for tensor, handle in zip(reversed(tensors), reversed(handles), strict=True):
            assert same_bytes(engine.fetch(handle), tensor)

    step(0)
    after_first_step = pool.stats()
    for seed in range(1, 10):
        step(seed)
    after_ten_steps = pool.stats()
    assert after_ten_steps["host_alloc_calls"] == after_first_step["host_alloc_calls"]
    assert after_ten_steps["reserved_bytes"] == after_first_step["reserved_bytes"]
    assert after_ten_steps["reuse_hits"] - after_first_step["reuse_hits"] == 9 * len(shapes)
    assert after_ten_steps["in_use_bytes"] == 0


def test_buffers_are_carved_from_slabs_without_power_of_two_waste(make_engine):
    engine = make_engine(slab_bytes=1 << 20)
    handles = [engine.offload(torch.zeros(3 * 1024 + 1, dtype=torch.uint8)) for _ in range(100)]
    stats = engine._impl.pool.stats()
    assert stats["host_alloc_calls"] == 1, "100 buffers of 3.5 KiB fit one 1 MiB slab"
    assert stats["in_use_bytes"] == 100 * 3584, "each buffer is rounded to 512 bytes, not to 4 KiB"
    del handles


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("view", ["conj", "neg"])
def test_lazy_conjugate_and_negative_views_come_back_resolved(make_engine, device, view):
    engine = make_engine(device)
    base = torch.randn(1000, dtype=torch.complex64, device=device)
    tensor = base.conj() if view == "conj" else base.conj().imag
    assert tensor.is_conj() or tensor.is_neg()
    expected = tensor.resolve_conj().resolve_neg().cpu()
    fetched = engine.fetch(engine.offload(tensor))
    assert not (fetched.is_conj() or fetched.is_neg())
    assert torch.equal(fetched.cpu(), expected)


def test_fetched_tensors_carry_no_autograd_history(make_engine):
    engine = make_engine()
    tensor = torch.randn(100, requires_grad=True) * 2
    fetched = engine.fetch(engine.offload(tensor))
    assert fetched.grad_fn is None and not fetched.requires_grad
    assert torch.equal(fetched, tensor.detach())


def test_reserve_allocates_ahead_of_offloads(make_engine):
    engine = make_engine(slab_bytes=1 << 20)
    engine.reserve(1 << 20)
    pool = engine._impl.pool
    assert pool.stats()["host_alloc_calls"] == 1 and pool.stats()["reserved_bytes"] == 1 << 20
    handles = [engine.offload(torch.ones(1000, dtype=torch.float64)) for _ in range(100)]
    assert pool.stats()["host_alloc_calls"] == 1
    del handles


def test_trim_frees_unused_slabs(make_engine):
    engine = make_engine(slab_bytes=1 << 16)
    handles = [engine.offload(torch.ones(10000)) for _ in range(3)]
    pool = engine._impl.pool
    assert pool.stats()["reserved_bytes"] > 0
    assert engine.trim() == 0, "slabs with live buffers stay"
    del handles
    freed = engine.trim()
    assert freed > 0
    assert pool.stats()["reserved_bytes"] == 0 and pool.stats()["slabs"] == 0
    tensor = torch.arange(10.0)
    assert same_bytes(engine.fetch(engine.offload(tensor)), tensor), "the pool works again after a trim"


class TestBudget:
    def test_keep_leaves_the_tensor_on_its_device(self, make_engine):
        engine = make_engine(budget=1024, slab_bytes=1024, over_budget="keep")
        tensor = torch.arange(1000.0)
        handle = engine.offload(tensor)
        assert handle.placement == "device"
        assert engine.prefetch(handle) is False
        fetched = engine.fetch(handle)
        assert fetched.data_ptr() == tensor.data_ptr(), "kept tensors come back without a copy"
        assert engine.stats()["kept_on_device"] == 1
        assert engine._impl.pool.stats()["spills"] == 1

    def test_pageable_copies_outside_the_pool(self, make_engine):
        engine = make_engine(budget=1024, slab_bytes=1024, over_budget="pageable")
        tensor = random_tensor((1000,), torch.float32, "cpu")
        handle = engine.offload(tensor)
        assert handle.placement == "pageable"
        assert same_bytes(engine.fetch(handle), tensor)
        assert engine.stats()["pageable_spills"] == 1
        assert engine._impl.pool.stats()["reserved_bytes"] == 0

    def test_error_raises_and_names_the_setting(self, make_engine):
        engine = make_engine(budget=1024, slab_bytes=1024, over_budget="error")
        small = engine.offload(torch.zeros(100))
        with pytest.raises(RuntimeError, match="host_budget_bytes"):
            engine.offload(torch.zeros(1000))
        assert engine.stats()["live_handles"] == 1, "the refused offload leaves no handle behind"
        del small

    def test_within_budget_uses_the_smallest_power_of_two_slab_when_a_full_one_does_not_fit(
        self, make_engine
    ):
        engine = make_engine(budget=4096, slab_bytes=1 << 20, over_budget="error")
        handle = engine.offload(torch.zeros(1000))
        assert handle.placement == "pool"
        assert engine._impl.pool.stats()["reserved_bytes"] == 4096

    def test_budget_change_applies_to_the_next_offload(self, make_engine):
        engine = make_engine(budget=None, slab_bytes=1024, over_budget="keep")
        engine._impl.pool.set_budget(0)
        assert engine.offload(torch.zeros(10)).placement == "device"
        engine._impl.pool.set_budget(None)
        assert engine.offload(torch.zeros(10)).placement == "pool"


class TestLifetimes:
    def test_dropped_handles_return_their_buffers(self, make_engine):
        engine = make_engine()
        pool = engine._impl.pool
        handles = [engine.offload(torch.randn(100, 10)) for _ in range(5)]
        engine.prefetch(handles[0])
        assert pool.stats()["in_use_bytes"] == 5 * 4096
        assert engine.stats()["live_handles"] == 5
        del handles
        assert pool.stats()["in_use_bytes"] == 0
        assert engine.stats()["live_handles"] == 0
        hits = pool.stats()["reuse_hits"]
        engine.offload(torch.randn(100, 10))
        assert pool.stats()["reuse_hits"] == hits + 1

    def test_release_is_idempotent_and_ends_the_handle(self, make_engine):
        engine = make_engine()
        handle = engine.offload(torch.randn(10))
        handle.release()
        handle.release()
        assert handle.state == "released"
        assert engine._impl.pool.stats()["in_use_bytes"] == 0
        assert engine.prefetch(handle) is False
        with pytest.raises(RuntimeError, match="already released"):
            engine.fetch(handle)

    def test_second_fetch_is_an_error(self, make_engine):
        engine = make_engine()
        handle = engine.offload(torch.randn(10))
        engine.fetch(handle)
        with pytest.raises(RuntimeError, match="already fetched"):
            engine.fetch(handle)

    def test_fetched_tensor_does_not_alias_the_pool(self, make_engine):
        engine = make_engine()
        first = torch.full((256,), 1.0)
        fetched = engine.fetch(engine.offload(first))
        engine.fetch(engine.offload(torch.full((256,), 2.0)))  # reuses the same host buffer
        assert torch.equal(fetched, first)


def test_concurrent_round_trips_from_threads(make_engine):
    engine = make_engine(slab_bytes=1 << 16)
    failures: list[str] = []
    barrier = threading.Barrier(8)

    def worker(index: int) -> None:
        barrier.wait()
        for step in range(150):
            tensor = random_tensor((64 + index, 3), torch.float32, "cpu", seed=index * 1000 + step)
            handle = engine.offload(tensor)
            if step % 2:
                engine.prefetch(handle)
            if not same_bytes(engine.fetch(handle), tensor):
                failures.append(f"thread {index} step {step}")

    threads = [threading.Thread(target=worker, args=(index,)) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    stats = engine.stats()
    assert stats["offloads"] == stats["fetches"] == 8 * 150
    assert stats["live_handles"] == 0
    assert engine._impl.pool.stats()["in_use_bytes"] == 0


def test_trace_records_copies_and_marks_in_issue_order(make_engine):
    engine = make_engine()
    with engine.trace() as trace:
        first = engine.offload(torch.randn(10))
        second = engine.offload(torch.randn(20))
        engine.mark("between")
        engine.prefetch(first)
        engine.fetch(first)
        engine.fetch(second)
    ops = [(entry["op"], entry["handle_id"], entry["label"]) for entry in trace]
    assert ops == [
        ("offload", first.id, ""),
        ("offload", second.id, ""),
        ("mark", -1, "between"),
        ("prefetch", first.id, ""),
        ("fetch", first.id, "prefetched"),
        ("prefetch", second.id, ""),
        ("fetch", second.id, "on_demand"),
    ]
    assert all(entry["end_ms"] >= entry["start_ms"] >= 0 for entry in trace)
    assert [entry["stream"] for entry in trace[:3]] == ["d2h", "d2h", "compute"]


class TestBadInput:
    def test_offload_rejects_non_tensors(self, make_engine):
        with pytest.raises(TypeError, match=r"tensor must be a torch\.Tensor"):
            make_engine().offload([1.0, 2.0])

    def test_offload_rejects_a_tensor_of_another_device(self, make_engine):
        with pytest.raises(RuntimeError, match=r"tensor is on meta but this engine serves cpu"):
            make_engine().offload(torch.empty(3, device="meta"))

    @pytest.mark.parametrize(
        ("kind", "message"),
        [
            ("sparse_coo", "must be dense"),
            ("sparse_csr", "must be dense"),
            ("sparse_csc", "must be dense"),
            ("sparse_bsr", "must be dense"),
            ("sparse_bsc", "must be dense"),
            ("mkldnn", "must be dense"),
            ("nested", "nested tensor"),
            ("nested_jagged", "nested tensor"),
            ("quantized", "quantized"),
            ("sub_byte_dtype", "dtype"),
            ("functional", "functional"),
            ("fake", "fake"),
            ("wrapper_subclass", "subclass"),
        ],
    )
    def test_offload_rejects_unsupported_tensors_before_taking_a_buffer(self, make_engine, kind, message):
        engine = make_engine()
        with pytest.raises(TypeError, match=rf"offload: tensor .*{message}.*offload takes a plain dense"):
            engine.offload(unsupported_tensor(kind))
        gc.collect()
        assert engine.stats()["live_handles"] == 0
        assert engine._impl.pool.stats()["in_use_bytes"] == 0
        assert engine._impl.pool.stats()["host_alloc_calls"] == 0, "rejected before the pool was asked"

    def test_fetch_rejects_something_that_is_not_a_handle(self, make_engine):
        with pytest.raises(TypeError, match=r"handle must come from CopyEngine\.offload"):
            make_engine().fetch(torch.zeros(1))

    def test_reserve_rejects_negative_sizes_and_budget_overruns(self, make_engine):
        engine = make_engine(budget=1 << 16, slab_bytes=1 << 16)
        with pytest.raises(ValueError, match="nbytes"):
            engine.reserve(-1)
        with pytest.raises(RuntimeError, match="exceed the host budget"):
            engine.reserve(1 << 20)

    @pytest.mark.parametrize(
        ("setting", "value"),
        [
            ("host_budget_bytes", -1),
            ("host_budget_bytes", 1.5),
            ("over_budget", "drop"),
            ("slab_bytes", 1000),
            ("max_pending", 0),
        ],
    )
    def test_configure_names_the_bad_setting(self, setting, value):
        before = gcoffload.configure()
        with pytest.raises(ValueError, match=setting):
            gcoffload.configure(**{setting: value})
        assert gcoffload.configure() == before

    @pytest.mark.parametrize(
        ("setting", "value"),
        [
            ("host_budget_bytes", 2**64),
            ("host_budget_bytes", 2**63),
            ("slab_bytes", 2**64),
            ("slab_bytes", 2**63),
            ("max_pending", 2**63),
            ("max_pending", engine_module.MAX_PENDING_LIMIT + 1),
        ],
    )
    def test_configure_stores_nothing_the_extension_cannot_hold(self, setting, value):
        before = gcoffload.configure()
        with pytest.raises(ValueError, match=setting):
            gcoffload.configure(**{setting: value}, over_budget="pageable")
        assert gcoffload.stats()["settings"] == before, "nothing of the failed call was stored"
        assert gcoffload.configure(**{setting: before[setting]}) == before, "the next valid call works"
        engine = gcoffload.get_engine("cpu")
        assert engine._impl.pool.stats()["budget_bytes"] == before["host_budget_bytes"]

    @pytest.mark.parametrize("device", ["nonsense", "meta"])
    def test_get_engine_rejects_bad_devices(self, device):
        with pytest.raises(ValueError, match="get_engine"):
            gcoffload.get_engine(device)

    # ids spelled out: a test whose id is "cuda" would be taken for a GPU test (conftest).
    @pytest.mark.parametrize(
        "device",
        ["mps", "mps:0", "cuda", "cuda:0", "xpu", "cuda:99"],
        ids=["mps", "mps-0", "cuda-current", "cuda-0", "xpu", "cuda-99"],
    )
    def test_get_engine_names_a_device_that_is_not_available(self, device):
        device_type = torch.device(device).type
        module = getattr(torch, device_type)
        if module.is_available() and device != "cuda:99":
            pytest.skip(f"{device_type} is available here")
        with pytest.raises(ValueError, match=rf"get_engine: device '{device}' is not available"):
            gcoffload.get_engine(device)

    def test_reserve_names_its_argument_and_the_range(self, make_engine):
        engine = make_engine()
        for nbytes in (-1, 2**70, 1.5, True):
            with pytest.raises(ValueError, match=r"reserve: nbytes must be an int from 0 to 2\*\*63 - 1"):
                engine.reserve(nbytes)

    def test_a_nested_trace_is_an_error_and_leaves_the_outer_trace_intact(self, make_engine):
        engine = make_engine()
        with engine.trace() as outer:
            first = engine.offload(torch.randn(10))
            with pytest.raises(RuntimeError, match=r"trace: a trace of .* is already active"), engine.trace():
                pass
            engine.fetch(first)
        assert [entry["op"] for entry in outer] == ["offload", "prefetch", "fetch"]
        with engine.trace() as again:  # a finished trace does not block the next one
            engine.mark("next")
        assert [entry["label"] for entry in again] == ["next"]

    def test_get_engine_rejects_bad_types(self):
        with pytest.raises(TypeError, match="device must be"):
            gcoffload.get_engine(3.0)


def test_configure_applies_to_live_engines_and_is_reported():
    engine = gcoffload.get_engine("cpu")
    gc.collect()  # handles of earlier tests would keep their slabs
    before = gcoffload.configure()
    try:
        settings = gcoffload.configure(host_budget_bytes=0, over_budget="keep")
        assert settings["host_budget_bytes"] == 0
        pool_stats = gcoffload.stats()["pools"]["cpu"]
        assert pool_stats["budget_bytes"] == 0 and pool_stats["reserved_bytes"] == 0, (
            "unused slabs were trimmed"
        )
        assert engine.offload(torch.zeros(1000)).placement == "device"
    finally:
        gcoffload.configure(**{key: before[key] for key in ("host_budget_bytes", "over_budget")})
    assert engine.offload(torch.zeros(1000)).placement == "pool"


def test_get_engine_returns_one_engine_per_device():
    assert gcoffload.get_engine("cpu") is gcoffload.get_engine(torch.device("cpu"))
    assert "cpu" in gcoffload.stats()["devices"]


def test_copies_inside_uncounted_stay_out_of_the_counters(make_engine):
    engine = make_engine()
    engine.fetch(engine.offload(torch.randn(100)))
    with engine.uncounted():
        engine.fetch(engine.offload(torch.randn(100)))
        kept = engine.offload(torch.randn(50))
    stats = engine.stats()
    assert (stats["offloads"], stats["fetches"], stats["offloaded_bytes"]) == (1, 1, 400)
    assert stats["live_handles"] == 1, "a gauge: what is live stays counted"
    engine.fetch(kept)  # outside the block: counted
    del kept
    assert (engine.stats()["fetches"], engine.stats()["live_handles"]) == (2, 0)
    engine.reset_stats()
    engine.fetch(engine.offload(torch.randn(100)))
    assert (engine.stats()["offloads"], engine.stats()["fetches"]) == (1, 1)
