"""Where people train: transformers, PEFT and the Trainer (:mod:`.hf`), LLaMA-Factory (:mod:`.llamafactory`).

Nothing here imports transformers or LLaMA-Factory at module level.
"""

from .hf import patch_model, prepare_model_for_training, unpatch_model

__all__ = ["patch_model", "prepare_model_for_training", "unpatch_model"]
