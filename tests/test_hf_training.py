"""The Trainer and LLaMA-Factory's entry point going through gcoffload."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import types

import hf_models
import pytest
import torch
from conftest import counted
from hf_models import batch

import gcoffload
from gcoffload.integrations.hf import TrainingSettings
from gcoffload.layers import LayerCheckpointer

pytestmark = pytest.mark.hf
transformers = hf_models.transformers

ENGINE = counted("cpu")


def train_three_steps(
    model: torch.nn.Module, output_dir: str, checkpointing: bool
) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Three Trainer steps, checkpointing requested the way users request it; per-step losses, weights."""
    arguments = transformers.TrainingArguments(**hf_models.trainer_arguments(output_dir, checkpointing))
    ids = batch(size=6, length=12, seed=11)
    dataset = [{"input_ids": row, "labels": row} for row in ids]
    log = hf_models.LossLog()
    trainer = transformers.Trainer(model=model, args=arguments, train_dataset=dataset, callbacks=[log])
    trainer.train()
    return log.losses, {name: parameter.detach().clone() for name, parameter in model.named_parameters()}


@pytest.mark.parametrize("use_peft", [False, True], ids=["full", "lora"])
def test_trainer_goes_through_gcoffload_and_matches_an_unpatched_run(tmp_path, use_peft):
    reference = hf_models.model("llama")
    model = copy.deepcopy(reference)
    if use_peft:
        reference, model = hf_models.lora(reference, "llama"), hf_models.lora(model, "llama")
    gcoffload.patch_model(model, gcoffload.OffloadOptions(min_offload_bytes=0))
    ENGINE.reset_stats()

    expected_losses, expected_weights = train_three_steps(reference, str(tmp_path / "reference"), False)
    assert ENGINE.stats()["checkpointed_layers"] == 0
    losses, weights = train_three_steps(model, str(tmp_path / "patched"), True)

    stats = ENGINE.stats()
    assert stats["checkpointed_layers"] == 3 * 4 and stats["recomputes"] == 3 * 4
    assert stats["offloads"] == 3 * 3 and stats["prefetch_hits"] == 3 * 3
    last_step = ENGINE.last_step()
    assert last_step["checkpointed_layers"] == 4 and last_step["prefetch_hits"] == 3
    assert len(losses) == 3 and losses == expected_losses
    for name, weight in weights.items():
        assert torch.equal(weight, expected_weights[name]), name

    model.eval()
    prompt = batch(size=1, length=5, seed=2)
    generated = model.generate(input_ids=prompt, max_new_tokens=4, do_sample=False)
    reference.eval()
    assert torch.equal(generated, reference.generate(input_ids=prompt, max_new_tokens=4, do_sample=False))


class LlamaFactoryArguments(types.SimpleNamespace):
    """The fields LLaMA-Factory's ModelArguments has, with its defaults."""

    def __init__(self, **overrides):
        super().__init__(
            **{
                "upcast_layernorm": False,
                "disable_gradient_checkpointing": False,
                "use_unsloth_gc": False,
                "use_reentrant_gc": True,
                "upcast_lmhead_output": False,
                "model_name_or_path": "unused",
                **overrides,
            }
        )


def checkpointers(model: torch.nn.Module) -> set[LayerCheckpointer]:
    return {
        module._gradient_checkpointing_func
        for module in model.modules()
        if getattr(module, "gradient_checkpointing", False)
    }


class TestPrepareModelForTraining:
    def test_defaults_enable_selective_checkpointing_without_offload(self):
        model = hf_models.model("llama")
        model.config.use_cache = True
        gcoffload.prepare_model_for_training(model, LlamaFactoryArguments())
        (checkpointer,) = checkpointers(model)
        assert isinstance(checkpointer, LayerCheckpointer)
        assert checkpointer.options.offload is False and checkpointer.use_reentrant is True
        assert model.config.use_cache is True, "the config is the model's, as stock checkpointing leaves it"

    def test_use_unsloth_gc_means_offload(self):
        model = hf_models.model("llama")
        gcoffload.prepare_model_for_training(model, LlamaFactoryArguments(use_unsloth_gc=True))
        (checkpointer,) = checkpointers(model)
        assert checkpointer.options.offload is True

    def test_upcasts_norm_weights_and_lm_head_output(self):
        model = hf_models.model("llama").to(torch.bfloat16)
        gcoffload.prepare_model_for_training(
            model, LlamaFactoryArguments(upcast_layernorm=True, upcast_lmhead_output=True)
        )
        for name, parameter in model.named_parameters():
            expected = torch.float32 if parameter.ndim == 1 and "norm" in name else torch.bfloat16
            assert parameter.dtype == expected, name
        model.eval()
        with torch.autocast("cpu", dtype=torch.bfloat16):  # how mixed-precision training runs it
            assert model(input_ids=batch()).logits.dtype == torch.float32

    def test_disable_gradient_checkpointing_leaves_the_model_alone(self):
        model = hf_models.model("llama")
        gcoffload.prepare_model_for_training(
            model, LlamaFactoryArguments(disable_gradient_checkpointing=True)
        )
        assert not hasattr(model, "_gcoffload_patch")
        assert checkpointers(model) == set()

    def test_keywords_override_the_arguments_object(self):
        model = hf_models.model("llama")
        gcoffload.prepare_model_for_training(
            model, LlamaFactoryArguments(use_unsloth_gc=True), use_unsloth_gc=False
        )
        (checkpointer,) = checkpointers(model)
        assert checkpointer.options.offload is False

    def test_fsdp2_switches_to_the_non_reentrant_path_with_a_warning(self, monkeypatch):
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
        monkeypatch.setenv("FSDP_VERSION", "2")
        model = hf_models.model("llama")
        with pytest.warns(UserWarning, match="FSDP2"):
            gcoffload.prepare_model_for_training(model, LlamaFactoryArguments(use_reentrant_gc=True))
        (checkpointer,) = checkpointers(model)
        assert checkpointer.use_reentrant is False
        with pytest.warns(UserWarning, match="FSDP2"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        (checkpointer,) = checkpointers(model)
        assert checkpointer.use_reentrant is False

    def test_a_memory_budget_turns_on_the_autopilot_offloading_only_with_use_unsloth_gc(self):
        for use_unsloth_gc in (False, True):
            model = hf_models.model("llama")
            gcoffload.prepare_model_for_training(
                model, LlamaFactoryArguments(use_unsloth_gc=use_unsloth_gc), memory_budget="1GiB"
            )
            (checkpointer,) = checkpointers(model)
            assert checkpointer.autopilot.budget.nbytes == 2**30
            assert checkpointer.options.offload is use_unsloth_gc
            assert model.gcoffload_plan is None

    def test_the_llama_factory_command_takes_a_memory_budget(self, capsys):
        from gcoffload.integrations.llamafactory import add_arguments

        parser = argparse.ArgumentParser()
        add_arguments(parser)
        assert parser.parse_args(["--memory-budget", "0.5", "train", "c.yaml"]).memory_budget.fraction == 0.5
        assert parser.parse_args(["train", "c.yaml"]).memory_budget is None
        with pytest.raises(SystemExit):
            parser.parse_args(["--memory-budget", "lots", "train", "c.yaml"])
        assert "memory_budget must be bytes" in capsys.readouterr().err

    def test_unknown_settings_are_named(self):
        with pytest.raises(TypeError, match="use_unslot_gc"):
            gcoffload.prepare_model_for_training(hf_models.model("llama"), use_unslot_gc=True)

    def test_settings_fields_are_the_llama_factory_ones(self):
        assert {field.name for field in dataclasses.fields(TrainingSettings)} == {
            "upcast_layernorm",
            "disable_gradient_checkpointing",
            "use_unsloth_gc",
            "use_reentrant_gc",
            "upcast_lmhead_output",
        }


@pytest.mark.parametrize("use_peft", [False, True], ids=["full", "lora"])
def test_the_trainer_runs_a_swap_plan_and_matches_an_unpatched_run(tmp_path, use_peft):
    reference = hf_models.model("llama")
    model = copy.deepcopy(reference)
    if use_peft:
        reference, model = hf_models.lora(reference, "llama"), hf_models.lora(model, "llama")
    expected_losses, expected_weights = train_three_steps(reference, str(tmp_path / "reference"), False)
    hf_models.pin_plan(model, ["swap", "keep", "swap", "checkpoint"])
    ENGINE.reset_stats()
    losses, weights = train_three_steps(model, str(tmp_path / "patched"), True)
    stats = ENGINE.stats()
    assert (stats["swapped_layers"], stats["kept_layers"], stats["recomputes"]) == (3 * 2, 3, 3)
    assert len(losses) == 3 and losses == expected_losses
    for name, weight in weights.items():
        assert torch.equal(weight, expected_weights[name]), name
