"""gcoffload.checkpoint behaves like torch.utils.checkpoint wherever a user can tell.

Each test runs the same scenario through torch's checkpoint as the reference
and asserts gcoffload does what torch does: the same error for an in-place
change to a saved input, the same keyword semantics, the caller's tensors left
alone. Both paths, with the input offloaded and kept resident.
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import pytest
import torch
import torch.utils.checkpoint
from conftest import counted
from held_memory import LiveStorages
from toy_models import HIDDEN, Block, add_lora, batch, loss_and_grads, make_pair

import gcoffload
from gcoffload import OffloadOptions
from gcoffload.checkpointing.nonreentrant import ROUTES_SELECTIVE_SAVES

pytestmark = pytest.mark.usefixtures("no_leaks")

ENGINE = counted("cpu")
OFFLOADED = OffloadOptions(keep_resident=0, min_offload_bytes=0)
RESIDENT = OffloadOptions(keep_resident=1, min_offload_bytes=0)
NOT_OFFLOADING = OffloadOptions(offload=False)
KEPT = {"offloaded": OFFLOADED, "resident": RESIDENT, "no-offload": NOT_OFFLOADING}
INPLACE_ERROR = "modified by an inplace operation"


def torch_checkpoint(options: OffloadOptions, function, *args, **kwargs):
    return torch.utils.checkpoint.checkpoint(function, *args, **kwargs)


def gcoffload_checkpoint(options: OffloadOptions, function, *args, **kwargs):
    return gcoffload.checkpoint_with(options, function, *args, **kwargs)


def scaled_sine(hidden: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.sin(hidden) * scale


def doubling_in_place(hidden: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    hidden.mul_(2)
    return torch.sin(hidden) * scale


def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A leaf, the hidden states computed from it, and a scale."""
    torch.manual_seed(0)
    leaf = torch.randn(4, 8, HIDDEN, requires_grad=True)
    return leaf, leaf * 1, torch.rand(HIDDEN, requires_grad=True)


def reference_grads(function, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Gradients of ``function(*tensors).sum()`` without checkpointing, on copies of the tensors."""
    copies = [tensor.detach().clone().requires_grad_(True) for tensor in tensors]
    return torch.autograd.grad(function(*copies).sum(), copies)


@pytest.mark.parametrize("kept", KEPT.values(), ids=KEPT.keys())
@pytest.mark.parametrize("use_reentrant", [True, False])
class TestInPlaceChanges:
    @pytest.mark.parametrize("run", [torch_checkpoint, gcoffload_checkpoint], ids=["torch", "gcoffload"])
    def test_changing_the_hidden_states_after_the_call_raises_in_backward(self, run, kept, use_reentrant):
        _, hidden, scale = inputs()
        out = run(kept, scaled_sine, hidden, scale, use_reentrant=use_reentrant)
        hidden.add_(10)
        with pytest.raises(RuntimeError, match=INPLACE_ERROR) as error:
            out.sum().backward()
        if run is gcoffload_checkpoint:
            assert "gcoffload" in str(error.value) and "scaled_sine" in str(error.value)
            assert "is at version 1; expected version 0" in str(error.value)

    @pytest.mark.parametrize("run", [torch_checkpoint, gcoffload_checkpoint], ids=["torch", "gcoffload"])
    def test_changing_another_saved_argument_after_the_call_raises_in_backward(
        self, run, kept, use_reentrant
    ):
        _, hidden, scale = inputs()
        scale = scale * 1
        out = run(kept, scaled_sine, hidden, scale, use_reentrant=use_reentrant)
        scale.mul_(3)
        with pytest.raises(RuntimeError, match=INPLACE_ERROR) as error:
            out.sum().backward()
        if run is gcoffload_checkpoint:
            assert "gcoffload" in str(error.value) and "scaled_sine" in str(error.value)

    def test_a_layer_changing_its_own_input_raises_in_backward(self, kept, use_reentrant):
        _, hidden, scale = inputs()
        if not use_reentrant:  # torch's non-reentrant checkpoint raises too
            reference = torch.utils.checkpoint.checkpoint(
                doubling_in_place, hidden * 1, scale, use_reentrant=False
            )
            with pytest.raises(RuntimeError, match=INPLACE_ERROR):
                reference.sum().backward()
        out = gcoffload.checkpoint_with(kept, doubling_in_place, hidden, scale, use_reentrant=use_reentrant)
        with pytest.raises(RuntimeError, match=INPLACE_ERROR) as error:
            out.sum().backward()
        assert "gcoffload" in str(error.value) and "doubling_in_place" in str(error.value)

    def test_changes_after_backward_are_fine(self, kept, use_reentrant):
        leaf, hidden, scale = inputs()
        expected = reference_grads(scaled_sine, hidden, scale)
        out = gcoffload.checkpoint_with(kept, scaled_sine, hidden, scale, use_reentrant=use_reentrant)
        out.sum().backward()
        hidden.add_(10)
        assert torch.equal(leaf.grad, expected[0]) and torch.equal(scale.grad, expected[1])

    def test_a_module_layer_is_named_in_the_error(self, kept, use_reentrant):
        block = Block(dropout=0.0)
        _, hidden, _ = inputs()
        out = gcoffload.checkpoint_with(kept, block, hidden, use_reentrant=use_reentrant)
        hidden.zero_()
        with pytest.raises(RuntimeError, match=r"gcoffload: it is an input of the checkpointed layer Block"):
            out.sum().backward()


def test_an_offloaded_input_changed_before_its_copy_was_fetched_is_caught():
    """The version check reads the offloaded tensor's counter, not the (stale) host copy."""
    _, model = make_pair(layers=3)
    model.train()
    hidden = model.embed(batch()).detach().requires_grad_(True)
    outputs = []
    with gcoffload.wrap_layers(model.layers, gcoffload.OffloadOptions(keep_resident=0, min_offload_bytes=0)):
        layer_input = hidden * 1
        outputs.append(model.layers[0](layer_input))
        assert ENGINE.stats()["offloads"] == 1
        layer_input.add_(1)
        with pytest.raises(RuntimeError, match=INPLACE_ERROR):
            outputs[0].sum().backward()
    del outputs


class TestKeywords:
    @pytest.mark.parametrize("use_reentrant", [True, False])
    @pytest.mark.parametrize("keyword", [{"early_stop": False}, {"determinism_check": "none"}], ids=str)
    def test_torch_keywords_do_not_reach_the_function(self, use_reentrant, keyword):
        leaf, hidden, scale = inputs()
        out = gcoffload.checkpoint(scaled_sine, hidden, scale, use_reentrant=use_reentrant, **keyword)
        out.sum().backward()
        assert torch.equal(leaf.grad, reference_grads(scaled_sine, hidden, scale)[0])

    @pytest.mark.parametrize(
        "keyword", [{"context_fn": lambda: (torch.no_grad(), torch.no_grad())}, {"debug": True}], ids=str
    )
    @pytest.mark.parametrize("run", [torch_checkpoint, gcoffload_checkpoint], ids=["torch", "gcoffload"])
    def test_context_fn_and_debug_on_the_reentrant_path_raise_like_torch(self, run, keyword):
        _, hidden, scale = inputs()
        with pytest.raises(ValueError, match="only supported when use_reentrant=False"):
            run(RESIDENT, scaled_sine, hidden, scale, use_reentrant=True, **keyword)

    @pytest.mark.parametrize("kept", [OFFLOADED, RESIDENT], ids=["offloaded", "resident"])
    def test_a_selective_checkpointing_policy_reaches_torch(self, kept):
        """context_fn reaches torch: its policy is asked about every op of the forward pass."""
        asked = []

        def policy(ctx, op, *args, **kwargs):
            asked.append((op, ctx.is_recompute))
            if op is torch.ops.aten.mm.default:
                return torch.utils.checkpoint.CheckpointPolicy.MUST_SAVE
            return torch.utils.checkpoint.CheckpointPolicy.PREFER_RECOMPUTE

        def layer(hidden, weight):
            return torch.sin(hidden @ weight)

        context_fn = functools.partial(torch.utils.checkpoint.create_selective_checkpoint_contexts, policy)
        leaf, hidden, _ = inputs()
        hidden = hidden.flatten(0, 1)
        weight = torch.randn(HIDDEN, HIDDEN, requires_grad=True)
        expected = reference_grads(layer, hidden, weight)
        with warnings.catch_warnings():
            # torch 2.14 warns when hooks around a selective checkpoint leave the choice of routing the
            # tensors the policy keeps to a default that will change; gcoffload's hooks make it.
            warnings.simplefilter("error", FutureWarning)
            out = gcoffload.checkpoint_with(
                kept, layer, hidden, weight, use_reentrant=False, context_fn=context_fn
            )
        out.sum().backward()
        assert asked[:2] == [(torch.ops.aten.mm.default, False), (torch.ops.aten.sin.default, False)]
        assert torch.equal(leaf.grad, expected[0].view_as(leaf)) and torch.equal(weight.grad, expected[1])

    @pytest.mark.parametrize("value", ["no", 0, 1])
    def test_use_reentrant_must_be_a_bool_or_none(self, value):
        _, hidden, scale = inputs()
        with pytest.raises(TypeError, match="use_reentrant must be True, False or None"):
            gcoffload.checkpoint(scaled_sine, hidden, scale, use_reentrant=value)

    @pytest.mark.parametrize("use_reentrant", [True, False])
    def test_a_function_keyword_named_like_an_option_reaches_the_function(self, use_reentrant):
        def layer(hidden, *, offload, prefetch_depth):
            return hidden * offload + prefetch_depth

        leaf, hidden, _ = inputs()
        out = gcoffload.checkpoint_with(
            OFFLOADED, layer, hidden, offload=3.0, prefetch_depth=2.0, use_reentrant=use_reentrant
        )
        assert torch.equal(out, hidden * 3.0 + 2.0)
        out.sum().backward()
        assert torch.equal(leaf.grad, torch.full_like(leaf, 3.0))
        assert ENGINE.stats()["offloads"] == 1, "the options in force are OFFLOADED's"

    def test_an_option_passed_to_a_function_without_it_points_to_checkpoint_with(self):
        _, hidden, scale = inputs()
        with pytest.raises(TypeError, match=r"keep_resident=.*gcoffload.checkpoint_with"):
            gcoffload.checkpoint(scaled_sine, hidden, scale, keep_resident=0)

    def test_options_must_be_offload_options(self):
        with pytest.raises(TypeError, match=r"options must be a gcoffload\.OffloadOptions"):
            gcoffload.checkpoint_with({"offload": False}, torch.sin, torch.randn(3))


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_meta_inputs_are_checkpointed_like_torch_does(use_reentrant):
    layer = torch.nn.Linear(HIDDEN, HIDDEN, device="meta")
    hidden = torch.randn(4, HIDDEN, device="meta", requires_grad=True)
    out = gcoffload.checkpoint(layer, hidden, use_reentrant=use_reentrant)
    reference = torch.utils.checkpoint.checkpoint(layer, hidden, use_reentrant=use_reentrant)
    assert out.device.type == "meta" and out.shape == reference.shape
    out.sum().backward()
    assert hidden.grad.shape == hidden.shape and layer.weight.grad.shape == layer.weight.shape


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_sparse_inputs_are_checkpointed_like_torch_does(use_reentrant):
    weight = torch.randn(HIDDEN, 3, requires_grad=True)
    sparse = torch.randn(5, HIDDEN).relu().to_sparse().requires_grad_(True)

    def layer(matrix):
        return torch.sparse.mm(matrix, weight)

    grads = []
    for run in (torch.utils.checkpoint.checkpoint, gcoffload.checkpoint):
        weight.grad = sparse.grad = None
        run(layer, sparse, use_reentrant=use_reentrant).sum().backward()
        grads.append((weight.grad.clone(), sparse.grad.to_dense()))
    assert all(torch.equal(ours, theirs) for ours, theirs in zip(grads[1], grads[0], strict=True))
    assert ENGINE.stats()["offloads"] == 0


class TestCallersTensors:
    """The selective rule never changes a tensor the caller owns."""

    def lora_stack(self):
        reference, model = make_pair(layers=3)
        for stack in (reference, model):
            torch.manual_seed(7)
            add_lora(stack)
        return reference, model

    @staticmethod
    def step(model, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        for layer in model.layers:
            hidden = layer(hidden)
        hidden.pow(2).mean().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    @pytest.mark.parametrize("use_reentrant", [True, False])
    def test_wrap_layers_leaves_a_reused_batch_tensor_untouched(self, use_reentrant):
        reference, model = self.lora_stack()
        reference.train()
        model.train()
        hidden = torch.randn(2, 16, HIDDEN)
        with gcoffload.wrap_layers(
            model.layers, gcoffload.OffloadOptions(min_offload_bytes=0), use_reentrant=use_reentrant
        ):
            for _ in range(3):
                expected = self.step(reference, hidden)
                got = self.step(model, hidden)
                assert got.keys() == expected.keys()
                assert all(torch.equal(got[name], expected[name]) for name in expected)
                assert hidden.requires_grad is False and hidden.grad is None
        assert ENGINE.stats()["checkpointed_layers"] == 9

    def test_the_selective_wrapper_around_torch_checkpoint_leaves_it_untouched(self):
        function = gcoffload.layers.selective_checkpoint_function(
            functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=True)
        )
        reference, model = self.lora_stack()
        reference.train()
        model.train()
        hidden = torch.randn(2, 16, HIDDEN)
        for _ in range(2):
            expected = self.step(reference, hidden)
            model.zero_grad(set_to_none=True)
            torch.manual_seed(3)
            out = hidden
            for layer in model.layers:
                out = function(layer.__call__, out)
            out.pow(2).mean().backward()
            assert all(torch.equal(p.grad, expected[n]) for n, p in model.named_parameters() if n in expected)
            assert hidden.requires_grad is False and hidden.grad is None

    def test_lora_on_a_transformers_style_batch_gets_its_gradients(self):
        reference, model = self.lora_stack()
        ids = batch()
        expected = loss_and_grads(reference, ids)
        embeddings = model.embed.weight
        with gcoffload.wrap_layers(model.layers, gcoffload.OffloadOptions(min_offload_bytes=0)):
            loss, grads = loss_and_grads(model, ids)
        assert torch.equal(loss, expected[0]) and grads.keys() == expected[1].keys()
        assert embeddings.grad is None and not embeddings.requires_grad


def _torch_inner(function, hidden):
    return torch.utils.checkpoint.checkpoint(function, hidden, use_reentrant=False)


def _gcoffload_inner(function, hidden):
    return gcoffload.checkpoint_with(RESIDENT, function, hidden, use_reentrant=False)


class TestNestedCheckpoints:
    """A checkpoint inside another non-reentrant checkpoint is nested as torch nests it."""

    @staticmethod
    def outer_function(inner_checkpoint):
        def outer(hidden: torch.Tensor) -> torch.Tensor:
            made_inside = hidden.cos()  # the inner call's input: the outer recompute makes it again
            return inner_checkpoint(torch.sin, made_inside) * 2

        return outer

    def run(self, outer_checkpoint, inner_checkpoint) -> tuple[int, torch.Tensor, torch.Tensor]:
        """Bytes held after forward (besides the output), and the leaf's gradient."""
        leaf = torch.randn(64, 256, requires_grad=True)  # 64 KiB
        with LiveStorages() as live:
            hidden = leaf * 1
            output = outer_checkpoint(self.outer_function(inner_checkpoint), hidden)
        held = live.alive_bytes(output)
        output.sum().backward()
        return held, leaf.grad, hidden

    @pytest.mark.parametrize("outer", ["torch", "gcoffload"])
    def test_the_inner_input_is_the_outer_checkpoints_to_recompute(self, outer):
        def outer_checkpoint(function, hidden):
            if outer == "torch":
                return torch.utils.checkpoint.checkpoint(function, hidden, use_reentrant=False)
            return gcoffload.checkpoint_with(RESIDENT, function, hidden, use_reentrant=False)

        torch.manual_seed(0)
        expected_held, expected_grad, _ = self.run(outer_checkpoint, _torch_inner)
        torch.manual_seed(0)
        held, grad, _ = self.run(outer_checkpoint, _gcoffload_inner)
        assert held == expected_held, "the inner input is not held from forward to backward"
        assert torch.equal(grad, expected_grad)

    @pytest.mark.parametrize("inner", [_torch_inner, _gcoffload_inner], ids=["torch", "gcoffload"])
    def test_an_outer_input_changed_in_place_raises_as_torch_does(self, inner):
        leaf = torch.randn(64, 256, requires_grad=True)
        hidden = leaf * 1
        output = torch.utils.checkpoint.checkpoint(self.outer_function(inner), hidden, use_reentrant=False)
        hidden.add_(1)
        with pytest.raises(RuntimeError, match=INPLACE_ERROR):
            output.sum().backward()

    def test_a_reentrant_call_inside_an_outer_region_saves_through_it(self):
        leaf = torch.randn(64, 256, requires_grad=True)
        packed = []
        with torch.autograd.graph.saved_tensors_hooks(
            lambda tensor: packed.append(tensor) or tensor, lambda t: t
        ):
            output = gcoffload.checkpoint_with(OFFLOADED, torch.sin, leaf * 1, use_reentrant=True)
        assert packed, "the outer region's hooks saw the checkpoint's input"
        output.sum().backward()
        assert torch.equal(leaf.grad, torch.cos(leaf))
        assert ENGINE.stats()["offloads"] == 0


@pytest.mark.parametrize("kept", KEPT.values(), ids=KEPT.keys())
def test_the_reentrant_path_works_where_saved_tensor_hooks_are_disabled(kept):
    leaf, hidden, scale = inputs()
    expected = reference_grads(scaled_sine, leaf * 1, scale)
    with torch.autograd.graph.disable_saved_tensors_hooks("a functorch-style wrapper disables them"):
        torch_output = torch.utils.checkpoint.checkpoint(scaled_sine, hidden, scale, use_reentrant=True)
        output = gcoffload.checkpoint_with(kept, scaled_sine, hidden, scale, use_reentrant=True)
    assert torch.equal(output, torch_output)
    output.sum().backward()
    assert torch.equal(leaf.grad, expected[0]) and torch.equal(scale.grad, expected[1])


class TestTorchsOwnChecks:
    """torch.utils.checkpoint's own tests, through gcoffload (test_checkpoint_partial_grad and friends)."""

    def test_partial_grad(self):
        def pass_both(first, second):
            return first, second

        first = torch.randn(1, 4, requires_grad=True)
        second = torch.randn(1, 4)
        output = gcoffload.checkpoint(pass_both, first, second, use_reentrant=True)
        output[0].sum().backward()

        def only_first(first, second):
            return first

        first = torch.randn(1, 4)
        second = torch.randn(1, 4, requires_grad=True)
        with pytest.raises(
            RuntimeError, match=r"none of output has requires_grad=True, this checkpoint\(\) is not necessary"
        ):
            output = gcoffload.checkpoint(only_first, first, second, use_reentrant=True)
            output.sum().backward()

    @pytest.mark.parametrize("use_reentrant", [True, False])
    def test_a_detached_output(self, use_reentrant):
        class NoGradModule(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.linear = torch.nn.Linear(2, 2, bias=False)
                self.lin2 = torch.nn.Linear(2, 2, bias=False)

            def forward(self, x):
                with torch.no_grad():
                    return self.lin2(self.linear(x))

        module = NoGradModule()
        raises = pytest.raises(RuntimeError, match="none of output has requires_grad=True")
        a = torch.randn(2, 2, requires_grad=True)
        for _ in range(3):
            with raises if use_reentrant else contextlib.nullcontext():
                out = gcoffload.checkpoint(module, a, use_reentrant=use_reentrant)
                out += a
                out.sum().backward()

    def test_grad_names_torchs_incompatibility(self):
        leaf, hidden, scale = inputs()
        output = gcoffload.checkpoint(scaled_sine, hidden, scale, use_reentrant=True)
        with pytest.raises(RuntimeError, match=r"torch\.utils\.checkpoint is incompatible with \.grad\(\)"):
            torch.autograd.grad(output.sum(), leaf)

    def test_without_use_reentrant_it_warns_and_takes_the_reentrant_path_as_torch_does(self):
        _, hidden, scale = inputs()
        with pytest.warns(UserWarning, match="use_reentrant parameter should be passed explicitly") as warned:
            torch.utils.checkpoint.checkpoint(scaled_sine, hidden, scale)
        with pytest.warns(UserWarning, match="use_reentrant parameter should be passed explicitly") as ours:
            output = gcoffload.checkpoint(scaled_sine, hidden, scale)
        assert warned[0].category is ours[0].category
        assert ours[0].filename == __file__, "the warning points at the caller"
        assert output.grad_fn.name().endswith("_OffloadedCheckpointBackward")


@pytest.mark.skipif(not ROUTES_SELECTIVE_SAVES, reason="torch before 2.14 has no respect_saved_tensors_hooks")
@pytest.mark.parametrize("respect", [True, False])
def test_a_chosen_routing_of_selectively_saved_tensors_reaches_torch(respect):
    def policy(ctx, op, *args, **kwargs):
        return torch.utils.checkpoint.CheckpointPolicy.MUST_SAVE

    context_fn = functools.partial(torch.utils.checkpoint.create_selective_checkpoint_contexts, policy)
    leaf, hidden, scale = inputs()
    expected = reference_grads(scaled_sine, leaf * 1, scale)
    out = gcoffload.checkpoint_with(
        RESIDENT,
        scaled_sine,
        hidden,
        scale,
        use_reentrant=False,
        context_fn=context_fn,
        respect_saved_tensors_hooks=respect,
    )
    out.sum().backward()
    assert torch.equal(leaf.grad, expected[0]) and torch.equal(scale.grad, expected[1])
    with pytest.raises(ValueError, match="respect_saved_tensors_hooks` is only supported when use_reentrant"):
        gcoffload.checkpoint_with(
            RESIDENT, scaled_sine, hidden, scale, use_reentrant=True, respect_saved_tensors_hooks=respect
        )
