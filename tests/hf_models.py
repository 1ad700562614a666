"""Tiny transformers models built from configs (no hub), with dropout on, and training helpers."""

from __future__ import annotations

import copy
import functools
from typing import Any

import torch

import gcoffload

transformers = __import__("pytest").importorskip("transformers")

FAMILIES = ("llama", "qwen2", "mistral", "gpt2")
VOCAB = 64
LORA_TARGETS = {"llama": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"]}
LORA_TARGETS["gpt2"] = ["c_attn"]


def config(family: str, layers: int = 4) -> transformers.PretrainedConfig:
    """A 4-layer, 32-wide config with dropout on and, as for training, no KV cache.

    The reference runs need ``use_cache=False`` too: with a cache, GPT-2 routes
    keys and values through the cache's concatenation and its gradients differ
    in the last bits from any checkpointed run (torch's own checkpoint included).
    """
    if family == "gpt2":
        return transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4, n_positions=64,
            resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1, use_cache=False,
        )  # fmt: skip
    config_class = {
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
        "mistral": transformers.MistralConfig,
    }[family]
    return config_class(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, attention_dropout=0.1,
        use_cache=False,
    )  # fmt: skip


def model(family: str, layers: int = 4, seed: int = 0, attn: str = "eager") -> torch.nn.Module:
    torch.manual_seed(seed)
    built = transformers.AutoModelForCausalLM.from_config(config(family, layers), attn_implementation=attn)
    return built.float()


def pin_plan(model: torch.nn.Module, modes: list[str]) -> None:
    """Patches ``model`` with an autopilot whose plan for :func:`batch`'s shape is ``modes``.

    The plan comes from the profile of a copy of the model, so the model's own
    first steps already run it.
    """
    from gcoffload.autopilot import predict
    from gcoffload.autopilot.plan_cache import bucket_tokens
    from gcoffload.integrations.hf import _PATCH_ATTRIBUTE

    def patched_autopilot(target: torch.nn.Module):
        gcoffload.patch_model(target, gcoffload.OffloadOptions(min_offload_bytes=0), memory_budget=1 << 40)
        base = target.get_base_model() if hasattr(target, "get_base_model") else target
        return getattr(base, _PATCH_ATTRIBUTE).autopilot

    probe = copy.deepcopy(model)
    autopilot = patched_autopilot(probe)
    for _ in range(2):  # the first pass, the profile step
        loss_and_grads(probe, batch())
    (profile,) = autopilot.profiles.values()
    plan = predict(profile.scaled(bucket_tokens(profile.tokens)), modes)
    patched_autopilot(model).use(plan)


def pair(family: str, layers: int = 4) -> tuple[torch.nn.Module, torch.nn.Module]:
    reference = model(family, layers)
    return reference, copy.deepcopy(reference)


def lora(base: torch.nn.Module, family: str, seed: int = 3) -> torch.nn.Module:
    peft = __import__("pytest").importorskip("peft")
    torch.manual_seed(seed)
    lora_config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=LORA_TARGETS[family])
    return peft.get_peft_model(base, lora_config)


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.transformer.h if hasattr(inner, "transformer") else inner.model.layers


def batch(size: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (size, length), generator=torch.Generator().manual_seed(seed))


def loss_and_grads(model: torch.nn.Module, ids: torch.Tensor, seed: int = 123) -> tuple[torch.Tensor, dict]:
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def assert_same(expected: tuple, actual: tuple) -> None:
    assert torch.equal(actual[0], expected[0])
    assert actual[1].keys() == expected[1].keys() and actual[1]
    for name, grad in actual[1].items():
        assert torch.equal(grad, expected[1][name]), name


@functools.cache
def has_activation_checkpointing() -> bool:
    return hasattr(transformers.PreTrainedModel, "activation_checkpointing_enable")


def tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer for the tiny models: ``w2`` ... ``w63`` are ids 2 to 63 (built in memory)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, **{f"w{index}": index for index in range(2, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>"
    )


def words(ids: torch.Tensor) -> str:
    """The text :func:`tokenizer` turns into ``ids`` (ids of 2 and above)."""
    return " ".join(f"w{token}" for token in ids.tolist())


def trainer_arguments(output_dir: str, checkpointing: bool, steps: int = 3) -> dict[str, Any]:
    """Keywords for ``TrainingArguments`` (or a subclass, such as TRL's configs): a short CPU run.

    Two rows per step, the loss logged every step, nothing saved, a fixed seed;
    checkpointing asked for by the name this transformers knows.
    """
    flag = "activation_checkpointing" if has_activation_checkpointing() else "gradient_checkpointing"
    return {
        "output_dir": output_dir,
        "max_steps": steps,
        "per_device_train_batch_size": 2,
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "dataloader_num_workers": 0,
        "seed": 7,
        flag: checkpointing,
    }


class LossLog(transformers.TrainerCallback):
    """Collects the loss the Trainer logs at each step."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])
