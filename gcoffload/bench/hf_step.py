"""Scenario (c): a transformers Llama built from a config, one training step per strategy.

Full fine-tuning and PEFT LoRA, each with transformers' own checkpointing
(non-reentrant), transformers' ``offload=True`` where the installed version
has it (5.17+), and gcoffload's ``patch_model``. A step is forward with labels
and backward; the optimizer is left out, as it is the same for all.
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..checkpointing.options import OffloadOptions
from ..engine import get_engine
from ..integrations.hf import patch_model
from . import common, noise


@dataclass(frozen=True)
class HFConfig:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    batch: int
    length: int

    @property
    def label(self) -> str:
        return f"Llama H={self.hidden} L={self.layers} {self.batch}x{self.length}"


GPU_CONFIG = HFConfig(2048, 8192, 16, 32, 8, 32000, batch=4, length=2048)
SMOKE_CONFIG = HFConfig(128, 512, 4, 4, 2, 1000, batch=2, length=128)


def _enable_stock(model: Any, offload: bool) -> None:
    enable = getattr(model, "activation_checkpointing_enable", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False}, offload=offload)
        elif offload:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}, offload=True
            )
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _stock_offload_supported() -> bool:
    """Whether the installed transformers' checkpointing takes ``offload`` (5.17+)."""
    from transformers import PreTrainedModel

    method = getattr(PreTrainedModel, "activation_checkpointing_enable", None)
    return "offload" in inspect.signature(method or PreTrainedModel.gradient_checkpointing_enable).parameters


STRATEGIES: dict[str, Callable[[Any], None]] = {
    "hf-checkpoint": lambda model: _enable_stock(model, offload=False),
    "hf-offload": lambda model: _enable_stock(model, offload=True),
    "gcoffload": lambda model: patch_model(model, OffloadOptions(min_offload_bytes=0)),
}


def _build(config: HFConfig, device: torch.device, dtype: torch.dtype, lora: bool) -> Any:
    import transformers

    torch.manual_seed(0)
    llama = transformers.LlamaConfig(
        vocab_size=config.vocab,
        hidden_size=config.hidden,
        intermediate_size=config.intermediate,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        num_key_value_heads=config.kv_heads,
        max_position_embeddings=max(4096, config.length),
        use_cache=False,
    )
    model = transformers.AutoModelForCausalLM.from_config(llama, attn_implementation="sdpa").to(device, dtype)
    if lora:
        import peft

        target = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=target))
    return model.train()


def run(
    config: HFConfig,
    device: torch.device,
    dtype: torch.dtype,
    warmup: int,
    steps: int,
    advance: Callable[[str], None] = lambda label: None,
) -> dict[str, Any]:
    """Times every (mode, strategy) pair; returns a JSON-ready dict."""
    ids = torch.randint(0, config.vocab, (config.batch, config.length), device=device)
    rows = []
    for mode in ("full", "lora"):
        for name, enable in STRATEGIES.items():
            advance(f"hf {mode}: {name}")
            if name == "hf-offload" and not _stock_offload_supported():
                rows.append({"mode": mode, "strategy": name, "skipped": "needs transformers >= 5.17"})
                continue
            if name == "hf-offload" and device.type == "cpu":
                rows.append({"mode": mode, "strategy": name, "skipped": "pins memory: needs an accelerator"})
                continue
            model = _build(config, device, dtype, lora=(mode == "lora"))
            enable(model)
            try:
                rows.append({"mode": mode, "strategy": name, **_measure(model, ids, device, warmup, steps)})
            except torch.OutOfMemoryError:
                rows.append({"mode": mode, "strategy": name, "oom": True})
            del model
    for mode in ("full", "lora"):  # a mode's strategies do the same work
        noise.mark_implausible([row for row in rows if row["mode"] == mode], "strategy")
    baselines = {
        row["mode"]: row for row in rows if row["strategy"] == "hf-checkpoint" and "median_ms" in row
    }
    for row in rows:
        if "median_ms" in row and row["mode"] in baselines:
            row["overhead_vs_checkpoint"] = row["median_ms"] / baselines[row["mode"]]["median_ms"] - 1
    return {"config": vars(config) | {"label": config.label}, "dtype": str(dtype), "rows": rows}


def _measure(model: Any, ids: torch.Tensor, device: torch.device, warmup: int, steps: int) -> dict[str, Any]:
    engine = get_engine(device)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()

    times = common.time_steps(step, device, warmup, steps)
    engine.reset_stats()
    model.zero_grad(set_to_none=True)
    memory = common.memory_of_step(
        device, lambda: model(input_ids=ids, labels=ids).loss, lambda loss: loss.backward()
    )
    return {
        "step_ms": common.spread(times),
        "median_ms": statistics.median(times),
        **memory,
        "offloads_per_step": engine.stats()["offloads"],
        "noisy": noise.diagnose(times),
    }


COLUMNS = [
    ("mode", "mode", "str"),
    ("strategy", "strategy", "str"),
    ("median_ms", "step ms", "ms"),
    ("overhead_vs_checkpoint", "vs hf-checkpoint", "pct"),
    ("peak_bytes", "peak GiB", "gib"),
    ("held_after_forward_bytes", "held after fwd GiB", "gib"),
    ("offloads_per_step", "offloads", "str"),
    ("skipped", "note", "str"),
    ("noisy", "noisy", "str"),
]


def report(result: dict[str, Any]) -> str:
    return f"### transformers step: {result['config']['label']} ({result['dtype']})\n\n" + common.table(
        result["rows"], COLUMNS
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=common.help_text(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--warmup",
        type=common.non_negative_int,
        default=5,
        help="untimed steps per run (default: %(default)s)",
    )
    parser.add_argument(
        "--steps", type=common.positive_int, default=10, help="timed steps per run (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    device = get_engine().device
    on_gpu = device.type != "cpu"
    config, dtype = (GPU_CONFIG, torch.bfloat16) if on_gpu else (SMOKE_CONFIG, torch.float32)
    with common.one_thread_on_the_cpu(device):
        print(report(run(config, device, dtype, args.warmup, args.steps)))
