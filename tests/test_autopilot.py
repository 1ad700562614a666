"""The autopilot applied: exact memory predictions, gradients of mixed plans, buckets, errors."""

from __future__ import annotations

import copy
import logging
import statistics
import time

import pytest
import torch
from conftest import ASYNC_DEVICES, counted
from held_memory import LiveStorages
from torch import nn
from toy_models import Block, add_lora, batch, loss_and_grads, make_pair

import gcoffload
from gcoffload.autopilot import Mode
from gcoffload.autopilot.plan_cache import bucket_tokens

DEVICES = ["cpu", ASYNC_DEVICES[0]]  # the simulated device; CUDA has its own tests
LAYERS = 6


class BareStack(nn.Module):
    """Only the layers between two ops that save nothing: all it holds after forward is theirs."""

    def __init__(self, layers: int = LAYERS, hidden: int = 64) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block(hidden) for _ in range(layers))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states * 1  # made inside the pass, like an embedding's output
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        return hidden_states * 1


def step(model: nn.Module, inputs: torch.Tensor) -> None:
    model(inputs).pow(2).mean().backward()


def least_and_most(wrapped: gcoffload.WrappedLayers) -> tuple[gcoffload.autopilot.Profile, int, int]:
    """The profile the first step measured, and the peaks of the least-memory and all-keep plans."""
    (profile,) = wrapped.autopilot.profiles.values()
    profile = profile.scaled(bucket_tokens(profile.tokens))
    least = ["offload" if layer.offloadable else "checkpoint" for layer in profile.layers]
    low = gcoffload.autopilot.predict(profile, least).peak_bytes
    high = gcoffload.autopilot.predict(profile, ["keep"] * len(profile.layers)).peak_bytes
    return profile, low, high


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_predicted_held_bytes_equal_what_autograd_holds(device, use_reentrant):
    torch.manual_seed(0)
    template = BareStack().to(device)
    inputs = torch.randn(4, 128, 64, device=device)
    engine = counted(device)

    def measured(budget: int | str) -> tuple[gcoffload.autopilot.Plan, int, gcoffload.WrappedLayers]:
        model = copy.deepcopy(template)
        wrapped = gcoffload.wrap_layers(
            model.layers,
            gcoffload.OffloadOptions(min_offload_bytes=0),
            memory_budget=budget,
            use_reentrant=use_reentrant,
        )
        step(model, inputs)  # the autopilot's first pass
        step(model, inputs)  # its profile step
        with LiveStorages() as live:
            output = model(inputs)
        engine.synchronize()  # copies done: the engine holds no offloaded source any more
        held = live.alive_bytes(output)
        return wrapped.plan, held, wrapped

    plan, held, wrapped = measured(1 << 40)
    assert plan.modes == (Mode.KEEP,) * LAYERS
    assert held == plan.held_bytes
    _, low, high = least_and_most(wrapped)
    seen = set()
    for fraction in (0.0, 0.2, 0.5, 0.8):
        plan, held, _ = measured(int(low + fraction * (high - low)))
        assert held == plan.held_bytes, plan.summary()
        seen.update(plan.modes)
    assert seen == {Mode.KEEP, Mode.CHECKPOINT, Mode.OFFLOAD}


MIXED = ("keep", "offload", "checkpoint", "offload", "keep", "checkpoint")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_mixed_plans_give_the_gradients_of_no_checkpointing(device, use_reentrant, lora):
    reference, model = make_pair(layers=len(MIXED))
    if lora:
        for stack in (reference, model):
            torch.manual_seed(7)
            add_lora(stack)
    reference.to(device)
    model.to(device)
    ids = batch().to(device)
    wrapped = gcoffload.wrap_layers(
        model.layers,
        gcoffload.OffloadOptions(min_offload_bytes=0),
        memory_budget=1 << 40,
        use_reentrant=use_reentrant,
    )
    engine = counted(device)
    for seed in range(4):  # the first pass, the profile step, then the mixed plan twice
        if seed == 2:
            (profile,) = wrapped.autopilot.profiles.values()
            wrapped.autopilot.use(
                gcoffload.autopilot.predict(profile.scaled(bucket_tokens(profile.tokens)), MIXED)
            )
            engine.reset_stats()
        expected = loss_and_grads(reference, ids, seed=seed)
        actual = loss_and_grads(model, ids, seed=seed)
        assert torch.equal(actual[0].cpu(), expected[0].cpu())
        assert actual[1].keys() == expected[1].keys()
        for name, grad in actual[1].items():
            assert torch.equal(grad.cpu(), expected[1][name].cpu()), name
    stats = engine.stats()
    assert stats["kept_layers"] == 2 * 2
    assert stats["checkpointed_layers"] == 2 * 4
    assert stats["offloads"] == 2 * 2
    assert stats["profiled_layers"] == 0


def test_a_frozen_bottom_stays_plain_and_the_rest_is_planned():
    reference, model = make_pair(layers=4)
    for frozen in (reference, model):
        frozen.embed.requires_grad_(False)
        frozen.layers[:2].requires_grad_(False)
    wrapped = gcoffload.wrap_layers(model.layers, memory_budget=1 << 40)
    ids = batch()
    for seed in range(3):
        expected = loss_and_grads(reference, ids, seed=seed)
        actual = loss_and_grads(model, ids, seed=seed)
        assert torch.equal(actual[0], expected[0])
        assert all(torch.equal(grad, expected[1][name]) for name, grad in actual[1].items())
    assert wrapped.plan.modes == (Mode.PLAIN, Mode.PLAIN, Mode.KEEP, Mode.KEEP)


def test_a_budget_below_the_minimum_says_the_minimum_and_leaks_nothing():
    model = BareStack()
    gcoffload.wrap_layers(model.layers, gcoffload.OffloadOptions(min_offload_bytes=0), memory_budget="1KiB")
    inputs = torch.randn(4, 128, 64)
    step(model, inputs)  # the first pass runs in the least memory, whatever the budget
    with pytest.raises(
        ValueError, match=r"memory_budget of 0\.00 MiB is below the \d+\.\d\d MiB the layers need"
    ):
        step(model, inputs)  # the profile step finds no plan
    stats = gcoffload.stats()
    assert stats["devices"]["cpu"]["live_handles"] == 0
    assert stats["pools"]["cpu"]["in_use_bytes"] == 0


def test_without_offload_the_autopilot_keeps_or_checkpoints_only():
    model = BareStack(layers=3)
    wrapped = gcoffload.wrap_layers(
        model.layers, gcoffload.OffloadOptions(offload=False, min_offload_bytes=0), memory_budget=1 << 40
    )
    engine = counted("cpu")
    engine.reset_stats()
    inputs = torch.randn(4, 128, 64)
    for _ in range(3):  # the first pass, the profile step, a planned step
        step(model, inputs)
    assert engine.stats()["offloads"] == 0
    (profile,) = wrapped.autopilot.profiles.values()
    assert not any(layer.offloadable for layer in profile.layers)
    with pytest.raises(ValueError, match="layer 0 cannot be offload"):
        gcoffload.autopilot.predict(profile, ["offload"] * 3)


def test_plans_are_cached_per_shape_bucket_and_logged_once_each(caplog):
    model = BareStack(layers=3)
    wrapped = gcoffload.wrap_layers(model.layers, memory_budget="1GiB")
    engine = counted("cpu")
    engine.reset_stats()

    def run(length: int) -> int:
        before = engine.stats()["profiled_layers"]
        step(model, torch.randn(2, length, 64))
        return engine.stats()["profiled_layers"] - before

    with caplog.at_level(logging.INFO, logger="gcoffload.autopilot"):
        assert run(64) == 0  # the first pass
        assert run(64) == 3  # a new bucket: profiled
        assert run(64) == 0
        assert run(60) == 0  # the same bucket (109..128 tokens)
        assert run(256) == 3  # above every measured size: profiled
        assert run(100) == 0  # below a measured size: planned from it, at once
    assert len(wrapped.autopilot.plans) == 3
    assert sorted(wrapped.autopilot.plans) == sorted({bucket_tokens(2 * n) for n in (64, 256, 100)})
    logged = [record for record in caplog.records if "gcoffload plan for" in record.getMessage()]
    assert len(logged) == 3
    assert bucket_tokens(128) == 128 and bucket_tokens(129) == 153 and bucket_tokens(1) == 1


def test_the_profile_steps_copy_measurement_stays_out_of_the_counters():
    model = BareStack(layers=3)
    gcoffload.wrap_layers(model.layers, gcoffload.OffloadOptions(min_offload_bytes=0), memory_budget=1 << 40)
    engine = counted("cpu")
    engine.reset_stats()
    inputs = torch.randn(2, 32, 64)
    step(model, inputs)  # the first pass offloads every input
    step(model, inputs)  # the profile step all but the last, and measures the copy bandwidth
    stats = engine.stats()
    assert stats["offloads"] == stats["fetches"] == 3 + 2
    assert engine.last_step()["offloads"] == 2


def test_an_explicit_profile_call_measures_again_and_returns_the_plan():
    model = BareStack(layers=2)
    wrapped = gcoffload.wrap_layers(model.layers, memory_budget=1 << 40)
    inputs = torch.randn(2, 32, 64)
    step(model, inputs)  # the first pass: no plan yet
    assert wrapped.plan is None
    plan = wrapped.autopilot.profile(lambda: step(model, inputs))
    assert plan is wrapped.plan and plan.modes == (Mode.KEEP, Mode.KEEP)
    again = wrapped.autopilot.profile(lambda: step(model, inputs))
    assert again is wrapped.plan and again is not plan
    with torch.no_grad(), pytest.raises(RuntimeError, match="ran no layer of this stack"):
        wrapped.autopilot.profile(lambda: model(inputs))


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ({"memory_budget": "lots"}, ValueError, "memory_budget must be bytes"),
        ({"memory_budget": 1.5}, ValueError, r"a fraction of the device's memory in \(0, 1\]"),
        ({"memory_budget": True}, ValueError, "memory_budget must be bytes"),
        ({"memory_budget": "1GiB", "every_n_layers": 2}, ValueError, "every_n_layers and memory_budget"),
    ],
)
def test_bad_budgets_are_refused_before_anything_changes(arguments, error, message):
    model = BareStack(layers=2)
    forward = model.layers[0].forward
    with pytest.raises(error, match=message):
        gcoffload.wrap_layers(model.layers, **arguments)
    assert model.layers[0].forward == forward


@pytest.fixture
def device_memory(monkeypatch) -> dict[str, int]:
    """The free and total bytes ``"auto"`` reads, set by the test (the CPU's move with the machine)."""
    memory = {"free": 0, "total": 1 << 40}
    monkeypatch.setattr(
        gcoffload.autopilot.budget, "device_memory", lambda device: (memory["free"], memory["total"])
    )
    return memory


def auto_margin(memory: dict[str, int]) -> int:
    return int(memory["total"] * gcoffload.autopilot.budget.AUTO_MARGIN)


@pytest.mark.parametrize("zero_grad", [True, False])
def test_auto_leaves_the_gradients_still_to_come_free(device_memory, zero_grad):
    model = BareStack(layers=3)
    model.layers[0].requires_grad_(False)  # frozen: no gradient to come
    wrapped = gcoffload.wrap_layers(
        model.layers, gcoffload.OffloadOptions(min_offload_bytes=0), memory_budget="auto"
    )
    device_memory["free"] = auto_margin(device_memory) + (64 << 20)
    inputs = torch.randn(2, 32, 64)
    step(model, inputs)  # the first pass
    if zero_grad:
        model.zero_grad(set_to_none=True)
    step(model, inputs)  # the profile step reads the budget
    to_come = sum(p.numel() * p.element_size() for p in model.layers[1:].parameters()) if zero_grad else 0
    assert to_come > 0 or not zero_grad
    assert wrapped.plan.budget_bytes == (64 << 20) - to_come


def test_auto_plans_anew_when_free_memory_shrinks_and_never_upward(device_memory, caplog):
    model = BareStack(layers=4)
    wrapped = gcoffload.wrap_layers(
        model.layers, gcoffload.OffloadOptions(min_offload_bytes=0), memory_budget="auto"
    )
    engine = counted("cpu")
    margin = auto_margin(device_memory)
    device_memory["free"] = margin + (1 << 36)
    inputs = torch.randn(4, 128, 64)
    for _ in range(3):  # the first pass, the profile step, a planned step; gradients stay allocated
        step(model, inputs)
    all_kept = wrapped.plan
    assert set(all_kept.modes) == {Mode.KEEP}
    profile, low, high = least_and_most(wrapped)

    device_memory["free"] = margin + (low + high) // 2  # say, optimizer states appeared
    with caplog.at_level(logging.INFO, logger="gcoffload.autopilot"):
        step(model, inputs)
    shrunk = wrapped.plan
    assert shrunk.budget_bytes == (low + high) // 2 and low <= shrunk.peak_bytes <= shrunk.budget_bytes
    assert Mode.KEEP in shrunk.modes and set(shrunk.modes) != {Mode.KEEP}, "a mixed plan"
    assert engine.last_step()["offloads"] == shrunk.modes.count(Mode.OFFLOAD), "used in that very step"
    assert len([r for r in caplog.records if "gcoffload plan for" in r.getMessage()]) == 1

    device_memory["free"] = margin + 2 * high  # memory comes back: the plan stays
    step(model, inputs)
    assert wrapped.plan is shrunk

    device_memory["free"] = margin + low // 2  # below the least memory: a warning, and the least memory
    with pytest.warns(UserWarning, match=r"memory_budget='auto' leaves \d+\.\d\d MiB .* least memory"):
        step(model, inputs)
    assert wrapped.plan.modes == gcoffload.autopilot.least_memory(profile).modes
    assert engine.last_step()["offloads"] == wrapped.plan.modes.count(Mode.OFFLOAD) > 0


def test_budget_strings_and_fractions():
    from gcoffload.autopilot.budget import MemoryBudget, device_memory

    assert MemoryBudget.parse("20GiB").nbytes == 20 * 2**30
    assert MemoryBudget.parse("1.5 GB").nbytes == 1_500_000_000
    assert MemoryBudget.parse(4096).nbytes == 4096
    cpu = torch.device("cpu")
    free, total = device_memory(cpu)
    assert 0 < free <= total
    assert MemoryBudget.parse(0.25).resolve(cpu) == total // 4
    assert MemoryBudget.parse("auto").resolve(cpu) <= free


def test_free_memory_is_read_where_torch_has_no_device_generic_memory_api(monkeypatch):
    """torch before 2.10 has no ``torch.accelerator.get_memory_info``: the device's own module answers."""
    monkeypatch.delattr(torch.accelerator, "get_memory_info", raising=False)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (3 << 30, 80 << 30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 5 << 30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 4 << 30)
    assert gcoffload.autopilot.budget.device_memory(torch.device("cuda", 0)) == (4 << 30, 80 << 30)


def test_patch_model_with_a_budget_plans_a_peft_lora_model_and_matches_stock():
    hf_models = pytest.importorskip("hf_models")
    reference = hf_models.lora(hf_models.model("llama", layers=4), "llama")
    model = copy.deepcopy(reference)
    gcoffload.patch_model(model, gcoffload.OffloadOptions(min_offload_bytes=0), memory_budget=1 << 40)
    assert model.gcoffload_plan is None  # before the first step
    ids = hf_models.batch(size=2, length=16)
    engine = counted("cpu")
    for seed in range(4):  # the first pass, the profile step, then the mixed plan twice
        if seed == 2:
            autopilot = model.get_base_model()._gcoffload_patch.autopilot
            (profile,) = autopilot.profiles.values()
            modes = ("offload", "keep", "checkpoint", "offload")
            autopilot.use(gcoffload.autopilot.predict(profile.scaled(bucket_tokens(profile.tokens)), modes))
            engine.reset_stats()
        hf_models.assert_same(
            hf_models.loss_and_grads(reference, ids, seed=seed),
            hf_models.loss_and_grads(model, ids, seed=seed),
        )
    assert model.gcoffload_plan.modes == (Mode.OFFLOAD, Mode.KEEP, Mode.CHECKPOINT, Mode.OFFLOAD)
    stats = engine.stats()
    assert (stats["kept_layers"], stats["checkpointed_layers"], stats["offloads"]) == (2, 6, 4)
    gcoffload.unpatch_model(model)
    assert not hasattr(model.get_base_model(), "gcoffload_plan")


def test_patch_model_with_auto_leaves_the_whole_models_gradients_still_to_come_free(device_memory):
    hf_models = pytest.importorskip("hf_models")
    model = hf_models.lora(hf_models.model("llama", layers=2), "llama")
    model.get_base_model().lm_head.requires_grad_(True)  # trainable outside the decoder layers
    gcoffload.patch_model(model, gcoffload.OffloadOptions(min_offload_bytes=0), memory_budget="auto")
    device_memory["free"] = auto_margin(device_memory) + (256 << 20)
    ids = hf_models.batch(size=2, length=16)
    for seed in range(2):  # the first pass, the profile step; each begins with zero_grad(set_to_none=True)
        hf_models.loss_and_grads(model, ids, seed=seed)
    to_come = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    assert model.gcoffload_plan.budget_bytes == (256 << 20) - to_come


class MatmulLayer(nn.Module):
    """An MLP block whose time on the simulated device is its matmuls: forward 2, backward 4."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.up = nn.Linear(hidden, 4 * hidden)
        self.down = nn.Linear(4 * hidden, hidden)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states + self.down(nn.functional.gelu(self.up(hidden_states)))


@pytest.mark.simdev
def test_predicted_step_time_is_within_15_percent_of_measured_on_the_simulated_device():
    import simdevice

    device = "simdev:0"
    matmul_ms = 2.0
    torch.manual_seed(0)
    template = nn.Sequential(*(MatmulLayer() for _ in range(LAYERS))).to(device)
    inputs = torch.randn(2, 128, 64, device=device)  # a layer input is 64 KiB
    # A 64 KiB copy takes 3 matmuls one way, so offloads hide only in part.
    copy_ms = 3 * matmul_ms
    gbps = inputs.nbytes / (copy_ms * 1e-3) / 1e9
    simdevice.set_copy_timing(d2h_gbps=gbps, h2d_gbps=gbps, latency_us=0, jitter=0)
    for op in ("aten::addmm", "aten::mm"):
        simdevice.set_kernel_time_us(matmul_ms * 1000, op)

    def measured_step(model: nn.Module) -> float:
        times = []
        for _ in range(3):
            simdevice.synchronize()
            start = time.perf_counter()
            step(model, inputs)
            simdevice.synchronize()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    model = copy.deepcopy(template)
    wrapped = gcoffload.wrap_layers(
        model, gcoffload.OffloadOptions(min_offload_bytes=0), memory_budget=1 << 40
    )
    step(model, inputs)
    step(model, inputs)
    _, low, high = least_and_most(wrapped)
    results = []
    for fraction in (0.0, 0.5, 1.0):
        model = copy.deepcopy(template)
        wrapped = gcoffload.wrap_layers(
            model,
            gcoffload.OffloadOptions(min_offload_bytes=0),
            memory_budget=int(low + fraction * (high - low)),
        )
        step(model, inputs)  # the first pass
        step(model, inputs)  # the profile step; the next step makes the final plan
        seconds = measured_step(model)
        results.append((wrapped.plan.counts(), wrapped.plan.step_seconds, seconds))
    for _, predicted, seconds in results:
        assert abs(predicted - seconds) <= 0.15 * seconds, results
    assert len({str(counts) for counts, _, _ in results}) == 3, results
