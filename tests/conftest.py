"""Shared fixtures: isolated engines, devices to parametrize over, and the cuda and simdev markers."""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator

import pytest
import simdevice
import torch

import gcoffload
from gcoffload.checkpointing import counters
from gcoffload.engine import CopyEngine, existing_engines, get_engine
from gcoffload.engine import extension as _ext

HAS_CUDA = torch.cuda.is_available()

# Devices whose copies run asynchronously on streams: the simulated device
# (tests/simdevice) everywhere, a real GPU where there is one.
ASYNC_DEVICES = [
    pytest.param("simdev:0", marks=pytest.mark.simdev),
    pytest.param("cuda:0", marks=pytest.mark.cuda),
]
DEVICES = ["cpu", *ASYNC_DEVICES]


@pytest.hookimpl(trylast=True)  # after -m and -k deselected: simdev is built only if a test needs it
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not HAS_CUDA:
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip)
    simdev_items = [item for item in items if "simdev" in item.keywords]
    if simdev_items:
        # Before any test runs: simdev must be registered before the process's
        # first backward pass (see simdevice.load).
        try:
            simdevice.load()
        except simdevice.BuildError as error:
            skip = pytest.mark.skip(reason=f"the simulated device cannot be built here: {error}")
            for item in simdev_items:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def idle_simdev(request: pytest.FixtureRequest) -> Iterator[None]:
    """A simdev test leaves every stream idle and the default copy and kernel timings behind it."""
    if "simdev" not in request.keywords or not simdevice.is_available():
        yield
        return
    previous = simdevice.copy_timing()
    yield
    for index in range(simdevice.device_count()):
        simdevice.synchronize(index)
    simdevice.set_copy_timing(**previous)
    simdevice.reset_kernel_times()


@pytest.fixture
def users_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """Default devices are what a user's process would pick: a GPU if there is one, else the CPU.

    Never the simulated device, which this conftest registers as the process's
    accelerator when a selected test needs it.
    """
    if not HAS_CUDA:
        monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)


@pytest.fixture
def make_engine() -> Callable[..., CopyEngine]:
    """Builds an engine with a pool of its own, so tests do not share counters."""

    def make(
        device: str = "cpu",
        *,
        budget: int | None = None,
        slab_bytes: int = 1 << 20,
        over_budget: str = "keep",
        max_pending: int = 32,
    ) -> CopyEngine:
        extension = _ext.load()
        pool = extension.PinnedPool(torch.device(device).type)
        pool.set_budget(budget)
        pool.set_slab_bytes(slab_bytes)
        impl = extension.CopyEngine(torch.device(device), pool)
        impl.set_over_budget(over_budget)
        impl.set_max_pending(max_pending)
        return CopyEngine(impl)

    return make


@pytest.fixture
def no_leaks() -> Iterator[CopyEngine]:
    """The CPU engine with fresh counters (gcoffload's all reset); fails the test if it leaves a handle
    or a host buffer behind."""
    engine = get_engine("cpu")
    gc.collect()
    gcoffload.reset_stats()
    yield engine
    gc.collect()
    assert engine.stats()["live_handles"] == 0, "the test leaked handles"
    assert engine._impl.pool.stats()["in_use_bytes"] == 0, "the test leaked host buffers"


class Counted:
    """One device's counters as :func:`gcoffload.stats` reports them, and its engine's trace."""

    def __init__(self, device: str | torch.device) -> None:
        self.device = torch.device(device)

    def stats(self) -> dict[str, int]:
        return gcoffload.stats()["devices"].get(str(self.device)) or dict.fromkeys(counters.LAYER_COUNTERS, 0)

    def reset_stats(self) -> None:
        gcoffload.reset_stats()

    def last_step(self) -> dict[str, int] | None:
        return counters.last_step(self.device)

    @property
    def steps(self) -> int:
        return counters.steps(self.device)

    def trace(self):
        return gcoffload.get_engine(self.device).trace()

    def synchronize(self) -> None:
        engine = existing_engines().get(self.device)
        if engine is not None:
            engine.synchronize()


def counted(device: str | torch.device = "cpu") -> Counted:
    return Counted(device)
