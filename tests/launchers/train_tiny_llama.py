"""Three Trainer steps of a tiny Llama under a real launcher, with stock checkpointing and with gcoffload.

tests/test_launchers.py starts it with two processes on the CPU:

    DS_ACCELERATOR=cpu python -m torch.distributed.run --nproc_per_node 2 train_tiny_llama.py \\
        --checkpointing stock gcoffload gcoffload-reentrant gcoffload-autopilot --deepspeed zero3.json \\
        --out result.json
    python -m accelerate.commands.launch --config_file fsdp2.yaml --num_processes 2 train_tiny_llama.py \\
        --checkpointing stock gcoffload gcoffload-reentrant gcoffload-autopilot --out result.json

Each run trains its own copy of the model with a Trainer of its own, one run after
another in the same processes (a launch costs seconds of imports; three steps cost
less than one). ``stock`` is transformers' non-reentrant checkpointing, the Trainer
without gcoffload; ``gcoffload`` is ``patch_model`` with its defaults but
``min_offload_bytes=0`` (the layer inputs are 8 KiB); ``gcoffload-reentrant`` also
asks for ``use_reentrant=True``; ``gcoffload-autopilot`` asks for
``memory_budget="auto"`` (the host's free memory here: after its first pass and its
profile step, every layer is kept). Rank 0 writes ``--out``: per run, the loss and
gradient norm the Trainer logged at each step, and for each rank the engine's
counters, the checkpoint function the decoder layers ended up with, the autopilot's
plan, what accelerate made of the launch (its distributed type, the wrapper around
the model, how the weights are held), and the warnings gcoffload gave.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import transformers

import gcoffload

RUNS = ("stock", "gcoffload", "gcoffload-reentrant", "gcoffload-autopilot")
LAYERS = 4
STEPS = 3
BATCH_PER_RANK = 2
SEQUENCE = 16
VOCAB = 128


def tiny_llama() -> torch.nn.Module:
    """The same weights on every rank and in every run: built from seed 0, no hub."""
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, attention_dropout=0.1,
        use_cache=False,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float()


def dataset(world_size: int) -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(
        0, VOCAB, (STEPS * BATCH_PER_RANK * world_size, SEQUENCE), generator=torch.Generator().manual_seed(11)
    )
    return [{"input_ids": row, "labels": row} for row in ids]


def training_arguments(
    output_dir: str, deepspeed: str | None, checkpointing_kwargs: dict[str, Any] | None
) -> transformers.TrainingArguments:
    # transformers 5.23 renamed gradient_checkpointing (still accepted, with a FutureWarning).
    names = {field.name for field in dataclasses.fields(transformers.TrainingArguments)}
    flag = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return transformers.TrainingArguments(
        output_dir=output_dir,
        max_steps=STEPS,
        per_device_train_batch_size=BATCH_PER_RANK,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        seed=7,
        deepspeed=deepspeed,
        **{flag: True, f"{flag}_kwargs": checkpointing_kwargs},
    )


def sharding(model: torch.nn.Module) -> dict[str, int]:
    """How the launcher's backend holds the weights: FSDP2 modules, ZeRO-3 partitioned parameters."""
    from torch.distributed.fsdp import FSDPModule

    parameters = list(model.parameters())
    return {
        "parameters": len(parameters),
        "fsdp2_modules": sum(isinstance(module, FSDPModule) for module in model.modules()),
        # Outside a forward or backward pass, ZeRO-3 leaves only each rank's partition, off the module.
        "zero3_partitioned": sum(hasattr(p, "ds_tensor") and p.numel() == 0 for p in parameters),
    }


def checkpoint_function(model: torch.nn.Module) -> dict[str, Any]:
    """Which checkpoint the decoder layers call, and on which path."""
    functions = {getattr(layer, "_gradient_checkpointing_func", None) for layer in model.model.layers}
    (function,) = functions
    if isinstance(function, gcoffload.layers.LayerCheckpointer):
        return {"checkpoint": "gcoffload", "use_reentrant": function.use_reentrant}
    return {"checkpoint": "torch", "use_reentrant": function.keywords.get("use_reentrant", True)}


class RecordLogs(transformers.TrainerCallback):
    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.steps.append({"loss": float(logs["loss"]), "grad_norm": float(logs["grad_norm"])})


def train(
    model: torch.nn.Module, checkpointing: str, deepspeed: str | None, output_dir: Path
) -> dict[str, Any]:
    """One Trainer run; what this rank saw."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if checkpointing == "gcoffload":
            gcoffload.patch_model(model, gcoffload.OffloadOptions(min_offload_bytes=0))
        elif checkpointing == "gcoffload-reentrant":
            gcoffload.patch_model(model, gcoffload.OffloadOptions(min_offload_bytes=0), use_reentrant=True)
        elif checkpointing == "gcoffload-autopilot":
            gcoffload.patch_model(model, gcoffload.OffloadOptions(min_offload_bytes=0), memory_budget="auto")
        # Stock asks for torch's non-reentrant checkpoint, the default from transformers 5 on (4.x
        # defaults to the reentrant one, which FSDP2 does not support). gcoffload's runs ask for
        # nothing: the option given to patch_model decides.
        kwargs = {"use_reentrant": False} if checkpointing == "stock" else None
        arguments = training_arguments(str(output_dir / f"trainer-{checkpointing}"), deepspeed, kwargs)
        record = RecordLogs()
        trainer = transformers.Trainer(
            model=model, args=arguments, train_dataset=dataset(arguments.world_size), callbacks=[record]
        )
        gcoffload.reset_stats()
        trainer.train()
    result = {
        "steps": record.steps,
        "stats": gcoffload.stats()["devices"].get("cpu", {}),
        **checkpoint_function(model),
        "plan": model.gcoffload_plan.counts() if getattr(model, "gcoffload_plan", None) else None,
        "sharding": sharding(model),
        "distributed_type": str(trainer.accelerator.distributed_type),
        "wrapper": type(trainer.model_wrapped).__name__,
        "gcoffload_warnings": sorted(
            {str(w.message) for w in caught if str(w.message).startswith("gcoffload")}
        ),
    }
    # Every collective of the run is finished and its objects are freed before the next run or
    # the teardown (see Note [Tearing down gloo] in tests/test_distributed.py).
    dist.barrier()
    del trainer, model
    gc.collect()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpointing", choices=RUNS, nargs="+", required=True, help="runs, one after another"
    )
    parser.add_argument("--deepspeed", help="a DeepSpeed config file for the Trainer (default: none)")
    parser.add_argument("--out", type=Path, required=True, help="the JSON file rank 0 writes")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher's
    args = parser.parse_args()

    # Every model is built before the first Trainer: once a Trainer has a ZeRO-3 config,
    # transformers builds models inside deepspeed.zero.Init, which draws other weights.
    models = [tiny_llama() for _ in args.checkpointing]
    runs = {run: train(models.pop(0), run, args.deepspeed, args.out.parent) for run in args.checkpointing}
    per_rank: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, runs)
    if dist.get_rank() == 0:
        result = {
            "deepspeed": args.deepspeed,
            "fsdp_version": os.environ.get("FSDP_VERSION") if os.environ.get("ACCELERATE_USE_FSDP") else None,
            # Every rank logs the same, all-reduced loss and gradient norm.
            "runs": {
                run: {"steps": record["steps"], "ranks": [ranks[run] for ranks in per_rank]}
                for run, record in runs.items()
            },
        }
        args.out.write_text(json.dumps(result, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
