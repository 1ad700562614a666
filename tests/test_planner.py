"""The planner as a pure function: profiles in, modes out; no model runs here."""

from __future__ import annotations

import dataclasses
import itertools
import math
import random

import pytest

import gcoffload
from gcoffload.autopilot import CopyProfile, LayerProfile, Mode, Profile
from gcoffload.autopilot.disk_time import exposed_disk_seconds
from gcoffload.autopilot.planner import _RESOLUTION
from gcoffload.autopilot.profile import DiskRates

MiB = 1 << 20
GPU_COPIES = CopyProfile(50e9, 50e9, 87e9, overlaps_compute=True, nbytes=16 * MiB)
CPU_COPIES = CopyProfile(8e9, 8e9, 8e9, overlaps_compute=False, nbytes=16 * MiB)


def random_profile(layers: int, seed: int, copies: CopyProfile = GPU_COPIES) -> Profile:
    """Layers of random sizes; about half take the previous layer's output storage as their input."""
    rng = random.Random(seed)
    made: list[LayerProfile] = []
    for index in range(layers):
        chained = index > 0 and rng.random() < 0.5
        made.append(
            LayerProfile(
                index=index,
                planned=True,
                own_bytes=rng.randint(8, 40) * MiB,
                input_bytes=made[-1].output_bytes if chained else rng.randint(1, 4) * MiB,
                offloadable=rng.random() < 0.8,
                saves_input=rng.random() < 0.5,
                saves_output=rng.random() < 0.5,
                forward_seconds=rng.uniform(0.02e-3, 0.2e-3),
                output_bytes=rng.randint(1, 4) * MiB,
                input_is_previous_output=chained,
            )
        )
    return Profile(tuple(made), copies, tokens=4096)


def decoder_profile(
    layers: int, input_mib: int, forward_ms: float, copies: CopyProfile = GPU_COPIES
) -> Profile:
    """Identical chained decoder layers: saved activations ~ 16 layer inputs, the input among them."""
    layer = LayerProfile(
        0,
        True,
        15 * input_mib * MiB,
        input_mib * MiB,
        True,
        True,
        False,
        forward_ms * 1e-3,
        output_bytes=input_mib * MiB,
        input_is_previous_output=True,
    )
    return Profile(tuple(LayerProfile(**{**vars(layer), "index": i}) for i in range(layers)), copies, 4096)


def bounds(profile: Profile) -> tuple[int, int]:
    """Peak of the least-memory plan and of the all-keep plan."""
    least = [
        ("offload" if layer.offloadable else "checkpoint") if layer.planned else "plain"
        for layer in profile.layers
    ]
    kept = ["keep" if layer.planned else "plain" for layer in profile.layers]
    return gcoffload.autopilot.predict(profile, least).peak_bytes, gcoffload.autopilot.predict(
        profile, kept
    ).peak_bytes


@pytest.mark.parametrize("seed", range(4))
def test_the_program_finds_the_fastest_plan_that_fits(seed):
    profile = random_profile(6, seed)
    low, high = bounds(profile)
    total = sum(layer.own_bytes + layer.input_bytes + layer.output_bytes for layer in profile.layers)
    unit = 1 << max(0, math.ceil(math.log2(total / _RESOLUTION)))
    every_plan = [
        gcoffload.autopilot.predict(profile, modes)
        for modes in itertools.product(("keep", "checkpoint", "offload"), repeat=6)
        if all(
            mode != "offload" or layer.offloadable for mode, layer in zip(modes, profile.layers, strict=True)
        )
    ]
    for budget in range(low, high + 1, (high - low) // 25):
        chosen = gcoffload.autopilot.fastest_plan(profile, budget)
        assert chosen.peak_bytes <= budget
        # Bytes are rounded up to 1/8192 of the stack's total: the best plan with that slack less is the bar.
        fitting = [option.step_seconds for option in every_plan if option.peak_bytes <= budget - 6 * unit]
        assert chosen.step_seconds <= min(fitting, default=float("inf"))
        assert chosen.step_seconds >= min(o.step_seconds for o in every_plan if o.peak_bytes <= budget)


@pytest.mark.parametrize("copies", [GPU_COPIES, CPU_COPIES], ids=["gpu-like", "cpu"])
def test_more_budget_never_predicts_a_slower_step_and_every_plan_fits(copies):
    profile = random_profile(40, seed=7, copies=copies)
    low, high = bounds(profile)
    previous = None
    for budget in [*range(low, high, max(1, (high - low) // 60)), high]:
        chosen = gcoffload.autopilot.fastest_plan(profile, budget)
        assert chosen.peak_bytes <= budget
        if previous is not None:
            assert chosen.step_seconds <= previous.step_seconds
            assert chosen.held_bytes >= previous.held_bytes - 64 * MiB  # uses the memory it is given
        previous = chosen
    assert set(previous.modes) == {Mode.KEEP}
    assert gcoffload.autopilot.fastest_plan(profile, low).step_seconds > previous.step_seconds


def test_budgets_between_the_extremes_use_the_memory():
    profile = decoder_profile(16, input_mib=8, forward_ms=2.0)
    low, high = bounds(profile)
    for fraction in (0.25, 0.5, 0.75):
        budget = int(low + fraction * (high - low))
        chosen = gcoffload.autopilot.fastest_plan(profile, budget)
        kept = chosen.modes.count(Mode.KEEP)
        assert 0 < kept < 16
        # One more kept layer would not fit: the plan leaves less than a layer's activations unused.
        assert budget - chosen.peak_bytes < profile.layers[0].saved_bytes


def test_a_budget_below_the_least_memory_plan_names_the_minimum():
    profile = decoder_profile(8, input_mib=4, forward_ms=1.0)
    low, _ = bounds(profile)
    gcoffload.autopilot.fastest_plan(profile, low)
    with pytest.raises(ValueError, match=rf"below the {low / MiB:.2f} MiB the layers need") as error:
        gcoffload.autopilot.fastest_plan(profile, low - 1)
    assert "every input that can leave the device offloaded" in str(error.value)


def test_offload_is_chosen_only_where_memory_needs_it_when_its_copy_cannot_hide():
    # Short sequences: a 4 MiB copy takes ~80 us at 50 GB/s, the layer's forward 20 us.
    profile = decoder_profile(8, input_mib=4, forward_ms=0.02)
    low, _ = bounds(profile)
    all_checkpoint = gcoffload.autopilot.predict(profile, ["checkpoint"] * 8)
    roomy = gcoffload.autopilot.fastest_plan(profile, all_checkpoint.peak_bytes)
    assert Mode.OFFLOAD not in roomy.modes
    tight = gcoffload.autopilot.fastest_plan(profile, low)
    assert tight.modes.count(Mode.OFFLOAD) >= 1
    assert tight.step_seconds > roomy.step_seconds
    assert sum(layer.exposed_copy_seconds for layer in tight.layers) > 0


def test_offload_that_hides_costs_nothing_but_the_last_layers_fetch():
    # Long sequences: a 4 MiB copy (80 us) hides behind a 2 ms forward and its neighbour's backward.
    profile = decoder_profile(8, input_mib=4, forward_ms=2.0)
    offloaded = gcoffload.autopilot.predict(profile, ["offload"] * 8)
    checkpointed = gcoffload.autopilot.predict(profile, ["checkpoint"] * 8)
    exposed = [layer.exposed_copy_seconds for layer in offloaded.layers]
    assert exposed[:-1] == [0.0] * 7
    assert exposed[-1] == pytest.approx(4 * MiB / 50e9, rel=1e-9)  # fetched on demand
    assert offloaded.step_seconds == pytest.approx(checkpointed.step_seconds + exposed[-1])
    tight = gcoffload.autopilot.fastest_plan(profile, bounds(profile)[0])
    assert tight.mode(7) is not Mode.OFFLOAD or tight.modes.count(Mode.OFFLOAD) == 8


def test_on_the_cpu_copies_always_cost_their_time():
    profile = decoder_profile(4, input_mib=4, forward_ms=2.0, copies=CPU_COPIES)
    offloaded = gcoffload.autopilot.predict(profile, ["offload"] * 4)
    per_copy = 4 * MiB / 8e9
    assert [layer.exposed_copy_seconds for layer in offloaded.layers] == pytest.approx([2 * per_copy] * 4)


def held_rows(profile: Profile, modes: list[str]) -> list[int]:
    return [layer.held_bytes for layer in gcoffload.autopilot.predict(profile, modes).layers]


def test_memory_model_counts_a_storage_kept_and_checkpointed_layers_share_once():
    # Layer 0 saves its output (2 MiB), which is layer 1's input, which layer 1 saves too.
    saves_output = LayerProfile(0, True, 8 * MiB, MiB, True, False, True, 1e-3, output_bytes=2 * MiB)
    saves_input = LayerProfile(
        1, True, 10 * MiB, 2 * MiB, True, True, False, 1e-3, input_is_previous_output=True
    )
    profile = Profile((saves_output, saves_input), GPU_COPIES, 128)
    # A row holds its own storages and the next layer's input (the first row its own input too).
    assert held_rows(profile, ["keep", "keep"]) == [10 * MiB, 10 * MiB]  # the shared storage once
    assert held_rows(profile, ["keep", "checkpoint"]) == [10 * MiB, 0]
    assert held_rows(profile, ["keep", "offload"]) == [
        10 * MiB,
        0,
    ]  # offloading frees nothing: layer 0 holds it
    assert held_rows(profile, ["checkpoint", "keep"]) == [MiB + 2 * MiB, 10 * MiB]
    assert held_rows(profile, ["offload", "offload"]) == [0, 0]


def test_memory_model_shares_nothing_between_layers_that_do_not_chain():
    # Something runs between the layers (x = layer(x) * 0.5): layer 1's input is another storage.
    saves_output = LayerProfile(0, True, 8 * MiB, MiB, True, False, True, 1e-3, output_bytes=2 * MiB)
    saves_input = LayerProfile(
        1, True, 10 * MiB, 2 * MiB, True, True, False, 1e-3, input_is_previous_output=False
    )
    profile = Profile((saves_output, saves_input), GPU_COPIES, 128)
    assert held_rows(profile, ["keep", "keep"]) == [12 * MiB, 10 * MiB]
    assert held_rows(profile, ["keep", "checkpoint"]) == [12 * MiB, 0]
    assert held_rows(profile, ["keep", "offload"]) == [10 * MiB, 0]


def test_arguments_count_once_and_only_where_a_layer_holds_them():
    # Both layers take argument 0 (a 3 MiB mask); kept, only layer 1 saves it.
    first = LayerProfile(0, True, 4 * MiB, MiB, True, False, False, 1e-3, arguments=(0,))
    second = LayerProfile(
        1, True, 4 * MiB, MiB, True, False, False, 1e-3, arguments=(0,), saved_arguments=(0,)
    )
    profile = Profile((first, second), GPU_COPIES, 128, arguments=(3 * MiB,))

    def held(modes: list[str]) -> int:
        return gcoffload.autopilot.predict(profile, modes).held_bytes

    assert held(["keep", "keep"]) == 8 * MiB + 3 * MiB
    assert held(["offload", "offload"]) == 3 * MiB  # a checkpoint saves every argument
    assert held(["checkpoint", "checkpoint"]) == 2 * MiB + 3 * MiB
    no_saver = Profile((first, first), GPU_COPIES, 128, arguments=(3 * MiB,))
    assert gcoffload.autopilot.predict(no_saver, ["keep", "keep"]).held_bytes == 8 * MiB


def test_plans_with_arguments_stay_within_the_budget():
    base = random_profile(12, seed=3)
    layers = tuple(
        dataclasses.replace(layer, arguments=(0, 1), saved_arguments=(1,) if layer.index % 3 == 0 else ())
        for layer in base.layers
    )
    profile = dataclasses.replace(base, layers=layers, arguments=(5 * MiB, 2 * MiB))
    low, high = bounds(profile)
    for budget in range(low, high + 1, max(1, (high - low) // 20)):
        chosen = gcoffload.autopilot.fastest_plan(profile, budget)
        assert chosen.peak_bytes <= budget
        assert chosen == gcoffload.autopilot.predict(profile, chosen.modes, budget)


def test_plain_layers_stay_plain_and_non_offloadable_inputs_stay_on_the_device():
    frozen = LayerProfile(0, False, 0, MiB, False, False, False, 1e-3)
    small = [LayerProfile(index, True, 8 * MiB, MiB, False, True, False, 1e-3) for index in (1, 2, 3)]
    profile = Profile((frozen, *small), GPU_COPIES, 128)
    chosen = gcoffload.autopilot.fastest_plan(profile, bounds(profile)[0])
    assert chosen.modes == (Mode.PLAIN, Mode.CHECKPOINT, Mode.CHECKPOINT, Mode.CHECKPOINT)
    with pytest.raises(ValueError, match="layer 1 cannot be offload"):
        gcoffload.autopilot.predict(profile, ["plain", "offload", "keep", "keep"])


def test_summary_has_a_row_per_layer_and_the_totals():
    profile = decoder_profile(4, input_mib=2, forward_ms=1.0)
    low, high = bounds(profile)
    text = gcoffload.autopilot.fastest_plan(profile, (low + high) // 2).summary()
    lines = text.splitlines()
    assert len(lines) == 2 + 4 + 1
    assert (
        lines[-1].startswith("total: ") and "held after forward" in lines[-1] and "(predicted)" in lines[-1]
    )
    assert "keep" in text and "checkpoint" in text


def test_scaling_a_profile_to_more_tokens_scales_bytes_and_time():
    profile = decoder_profile(2, input_mib=2, forward_ms=1.0)
    doubled = profile.scaled(2 * profile.tokens)
    assert doubled.tokens == 8192
    assert doubled.layers[0].input_bytes == 4 * MiB and doubled.layers[0].saved_bytes == 64 * MiB
    assert doubled.layers[0].forward_seconds == pytest.approx(2e-3)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"memory_budget": -1}, "memory_budget must be a non-negative int"),
        ({"memory_budget": "1GiB"}, "memory_budget must be a non-negative int"),
        ({"memory_budget": 1 << 30, "prefetch_depth": -1}, "prefetch_depth must be"),
    ],
)
def test_bad_arguments(arguments, message):
    with pytest.raises(ValueError, match=message):
        gcoffload.autopilot.fastest_plan(decoder_profile(2, 1, 1.0), **arguments)
    with pytest.raises(TypeError, match="profile must be a gcoffload Profile"):
        gcoffload.autopilot.fastest_plan("profile", 1 << 30)


class TestDiskTier:
    """Plans under ``over_budget="disk"``: Note [The disk tier in the plan]."""

    @staticmethod
    def at_least_memory(profile: Profile, host_budget: int) -> gcoffload.autopilot.Plan:
        least = gcoffload.autopilot.least_memory(profile)
        return gcoffload.autopilot.fastest_plan(profile, least.peak_bytes, host_budget=host_budget)

    def test_the_earliest_inputs_the_host_budget_cannot_hold_go_to_disk(self) -> None:
        profile = decoder_profile(8, input_mib=64, forward_ms=20)
        fast = dataclasses.replace(profile, disk=DiskRates(100e9, 100e9))
        plan = self.at_least_memory(fast, host_budget=3 * 64 * MiB)
        offloaded = [index for index, mode in enumerate(plan.modes) if mode is Mode.OFFLOAD]
        assert len(offloaded) >= 4
        assert plan.disk_layers == tuple(offloaded[:-3])  # the last three stay on the host
        assert plan.disk_bytes == (len(offloaded) - 3) * 64 * MiB and plan.host_bytes == 3 * 64 * MiB
        assert self.at_least_memory(profile, host_budget=3 * 64 * MiB).disk_bytes == 0  # no rates: no disk

    def test_the_step_time_adds_the_disks_waits_and_reads_ahead_as_far_as_they_need(self) -> None:
        profile = decoder_profile(8, input_mib=64, forward_ms=20)
        fast = self.at_least_memory(dataclasses.replace(profile, disk=DiskRates(100e9, 100e9)), 0)
        slow = self.at_least_memory(dataclasses.replace(profile, disk=DiskRates(1e9, 1e9)), 0)
        assert fast.modes == slow.modes
        # The last layer's input goes to disk too (a host budget of 0): its read, from the turn, waits.
        assert fast.disk_seconds == pytest.approx(64 * MiB / 100e9)
        without = fast.step_seconds - fast.disk_seconds
        assert slow.disk_seconds > 0.05 and slow.step_seconds == pytest.approx(without + slow.disk_seconds)
        # A 67 ms read needs two 60 ms backward passes: read two layers ahead, one of them the prefetch's.
        assert fast.disk_read_ahead == 1 and slow.disk_read_ahead == 2

    def test_exposed_disk_seconds_by_hand(self) -> None:
        # Two layers of 1 s forward, 2 s backward; layer 0's 1 GB input on a 1 GB/s drive: written in
        # layer 0's forward, read from the turn (t=2) until t=3, while layer 1's backward runs to t=4.
        assert (
            exposed_disk_seconds(
                [1, 1], [2, 2], [10**9, 0], read_bytes_per_second=1e9, write_bytes_per_second=1e9
            )
            == 0
        )
        # Read at 0.25 GB/s: done at t=6, two seconds after layer 0's backward could start.
        assert exposed_disk_seconds(
            [1, 1], [2, 2], [10**9, 0], read_bytes_per_second=0.25e9, write_bytes_per_second=1e9
        ) == pytest.approx(2.0)
