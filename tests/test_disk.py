"""The disk tier (``over_budget="disk"``): round trips, training, and every failure it must survive.

Each test checks the bytes that come back against the bytes that left
(``torch.equal``), and that nothing is left behind: no handle, no host or
staging buffer, no byte on the disk, no file in ``disk_dir``. Faults are real
where this machine can make them (a missing directory, tmpfs without
O_DIRECT, a file corrupted behind the tier's back) and injected at the
tier's file calls otherwise (``registry._fault_injector()``).
"""

from __future__ import annotations

import errno
import gc
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import gcoffload
from gcoffload.checkpointing import counters
from gcoffload.checkpointing.forward_chain import ForwardChain, link
from gcoffload.checkpointing.saved_input import prefetch_predecessors
from gcoffload.engine import get_engine, registry
from gcoffload.engine.host_settings import HostSettings

ON_DEVICES = pytest.mark.parametrize("device", ["cpu", pytest.param("simdev:0", marks=pytest.mark.simdev)])
MiB = 1 << 20


@pytest.fixture
def disk_dir(tmp_path: Path) -> Iterator[Path]:
    """An empty directory on this machine's disk; afterwards the settings are back and the tier empty."""
    before = registry.settings()
    yield tmp_path
    registry._fault_injector().clear()  # a fault a test armed but did not meet
    gc.collect()
    for engine in registry.existing_engines().values():
        engine.synchronize()
    left = {device_type: stats for device_type, stats in registry.disk_stats().items()}
    names = ("host_budget_bytes", "over_budget", "disk_dir", "disk_budget_bytes", "disk_staging_bytes")
    gcoffload.configure(**{name: before[name] for name in (*names, "disk_fallback", "disk_checksums")})
    for device_type, stats in left.items():
        assert stats["bytes_on_disk"] == 0, f"the test left bytes on the {device_type} disk tier"
        assert stats["staging_in_use_bytes"] == 0, f"the test left {device_type} staging buffers in use"
    assert list(tmp_path.iterdir()) == [], "the disk tier's file has a name"


def use_disk(directory: Path, **settings: object) -> None:
    gcoffload.configure(host_budget_bytes=0, over_budget="disk", disk_dir=str(directory), **settings)


def assert_nothing_held(device: str) -> None:
    gc.collect()
    engine = get_engine(device)
    engine.synchronize()
    assert engine.stats()["live_handles"] == 0
    assert engine._impl.pool.stats()["in_use_bytes"] == 0
    disk = registry.disk_stats()[torch.device(device).type]
    assert disk["bytes_on_disk"] == 0
    assert disk["staging_in_use_bytes"] == 0


def samples(device: str) -> list[torch.Tensor]:
    """Tensors of sizes that are and are not multiples of the disk's blocks, in several dtypes."""
    generator = torch.Generator().manual_seed(0)
    return [
        torch.randn(1000, 129, generator=generator).to(device),
        torch.randn(4096, generator=generator, dtype=torch.float64).to(device),
        torch.randint(0, 255, (3, 7, 11), generator=generator, dtype=torch.uint8).to(device),
        torch.randn(2, 3, 4096, generator=generator).to(torch.bfloat16).to(device),
        torch.randn(257, 33, generator=generator).t().to(device),  # not contiguous
        torch.empty(0, 5, device=device),
    ]


class TestRoundTrip:
    @ON_DEVICES
    @pytest.mark.parametrize("way", ["on_demand", "prefetch", "read_ahead"])
    def test_bytes_come_back_equal(self, disk_dir: Path, device: str, way: str) -> None:
        use_disk(disk_dir)
        engine = get_engine(device)
        tensors = samples(device)
        handles = [engine.offload(tensor) for tensor in tensors]
        assert [handle.placement for handle in handles] == ["disk"] * 5 + ["empty"]
        engine.synchronize()  # every write done: staging given back, the bytes on disk only
        assert registry.disk_stats()[engine.device.type]["staging_in_use_bytes"] == 0
        for handle in reversed(handles):
            if way == "read_ahead":
                engine.read_ahead(handle)
            if way != "on_demand":
                engine.prefetch(handle)
        back = [engine.fetch(handle) for handle in handles]
        for original, fetched in zip(tensors, back, strict=True):
            assert torch.equal(fetched.cpu(), original.contiguous().cpu())
        del handles, back, handle
        assert_nothing_held(device)

    @ON_DEVICES
    def test_fetch_before_the_write_is_done_comes_from_staging(self, disk_dir: Path, device: str) -> None:
        use_disk(disk_dir)
        engine = get_engine(device)
        tensor = torch.randn(512, 1024, device=device)
        handle = engine.offload(tensor)
        assert torch.equal(engine.fetch(handle).cpu(), tensor.cpu())
        del handle
        assert_nothing_held(device)

    def test_to_disk_skips_a_pool_with_room_and_is_ignored_without_the_tier(self, disk_dir: Path) -> None:
        engine = get_engine("cpu")
        tensor = torch.randn(300, 300)
        gcoffload.configure(host_budget_bytes=None, over_budget="keep")
        assert engine.offload(tensor, to_disk=True).placement == "pool"
        gcoffload.configure(over_budget="disk", disk_dir=str(disk_dir))
        handles = [engine.offload(tensor, to_disk=True), engine.offload(tensor)]
        assert [handle.placement for handle in handles] == ["disk", "pool"]
        engine.synchronize()
        assert all(torch.equal(engine.fetch(handle), tensor) for handle in handles)
        del handles
        assert_nothing_held("cpu")

    def test_tmpfs_works(self, disk_dir: Path) -> None:
        shm = Path("/dev/shm")
        if not shm.is_dir():
            pytest.skip("no tmpfs at /dev/shm")
        use_disk(disk_dir)  # the fixture's checks, then tmpfs
        gcoffload.configure(disk_dir=str(shm))
        engine = get_engine("cpu")
        tensor = torch.randn(3000, 77)
        handle = engine.offload(tensor)
        engine.synchronize()
        assert handle.placement == "disk"
        assert torch.equal(engine.fetch(handle), tensor)
        del handle
        assert_nothing_held("cpu")

    def test_o_direct_refused_at_the_first_transfer_falls_back_to_buffered_io(self, disk_dir: Path) -> None:
        use_disk(disk_dir)
        engine = get_engine("cpu")
        # As filesystems that take the flag but not the transfer.
        registry._fault_injector().arm("write", errno.EINVAL)
        tensor = torch.randn(3000, 77)
        handle = engine.offload(tensor)
        engine.synchronize()
        stats = registry.disk_stats()["cpu"]
        assert stats["direct"] is False and stats["writes"] == 1 and stats["failed_writes"] == 0
        assert torch.equal(engine.fetch(handle), tensor)
        del handle
        assert_nothing_held("cpu")

    def test_on_ext4_it_bypasses_the_page_cache(self, disk_dir: Path) -> None:
        if _filesystem(disk_dir) not in ("ext4", "xfs"):
            pytest.skip(f"{disk_dir} is on {_filesystem(disk_dir)}")
        use_disk(disk_dir)
        get_engine("cpu")
        stats = registry.disk_stats()["cpu"]
        assert stats["file"] == "O_TMPFILE"
        assert stats["direct"] is True

    def test_small_staging_waits_for_writes_and_grows_for_a_large_tensor(self, disk_dir: Path) -> None:
        use_disk(disk_dir, disk_staging_bytes=3 * MiB)
        engine = get_engine("cpu")
        tensors = [torch.randn(MiB // 4) for _ in range(12)] + [torch.randn(2 * MiB)]  # 12 x 1 MiB, 8 MiB
        handles = [engine.offload(tensor) for tensor in tensors]
        engine.synchronize()
        stats = registry.disk_stats()["cpu"]
        assert stats["writes"] == 13
        assert stats["staging_peak_bytes"] >= 8 * MiB
        for handle, tensor in zip(handles, tensors, strict=True):
            assert torch.equal(engine.fetch(handle), tensor)
        del handles, handle
        assert_nothing_held("cpu")


class TestTraining:
    """A stack whose host budget holds about one input: the rest goes to disk, gradients stay exact."""

    @staticmethod
    def stack() -> torch.nn.ModuleList:
        torch.manual_seed(0)
        return torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.GELU(), torch.nn.Dropout(0.1))
            for _ in range(8)
        )

    @staticmethod
    def step(layers: torch.nn.ModuleList, device: str, settle: bool = False) -> list[torch.Tensor]:
        """One training step through ``layers`` (checkpointed as they are wrapped, or not); the gradients.

        ``settle`` waits for the disk writes before backward, so that every input past the host
        budget comes back from the disk, none from its staging buffer.
        """
        torch.manual_seed(1)
        hidden = out = torch.randn(4, 1024, 128, device=device, requires_grad=True)
        for layer in layers:
            out = layer(out)
        if settle:
            get_engine(device).synchronize()
        (out.float() ** 2).mean().backward()
        grads = [parameter.grad.clone() for parameter in layers.parameters()] + [hidden.grad.clone()]
        layers.zero_grad()
        return grads

    @ON_DEVICES
    @pytest.mark.parametrize("use_reentrant", [False, True])
    @pytest.mark.parametrize("mode", ["checkpoint", "swap"])
    def test_gradients_equal_with_inputs_past_a_2_mib_budget_on_disk(
        self, disk_dir: Path, device: str, use_reentrant: bool, mode: str
    ) -> None:
        layers = self.stack().to(device)
        reference = self.step(layers, device)
        gcoffload.configure(
            host_budget_bytes=2 * MiB, over_budget="disk", disk_dir=str(disk_dir), disk_checksums=True
        )
        options = gcoffload.OffloadOptions(keep_resident=0, disk_read_ahead=2)
        gcoffload.wrap_layers(layers, options=options, use_reentrant=use_reentrant, mode=mode)
        gcoffload.reset_stats()
        for settle in (False, True):  # the second step reuses the file's places and the staging buffers
            got = self.step(layers, device, settle)
            for expected, actual in zip(reference, got, strict=True):
                assert torch.equal(expected, actual)
        counts = gcoffload.stats()["devices"][str(torch.device(device))]
        disk = registry.disk_stats()[torch.device(device).type]
        assert counts["disk_spills"] >= 10 and counts["disk_spills"] >= counts["offloads"] - 2
        assert disk["writes"] == counts["disk_spills"] and disk["failed_writes"] == 0
        assert disk["reads"] >= counts["disk_spills"] // 2  # the settled step read all of its own
        if mode == "checkpoint":
            assert counts["read_aheads"] > 0
        assert_nothing_held(device)


def test_the_autopilot_sends_its_earliest_inputs_to_disk_and_reads_them_as_far_ahead_as_it_says(
    disk_dir: Path,
) -> None:
    layers = TestTraining.stack()
    reference = TestTraining.step(layers, "cpu")
    gcoffload.configure(host_budget_bytes=2 * MiB, over_budget="disk", disk_dir=str(disk_dir))
    wrapped = gcoffload.wrap_layers(layers, memory_budget="17MiB")  # 16 MiB least: everything offloaded
    for _ in range(3):  # the profile step, then the plan
        for expected, actual in zip(reference, TestTraining.step(layers, "cpu"), strict=True):
            assert torch.equal(expected, actual)
    plan = wrapped.plan  # made with the measured rates: without them a plan has no disk bytes
    offloaded = [position for position, mode in enumerate(plan.modes) if mode.value == "offload"]
    assert plan.disk_layers == tuple(offloaded[:-1])  # 2 MiB of host memory holds the last input
    assert plan.disk_read_ahead >= 1
    step = counters.last_step(torch.device("cpu"))
    assert step["disk_spills"] == len(plan.disk_layers) and step["offloads"] == len(offloaded)
    assert_nothing_held("cpu")


class _Unit:
    """A chain unit that records what backward asked of it."""

    def __init__(self, waiting: bool) -> None:
        self.previous = None
        self.waiting = waiting
        self.asked: list[str] = []

    def prefetch(self) -> None:
        self.asked.append("prefetch")

    def read_ahead(self) -> None:
        self.asked.append("read_ahead")


def test_reads_ahead_past_the_prefetch_depth_counted_in_chain_units_whatever_their_kind() -> None:
    chain = ForwardChain()
    units = [_Unit(waiting) for waiting in (True, True, True, False, True, False)]  # forward order
    for unit in units:
        link(chain, unit)
    prefetch_predecessors(units[-1], 2, torch.device("cpu"), read_ahead=2)
    # The second unit back holds nothing on the host: the prefetch stops there (two units deep),
    # the next two read ahead, and the one past them is left alone.
    assert [unit.asked for unit in units] == [[], ["read_ahead"], ["read_ahead"], [], ["prefetch"], []]


class TestFaults:
    """Every failure names the setting, leaves nothing behind, and the next step runs exactly."""

    @staticmethod
    def faults():
        return registry._fault_injector()

    def test_missing_directory_raises_at_configure_and_changes_nothing(self, disk_dir: Path) -> None:
        before = registry.settings()
        with pytest.raises(RuntimeError, match=r"disk_dir='.*missing'.*ENOENT.*create it"):
            use_disk(disk_dir / "missing")
        assert registry.settings() == before

    def test_read_only_directory_raises_at_configure(self, disk_dir: Path) -> None:
        self.faults().arm("open", errno.EROFS)
        with pytest.raises(RuntimeError, match=r"disk_dir=.*EROFS.*a directory this process can write to"):
            use_disk(disk_dir)
        assert registry.settings()["over_budget"] != "disk"

    def test_disk_dir_is_required(self, disk_dir: Path) -> None:
        gcoffload.configure(disk_dir=None)
        with pytest.raises(ValueError, match=r"disk_dir=.*GCOFFLOAD_DISK_DIR"):
            gcoffload.configure(over_budget="disk")

    def test_disk_dir_defaults_to_the_environment_when_first_needed(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        settings = HostSettings()
        monkeypatch.setenv("GCOFFLOAD_DISK_DIR", "/scratch/nvme")
        assert settings.as_dict()["disk_dir"] == "/scratch/nvme"
        monkeypatch.delenv("GCOFFLOAD_DISK_DIR")
        assert HostSettings().as_dict()["disk_dir"] is None

    @pytest.mark.parametrize(
        ("setting", "value"),
        [
            ("disk_dir", 3),
            ("disk_budget_bytes", -1),
            ("disk_staging_bytes", 0),
            ("disk_fallback", "disk"),
            ("disk_checksums", "yes"),
        ],
    )
    def test_bad_settings_name_themselves(self, disk_dir: Path, setting: str, value: object) -> None:
        with pytest.raises(ValueError, match=setting):
            gcoffload.configure(**{setting: value})

    @ON_DEVICES
    def test_disk_full_raises_from_the_next_offload_and_training_goes_on_after(
        self, disk_dir: Path, device: str
    ) -> None:
        layers = TestTraining.stack().to(device)
        reference = TestTraining.step(layers, device)
        gcoffload.wrap_layers(layers, options=gcoffload.OffloadOptions(keep_resident=0))
        use_disk(disk_dir)
        parameters = [parameter.detach().clone() for parameter in layers.parameters()]
        self.faults().arm("write", errno.ENOSPC)
        with pytest.raises(
            RuntimeError,
            match=r"earlier write failed.*disk_dir='.*No space left on device \(ENOSPC.*Free space there",
        ):
            for _ in range(3):  # the failed write is met by an offload of this step or the next
                TestTraining.step(layers, device)
                get_engine(device).synchronize()
        assert all(torch.equal(a, b) for a, b in zip(parameters, layers.parameters(), strict=True))
        layers.zero_grad()
        assert_nothing_held(device)
        use_disk(disk_dir)  # a fresh tier
        for expected, actual in zip(reference, TestTraining.step(layers, device), strict=True):
            assert torch.equal(expected, actual)

    def test_a_failed_write_keeps_its_tensor_and_disk_fallback_keep_goes_on(self, disk_dir: Path) -> None:
        use_disk(disk_dir, disk_fallback="keep")
        engine = get_engine("cpu")
        self.faults().arm("write", errno.EIO)
        tensors = [torch.randn(300, 300) for _ in range(3)]
        first = engine.offload(tensors[0])
        engine.synchronize()
        assert registry.disk_stats()["cpu"]["failed_writes"] == 1
        later = [engine.offload(tensor) for tensor in tensors[1:]]
        assert [handle.placement for handle in later] == ["device", "device"]
        assert torch.equal(engine.fetch(first), tensors[0])  # from its staging buffer
        for handle, tensor in zip(later, tensors[1:], strict=True):
            assert torch.equal(engine.fetch(handle), tensor)
        del first, later, handle
        assert_nothing_held("cpu")

    def test_read_error_raises_in_backward_and_leaves_nothing(self, disk_dir: Path) -> None:
        # On the CPU: a device's backward thread lets go of a failed graph on its own time.
        device = "cpu"
        layers = TestTraining.stack().to(device)
        reference = TestTraining.step(layers, device)
        gcoffload.wrap_layers(layers, options=gcoffload.OffloadOptions(keep_resident=0))
        use_disk(disk_dir)
        self.faults().arm("read", errno.EIO, skip=2)
        with pytest.raises(RuntimeError, match=r"reading .* disk_dir='.*Input/output error \(EIO"):
            TestTraining.step(layers, device, settle=True)
        layers.zero_grad()
        assert_nothing_held(device)
        for expected, actual in zip(reference, TestTraining.step(layers, device), strict=True):
            assert torch.equal(expected, actual)

    @ON_DEVICES
    def test_read_error_raises_from_the_fetch_that_needs_it(self, disk_dir: Path, device: str) -> None:
        use_disk(disk_dir)
        engine = get_engine(device)
        tensor = torch.randn(256, 1024, device=device)
        handle = engine.offload(tensor)
        engine.synchronize()
        self.faults().arm("read", errno.EIO)
        with pytest.raises(RuntimeError, match=r"reading .* disk_dir='.*Input/output error \(EIO"):
            engine.fetch(handle)  # the copy to the device queued behind the read must not hide its error
        del handle
        assert_nothing_held(device)

    def test_short_writes_and_reads_are_continued(self, disk_dir: Path) -> None:
        use_disk(disk_dir)
        engine = get_engine("cpu")
        self.faults().arm("write", transfer_bytes=4096, times=3)
        self.faults().arm("read", transfer_bytes=8192, times=2)
        tensor = torch.randn(100, 1000)
        handle = engine.offload(tensor)
        engine.synchronize()
        assert torch.equal(engine.fetch(handle), tensor)
        del handle
        assert_nothing_held("cpu")

    def test_a_write_that_moves_nothing_is_an_error(self, disk_dir: Path) -> None:
        use_disk(disk_dir)
        engine = get_engine("cpu")
        self.faults().arm("write", transfer_bytes=0)
        tensor = torch.randn(100, 1000)
        handle = engine.offload(tensor)
        engine.synchronize()
        assert registry.disk_stats()["cpu"]["failed_writes"] == 1
        with pytest.raises(RuntimeError, match=r"writing .* moved no bytes.*disk_fallback='error'"):
            engine.offload(tensor)
        assert torch.equal(engine.fetch(handle), tensor)  # kept in staging
        del handle
        assert_nothing_held("cpu")

    def test_disk_budget_refuses_with_the_setting_named(self, disk_dir: Path) -> None:
        use_disk(disk_dir, disk_budget_bytes=MiB)
        engine = get_engine("cpu")
        kept = engine.offload(torch.randn(MiB // 8))  # half a MiB fits
        with pytest.raises(RuntimeError, match=r"budget is full \(disk_budget_bytes=1048576\)"):
            engine.offload(torch.randn(MiB // 4))
        gcoffload.configure(disk_fallback="keep")
        assert engine.offload(torch.randn(MiB // 4)).placement == "device"
        del kept
        assert_nothing_held("cpu")

    def test_checksums_catch_bytes_changed_on_the_disk(self, disk_dir: Path) -> None:
        use_disk(disk_dir, disk_checksums=True)
        engine = get_engine("cpu")
        tensor = torch.randn(256, 1024)
        handle = engine.offload(tensor)
        engine.synchronize()
        _corrupt_tier_file(disk_dir)
        with pytest.raises(RuntimeError, match=r"checksum mismatch"):
            engine.fetch(handle)
        del handle
        assert_nothing_held("cpu")

    def test_sigkill_leaves_no_file(self, disk_dir: Path) -> None:
        child = textwrap.dedent(
            f"""
            import os, signal, torch, gcoffload
            gcoffload.configure(host_budget_bytes=0, over_budget="disk", disk_dir={str(disk_dir)!r})
            engine = gcoffload.get_engine("cpu")
            handles = [engine.offload(torch.randn(1 << 18)) for _ in range(4)]
            engine.synchronize()
            print("written", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
            """
        )
        result = subprocess.run(
            [sys.executable, "-c", child], capture_output=True, text=True, timeout=600, env=dict(os.environ)
        )
        assert result.returncode == -signal.SIGKILL, result.stderr
        assert "written" in result.stdout
        assert list(disk_dir.iterdir()) == []


def _filesystem(path: Path) -> str:
    """The type of the filesystem ``path`` is on, from the longest mount point above it."""
    mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    above = [(point, kind) for point, kind in mounts if str(path.resolve()).startswith(point)]
    return max(above, key=lambda mount: len(mount[0]))[1]


def _corrupt_tier_file(directory: Path) -> None:
    """Flips the first block of this process's disk tier files in ``directory`` (one per device type)."""
    corrupted = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(directory)) and target.endswith("(deleted)"):
            with open(f"/proc/self/fd/{fd}", "r+b", buffering=0) as file:
                block = bytearray(file.read(4096))
                file.seek(0)
                file.write(bytes(byte ^ 0xFF for byte in block))
            corrupted += 1
    assert corrupted, f"no disk tier file of this process in {directory}"
