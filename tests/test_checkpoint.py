"""The offloaded checkpoint, wrap_layers and the selective rule, against runs without checkpointing."""

from __future__ import annotations

import pytest
import torch
from conftest import counted
from toy_models import (
    HIDDEN,
    Block,
    ExtraArgumentBlock,
    Stack,
    TupleBlock,
    add_lora,
    batch,
    causal_mask,
    loss_and_grads,
    make_pair,
)

import gcoffload
from gcoffload import OffloadOptions

pytestmark = pytest.mark.usefixtures("no_leaks")

ENGINE = counted("cpu")
EAGER = OffloadOptions(min_offload_bytes=0)  # offloads inputs of any size


def assert_same(reference: tuple, candidate: tuple) -> None:
    reference_loss, reference_grads = reference
    loss, grads = candidate
    assert torch.equal(loss, reference_loss)
    assert grads.keys() == reference_grads.keys()
    for name, grad in grads.items():
        assert torch.equal(grad, reference_grads[name]), name


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize(
    ("offload", "prefetch_depth", "keep_resident"),
    [(True, 1, 1), (True, 0, 0), (True, 2, 0), (True, 1, 3), (False, 1, 1)],
)
def test_gradients_match_no_checkpointing_bitwise(use_reentrant, offload, prefetch_depth, keep_resident):
    reference, model = make_pair(layers=5)
    ids = batch()
    expected = loss_and_grads(reference, ids)
    with gcoffload.wrap_layers(
        model.layers,
        gcoffload.OffloadOptions(
            offload=offload, prefetch_depth=prefetch_depth, keep_resident=keep_resident, min_offload_bytes=0
        ),
        use_reentrant=use_reentrant,
    ):
        assert_same(expected, loss_and_grads(model, ids))
    stats = ENGINE.stats()
    assert stats["checkpointed_layers"] == 5
    assert stats["offloads"] == (5 - keep_resident if offload else 0)
    assert stats["fetches"] == stats["offloads"]


@pytest.mark.parametrize("block", [TupleBlock, Block], ids=["tuple-outputs", "tensor-output"])
def test_direct_checkpoint_calls_match(block):
    reference, model = make_pair(layers=3, block=block)
    ids = batch()
    expected = loss_and_grads(reference, ids)

    def forward(ids: torch.Tensor) -> torch.Tensor:
        hidden_states = model.embed(ids).requires_grad_(True)
        mask = causal_mask(ids.shape[1])
        for layer in model.layers:
            output = gcoffload.checkpoint_with(EAGER, layer, hidden_states, mask, use_reentrant=True)
            if isinstance(output, tuple):
                assert output[1:3] == (None, "aux")
                # The aux output does not require grad in the recompute; a gradient arriving
                # for it must be skipped, and adding zero keeps the loss bitwise equal.
                output = output[0] + 0 * output[3]
            hidden_states = output
        return model.head(model.norm(hidden_states))

    model.forward = forward
    loss, grads = loss_and_grads(model, ids)
    assert torch.equal(loss, expected[0])
    for name, grad in expected[1].items():
        if not name.startswith("embed"):
            assert torch.equal(grads[name], grad), name


def test_extra_tensor_arguments_receive_their_gradients():
    torch.manual_seed(0)
    layer = ExtraArgumentBlock(dropout=0.1)
    hidden = torch.randn(2, 8, HIDDEN, requires_grad=True)
    scale = torch.rand(HIDDEN, requires_grad=True)
    shift = torch.randn(HIDDEN, requires_grad=True)
    pair = (torch.rand(3, requires_grad=True), torch.randn(4, requires_grad=True))
    arguments = (hidden, scale, shift, *pair)

    def run(checkpointed: bool) -> list[torch.Tensor]:
        for tensor in (*arguments, *layer.parameters()):
            tensor.grad = None
        torch.manual_seed(5)
        if checkpointed:
            out = gcoffload.checkpoint_with(
                OffloadOptions(keep_resident=0, min_offload_bytes=0),
                layer,
                hidden,
                scale,
                shift=shift,
                pair=pair,
                use_reentrant=True,
            )
        else:
            out = layer(hidden, scale, shift=shift, pair=pair)
        out.pow(2).mean().backward()
        return [tensor.grad.clone() for tensor in (*arguments, *layer.parameters())]

    expected = run(checkpointed=False)
    for grad, reference in zip(run(checkpointed=True), expected, strict=True):
        assert torch.equal(grad, reference)
    assert ENGINE.stats()["offloads"] == 1


def test_autocast_state_is_restored_for_the_recompute():
    reference, model = make_pair(layers=3)
    ids = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = loss_and_grads(reference, ids)
        with gcoffload.wrap_layers(model.layers, gcoffload.OffloadOptions(min_offload_bytes=0)):
            assert_same(expected, loss_and_grads(model, ids))


class TestSelectivePolicy:
    def test_freeze_tuning_checkpoints_only_the_trainable_tail(self):
        reference, model = make_pair(layers=6)
        for stack in (reference, model):
            stack.embed.requires_grad_(False)
            for layer in stack.layers[:4]:
                layer.requires_grad_(False)
        ids = batch()
        expected = loss_and_grads(reference, ids)
        output_requires_grad = []
        hooks = [
            layer.register_forward_hook(lambda _m, _a, out: output_requires_grad.append(out.requires_grad))
            for layer in model.layers
        ]
        with gcoffload.wrap_layers(model.layers, gcoffload.OffloadOptions(min_offload_bytes=0)):
            assert_same(expected, loss_and_grads(model, ids))
        for hook in hooks:
            hook.remove()
        assert output_requires_grad == [False] * 4 + [True] * 2, (
            "frozen layers built no graph and saved nothing"
        )
        stats = ENGINE.stats()
        assert stats["checkpointed_layers"] == 2
        assert stats["plain_layers"] == 4

    def test_frozen_layers_downstream_of_trainable_ones_are_checkpointed(self):
        reference, model = make_pair(layers=4)
        for stack in (reference, model):
            stack.layers[2].requires_grad_(False)
        ids = batch()
        expected = loss_and_grads(reference, ids)
        with gcoffload.wrap_layers(model.layers, gcoffload.OffloadOptions(min_offload_bytes=0)):
            assert_same(expected, loss_and_grads(model, ids))
        assert ENGINE.stats()["checkpointed_layers"] == 4

    def test_lora_with_frozen_embeddings_matches_and_checkpoints_every_layer(self):
        reference, model = make_pair(layers=4)
        for stack in (reference, model):
            torch.manual_seed(7)
            add_lora(stack)
        ids = batch()
        expected = loss_and_grads(reference, ids)
        assert all("down" in name or "up" in name for name in expected[1])
        with gcoffload.wrap_layers(model.layers, gcoffload.OffloadOptions(min_offload_bytes=0)):
            assert_same(expected, loss_and_grads(model, ids))
        stats = ENGINE.stats()
        assert stats["checkpointed_layers"] == 4 and stats["plain_layers"] == 0

    def test_only_trainable_false_checkpoints_frozen_layers_too(self):
        _, model = make_pair(layers=3)
        model.requires_grad_(False)
        model.head.requires_grad_(True)
        with gcoffload.wrap_layers(
            model.layers, gcoffload.OffloadOptions(min_offload_bytes=0), only_trainable=False
        ):
            loss_and_grads(model, batch())
        assert ENGINE.stats()["checkpointed_layers"] == 3

    def test_every_n_layers_checkpoints_every_nth(self):
        reference, model = make_pair(layers=5)
        ids = batch()
        expected = loss_and_grads(reference, ids)
        with gcoffload.wrap_layers(
            model.layers, gcoffload.OffloadOptions(min_offload_bytes=0), every_n_layers=2
        ):
            assert_same(expected, loss_and_grads(model, ids))
        stats = ENGINE.stats()
        assert stats["checkpointed_layers"] == 3 and stats["plain_layers"] == 2

    @pytest.mark.parametrize("mode", ["eval", "no_grad"])
    def test_eval_and_no_grad_call_layers_plainly(self, mode):
        reference, model = make_pair(layers=3)
        ids = batch()
        with gcoffload.wrap_layers(model.layers, gcoffload.OffloadOptions(min_offload_bytes=0)):
            if mode == "eval":
                reference.eval()
                model.eval()
                assert torch.equal(model(ids), reference(ids))
            else:
                torch.manual_seed(0)
                with torch.no_grad():
                    expected = reference(ids)
                torch.manual_seed(0)
                with torch.no_grad():
                    assert torch.equal(model(ids), expected)
        stats = ENGINE.stats()
        assert stats["checkpointed_layers"] == stats["plain_layers"] == stats["offloads"] == 0


class TestPrefetchOrder:
    def run_traced(self, layers: int, **options) -> tuple[list[dict], dict]:
        _, model = make_pair(layers=layers)
        options = gcoffload.OffloadOptions(min_offload_bytes=0, **options)
        with gcoffload.wrap_layers(model.layers, options), ENGINE.trace() as trace:
            loss_and_grads(model, batch())
        return trace, ENGINE.stats()

    def test_each_backward_prefetches_the_previous_input_before_fetching_its_own(self):
        trace, stats = self.run_traced(6, prefetch_depth=1, keep_resident=1)
        offloaded = [entry["handle_id"] for entry in trace if entry["op"] == "offload"]
        assert len(offloaded) == 5, "layers 0-4 are offloaded; the last layer's input stays resident"
        position = {(entry["op"], entry["handle_id"]): index for index, entry in enumerate(trace)}
        for layer in range(4, 0, -1):
            assert position[("prefetch", offloaded[layer - 1])] < position[("fetch", offloaded[layer])]
        assert position[("prefetch", offloaded[4])] < position[("fetch", offloaded[4])]
        assert stats["prefetch_hits"] == 5 and stats["on_demand_fetches"] == 0
        assert stats["kept_resident"] == 1

    def test_prefetch_depth_zero_fetches_on_demand(self):
        _, stats = self.run_traced(4, prefetch_depth=0, keep_resident=0)
        assert stats["offloads"] == 4 and stats["on_demand_fetches"] == 4 and stats["prefetch_hits"] == 0

    def test_a_wider_window_keeps_more_inputs_resident(self):
        _, stats = self.run_traced(5, keep_resident=3)
        assert stats["offloads"] == 2 and stats["kept_resident"] == 3

    def test_stats_report_bytes_each_way(self):
        _, stats = self.run_traced(3, keep_resident=0)
        layer_input_bytes = 2 * 16 * HIDDEN * 4
        assert stats["offloaded_bytes"] == stats["fetched_bytes"] == 3 * layer_input_bytes
        assert gcoffload.stats()["devices"]["cpu"]["offloads"] == 3

    def test_inputs_below_the_threshold_stay_on_the_device(self):
        _, model = make_pair(layers=3)
        with gcoffload.wrap_layers(model.layers, gcoffload.OffloadOptions(min_offload_bytes=1 << 30)):
            loss_and_grads(model, batch())
        stats = ENGINE.stats()
        assert stats["offloads"] == 0 and stats["kept_below_threshold"] == 3


class TestStepStats:
    @pytest.mark.parametrize("use_reentrant", [True, False])
    def test_last_step_counts_one_forward_and_backward(self, use_reentrant):
        _, model = make_pair(layers=4)
        layer_input_bytes = 2 * 16 * HIDDEN * 4
        steps_before = gcoffload.stats()["steps"]
        with gcoffload.wrap_layers(
            model.layers, gcoffload.OffloadOptions(min_offload_bytes=0), use_reentrant=use_reentrant
        ):
            for step in range(3):
                loss_and_grads(model, batch(seed=step))
                last = ENGINE.last_step()
                assert last["checkpointed_layers"] == last["recomputes"] == 4
                assert last["offloads"] == last["fetches"] == last["prefetch_hits"] == 3
                assert last["offloaded_bytes"] == last["fetched_bytes"] == 3 * layer_input_bytes
                assert last["kept_resident"] == 1 and last["live_handles"] == 0
        assert ENGINE.stats()["offloads"] == 3 * 3
        assert gcoffload.stats()["steps"] == steps_before + 3
        assert gcoffload.stats()["last_step"]["cpu"] == last

    def test_a_forward_without_backward_ends_no_step(self):
        _, model = make_pair(layers=3)
        with gcoffload.wrap_layers(model.layers, gcoffload.OffloadOptions(min_offload_bytes=0)):
            loss_and_grads(model, batch())
            finished = ENGINE.last_step()
            steps = gcoffload.stats()["steps"]
            model.train()
            model(batch())
        assert gcoffload.stats()["steps"] == steps and ENGINE.last_step() == finished


class RaisingBlock(Block):
    """Raises on its n-th call: 1 is the forward pass, 2 the recompute in backward."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.calls = 0
        self.raise_on_call: int | None = None

    def forward(self, hidden_states, mask=None):
        self.calls += 1
        if self.calls == self.raise_on_call:
            raise ValueError("layer failed")
        return super().forward(hidden_states, mask)


class TestErrorsAndLifetimes:
    @pytest.mark.parametrize("use_reentrant", [True, False])
    def test_a_layer_raising_in_forward_leaks_nothing(self, use_reentrant):
        model = Stack(layers=5, block=RaisingBlock)
        model.layers[3].raise_on_call = 1
        with gcoffload.wrap_layers(
            model.layers,
            gcoffload.OffloadOptions(keep_resident=0, min_offload_bytes=0),
            use_reentrant=use_reentrant,
        ):
            with pytest.raises(ValueError, match="layer failed") as failure:
                loss_and_grads(model, batch())
            del failure
        assert ENGINE.stats()["offloads"] >= 3

    @pytest.mark.parametrize("use_reentrant", [True, False])
    def test_a_layer_raising_in_recompute_leaks_nothing(self, use_reentrant):
        model = Stack(layers=5, block=RaisingBlock)
        model.layers[2].raise_on_call = 2
        with gcoffload.wrap_layers(
            model.layers,
            gcoffload.OffloadOptions(keep_resident=0, min_offload_bytes=0),
            use_reentrant=use_reentrant,
        ):
            model.train()
            logits = model(batch())
            with pytest.raises(ValueError, match="layer failed") as failure:
                logits.sum().backward()
            del failure, logits

    def test_retain_graph_allows_a_second_backward(self):
        reference, model = make_pair(layers=3)
        ids = batch()
        for stack in (reference, model):
            stack.zero_grad()
        with gcoffload.wrap_layers(model.layers, gcoffload.OffloadOptions(min_offload_bytes=0)):
            results = []
            for stack in (reference, model):
                torch.manual_seed(0)
                loss = stack(ids).logsumexp(-1).mean()
                loss.backward(retain_graph=True)
                loss.backward()
                results.append([parameter.grad for parameter in stack.parameters()])
        for grad, expected in zip(*results[::-1], strict=True):
            assert torch.equal(grad, expected)

    def test_a_second_backward_without_retain_graph_is_a_clear_error(self):
        _, model = make_pair(layers=2)
        with gcoffload.wrap_layers(model.layers, gcoffload.OffloadOptions(min_offload_bytes=0)):
            loss = model(batch()).sum()
            loss.backward()
            with pytest.raises(RuntimeError, match="backward through the graph a second time"):
                loss.backward()

    def test_autograd_grad_on_the_reentrant_path_is_a_clear_error(self):
        _, model = make_pair(layers=2)
        with gcoffload.wrap_layers(
            model.layers, gcoffload.OffloadOptions(min_offload_bytes=0), use_reentrant=True
        ):
            loss = model(batch()).sum()
            with pytest.raises(RuntimeError, match="use_reentrant=False"):
                torch.autograd.grad(loss, list(model.parameters()))

    def test_a_first_argument_that_is_not_floating_is_not_offloaded(self):
        layer = torch.nn.Linear(HIDDEN, HIDDEN)
        positions = torch.arange(8)
        hidden = torch.randn(8, HIDDEN, requires_grad=True)

        def function(positions, hidden):
            return layer(hidden) * positions[:, None]

        out = gcoffload.checkpoint_with(EAGER, function, positions, hidden, use_reentrant=True)
        out.sum().backward()
        expected = torch.autograd.grad((layer(hidden) * positions[:, None]).sum(), hidden)[0]
        assert torch.equal(hidden.grad, expected)
        assert ENGINE.stats()["offloads"] == 0

    def test_no_input_requiring_grad_warns_and_runs_plainly(self):
        layer = torch.nn.Linear(HIDDEN, HIDDEN)
        with pytest.warns(UserWarning, match="no tensor argument requires grad"):
            out = gcoffload.checkpoint(layer, torch.randn(4, HIDDEN), use_reentrant=True)
        out.sum().backward()
        assert layer.weight.grad is not None, "parameters still get their gradients"

    def test_a_function_returning_something_else_is_a_type_error(self):
        with pytest.raises(TypeError, match="must return a tensor or a tuple"):
            gcoffload.checkpoint(lambda x: {"out": x}, torch.randn(3, requires_grad=True), use_reentrant=True)


class TestBadOptions:
    @pytest.mark.parametrize(
        ("option", "value", "error"),
        [
            ("prefetch_depth", -1, ValueError),
            ("keep_resident", "1", ValueError),
            ("min_offload_bytes", 1.5, ValueError),
            ("offload", "yes", TypeError),
        ],
    )
    def test_checkpoint_options_are_validated(self, option, value, error):
        with pytest.raises(error, match=option):
            gcoffload.checkpoint_with(OffloadOptions(**{option: value}), torch.sin, torch.randn(3))

    def test_wrap_layers_validates_its_arguments(self):
        with pytest.raises(TypeError, match="layers must be"):
            gcoffload.wrap_layers(Block())
        with pytest.raises(TypeError, match=r"layers\[1\] must be an nn.Module"):
            gcoffload.wrap_layers([Block(), "not a layer"])
        with pytest.raises(ValueError, match="every_n_layers"):
            gcoffload.wrap_layers([Block()], every_n_layers=0)
        block = Block()
        with pytest.raises(ValueError, match="same module twice"):
            gcoffload.wrap_layers([block, block])

    def test_wrapping_twice_is_refused_and_unwrap_restores(self):
        _, model = make_pair(layers=2)
        original = model.layers[0].forward
        model.layers[1].forward = custom = lambda *args, **kwargs: Block.forward(
            model.layers[1], *args, **kwargs
        )
        wrapped = gcoffload.wrap_layers(model.layers)
        with pytest.raises(ValueError, match=r"layers\[0\] is already wrapped"):
            gcoffload.wrap_layers(model.layers)
        wrapped.unwrap()
        wrapped.unwrap()
        assert "forward" not in model.layers[0].__dict__ and model.layers[0].forward == original
        assert model.layers[1].forward is custom


def test_options_dataclass_rejects_bad_values():
    with pytest.raises(ValueError, match="keep_resident"):
        OffloadOptions(keep_resident=-2)
