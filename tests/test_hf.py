"""patch_model on transformers models, PEFT LoRA and freeze-tuning, against runs without checkpointing."""

from __future__ import annotations

import copy
import functools
import json
import pickle
import warnings

import hf_models
import pytest
import torch
from conftest import counted
from hf_models import FAMILIES, assert_same, batch, decoder_layers, loss_and_grads

import gcoffload
from gcoffload.checkpointing.layer_call import resolve_module
from gcoffload.layers import LayerCheckpointer

pytestmark = [pytest.mark.hf, pytest.mark.usefixtures("no_leaks")]

ENGINE = counted("cpu")


def installed_functions(model: torch.nn.Module) -> set[type]:
    return {
        type(module._gradient_checkpointing_func)
        for module in model.modules()
        if getattr(module, "gradient_checkpointing", False)
    }


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_full_fine_tuning_matches_no_checkpointing(family, use_reentrant):
    reference, model = hf_models.pair(family)
    ids = batch()
    expected = loss_and_grads(reference, ids)
    gcoffload.patch_model(model, gcoffload.OffloadOptions(min_offload_bytes=0), use_reentrant=use_reentrant)
    assert installed_functions(model) == {LayerCheckpointer}
    assert_same(expected, loss_and_grads(model, ids))
    stats = ENGINE.stats()
    assert stats["checkpointed_layers"] == 4 and stats["recomputes"] == 4
    assert stats["offloads"] == 3 and stats["prefetch_hits"] == 3


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("patch_first", [False, True], ids=["patch-peft-model", "peft-wraps-patched-model"])
def test_peft_lora_with_frozen_embeddings_matches(family, patch_first):
    reference = hf_models.lora(hf_models.model(family), family)
    base = hf_models.model(family)
    if patch_first:
        gcoffload.patch_model(base, gcoffload.OffloadOptions(min_offload_bytes=0), use_reentrant=True)
        model = hf_models.lora(base, family)
    else:
        model = gcoffload.patch_model(
            hf_models.lora(base, family), gcoffload.OffloadOptions(min_offload_bytes=0), use_reentrant=True
        )
    ids = batch()
    expected = loss_and_grads(reference, ids)
    assert all("lora_" in name for name in expected[1])
    assert_same(expected, loss_and_grads(model, ids))
    assert ENGINE.stats()["checkpointed_layers"] == 4


def test_peft_prepare_model_for_kbit_training_lands_in_gcoffload():
    peft = pytest.importorskip("peft")
    reference, base = hf_models.pair("llama")
    reference = hf_models.lora(
        peft.prepare_model_for_kbit_training(reference, use_gradient_checkpointing=False), "llama"
    )
    gcoffload.patch_model(base, gcoffload.OffloadOptions(min_offload_bytes=0))
    prepared = peft.prepare_model_for_kbit_training(
        base, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True}
    )
    model = hf_models.lora(prepared, "llama")
    assert installed_functions(model) == {LayerCheckpointer}
    ids = batch()
    assert_same(loss_and_grads(reference, ids), loss_and_grads(model, ids))
    assert ENGINE.stats()["checkpointed_layers"] == 4


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_freeze_tuning_the_last_two_layers_checkpoints_only_those(family):
    reference, model = hf_models.pair(family)
    for candidate in (reference, model):
        candidate.requires_grad_(False)
        for layer in decoder_layers(candidate)[-2:]:
            layer.requires_grad_(True)
    ids = batch()
    expected = loss_and_grads(reference, ids)
    gcoffload.patch_model(model, gcoffload.OffloadOptions(min_offload_bytes=0))
    assert_same(expected, loss_and_grads(model, ids))
    stats = ENGINE.stats()
    assert stats["checkpointed_layers"] == 2 and stats["plain_layers"] == 2


def test_the_seed_helpers_compose_into_a_checkpoint_function():
    reference = hf_models.lora(hf_models.model("llama"), "llama")
    model = hf_models.lora(hf_models.model("llama"), "llama")
    function = gcoffload.layers.selective_checkpoint_function(
        gcoffload.integrations.hf.offloaded_checkpoint_function(
            gcoffload.OffloadOptions(keep_resident=0, min_offload_bytes=0)
        )
    )
    model.get_base_model()._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=function)
    ids = batch()
    assert_same(loss_and_grads(reference, ids), loss_and_grads(model, ids))
    assert ENGINE.stats()["offloads"] == 4


def test_module_resolution_covers_every_call_shape():
    layer = decoder_layers(hf_models.model("llama"))[0]
    forward = type(layer).forward
    shapes = [
        layer.__call__,  # transformers <= 4.51
        functools.partial(super(type(layer), layer).__call__, attention_mask=None),  # 4.52 - 5.22
        functools.partial(forward, layer, attention_mask=None),  # 5.23+
    ]
    assert [resolve_module(shape) for shape in shapes] == [layer] * 3


def test_every_n_layers_from_the_enable_call_applies():
    reference, model = hf_models.pair("llama")
    ids = batch()
    expected = loss_and_grads(reference, ids)
    gcoffload.patch_model(model, gcoffload.OffloadOptions(min_offload_bytes=0))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"every_n_layers": 2})
    assert_same(expected, loss_and_grads(model, ids))
    stats = ENGINE.stats()
    assert stats["checkpointed_layers"] == 2 and stats["plain_layers"] == 2


def reentrant(model: torch.nn.Module) -> set[bool]:
    """The paths the model's checkpointed layers take (True: reentrant)."""
    return {
        module._gradient_checkpointing_func.use_reentrant
        for module in model.modules()
        if getattr(module, "gradient_checkpointing", False)
    }


def test_enable_kwargs_choose_the_path():
    model = gcoffload.patch_model(hf_models.model("llama"))
    assert reentrant(model) == {False}  # patch_model's default
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    assert reentrant(model) == {True}
    model.gradient_checkpointing_enable()  # no choice made: patch_model's
    assert reentrant(model) == {False}

    model = gcoffload.patch_model(hf_models.model("llama"), use_reentrant=True)
    assert reentrant(model) == {True}
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert reentrant(model) == {False}


class TestEntryPoints:
    def test_enable_keeps_the_parameter_name_peft_inspects(self):
        import inspect

        model = gcoffload.patch_model(hf_models.model("llama"))
        assert (
            "gradient_checkpointing_kwargs"
            in inspect.signature(model.gradient_checkpointing_enable).parameters
        )

    @pytest.mark.skipif(
        not hf_models.has_activation_checkpointing(),
        reason="activation_checkpointing_enable is transformers 5.23+",
    )
    def test_the_deprecation_path_neither_recurses_nor_warns(self):
        model = gcoffload.patch_model(hf_models.model("llama"))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
            model.activation_checkpointing_enable(every_n_layers=1, offload=True)
            # The class's own method, as a subclass's super() call would reach it.
            type(model).__mro__[1].activation_checkpointing_enable(model)
        assert [w for w in caught if issubclass(w.category, FutureWarning)] == []
        assert installed_functions(model) == {LayerCheckpointer}

    def test_input_require_grads_is_deferred_while_patched_and_restored_after(self):
        model = hf_models.model("llama")
        model.enable_input_require_grads()
        gcoffload.patch_model(model)
        embeddings = model.get_input_embeddings()
        assert not embeddings._forward_hooks, "the hook was removed: the selective rule replaces it"
        model.enable_input_require_grads()
        assert not embeddings._forward_hooks
        gcoffload.unpatch_model(model)
        assert len(embeddings._forward_hooks) == 1

    def test_unpatch_restores_stock_behaviour(self):
        model = hf_models.model("llama")
        model.config.use_cache = True
        gcoffload.patch_model(model)
        gcoffload.unpatch_model(model)
        assert "gradient_checkpointing_enable" not in model.__dict__
        assert not hasattr(model, "_gcoffload_patch")
        assert model.config.use_cache is True
        assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
        enable = model.activation_checkpointing_enable if hf_models.has_activation_checkpointing() else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            (enable or model.gradient_checkpointing_enable)()
        assert LayerCheckpointer not in installed_functions(model)
        with pytest.raises(ValueError, match="not patched"):
            gcoffload.unpatch_model(model)

    def test_bad_input(self):
        with pytest.raises(TypeError, match="no transformers PreTrainedModel"):
            gcoffload.patch_model(torch.nn.Linear(2, 2))
        with pytest.raises(ValueError, match="keep_resident"):
            gcoffload.patch_model(hf_models.model("llama"), gcoffload.OffloadOptions(keep_resident=-1))
        model = hf_models.model("llama")
        with pytest.raises(ValueError, match="every_n_layers"):
            gcoffload.patch_model(model, every_n_layers=0)
        assert "gradient_checkpointing_enable" not in model.__dict__, "a refused patch changes nothing"


def _round_trip(model: torch.nn.Module, how: str, directory) -> torch.nn.Module:
    if how == "pickle":
        return pickle.loads(pickle.dumps(model))
    if how == "torch.save":
        path = directory / "model.pt"
        torch.save(model, path)
        return torch.load(path, weights_only=False)
    return copy.deepcopy(model)


class TestPersistence:
    @pytest.mark.parametrize("how", ["pickle", "torch.save", "deepcopy"])
    @pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
    def test_a_patched_model_comes_back_patched(self, how, peft, tmp_path):
        reference = hf_models.model("llama")
        model = copy.deepcopy(reference)
        if peft:
            reference, model = hf_models.lora(reference, "llama"), hf_models.lora(model, "llama")
        gcoffload.patch_model(model, gcoffload.OffloadOptions(min_offload_bytes=0))
        restored = _round_trip(model, how, tmp_path)
        assert installed_functions(restored) == {LayerCheckpointer}
        base = restored.get_base_model() if peft else restored
        (checkpointer,) = {
            module._gradient_checkpointing_func
            for module in base.modules()
            if hasattr(module, "gradient_checkpointing") and module.gradient_checkpointing
        }
        assert set(checkpointer.layer_indices) == set(decoder_layers(restored)), (
            "indices of the copy's own layers"
        )
        restored.gradient_checkpointing_enable()  # an entry point of the copy, acting on the copy
        gcoffload.reset_stats()
        assert_same(loss_and_grads(reference, batch()), loss_and_grads(restored, batch()))
        assert ENGINE.stats()["checkpointed_layers"] == 4 and ENGINE.stats()["offloads"] == 3
        gcoffload.unpatch_model(restored)
        assert installed_functions(restored) == set()

    def test_an_autopilot_comes_back_with_its_plans(self, tmp_path):
        model = hf_models.model("llama")
        gcoffload.patch_model(model, gcoffload.OffloadOptions(min_offload_bytes=0), memory_budget=1 << 40)
        for _ in range(3):  # the first pass, the profile step, a planned step
            loss_and_grads(model, batch())
        restored = _round_trip(model, "torch.save", tmp_path)
        assert restored.gcoffload_plan == model.gcoffload_plan is not None
        gcoffload.reset_stats()
        loss_and_grads(restored, batch())
        assert ENGINE.stats()["profiled_layers"] == 0, (
            "the plan in force came along; nothing is measured again"
        )
        assert ENGINE.stats()["kept_layers"] == 4

    def test_save_pretrained_writes_the_models_own_config(self, tmp_path):
        model = hf_models.model("llama")
        model.config.use_cache = True
        gcoffload.patch_model(model)
        loss_and_grads(model, batch())
        model.save_pretrained(tmp_path)
        saved = json.loads((tmp_path / "config.json").read_text())
        assert saved["use_cache"] is True
        assert not any("gcoffload" in key for key in saved)


SWAP_PLAN = ["swap", "swap", "checkpoint", "swap"]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("tuning", ["full", "lora"])
def test_swap_plans_of_the_autopilot_match_stock(family, attn, tuning):
    reference = hf_models.model(family, attn=attn)
    model = copy.deepcopy(reference)
    if tuning == "lora":
        reference, model = hf_models.lora(reference, family), hf_models.lora(model, family)
    ids = batch()
    expected = loss_and_grads(reference, ids)
    hf_models.pin_plan(model, SWAP_PLAN)
    gcoffload.reset_stats()
    assert_same(expected, loss_and_grads(model, ids))
    stats = ENGINE.stats()
    assert (stats["swapped_layers"], stats["checkpointed_layers"], stats["recomputes"]) == (3, 1, 1)
    assert stats["swapped_storages"] > 3 and stats["fetches"] == stats["offloads"]
    assert [mode.value for mode in model.gcoffload_plan.modes] == SWAP_PLAN
