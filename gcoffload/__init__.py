"""gcoffload: gradient checkpointing that parks layer inputs in pinned host memory.

The layers of the package, top to bottom (a tensor's path in the forward pass):

* :mod:`gcoffload.integrations`: :func:`patch_model` and
  :func:`prepare_model_for_training` make a transformers model, PEFT and the
  Trainer use gcoffload; LLaMA-Factory's train command runs through it.
* :mod:`gcoffload.layers`: :func:`wrap_layers` for any stack of PyTorch
  layers; the selective rule and the per-layer checkpointer.
* :mod:`gcoffload.autopilot`: with ``memory_budget=``, keep, checkpoint or
  offload each layer, as the planner decides from a measured profile.
* :mod:`gcoffload.checkpoint`: :func:`checkpoint`, offload in forward, prefetch
  and recompute in backward; :class:`OffloadOptions`; the counters.
* :mod:`gcoffload.swapping`: :func:`swap_activations`, no recompute: what
  autograd saves goes to host memory storage by storage and comes back ahead
  of backward.
* :mod:`gcoffload.engine`: :func:`get_engine`, the per-device copy engine over
  the C++ pinned pool and side streams, built on first use.

Beside them, :mod:`gcoffload.sizing`: :func:`capacity` counts, from a model's
config alone, the memory each strategy needs and the longest context it fits
(``python -m gcoffload plan``).
"""

from .checkpointing import OffloadOptions, checkpoint, checkpoint_with
from .checkpointing.counters import reset_stats, stats
from .engine import configure, get_engine
from .integrations import patch_model, prepare_model_for_training, unpatch_model
from .layers import WrappedLayers, wrap_layers
from .sizing import capacity
from .swapping import swap_activations

__version__ = "0.2.0"

__all__ = [
    "OffloadOptions",
    "WrappedLayers",
    "capacity",
    "checkpoint",
    "checkpoint_with",
    "configure",
    "get_engine",
    "patch_model",
    "prepare_model_for_training",
    "reset_stats",
    "stats",
    "swap_activations",
    "unpatch_model",
    "wrap_layers",
]
