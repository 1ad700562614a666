"""TRL's SFTTrainer with a PEFT LoRA config and gradient checkpointing, going through gcoffload."""

from __future__ import annotations

import copy

import hf_models
import pytest
import torch
from conftest import counted

import gcoffload

pytestmark = pytest.mark.hf
trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")
datasets = pytest.importorskip("datasets")

ENGINE = counted("cpu")
LAYERS = 4
STEPS = 3


def dataset() -> datasets.Dataset:
    ids = hf_models.batch(size=2 * STEPS, length=12, seed=11).clamp(min=2)
    return datasets.Dataset.from_dict({"text": [hf_models.words(row) for row in ids]})


def train(model: torch.nn.Module, output_dir: str) -> list[float]:
    """SFTTrainer's per-step losses, with LoRA added by the trainer from a PEFT config."""
    arguments = trl.SFTConfig(max_length=16, **hf_models.trainer_arguments(output_dir, True, STEPS))
    lora = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.1,
        target_modules=hf_models.LORA_TARGETS["llama"],
        task_type="CAUSAL_LM",
    )
    log = hf_models.LossLog()
    trainer = trl.SFTTrainer(
        model=model,
        args=arguments,
        train_dataset=dataset(),
        processing_class=hf_models.tokenizer(),
        peft_config=lora,
        callbacks=[log],
    )
    trainer.train()
    return log.losses


def test_sft_trainer_with_lora_goes_through_gcoffload_and_matches_an_unpatched_run(tmp_path):
    reference = hf_models.model("llama", layers=LAYERS)
    model = copy.deepcopy(reference)
    gcoffload.patch_model(model, gcoffload.OffloadOptions(min_offload_bytes=0))
    ENGINE.reset_stats()
    expected = train(reference, str(tmp_path / "reference"))
    assert ENGINE.stats()["checkpointed_layers"] == 0, "the unpatched run went through gcoffload"

    losses = train(model, str(tmp_path / "patched"))
    stats = ENGINE.stats()
    assert stats["checkpointed_layers"] == STEPS * LAYERS
    assert stats["offloads"] == STEPS * (LAYERS - 1)
    assert len(losses) == STEPS and losses == expected
