"""The autopilot applied: exact memory predictions, gradients of mixed plans, buckets, errors."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from conftest import ASYNC_DEVICES, counted
from held_memory import LiveStorages
from torch import nn
from toy_models import Block, add_lora, batch, causal_mask, loss_and_grads, make_pair

import gcoffload
from gcoffload.autopilot import Mode
from gcoffload.autopilot.plan_cache import bucket_tokens
from gcoffload.autopilot.planner import _Model

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

    def measured(
        budget: int | str, modes: tuple[str, ...] | None = None
    ) -> tuple[gcoffload.autopilot.Plan, int, gcoffload.WrappedLayers]:
        model = copy.deepcopy(template)
        wrapped = gcoffload.wrap_layers(
            model.layers,
            gcoffload.OffloadOptions(min_offload_bytes=0),
            memory_budget=budget,
            use_reentrant=use_reentrant,
        )
        step(model, inputs)  # the autopilot's first pass
        step(model, inputs)  # its profile step
        if modes is not None:
            profile, _, _ = least_and_most(wrapped)
            wrapped.autopilot.use(gcoffload.autopilot.predict(profile, modes))
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
    for modes in [("swap",) * LAYERS, ("swap", "keep", "offload", "swap", "checkpoint", "swap")]:
        plan, held, _ = measured(1 << 40, modes)
        assert plan.modes == tuple(Mode(mode) for mode in modes)
        assert held == plan.held_bytes, plan.summary()
        seen.update(plan.modes)
    assert seen == {Mode.KEEP, Mode.SWAP, Mode.CHECKPOINT, Mode.OFFLOAD}


@pytest.mark.simdev
@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize(
    "modes",
    [
        ("keep",) * LAYERS,
        ("checkpoint",) * LAYERS,
        ("keep", "checkpoint") * (LAYERS // 2),
        ("swap",) * (LAYERS - 1) + ("keep",),
        ("swap", "checkpoint") * (LAYERS // 2),
    ],
    ids=["keep", "checkpoint", "mixed", "swap", "swap-mixed"],
)
def test_the_predicted_peak_is_at_least_a_real_steps_peak(modes, use_reentrant):
    """The backward pass allocates a gradient buffer the size of a layer's largest saved storage;
    swapped activations come back a layer ahead (Note [The memory model]). Those still on their
    way out when backward begins are a matter of timing, settled here."""
    import simdevice

    device = ASYNC_DEVICES[0].values[0]
    torch.manual_seed(0)
    model = BareStack().to(device)
    inputs = torch.randn(4, 128, 64, device=device)
    wrapped = gcoffload.wrap_layers(
        model.layers,
        gcoffload.OffloadOptions(min_offload_bytes=0),
        memory_budget=1 << 40,
        use_reentrant=use_reentrant,
    )
    step(model, inputs)  # the autopilot's first pass
    step(model, inputs)  # its profile step
    (profile,) = wrapped.autopilot.profiles.values()
    plan = gcoffload.autopilot.predict(profile.scaled(bucket_tokens(profile.tokens)), modes)
    wrapped.autopilot.use(plan)
    step(model, inputs)
    simdevice.synchronize()
    before = simdevice.memory_allocated()
    simdevice.reset_peak_memory_stats()
    loss = model(inputs).pow(2).mean()
    # Swapped bytes still on their way out when backward begins depend on how this busy machine
    # schedules simdev's copy thread, not on the memory model: they are settled first, and the
    # model's estimate of them (timed from the profile's copy speed) is left out of the comparison.
    gcoffload.get_engine(device).synchronize()
    loss.backward()
    simdevice.synchronize()
    real = simdevice.max_memory_allocated() - before
    scaled = profile.scaled(bucket_tokens(profile.tokens))
    in_flight = _Model(scaled, plan.prefetch_depth, plan.swap_prefetch).in_flight_bytes(plan.modes)
    # The model counts a whole recompute; torch 2.14's non-reentrant checkpoint may need less of one.
    # It counts a swapped layer's prefetched activations on top of all that is held after forward,
    # though kept layers after it have freed theirs by then.
    slack = max(layer.saved_bytes for layer in profile.layers)
    if "swap" in modes:
        slack += max(layer.swap_bytes for layer in profile.layers)
    assert real <= plan.peak_bytes - in_flight <= real + slack, plan.summary()


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


def test_a_buckets_bound_is_its_own_bucket():
    """Autopilot.use files a plan under the bucket of its token count: a plan made for a bucket's
    bound (profile.scaled(bucket)) must land in that bucket, not the next one."""
    bounds = [bucket_tokens(tokens) for tokens in range(1, 20_000)]
    assert all(bucket_tokens(bound) == bound for bound in bounds)
    assert bounds == sorted(bounds) and bucket_tokens(24) == bucket_tokens(27) == 27


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
    last = engine.last_step()
    assert last["offloads"] == shrunk.modes.count(Mode.OFFLOAD) + last["swapped_storages"]
    assert last["swapped_layers"] == shrunk.modes.count(Mode.SWAP), "used in that very step"
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


class OutputSavingBlock(Block):
    """Ends in tanh, which saves its output: a kept layer holds the storage the next layer gets."""

    def forward(self, hidden_states: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return torch.tanh(super().forward(hidden_states, mask))


class BetweenStack(nn.Module):
    """Layers with something between them, or with a mask argument made in the pass or held by the model."""

    def __init__(self, scenario: str, layers: int = LAYERS, hidden: int = 64, length: int = 128) -> None:
        super().__init__()
        self.scenario = scenario
        self.layers = nn.ModuleList(OutputSavingBlock(hidden) for _ in range(layers))
        self.register_buffer("held_mask", causal_mask(length), persistent=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states * 1
        mask = None
        if self.scenario == "mask-made-in-the-pass":
            mask = self.held_mask * 1
        elif self.scenario == "mask-held-by-the-model":
            mask = self.held_mask
        for layer in self.layers:
            hidden_states = layer(hidden_states, mask)
            if self.scenario == "scaled-between-layers":
                hidden_states = hidden_states * 0.5
        return hidden_states * 1


SCENARIOS = ("scaled-between-layers", "mask-made-in-the-pass", "mask-held-by-the-model")
PLANS = (
    ("keep",) * LAYERS,
    ("keep", "offload", "checkpoint", "offload", "keep", "checkpoint"),
    ("checkpoint", "keep", "keep", "offload", "offload", "keep"),
    ("offload",) * LAYERS,
)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_plan_holds_what_is_predicted_when_layers_do_not_chain_directly(
    device, use_reentrant, scenario
):
    torch.manual_seed(0)
    template = BetweenStack(scenario).to(device)
    inputs = torch.randn(4, 128, 64, device=device)
    model = copy.deepcopy(template)
    wrapped = gcoffload.wrap_layers(
        model.layers,
        gcoffload.OffloadOptions(min_offload_bytes=0),
        memory_budget=1 << 40,
        use_reentrant=use_reentrant,
    )
    for _ in range(3):  # the first pass, the profile step, a planned step (the profile's backward is in)
        step(model, inputs)
    (profile,) = wrapped.autopilot.profiles.values()
    chained = [layer.input_is_previous_output for layer in profile.layers[1:]]
    assert chained == [scenario != "scaled-between-layers"] * (LAYERS - 1), "sharing is measured"
    assert (profile.arguments == ()) is (scenario == "scaled-between-layers")
    for modes in PLANS:
        wrapped.autopilot.use(
            gcoffload.autopilot.predict(profile.scaled(bucket_tokens(profile.tokens)), modes)
        )
        with LiveStorages() as live:
            output = model(inputs)
        counted(device).synchronize()  # copies done: the engine holds no offloaded source any more
        assert live.alive_bytes(output) == wrapped.plan.held_bytes, (modes, wrapped.plan.summary())
        output.sum().backward()


class NormBlock(nn.Module):
    """A linear layer and a BatchNorm: its running statistics count the forward runs."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden, hidden)
        self.norm = nn.BatchNorm1d(hidden)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        flat = self.linear(hidden_states).flatten(0, 1)
        return self.norm(flat).view_as(hidden_states).relu()


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_the_profile_step_changes_module_state_as_a_checkpointed_step_does(use_reentrant):
    torch.manual_seed(0)
    reference = nn.Sequential(*(NormBlock() for _ in range(4)))
    model = copy.deepcopy(reference)
    calls = {id(stack): [0] * 4 for stack in (reference, model)}
    for stack in (reference, model):
        for index, layer in enumerate(stack):
            layer.norm.register_forward_hook(
                lambda *_, stack=stack, index=index: calls[id(stack)].__setitem__(
                    index, calls[id(stack)][index] + 1
                )
            )
    gcoffload.wrap_layers(
        model,
        gcoffload.OffloadOptions(min_offload_bytes=0),
        memory_budget=1 << 40,
        use_reentrant=use_reentrant,
    )
    inputs = torch.randn(2, 16, 64, requires_grad=True)

    def reference_step(kept_last: bool) -> None:
        hidden = inputs
        for index, layer in enumerate(reference):
            if kept_last and index == 3:
                hidden = layer(hidden)
            else:
                hidden = torch.utils.checkpoint.checkpoint(layer, hidden, use_reentrant=use_reentrant)
        hidden.pow(2).mean().backward()

    reference_step(kept_last=False)  # what the autopilot's first pass does
    step(model, inputs)
    reference_step(kept_last=True)  # the profile step's modes: checkpointed, the last layer kept
    step(model, inputs)
    assert calls[id(model)] == calls[id(reference)] == [4, 4, 4, 3], "hooks fire as often"
    for mine, theirs in zip(model, reference, strict=True):
        assert torch.equal(mine.norm.num_batches_tracked, theirs.norm.num_batches_tracked)
        assert torch.equal(mine.norm.running_mean, theirs.norm.running_mean)
        assert torch.equal(mine.norm.running_var, theirs.norm.running_var)


def test_torch_compile_with_a_budget_follows_changing_lengths():
    torch.manual_seed(0)
    reference = nn.Sequential(*(Block(32, dropout=0.0) for _ in range(3)))
    model = copy.deepcopy(reference)
    wrapped = gcoffload.wrap_layers(
        model, gcoffload.OffloadOptions(min_offload_bytes=0), memory_budget=1 << 40
    )
    compiled = torch.compile(model, backend="eager")
    for length in (16, 16, 32, 48):  # the first pass, a profile step, then new lengths: dynamic shapes
        hidden = torch.randn(2, length, 32)
        for stack in (reference, compiled):
            stack.zero_grad(set_to_none=True)
            stack(hidden).pow(2).mean().backward()
        for expected, actual in zip(reference.parameters(), model.parameters(), strict=True):
            torch.testing.assert_close(actual.grad, expected.grad)
    assert len(wrapped.autopilot.plans) == 3


def test_auto_with_a_pinned_plan_for_an_unmeasured_size_plans_anew_when_memory_shrinks(device_memory):
    model = BareStack(layers=3)
    wrapped = gcoffload.wrap_layers(
        model.layers, gcoffload.OffloadOptions(min_offload_bytes=0), memory_budget="auto"
    )
    device_memory["free"] = auto_margin(device_memory) + (1 << 36)
    for _ in range(3):  # measured at 2 x 64 tokens
        step(model, torch.randn(2, 64, 64))
    (profile,) = wrapped.autopilot.profiles.values()
    larger = profile.scaled(4 * 1024)  # a size never measured, pinned by the user
    wrapped.autopilot.use(gcoffload.autopilot.predict(larger, ["keep"] * 3, 1 << 36))
    budget = 2 * gcoffload.autopilot.least_memory(larger).peak_bytes  # below the pinned all-keep plan
    device_memory["free"] = auto_margin(device_memory) + budget
    with pytest.warns(UserWarning, match="no profile was measured to plan that size anew"):
        step(model, torch.randn(4, 1024, 64))  # a profile step, in the least memory
    step(model, torch.randn(4, 1024, 64))
    assert 4 * 1024 in wrapped.autopilot.profiles, "the new size was measured"
    assert wrapped.plan.tokens == bucket_tokens(4 * 1024) and wrapped.plan.budget_bytes == budget


def _decoder_profile() -> gcoffload.autopilot.Profile:
    copies = gcoffload.autopilot.CopyProfile(50e9, 50e9, 87e9, True, 1 << 20)
    layer = gcoffload.autopilot.LayerProfile(0, True, 1 << 20, 1 << 18, True, True, False, 1e-3)
    return gcoffload.autopilot.Profile((layer,), copies, 128)


planner = gcoffload.autopilot
BAD_ARGUMENTS = {
    "a budget too large": (
        lambda: gcoffload.wrap_layers([nn.Linear(2, 2)], memory_budget="1" * 400 + "GiB"),
        ValueError,
        r"memory_budget must be bytes .*at most 2\*\*63 - 1",
    ),
    "no modes": (lambda: planner.predict(_decoder_profile(), None), TypeError, "modes must be a sequence"),
    "an unknown mode": (
        lambda: planner.predict(_decoder_profile(), ["kept"]),
        ValueError,
        "must each be one of",
    ),
    "a budget string": (
        lambda: planner.predict(_decoder_profile(), ["keep"], memory_budget="1GiB"),
        ValueError,
        "memory_budget must be a non-negative int of bytes here",
    ),
    "no profile": (
        lambda: planner.least_memory(None),
        TypeError,
        "least_memory: profile must be a gcoffload",
    ),
    "no bandwidth": (
        lambda: planner.CopyProfile(0.0, 1e9, 1e9, True, 1),
        ValueError,
        "d2h_bytes_per_second must be a positive number",
    ),
    "no options": (lambda: planner.Autopilot("1GiB", None, 3), TypeError, "Autopilot: options must be"),
    "negative layers": (
        lambda: planner.Autopilot("1GiB", gcoffload.OffloadOptions(), -1),
        ValueError,
        "layer_count must be a non-negative int",
    ),
    "a checkpointer without options": (
        lambda: gcoffload.layers.LayerCheckpointer(None),
        TypeError,
        "LayerCheckpointer: options must be",
    ),
    "a number for a checkpoint function": (
        lambda: gcoffload.layers.selective_checkpoint_function(5),
        TypeError,
        "checkpoint_function must be callable",
    ),
    "a dict for options": (
        lambda: gcoffload.wrap_layers([nn.Linear(2, 2)], {"offload": False}),
        TypeError,
        "wrap_layers: options must be a gcoffload.OffloadOptions",
    ),
}


@pytest.mark.parametrize(("call", "error", "message"), BAD_ARGUMENTS.values(), ids=BAD_ARGUMENTS.keys())
def test_bad_arguments_name_the_argument_and_what_is_accepted(call, error, message):
    with pytest.raises(error, match=message):
        call()
