"""A LoRA fine-tune of a tiny Llama with the transformers Trainer, through gcoffload. Runs offline on a CPU.

    python examples/lora_trainer.py

The model is built from a config (no download), the data is random token ids,
and the Trainer runs three steps. ``patch_model`` with a memory budget makes
gcoffload pick, per decoder layer, whether to keep its activations, swap them
to host memory, checkpoint it, or checkpoint it and park its input in host
memory; the script prints the plan it chose and what went to host memory.
"""

from __future__ import annotations

import tempfile

import peft
import torch
import transformers

import gcoffload

LENGTH = 256  # tokens per sequence


def tiny_llama() -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=LENGTH,
    )
    return transformers.AutoModelForCausalLM.from_config(config)


def random_tokens(rows: int) -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(0, 128, (rows, LENGTH), generator=torch.Generator().manual_seed(1))
    return [{"input_ids": row, "labels": row} for row in ids]


def main() -> None:
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    # A decoder layer's input here is 2 x 256 x 64 floats: 128 KiB. By default gcoffload leaves
    # inputs under 1 MiB on the device (copying them costs more than it saves), so a model this
    # small would show "offloads: 0"; min_offload_bytes=0 lets the tiny inputs move too.
    gcoffload.patch_model(model, gcoffload.OffloadOptions(min_offload_bytes=0), memory_budget="3.5MiB")
    checkpointing = (
        "activation_checkpointing"  # transformers 5.23+
        if hasattr(transformers.PreTrainedModel, "activation_checkpointing_enable")
        else "gradient_checkpointing"
    )
    with tempfile.TemporaryDirectory() as output_dir:
        arguments = transformers.TrainingArguments(
            output_dir=output_dir,
            max_steps=3,
            per_device_train_batch_size=2,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            **{checkpointing: True},
        )
        trainer = transformers.Trainer(model=model, args=arguments, train_dataset=random_tokens(6))
        trainer.train()
    print(model.get_base_model().gcoffload_plan.summary())
    counters = gcoffload.stats()["last_step"]["cpu"]
    print(
        f"last step: {counters['checkpointed_layers']} layers checkpointed, {counters['kept_layers']} kept, "
        f"{counters['swapped_layers']} swapped; {counters['offloads']} copies to host memory "
        f"({counters['swapped_storages']} of them swapped storages, "
        f"{counters['offloaded_bytes'] / 2**10:.0f} KiB), {counters['prefetch_hits']} prefetched ahead "
        "of their backward"
    )


if __name__ == "__main__":
    main()
