"""gcoffload plan: traced bytes against real steps, real configs, the longest context, the command line."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.utils.checkpoint
from held_memory import LiveStorages

import gcoffload
from gcoffload.__main__ import main
from gcoffload.autopilot.disk_time import exposed_disk_seconds
from gcoffload.autopilot.planner import Mode
from gcoffload.sizing.curve import TraceCurve
from gcoffload.sizing.estimate import Strategy, capacity
from gcoffload.sizing.model_source import load_config
from gcoffload.sizing.trace import MetaModel

transformers = pytest.importorskip("transformers")

CONFIGS = Path(__file__).parent / "configs"
# name: (attention, parameters as published for the checkpoint)
REAL = {
    "llama-3.1-8b": ("sdpa", 8_030_261_248),
    "qwen3-8b": ("sdpa", 8_190_735_360),
    "mistral-7b-v0.3": ("sdpa", 7_248_023_552),
    "gemma-2-9b": ("eager", 9_241_705_984),  # transformers runs Gemma 2 with eager attention only
    "qwen3-30b-a3b": ("sdpa", 30_532_122_624),
}
DENSE = [name for name in REAL if name != "qwen3-30b-a3b"]
EVERYTHING = dict(gpu="1TiB", dtype="float32", min_offload_bytes=0, granularity=16, max_seq=256)
A_DISK = dict(host_memory="1GiB", disk_memory="1TB")


def tiny(family: str = "llama", layers: int = 3) -> transformers.PretrainedConfig:
    """A small config with dropout off (the CPU's fused attention has no dropout)."""
    config_class = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[family]
    return config_class(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, attention_dropout=0.0, use_cache=False,
    )  # fmt: skip


def scaled_down(name: str) -> transformers.PretrainedConfig:
    """The config of ``name`` with fewer layers and a narrower width; its structure otherwise."""
    config = load_config(CONFIGS / f"{name}.json")
    narrow = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=96, num_attention_heads=4)
    config.update(
        dict(narrow, num_key_value_heads=2, head_dim=16, vocab_size=96, max_position_embeddings=256)
    )
    config.use_cache = False
    if getattr(config, "sliding_window", None):
        config.sliding_window = 24  # shorter than the sequence, so that it shapes the mask
    if hasattr(config, "query_pre_attn_scalar"):
        config.query_pre_attn_scalar = 16
    return config


def checkpoint_in_save_on_cpu(function, *args, **kwargs):
    with torch.autograd.graph.save_on_cpu(pin_memory=False):
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, **kwargs)


def what_a_real_step_holds(
    config: transformers.PretrainedConfig,
    attn: str,
    strategy: str,
    seq: int,
    lora: int | None = None,
    device: str = "cpu",
) -> tuple[int, int]:
    """Bytes autograd holds after a real forward pass in float32 (loss and logits aside), on ``device``
    and in host memory (on the CPU, the host is the device: all is counted as the device's)."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn).float().to(device)
    if lora is not None:
        peft = pytest.importorskip("peft")
        model = peft.get_peft_model(
            model, peft.LoraConfig(r=lora, lora_alpha=2 * lora, lora_dropout=0.0, target_modules="all-linear")
        )
    model.train()
    if strategy == "checkpoint":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif strategy == "save_on_cpu":  # transformers' offload=True, unpinned: pinning needs an accelerator
        model._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=checkpoint_in_save_on_cpu)
    elif strategy == "offload":
        gcoffload.patch_model(model, gcoffload.OffloadOptions(min_offload_bytes=0))
        model.gradient_checkpointing_enable()
    ids = torch.randint(0, config.vocab_size, (2, seq), generator=torch.Generator().manual_seed(1)).to(device)
    with LiveStorages() as live:
        output = model(input_ids=ids, labels=ids)
    if strategy == "offload":
        gcoffload.get_engine(device).synchronize()  # copies done: the engine holds no source any more
    if device == "cpu":
        return live.alive_bytes(output.loss, output.logits), 0
    return live.alive_bytes(output.loss, output.logits, device=device), live.alive_bytes(device="cpu")


@pytest.mark.parametrize("strategy", ["none", "checkpoint", "offload"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_predicted_activations_equal_what_a_real_step_holds(family, attn, strategy):
    config = tiny(family)
    answer = capacity(config, 48, batch=2, attn=attn, **EVERYTHING)
    predicted = answer.at(48)[Strategy(strategy)]
    assert predicted.activation_bytes == what_a_real_step_holds(config, attn, strategy, 48)[0]
    if strategy == "offload":
        assert predicted.host_bytes == 2 * 2 * 48 * 32 * 4  # two of three layer inputs; the last stays


@pytest.mark.simdev
@pytest.mark.parametrize("strategy", ["save_on_cpu", "offload", "checkpoint"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_on_an_asynchronous_device_device_and_host_bytes_are_the_predicted(attn, strategy):
    """On the simulated device, host copies are copies: what stays on the device is told apart."""
    config = tiny()
    predicted = capacity(config, 48, batch=2, attn=attn, **EVERYTHING).at(48)[Strategy(strategy)]
    device_bytes, host_bytes = what_a_real_step_holds(config, attn, strategy, 48, device="simdev:0")
    assert device_bytes == predicted.activation_bytes
    if strategy == "save_on_cpu":  # gcoffload's pool is not made by ops: its bytes are not seen here
        assert host_bytes == predicted.host_bytes == 3 * 2 * 48 * 32 * 4


@pytest.mark.simdev
@pytest.mark.parametrize("strategy", ["none", "checkpoint"])
@pytest.mark.parametrize(
    ("vocab", "seq"), [(64, 256), (4096, 48)], ids=["layers-dominate", "logits-dominate"]
)
def test_the_estimated_peak_is_near_a_real_steps_peak(strategy, vocab, seq):
    """The peak is an estimate; this keeps it honest against the allocator of a real step (no copies,
    so the step's memory does not depend on timing). Measured here: 1.01 and 1.08 (layers), 1.17 and
    1.18 (logits: the head's working set is counted as two float32 logits)."""
    import simdevice

    config = tiny()
    config.vocab_size = vocab
    answer = capacity(config, seq, batch=2, **{**EVERYTHING, "max_seq": 1024})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to("simdev:0")
    model.train()
    if strategy == "checkpoint":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(1)).to("simdev:0")
    simdevice.synchronize(0)
    weights = simdevice.memory_allocated(0)
    simdevice.reset_peak_memory_stats(0)
    output = model(input_ids=ids, labels=ids)  # held through backward, as the estimate assumes
    output.loss.backward()
    del output
    simdevice.synchronize(0)
    real = simdevice.max_memory_allocated(0) - weights  # activations, gradients, working sets
    estimate = answer.at(seq)[Strategy(strategy)].peak_bytes
    estimate -= answer.weights.weight_bytes + answer.weights.optimizer_bytes  # no optimizer step here
    assert 1.0 <= estimate / real <= 1.25


@pytest.mark.parametrize("strategy", ["none", "checkpoint"])
def test_predicted_activations_of_lora_equal_what_a_real_step_holds(strategy):
    pytest.importorskip("peft")
    config = tiny("llama")
    answer = capacity(config, 40, batch=2, lora_rank=4, **EVERYTHING)
    assert (
        answer.at(40)[Strategy(strategy)].activation_bytes
        == what_a_real_step_holds(config, "sdpa", strategy, 40, lora=4)[0]
    )


@pytest.mark.parametrize("strategy", ["none", "checkpoint"])
@pytest.mark.parametrize("name", DENSE)
def test_a_scaled_down_copy_of_a_real_config_matches_a_real_step(name, strategy):
    attn = REAL[name][0]
    config = scaled_down(name)
    answer = capacity(config, 64, batch=2, attn=attn, **EVERYTHING)
    held, _ = what_a_real_step_holds(config, attn, strategy, 64)
    assert answer.at(64)[Strategy(strategy)].activation_bytes == held


@pytest.mark.parametrize("name", REAL)
def test_real_configs_hold_layers_times_tokens_times_hidden_of_layer_inputs(name):
    attn, parameters = REAL[name]
    config = load_config(CONFIGS / f"{name}.json")
    model = MetaModel(config, torch.bfloat16, attn)
    assert model.weights().parameters == parameters
    if name not in DENSE and int(transformers.__version__.split(".")[0]) < 5:
        with pytest.raises(ValueError, match="mixture of experts"):  # its experts loop over the tokens routed
            model.trace(2, 4096)
        return
    trace = model.trace(2, 4096)
    layers = trace.profile.layers
    assert len(layers) == config.num_hidden_layers
    assert (
        sum(layer.input_bytes for layer in layers)
        == config.num_hidden_layers * 2 * 4096 * config.hidden_size * 2
    )
    assert all(layer.offloadable and layer.planned for layer in layers)
    assert all(layer.input_is_previous_output for layer in layers[1:])  # nothing runs between the layers


def test_interpolated_traces_equal_direct_traces():
    options = gcoffload.OffloadOptions(min_offload_bytes=0)
    model = MetaModel(tiny(), torch.float32, "eager")  # eager: its saves grow with the square of the length
    curve = TraceCurve(model, batch=2, probe=16, options=options)
    assert curve.exact
    for seq in (17, 80, 333):
        assert curve.at(seq) == model.trace(2, seq, options)


def test_counts_that_are_no_quadratic_are_traced_at_every_length():
    model = MetaModel(tiny(layers=2), torch.float32, "sdpa")
    traced = []

    class Cubic:  # a model whose head saves seq**3 bytes
        layers = model.layers

        def trace(self, batch, seq, options):
            traced.append(seq)
            return replace(model.trace(batch, seq, options), other_bytes=seq**3)

    curve = TraceCurve(Cubic(), batch=1, probe=16)
    assert not curve.exact
    assert curve.at(100).other_bytes == 100**3
    assert traced[-1] == 100


def test_the_longest_context_is_where_the_next_step_no_longer_fits():
    config = tiny(layers=6)
    weights = MetaModel(config, torch.float32).weights().total_bytes
    answer = capacity(  # flash: no mask, whose square would outgrow the layer inputs on transformers 4.x
        config, 64, gpu=weights + 3 * 2**20, dtype="float32", reserve_bytes=0, min_offload_bytes=0,
        granularity=16, max_seq=8192, attn="flash",
    )  # fmt: skip
    estimator = answer.estimator
    longest = answer.longest
    assert 0 < longest[Strategy.NONE] < longest[Strategy.CHECKPOINT] < longest[Strategy.OFFLOAD] < 8192
    assert longest[Strategy.AUTOPILOT] >= longest[Strategy.OFFLOAD]
    for strategy, seq in longest.items():
        assert estimator.fit(estimator.curve.traced(seq), strategy).fits, strategy
        assert not estimator.fit(estimator.curve.traced(seq + 16), strategy).fits, strategy


def test_the_autopilot_fits_and_is_never_slower_than_offload_or_checkpointing():
    config = load_config(CONFIGS / "llama-3.1-8b.json")
    answer = capacity(config, [4096, 8192, 12288], lora_rank=None)
    for seq in (4096, 8192):
        fits = answer.at(seq)
        pilot = fits[Strategy.AUTOPILOT]
        assert pilot.fits and pilot.peak_bytes <= answer.usable_bytes
        for other in (Strategy.OFFLOAD, Strategy.CHECKPOINT):
            if fits[other].fits:
                assert pilot.step_seconds <= fits[other].step_seconds
    assert not answer.at(12288)[Strategy.AUTOPILOT].fits


def test_the_autopilot_swaps_where_the_link_has_room_and_within_the_host_memory():
    config = load_config(CONFIGS / "llama-3.1-8b.json")
    roomy = capacity(config, [4096], lora_rank=None, link_bytes_per_second=350e9)
    pilot = roomy.at(4096)[Strategy.AUTOPILOT]
    modes = pilot.plan.modes
    assert modes.count(Mode.SWAP) >= len(modes) // 2, pilot.plan.summary()
    assert pilot.host_bytes == pilot.plan.host_bytes > 0
    offload = roomy.at(4096)[Strategy.OFFLOAD]
    assert pilot.step_seconds < 0.9 * offload.step_seconds  # no recompute on the swapped layers
    capped = capacity(config, [4096], lora_rank=None, link_bytes_per_second=350e9, host_memory="4GiB")
    capped_pilot = capped.at(4096)[Strategy.AUTOPILOT]
    assert capped_pilot.fits and capped_pilot.host_bytes <= 4 * 2**30
    assert capped_pilot.plan.modes.count(Mode.SWAP) < modes.count(Mode.SWAP)
    slow = capacity(config, [4096], lora_rank=None).at(4096)[Strategy.AUTOPILOT]  # the H100's PCIe 5
    assert Mode.SWAP not in slow.plan.modes


def test_a_disk_takes_the_earliest_inputs_that_do_not_fit_the_host_memory():
    config = tiny(layers=6)
    options = dict(EVERYTHING, max_seq=1024, strategies=["offload"])
    all_host = capacity(config, 512, **options).at(512)[Strategy.OFFLOAD]
    ram_only = capacity(config, 512, host_memory="64KiB", **options)
    with_disk = capacity(config, 512, host_memory="64KiB", disk_memory="1MiB", **options)
    fit = with_disk.at(512)[Strategy.OFFLOAD]
    one_input = 512 * 32 * 4  # 64 KiB: five of the six layer inputs leave the device, the last stays
    assert all_host.host_bytes == 5 * one_input and all_host.disk_bytes == 0
    assert not ram_only.at(512)[Strategy.OFFLOAD].fits and fit.fits
    assert ram_only.longest[Strategy.OFFLOAD] < with_disk.longest[Strategy.OFFLOAD] == 1024
    assert fit.disk_layers == (0, 1, 2, 3)  # the earliest, until the rest fits the host memory
    assert fit.disk_bytes == 4 * one_input and fit.host_bytes == one_input
    assert fit.disk_bytes + fit.host_bytes == all_host.host_bytes
    assert (fit.activation_bytes, fit.peak_bytes) == (all_host.activation_bytes, all_host.peak_bytes)


@pytest.mark.parametrize(("disk", "fits"), [(4 * 512 * 32 * 4 - 1, False), (4 * 512 * 32 * 4, True)])
def test_a_disk_too_small_for_what_the_host_memory_leaves_does_not_fit(disk, fits):
    answer = capacity(
        tiny(layers=6), 512, **dict(EVERYTHING, max_seq=1024, strategies=["offload"]),
        host_memory="64KiB", disk_memory=disk,
    )  # fmt: skip
    assert answer.at(512)[Strategy.OFFLOAD].fits is fits


def test_the_autopilot_puts_its_earliest_offloaded_inputs_on_disk():
    config = tiny(layers=6)
    weights = MetaModel(config, torch.float32).weights().total_bytes
    options = dict(  # room for one layer's input on the device beside the least memory: one checkpoint
        gpu=weights + 2 * 2**20, dtype="float32", reserve_bytes=0, min_offload_bytes=0, granularity=16,
        max_seq=1024, attn="flash", strategies=["autopilot"], host_memory="64KiB",
    )  # fmt: skip
    ram_only = capacity(config, 512, **options).at(512)[Strategy.AUTOPILOT]
    fit = capacity(config, 512, disk_memory="1MiB", **options).at(512)[Strategy.AUTOPILOT]
    offloaded = [index for index, mode in enumerate(fit.plan.modes) if mode is Mode.OFFLOAD]
    assert fit.plan.modes == ram_only.plan.modes and len(offloaded) == 5, fit.plan.summary()
    assert not ram_only.fits and fit.fits
    assert fit.disk_layers == tuple(offloaded[:4])
    assert fit.host_bytes == 512 * 32 * 4 and fit.disk_bytes + fit.host_bytes == ram_only.host_bytes


def test_a_disk_read_that_the_backward_pass_outlasts_costs_nothing():
    # Layer 0's input: written at 0-2 s of a 4 s forward pass, read back at 4-6 s, needed at 13 s.
    seconds = exposed_disk_seconds(
        [1, 1, 1, 1], [3, 3, 3, 3], [2, 0, 0, 0], read_bytes_per_second=1, write_bytes_per_second=1
    )
    assert seconds == 0.0


def test_disk_reads_that_come_late_hold_the_backward_pass_back():
    # Writes: layer 0 at 0-2 s, layer 1 at 2-4 s, past the turn at 3 s. Reads, the latest layer first:
    # layer 1 at 4-8 s, layer 0 at 8-12 s. Backward: layer 2 at 3-6 s; layer 1 waits 2 s, runs at 8-11 s;
    # layer 0 waits 1 s, runs at 12-15 s. Without the disk the step would end at 12 s.
    seconds = exposed_disk_seconds(
        [1, 1, 1], [3, 3, 3], [4, 4, 0], read_bytes_per_second=1, write_bytes_per_second=2
    )
    assert seconds == 3.0


def test_the_command_shows_the_disk_where_one_is_given(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(tiny().to_dict()))
    arguments = ["plan", str(config), "--tokens", "8k", "--gpu", "4GiB", "--dtype", "float32"]
    arguments += ["--host-memory", "1MiB", "--max-seq", "8192"]  # an input at 8k tokens: 1 MiB
    assert main([*arguments, "--disk", "1GiB", "--disk-bandwidth", "6GB/s,4GB/s", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    offload = report["lengths"][0]["strategies"]["offload"]
    assert (offload["disk_layers"], offload["disk_bytes"], offload["host_bytes"]) == ([0], 2**20, 2**20)
    assert offload["fits"] and report["disk"]["write_bytes_per_second"] == 4e9
    assert main([*arguments, "--disk", "1GiB"]) == 0
    assert "disk: 1.00 GiB (7 GB/s read, 5 GB/s write)" in capsys.readouterr().out
    assert main(arguments) == 0
    assert " disk " not in capsys.readouterr().out


def test_lora_counts_its_adapters_in_float32_with_their_gradients_and_adamw_states():
    pytest.importorskip("peft")
    config = tiny()
    weights = MetaModel(config, torch.bfloat16, lora_rank=8).weights()
    hidden, inner, heads, kv, head_dim = 32, 64, 4, 2, 8
    shapes = [(hidden, heads * head_dim), (hidden, kv * head_dim), (hidden, kv * head_dim),
              (heads * head_dim, hidden), (hidden, inner), (hidden, inner), (inner, hidden)]  # fmt: skip
    adapters = config.num_hidden_layers * sum(8 * (fan_in + fan_out) for fan_in, fan_out in shapes)
    assert weights.trainable == adapters
    assert weights.gradient_bytes == 4 * adapters  # PEFT keeps adapters in float32 by default
    assert weights.optimizer_bytes == 2 * weights.gradient_bytes
    base = MetaModel(config, torch.bfloat16).weights()
    assert weights.weight_bytes == base.weight_bytes + 4 * adapters


def test_a_mixture_of_experts_routing_by_value_is_refused_with_a_reason():
    config = transformers.MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    config._experts_implementation = "eager"  # a loop over the experts a token picked
    model = MetaModel(config, torch.bfloat16)
    with pytest.raises(ValueError, match=r"reads tensor values.*mixture of experts"):
        model.trace(1, 32)


def test_the_command_prints_each_strategy_and_the_longest_contexts(capsys):
    assert main(["plan", str(CONFIGS / "llama-3.1-8b.json"), "--tokens", "4k:8k", "--lora", "16"]) == 0
    out = capsys.readouterr().out
    assert "at 4096 tokens per sequence" in out and "at 8192 tokens per sequence" in out
    for strategy in Strategy:
        assert strategy.value in out
    assert "longest context that fits" in out and "the autopilot's plan at 8192" in out
    assert "(est.)" in out and "Estimates:" in out


def test_the_command_writes_json_and_a_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    config = tmp_path / "config.json"
    config.write_text(json.dumps(tiny().to_dict()))
    png = tmp_path / "plan.png"
    arguments = [
        "plan",
        str(config),
        "--tokens",
        "64",
        "--gpu",
        "64MiB",
        "--reserve",
        "0",
        "--granularity",
        "16",
    ]
    assert main([*arguments, "--dtype", "float32", "--json", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    report = json.loads(out[: out.rindex("}") + 1])
    assert report["lengths"][0]["seq"] == 64
    assert set(report["longest_seq"]) == {strategy.value for strategy in Strategy}
    assert report["exact"] is True
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_hub_id_without_network_points_to_the_local_config(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        ValueError, match=r"Download its config\.json.*python -m gcoffload plan \./config\.json"
    ):
        load_config("meta-llama/Llama-3.1-8B")


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (dict(gpu="Z80"), "gpu must be one of H100 80GB"),
        (dict(dtype="int8"), "dtype must be one of"),
        (dict(attn="xformers"), "attn must be one of"),
        (dict(lora_rank=0), "lora_rank must be a positive int"),
        (dict(seq=0), "seq must be a positive int"),
        (dict(batch=0), "batch must be a positive int"),
        (dict(mfu=2.0), "mfu must be a fraction"),
        (dict(reserve_bytes="100GiB", gpu="80GiB"), "reserve_bytes"),
        (dict(host_memory="lots"), "host_memory: expected bytes"),
        (dict(A_DISK, disk_memory="lots"), "disk_memory: expected bytes"),
        (dict(A_DISK, disk_memory=-1), "disk_memory: expected bytes"),
        (dict(A_DISK, disk_memory="-3.84TB"), "disk_memory: expected bytes"),
        (dict(disk_memory="3.84TB"), "disk_memory: .*give host_memory too"),
        (dict(disk_bandwidth="7GB/s"), "disk_bandwidth: .*give disk_memory too"),
        (dict(A_DISK, disk_bandwidth="fast"), "disk_bandwidth: expected bytes per"),
        (dict(A_DISK, disk_bandwidth=-7e9), "disk_bandwidth: expected bytes per"),
        (dict(A_DISK, disk_bandwidth="0GB/s"), "disk_bandwidth: expected bytes"),
        (dict(A_DISK, disk_bandwidth="1,2,3"), "disk_bandwidth: give one rate"),
        (dict(max_seq=8), "max_seq must be an int of at least granularity"),
        (dict(strategies=["swap"]), "strategies must be among"),
    ],
)
def test_bad_arguments_say_what_is_accepted(arguments, message):
    with pytest.raises(ValueError, match=message):
        capacity(tiny(), **{"seq": 64, **arguments})


def test_bad_model_sources_say_what_is_wrong(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"directory without a config\.json"):
        load_config(tmp_path / "empty")
    (tmp_path / "weights.json").write_text('{"hidden_size": 8}')
    with pytest.raises(ValueError, match="no 'model_type'"):
        load_config(tmp_path / "weights.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="not a readable JSON config"):
        load_config(tmp_path / "broken.json")
