"""The host tier: pinned-memory growth, reuse and give-back, budgets, refused allocations."""

from __future__ import annotations

import gc
import random
import warnings

import pytest
import torch

import gcoffload
from gcoffload.engine import host_settings as engine_module

MIB = 1 << 20
MIN_SLAB = MIB  # the smallest slab the pool grows by (PinnedPool::kMinSlabBytes)
LAYERS = 4
HIDDEN = 128  # float32: 512 bytes per token
LENGTHS = [32 + 8 * step for step in range(200)]  # 16 KiB .. 812 KiB per layer input
SHUFFLED = random.Random(0).sample(LENGTHS, len(LENGTHS))
# Layer inputs of 128 KiB .. 8 MiB, past 1 MiB slabs.
LONG_LENGTHS = [256 * (step + 1) for step in range(64)]


def run_steps(engine, lengths, slab_bytes=MIB, layers=LAYERS):
    """Offloads `layers` inputs per step and fetches them in reverse, as a training step does.

    Returns the largest reserved_bytes / (2 * peak_in_use_bytes + slab_bytes) seen,
    with reserved read while every input of a step is in host memory.
    """
    pool = engine._impl.pool
    worst = 0.0
    for length in lengths:
        handles = [engine.offload(torch.empty(length, HIDDEN)) for _ in range(layers)]
        stats = pool.stats()
        worst = max(worst, stats["reserved_bytes"] / (2 * stats["peak_in_use_bytes"] + slab_bytes))
        for handle in reversed(handles):
            engine.fetch(handle)
    return worst


class TestGrowth:
    @pytest.mark.parametrize(
        ("lengths", "slab_bytes"),
        [
            (LENGTHS, 4 * MIB),
            (SHUFFLED, 4 * MIB),
            (LONG_LENGTHS, MIB),
            (random.Random(1).sample(LONG_LENGTHS, len(LONG_LENGTHS)), MIB),
        ],
        ids=["growing", "shuffled", "growing-past-slab", "shuffled-past-slab"],
    )
    def test_reserved_stays_within_twice_the_peak_plus_one_slab(self, make_engine, lengths, slab_bytes):
        engine = make_engine(slab_bytes=slab_bytes, over_budget="error")
        assert run_steps(engine, lengths, slab_bytes) <= 1.0
        assert engine._impl.pool.stats()["in_use_bytes"] == 0

    @pytest.mark.parametrize("lengths", [LENGTHS, SHUFFLED], ids=["growing", "shuffled"])
    def test_a_few_mib_of_demand_does_not_pin_a_full_default_slab(self, make_engine, lengths):
        engine = make_engine(slab_bytes=256 * MIB, over_budget="error")
        run_steps(engine, lengths)
        stats = engine._impl.pool.stats()
        assert stats["peak_in_use_bytes"] < 4 * MIB
        assert stats["reserved_bytes"] <= 2 * stats["peak_in_use_bytes"] + MIN_SLAB

    @pytest.mark.parametrize("lengths", [LENGTHS, LONG_LENGTHS], ids=["in-slab", "past-slab"])
    def test_repeated_shapes_make_no_host_allocation_after_the_first_step(self, make_engine, lengths):
        engine = make_engine(slab_bytes=MIB)
        pool = engine._impl.pool
        run_steps(engine, lengths)  # warm-up through every shape
        run_steps(engine, lengths[-1:])
        settled = pool.stats()
        run_steps(engine, lengths[-1:] * 20)
        after = pool.stats()
        assert after["host_alloc_calls"] == settled["host_alloc_calls"]
        assert after["reserved_bytes"] == settled["reserved_bytes"]
        assert after["reuse_hits"] - settled["reuse_hits"] == 20 * LAYERS

    def test_adjacent_free_buffers_merge_into_one_larger_buffer(self, make_engine):
        engine = make_engine(slab_bytes=1 << 16)
        pool = engine._impl.pool
        handles = [engine.offload(torch.zeros(4096, dtype=torch.uint8)) for _ in range(16)]
        assert pool.stats()["reserved_bytes"] == 1 << 16, "16 buffers of 4 KiB fill the 64 KiB slab"
        for handle in handles[::2] + handles[1::2]:  # freed out of order
            handle.release()
        handle = engine.offload(torch.zeros(1 << 16, dtype=torch.uint8))
        assert handle.placement == "pool"
        assert pool.stats()["host_alloc_calls"] == 1, "the 16 freed buffers serve one 64 KiB request"

    def test_a_smaller_request_takes_part_of_a_free_buffer_without_waste(self, make_engine):
        engine = make_engine(slab_bytes=1 << 16)
        pool = engine._impl.pool
        engine.fetch(engine.offload(torch.zeros(1 << 16, dtype=torch.uint8)))
        small = [engine.offload(torch.zeros(size, dtype=torch.uint8)) for size in (9000, 4096, 100)]
        stats = pool.stats()
        assert stats["in_use_bytes"] == 9216 + 4096 + 512, "each buffer is its own size, rounded to 512"
        assert stats["host_alloc_calls"] == 1 and stats["reuse_hits"] == 3
        del small


class TestPeak:
    @pytest.mark.simdev
    def test_a_reset_peak_starts_from_what_is_in_use_now(self, make_engine):
        """A released buffer whose copy has finished is not in use: a peak reset after it is not its size.

        On an asynchronous device the buffer retires behind its copy's fence, which the pool collects
        when asked; the reset must collect first.
        """
        engine = make_engine("simdev:0", slab_bytes=MIB)
        pool = engine._impl.pool
        handle = engine.offload(torch.ones(MIB // 4, device="simdev:0"))
        handle.release()
        engine.synchronize()  # the copy is done
        pool.reset_peak()
        assert pool.stats()["in_use_bytes"] == pool.stats()["peak_in_use_bytes"] == 0
        kept = engine.offload(torch.ones(MIB // 8, device="simdev:0"))
        assert pool.stats()["peak_in_use_bytes"] == MIB // 2
        kept.release()
        engine.synchronize()


class TestGivingBack:
    def test_acquire_never_gives_memory_back(self, make_engine):
        """Under a tight budget and changing shapes, no offload lowers what the pool holds.

        Giving memory back inside acquire would free (and, for a device, may
        synchronise) in the middle of a forward pass. On the simulated device the
        same sequence must also never call the host allocator's empty_cache.
        """
        engine = make_engine(budget=2 * MIB, slab_bytes=MIB, over_budget="keep")
        pool = engine._impl.pool
        rng = random.Random(0)
        live = []
        for _ in range(400):
            if live and (len(live) >= 4 or rng.random() < 0.5):
                engine.fetch(live.pop(rng.randrange(len(live))))
                continue
            before = pool.stats()
            live.append(engine.offload(torch.empty(rng.randrange(64, 900) * 1024, dtype=torch.uint8)))
            after = pool.stats()
            assert after["reserved_bytes"] >= before["reserved_bytes"]
            assert after["slabs"] >= before["slabs"]
        for handle in live:
            engine.fetch(handle)
        assert pool.stats()["in_use_bytes"] == 0

    def test_lowering_the_budget_mid_step_takes_effect_as_buffers_return(self):
        engine = gcoffload.get_engine("cpu")
        gc.collect()
        before = gcoffload.configure()
        pool = engine._impl.pool
        try:
            handles = [engine.offload(torch.randn(64, 1024)) for _ in range(4)]  # forward, mid-step
            assert pool.stats()["reserved_bytes"] > 0
            gcoffload.configure(host_budget_bytes=0)
            late = engine.offload(torch.randn(64, 1024))
            assert late.placement == "device", "past the lowered budget the input stays on the device"
            assert pool.stats()["reserved_bytes"] > 0, "slabs in use stay until their buffers return"
            for handle in reversed([*handles, late]):  # backward
                engine.fetch(handle)
            stats = pool.stats()
            assert stats["reserved_bytes"] == 0 and stats["slabs"] == 0 and stats["in_use_bytes"] == 0
        finally:
            gcoffload.configure(host_budget_bytes=before["host_budget_bytes"])
        assert engine.fetch(engine.offload(torch.ones(10))).sum() == 10

    def test_outgrown_slabs_make_room_under_a_tight_budget(self, make_engine):
        engine = make_engine(budget=2 * MIB, slab_bytes=MIB, over_budget="keep")
        pool = engine._impl.pool
        for handle in [engine.offload(torch.empty(600 * 1024, dtype=torch.uint8)) for _ in range(2)]:
            engine.fetch(handle)
        assert pool.stats()["reserved_bytes"] == 2 * MIB, "two 1 MiB slabs fill the budget"
        for _ in range(3):  # inputs grew past the slabs: they must not stay on the device for good
            handle = engine.offload(torch.empty(3 * MIB // 2, dtype=torch.uint8))
            assert handle.placement == "pool"
            engine.fetch(handle)
            stats = pool.stats()
            assert stats["reserved_bytes"] == 2 * MIB and stats["slabs"] == 1
        assert stats["host_alloc_calls"] == 3

    def test_a_budget_between_zero_and_reserved_keeps_what_fits(self, make_engine):
        engine = make_engine(slab_bytes=MIB)
        pool = engine._impl.pool
        handles = [engine.offload(torch.empty(MIB, dtype=torch.uint8)) for _ in range(4)]
        reserved = pool.stats()["reserved_bytes"]
        pool.set_budget(2 * MIB)
        for handle in handles:
            handle.release()
        assert pool.stats()["reserved_bytes"] <= 2 * MIB < reserved
        assert engine.offload(torch.empty(MIB, dtype=torch.uint8)).placement == "pool"


class TestRefusedAllocations:
    def test_a_refused_slab_is_retried_smaller(self, make_engine):
        engine = make_engine(slab_bytes=MIB, over_budget="error")
        pool = engine._impl.pool
        pool._fail_allocation_after(0)  # the first slab asked for (1 MiB) is refused
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a smaller slab served it: nothing to warn about
            handle = engine.offload(torch.empty(100 * 1024, dtype=torch.uint8))
        assert handle.placement == "pool"
        stats = pool.stats()
        assert stats["alloc_failures"] == 1 and stats["host_alloc_calls"] == 1
        assert stats["reserved_bytes"] == MIB // 2

    @pytest.mark.parametrize("policy", ["keep", "pageable"])
    def test_refused_memory_follows_over_budget_and_warns_once(self, make_engine, policy):
        engine = make_engine(slab_bytes=MIB, over_budget=policy)
        pool = engine._impl.pool
        pool._fail_allocation_after(0, failures=1000)
        tensors = [torch.randn(256 * 1024) for _ in range(4)]  # 1 MiB each
        with pytest.warns(UserWarning, match=r"host_budget_bytes=.*ulimit -l|ulimit -l.*host_budget_bytes="):
            handles = [engine.offload(tensors[0])]
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once per pool
            handles += [engine.offload(tensor) for tensor in tensors[1:]]
        assert [handle.placement for handle in handles] == 4 * ["device" if policy == "keep" else "pageable"]
        for handle, tensor in zip(handles, tensors, strict=True):
            assert torch.equal(engine.fetch(handle), tensor)
        stats = pool.stats()
        assert stats["reserved_bytes"] == 0 and stats["spills"] == 4
        assert stats["alloc_failures"] == 1, "a refused size is not asked for again"

    def test_refused_memory_under_error_raises_and_leaks_nothing(self, make_engine):
        engine = make_engine(slab_bytes=MIB, over_budget="error")
        pool = engine._impl.pool
        pool._fail_allocation_after(0, failures=1000)
        with (
            pytest.warns(UserWarning, match="refused page-locked memory"),
            pytest.raises(RuntimeError, match="refused pinned memory"),
        ):
            engine.offload(torch.randn(1000))
        assert engine.stats()["live_handles"] == 0 and pool.stats()["in_use_bytes"] == 0

    def test_a_refused_size_is_not_retried_until_trim(self, make_engine):
        engine = make_engine(slab_bytes=MIB)
        pool = engine._impl.pool
        pool._fail_allocation_after(0, failures=2)  # 1 MiB, then 512 KiB refused
        with pytest.warns(UserWarning, match="refused page-locked memory"):
            assert engine.offload(torch.empty(300 * 1024, dtype=torch.uint8)).placement == "device"
        assert pool.stats()["alloc_failures"] == 2
        assert engine.offload(torch.empty(200 * 1024, dtype=torch.uint8)).placement == "pool"
        assert pool.stats()["reserved_bytes"] == 256 * 1024, "below the refused 512 KiB"
        engine.trim()
        assert engine.offload(torch.empty(300 * 1024, dtype=torch.uint8)).placement == "pool"


class TestNodeBudget:
    @pytest.fixture(autouse=True)
    def clean_environment(self, monkeypatch):
        for name in (*engine_module.LOCAL_SIZE_VARIABLES, "WORLD_SIZE"):
            monkeypatch.delenv(name, raising=False)

    @pytest.mark.parametrize("variable", engine_module.LOCAL_SIZE_VARIABLES)
    def test_the_default_budget_is_shared_by_the_processes_of_a_node(self, monkeypatch, variable):
        half = engine_module._half_of_physical_memory()
        monkeypatch.setenv(variable, "8")
        assert engine_module.HostSettings().as_dict()["host_budget_bytes"] == half // 8
        assert engine_module.processes_on_this_node() == 8

    def test_a_single_process_gets_half_of_memory(self):
        assert engine_module.HostSettings().as_dict()["host_budget_bytes"] == (
            engine_module._half_of_physical_memory()
        )

    @pytest.mark.parametrize(("devices", "expected"), [(4, 4), (16, 8), (0, 8)])
    def test_without_a_local_size_a_job_is_assumed_one_process_per_device(
        self, monkeypatch, devices, expected
    ):
        monkeypatch.setenv("WORLD_SIZE", "8")
        monkeypatch.setattr(torch.accelerator, "is_available", lambda: devices > 0)
        monkeypatch.setattr(torch.accelerator, "device_count", lambda: devices)
        assert engine_module.processes_on_this_node() == expected

    def test_the_launcher_variables_come_first_and_bad_values_are_skipped(self, monkeypatch):
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "not a number")
        monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "2")
        monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4")
        assert engine_module.processes_on_this_node() == 2
