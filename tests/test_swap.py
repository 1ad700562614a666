"""Swap mode: layers not recomputed whose saved activations travel to host memory storage by storage.

Every test compares with a run that keeps everything on the device (no
checkpointing): gradients ``torch.equal``, dropout on. On the simulated
device the copies are asynchronous, so a missing wait shows as wrong
gradients (``tools/simdevice/mutations.py`` runs the simdev tests here).
"""

from __future__ import annotations

import copy
import gc

import pytest
import simdevice
import torch
from conftest import DEVICES
from toy_models import add_lora, batch, causal_mask, loss_and_grads, make_pair

import gcoffload
from gcoffload.checkpointing import counters
from gcoffload.swapping.swapped_storage import SwappedStorage

on_devices = pytest.mark.parametrize("device", DEVICES)
on_simdev = pytest.mark.parametrize("device", [pytest.param("simdev:0", marks=pytest.mark.simdev)])
SWAP_ALL = gcoffload.OffloadOptions(min_offload_bytes=0)


def synchronize(device: str) -> None:
    if torch.device(device).type != "cpu":
        torch.get_device_module(torch.device(device).type).synchronize()


def assert_same(grads: dict, expected: dict) -> None:
    assert grads.keys() == expected.keys()
    for name, grad in grads.items():
        assert torch.equal(grad.cpu(), expected[name].cpu()), name


def step_stats(device: str) -> dict[str, int]:
    return gcoffload.stats()["devices"][str(torch.device(device))]


@on_devices
@pytest.mark.parametrize("prefetch_depth", [0, 1, 2])
def test_swapped_layers_give_the_gradients_of_no_checkpointing(device, prefetch_depth):
    reference, model = make_pair(layers=5)
    reference.to(device)
    model.to(device)
    ids = batch().to(device)
    expected_loss, expected = loss_and_grads(reference, ids)
    gcoffload.reset_stats()
    options = gcoffload.OffloadOptions(prefetch_depth=prefetch_depth, min_offload_bytes=0)
    with gcoffload.wrap_layers(model.layers, options, mode="swap"):
        loss, grads = loss_and_grads(model, ids)
    synchronize(device)
    assert torch.equal(loss.cpu(), expected_loss.cpu())
    assert_same(grads, expected)
    stats = step_stats(device)
    assert stats["swapped_layers"] == 5
    assert stats["recomputes"] == stats["checkpointed_layers"] == 0
    assert stats["swapped_storages"] == stats["offloads"] == stats["fetches"] > 5
    # The last layer's storages are the first backward needs; every other group was prefetched ahead.
    if prefetch_depth and device != "cpu":
        assert stats["prefetch_hits"] >= stats["offloads"] - stats["offloads"] // 5
    assert stats["live_handles"] == 0


@on_devices
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_swap_mixes_with_checkpointed_offloaded_and_kept_layers(device, use_reentrant):
    reference, model = make_pair(layers=6)
    reference.to(device)
    model.to(device)
    ids = batch().to(device)
    expected_loss, expected = loss_and_grads(reference, ids)
    gcoffload.reset_stats()
    modes = ["swap", "checkpoint", "swap", "swap", "keep", "checkpoint"]
    options = gcoffload.OffloadOptions(keep_resident=0, min_offload_bytes=0)
    with gcoffload.wrap_layers(model.layers, options, use_reentrant=use_reentrant, mode=modes):
        loss, grads = loss_and_grads(model, ids)
    synchronize(device)
    assert torch.equal(loss.cpu(), expected_loss.cpu())
    assert_same(grads, expected)
    stats = step_stats(device)
    assert (stats["swapped_layers"], stats["checkpointed_layers"], stats["plain_layers"]) == (3, 2, 1)
    assert stats["fetches"] == stats["offloads"] == stats["swapped_storages"] + 2
    assert counters.last_step(device) is not None


@on_devices
def test_lora_layers_swap_with_frozen_weights_left_on_the_device(device, monkeypatch):
    reference, _ = make_pair(layers=3)
    add_lora(reference)
    model = copy.deepcopy(reference)
    reference.to(device)
    model.to(device)
    ids = batch().to(device)
    _, expected = loss_and_grads(reference, ids)
    swapped: list[int] = []
    original = SwappedStorage.__init__

    def recording(self, storage, where):
        swapped.append(storage.data_ptr())
        original(self, storage, where)

    monkeypatch.setattr(SwappedStorage, "__init__", recording)
    gcoffload.reset_stats()
    with gcoffload.wrap_layers(model.layers, SWAP_ALL, mode="swap"):
        _, grads = loss_and_grads(model, ids)
    assert_same(grads, expected)
    assert step_stats(device)["swapped_layers"] == 3
    weights = {parameter.untyped_storage().data_ptr() for parameter in model.parameters()}
    assert swapped and not weights & set(swapped), "a frozen weight travelled"


class Views(torch.nn.Module):
    """Saves several views of one storage (slices, a transpose, an expand) and a small view of a big one."""

    def __init__(self, width: int = 16, rows: int = 2) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.wide = torch.nn.Linear(width, 64 * width)
        self.rows = rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # views of one storage
        scores = (q @ k.transpose(-1, -2)).softmax(-1)  # matmul saves q and k^T, softmax its output
        attended = scores @ v.expand_as(v)
        big = self.wide(x)  # (batch, seq, 64 * width); only its first rows are saved below
        small = big[:, : self.rows].sin()  # sin saves the small view
        return attended.sum() + small.sum()


@on_devices
def test_each_storage_travels_once_and_only_the_span_its_views_cover(device):
    torch.manual_seed(0)
    reference = Views().to(device)
    model = Views().to(device)
    model.load_state_dict(reference.state_dict())
    x = torch.randn(2, 8, 16, device=device, requires_grad=True)
    reference(x).sum().backward()
    expected = [parameter.grad.clone() for parameter in reference.parameters()] + [x.grad.clone()]
    x.grad = None
    gcoffload.reset_stats()
    with gcoffload.swap_activations(min_offload_bytes=0, keep_pending=100) as region:
        out = model(x)
    traveled = region.swapped_bytes
    out.sum().backward()
    synchronize(device)
    got = [parameter.grad for parameter in model.parameters()] + [x.grad]
    assert all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(got, expected, strict=True))
    stats = step_stats(device)
    # Storages: x (saved by both linears, once), qkv (q, k^T and v: once), the scores (softmax output,
    # saved twice), big (only its first rows: sin's input), and scores @ v is not saved.
    qkv = 2 * 8 * 48 * 4
    small_span = (1 * 8 * 1024 + 2 * 1024) * 4  # batch 0's whole rows, then batch 1's first two rows
    scores = 2 * 8 * 8 * 4
    x_bytes = 2 * 8 * 16 * 4
    assert stats["swapped_storages"] == 4
    assert traveled == stats["offloaded_bytes"] == x_bytes + qkv + scores + small_span
    assert small_span < 2 * 8 * 1024 * 4


class SavesItsOutput(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).tanh()  # tanh saves its output


@on_devices
@pytest.mark.parametrize("where", ["after the layer", "inside the layer"])
def test_an_in_place_change_to_a_swapped_tensor_raises_autograds_error(device, where):
    layer = SavesItsOutput().to(device)
    x = torch.randn(4, 16, device=device, requires_grad=True)

    def forward() -> torch.Tensor:
        if where == "inside the layer":
            hidden = layer.linear(x).sigmoid()  # sigmoid saves its output
            hidden.mul_(2)
            return hidden
        out = layer(x)
        out.mul_(2)
        return out

    with pytest.raises(RuntimeError, match="modified by an inplace operation") as plain:
        forward().sum().backward()
    with gcoffload.swap_activations(min_offload_bytes=0, keep_pending=1):
        out = forward()
    with pytest.raises(RuntimeError, match="modified by an inplace operation") as swapped:
        out.sum().backward()
    assert "expected version 0" in str(plain.value) and "expected version 0" in str(swapped.value)


class RaisesInForward(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.exp().sin().cos()  # saved, then the layer fails
        raise RuntimeError("the layer failed")


class _FailingBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("the backward failed")


class RaisesInBackward(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FailingBackward.apply(x.exp()).sin()


def test_nothing_leaks_when_a_swapped_layer_raises(no_leaks):
    layers = torch.nn.ModuleList([SavesItsOutput(), RaisesInForward()])
    x = torch.randn(4, 16, requires_grad=True)
    with (
        gcoffload.wrap_layers(layers, SWAP_ALL, mode="swap"),
        pytest.raises(RuntimeError, match="the layer failed"),
    ):
        layers[1](layers[0](x))
    assert no_leaks.stats()["offloads"] >= 1  # layer 0's storages had left
    with (
        gcoffload.swap_activations(min_offload_bytes=0, keep_pending=1),
        pytest.raises(RuntimeError, match="the layer failed"),
    ):
        RaisesInForward()(x)
    gc.collect()


def test_nothing_leaks_when_backward_through_swapped_layers_raises(no_leaks):
    layers = torch.nn.ModuleList([SavesItsOutput(), RaisesInBackward(), SavesItsOutput()])
    x = torch.randn(4, 16, requires_grad=True)
    with gcoffload.wrap_layers(layers, SWAP_ALL, mode="swap"):
        out = layers[2](layers[1](layers[0](x)))
        with pytest.raises(RuntimeError, match="the backward failed"):
            out.sum().backward()
        del out
    assert no_leaks.stats()["offloads"] >= 3


@on_devices
def test_autograd_grad_and_retain_graph_through_swapped_layers(device):
    reference, model = make_pair(layers=3)
    reference.to(device)
    model.to(device)
    ids = batch().to(device)
    torch.manual_seed(5)
    expected = torch.autograd.grad(reference(ids).square().mean(), list(reference.parameters()))
    with gcoffload.wrap_layers(model.layers, SWAP_ALL, mode="swap"):
        torch.manual_seed(5)
        loss = model(ids).square().mean()
        first = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
        second = torch.autograd.grad(loss, list(model.parameters()))
    for a, b, c in zip(first, second, expected, strict=True):
        assert torch.equal(a.cpu(), c.cpu()) and torch.equal(b.cpu(), c.cpu())


class Smooth(torch.nn.Module):
    """Twice differentiable: tanh and a square."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).tanh().square()


@on_devices
def test_double_backward_through_swapped_layers(device):
    torch.manual_seed(0)
    reference = torch.nn.ModuleList([Smooth(), Smooth()]).to(device)
    model = torch.nn.ModuleList([Smooth(), Smooth()]).to(device)
    model.load_state_dict(reference.state_dict())
    x = torch.randn(4, 16, device=device, requires_grad=True)

    def penalty(layers: torch.nn.ModuleList) -> list[torch.Tensor]:
        out = layers[1](layers[0](x)).sum()
        (grad_x,) = torch.autograd.grad(out, x, create_graph=True)
        return torch.autograd.grad(grad_x.square().sum(), list(layers.parameters()))

    expected = penalty(reference)
    with gcoffload.wrap_layers(model, SWAP_ALL, mode="swap"):
        got = penalty(model)
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a.cpu(), b.cpu())
    assert step_stats(device)["swapped_layers"] >= 2


@on_devices
def test_swap_activations_around_a_whole_model(device):
    reference, model = make_pair(layers=4)
    reference.to(device)
    model.to(device)
    ids = batch().to(device)
    expected_loss, expected = loss_and_grads(reference, ids)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    gcoffload.reset_stats()
    with gcoffload.swap_activations(min_offload_bytes=0, prefetch_depth=2, keep_pending=2):
        logits = model(ids)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.roll(-1, dims=1).flatten())
    loss.backward()
    synchronize(device)
    assert torch.equal(loss.detach().cpu(), expected_loss.cpu())
    assert_same({name: p.grad for name, p in model.named_parameters()}, expected)
    stats = step_stats(device)
    assert stats["offloads"] == stats["fetches"] == stats["swapped_storages"] > 10
    assert stats["live_handles"] == 0


@on_devices
def test_a_checkpoint_inside_a_swap_region_and_a_swap_inside_save_on_cpu(device):
    reference, model = make_pair(layers=3)
    reference.to(device)
    model.to(device)
    ids = batch().to(device)
    _, expected = loss_and_grads(reference, ids)
    with gcoffload.wrap_layers(model.layers, SWAP_ALL, mode=["swap", "checkpoint", "swap"]):
        with gcoffload.swap_activations(min_offload_bytes=0):  # the layers' regions are this one's
            _, grads = loss_and_grads(model, ids)
        assert_same(grads, expected)
        if device == "cpu":
            with torch.autograd.graph.save_on_cpu():
                _, grads = loss_and_grads(model, ids)
            assert_same(grads, expected)


@on_simdev
def test_activations_stay_on_the_device_while_the_stream_captures_a_graph(device):
    reference, model = make_pair(layers=3)
    reference.to(device)
    model.to(device)
    ids = batch().to(device)
    expected_loss, _ = loss_and_grads(reference, ids)
    gcoffload.reset_stats()
    with gcoffload.wrap_layers(model.layers, SWAP_ALL, mode="swap"):
        with simdevice.graph_capture():
            loss, _ = loss_and_grads(model, ids)
        assert torch.equal(loss.cpu(), expected_loss.cpu())
        assert step_stats(device)["offloads"] == 0

        model.train()
        hidden_states = model.layers[0](model.embed(ids), causal_mask(ids.shape[1]).to(device))
        with simdevice.graph_capture(), pytest.raises(RuntimeError, match="swapped before graph capture"):
            hidden_states.sum().backward()


@on_simdev
def test_swapped_activations_leave_the_device_after_forward(device):
    """After forward (copies done) the swapped layers hold only what never leaves: none of their storages."""
    torch.manual_seed(0)
    _, model = make_pair(layers=4)
    model.to(device)
    ids = batch().to(device)
    for layer in model.layers:
        layer.eval()  # no dropout masks: every saved storage is floating point
    allocated = torch.get_device_module("simdev").memory_allocated

    def held_after_forward(mode: str) -> int:
        gc.collect()
        synchronize(device)
        before = allocated()
        with gcoffload.wrap_layers(model.layers, SWAP_ALL, mode=mode, only_trainable=False):
            hidden = model.embed(ids)
            mask = causal_mask(ids.shape[1]).to(device)
            for layer in model.layers:
                layer.training = True
                hidden = layer(hidden, mask)
            gcoffload.get_engine(device).synchronize()
            synchronize(device)
            held = allocated() - before
            hidden.sum().backward()
        return held - hidden.untyped_storage().nbytes() - mask.untyped_storage().nbytes()

    kept = held_after_forward("keep")
    swapped = held_after_forward("swap")
    assert kept > 0
    assert swapped == 0


def test_an_empty_view_outside_the_span_comes_back_empty():
    x = torch.randn(8, 64, requires_grad=True)

    def loss() -> torch.Tensor:
        y = x * 2
        head, empty = y[:1, :4], y[7:7]  # the span covers the head alone; the empty view lies past it
        return head.sin().sum() + (empty * empty).sum()

    (expected,) = torch.autograd.grad(loss(), x)
    with gcoffload.swap_activations(min_offload_bytes=0, keep_pending=100):
        value = loss()
    (got,) = torch.autograd.grad(value, x)
    assert torch.equal(got, expected)


def test_a_bad_mode_is_named():
    layers = torch.nn.ModuleList([SavesItsOutput(), SavesItsOutput()])
    with pytest.raises(ValueError, match=r"mode must be one of \['checkpoint', 'swap', 'keep'\].*'spill'"):
        gcoffload.wrap_layers(layers, mode="spill")
    with pytest.raises(ValueError, match=r"mode must be one of .*'spill'"):
        gcoffload.wrap_layers(layers, mode=["swap", "spill"])
    with pytest.raises(ValueError, match="mode: 1 modes given for 2 layers"):
        gcoffload.wrap_layers(layers, mode=["swap"])
    with pytest.raises(ValueError, match="modes and memory_budget cannot be combined"):
        gcoffload.wrap_layers(layers, mode="swap", memory_budget="1GiB")
    with (
        pytest.raises(ValueError, match="swap_activations: keep_pending must be a positive int"),
        gcoffload.swap_activations(keep_pending=0),
    ):
        pass
    assert all("forward" not in layer.__dict__ for layer in layers), "nothing was wrapped"
