"""DDP and FSDP2 with two gloo processes: gradients equal the average of per-shard references."""

from __future__ import annotations

import faulthandler
import gc
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from toy_models import Block, Stack, batch, loss_and_grads

WORLD_SIZE = 2
TIMEOUT_S = 300


def _worker(rank: int, rendezvous: str, mode: str) -> None:
    # A crash in C++ (rather than a Python exception) still shows where it happened.
    faulthandler.enable()
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD_SIZE)
    try:
        _train_one_step_and_compare(rank, mode)
        # Note [Tearing down gloo]: every collective is finished on both ranks and every
        # tensor, module and work object of the step is freed before the process group
        # goes. Without that, FSDP2 with torch's non-reentrant checkpoint (gcoffload or
        # not) sometimes aborts at interpreter shutdown with "terminate called without an
        # active exception", most likely a gloo thread dropping work it still held.
        dist.barrier()
        gc.collect()
    finally:
        dist.destroy_process_group()


def _train_one_step_and_compare(rank: int, mode: str) -> None:
    import gcoffload

    torch.manual_seed(0)
    reference = Stack(layers=4, block=Block, dropout=0.0)
    model = Stack(layers=4, block=Block, dropout=0.0)
    model.load_state_dict(reference.state_dict())
    ids = batch(size=2 * WORLD_SIZE)
    shards = ids.chunk(WORLD_SIZE)
    per_shard = [loss_and_grads(reference, shard)[1] for shard in shards]
    expected = {name: sum(grads[name] for grads in per_shard) / WORLD_SIZE for name in per_shard[0]}

    gcoffload.wrap_layers(
        model.layers,
        gcoffload.OffloadOptions(min_offload_bytes=0),
        use_reentrant=(mode == "ddp-static-graph"),
    )
    if mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.layers:
            fully_shard(layer)
        trained = fully_shard(model)
    else:
        trained = nn.parallel.DistributedDataParallel(model, static_graph=(mode == "ddp-static-graph"))
    logits = trained(shards[rank])
    nn.functional.cross_entropy(logits.flatten(0, 1), shards[rank].roll(-1, dims=1).flatten()).backward()

    for name, parameter in model.named_parameters():
        grad = parameter.grad
        grad = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
        torch.testing.assert_close(grad, expected[name], rtol=0, atol=0, msg=f"rank {rank}: {name}")
    stats = gcoffload.stats()["devices"]["cpu"]
    assert stats["checkpointed_layers"] == 4 and stats["offloads"] == 3, stats


@pytest.mark.parametrize("mode", ["ddp", "ddp-static-graph", "fsdp2"])
def test_two_processes_match_the_averaged_reference(tmp_path, mode):
    context = mp.spawn(_worker, args=(str(tmp_path / "rendezvous"), mode), nprocs=WORLD_SIZE, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{mode} did not finish in {TIMEOUT_S} s")
