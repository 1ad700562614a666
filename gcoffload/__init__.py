"""gcoffload: gradient checkpointing that parks layer inputs in pinned host memory.

The pieces, top to bottom (a tensor's path in the forward pass):

* :func:`patch_model` / :func:`prepare_model_for_training` (``gcoffload.hf``):
  make a transformers model, PEFT and the Trainer use gcoffload.
* :func:`wrap_layers`: the same for any stack of PyTorch layers.
* :class:`LayerCheckpointer` (``gcoffload.policy``): which layers to checkpoint.
* :class:`Autopilot` (``gcoffload.autopilot``): with a memory budget, keep,
  checkpoint or offload each layer, as :func:`plan` (``gcoffload.planner``)
  decides from a :class:`Profile` (``gcoffload.profile``).
* :func:`checkpoint` (``gcoffload.function``): offload in forward, prefetch and
  recompute in backward.
* :func:`get_engine` (``gcoffload.engine``): per-device copy engine over the C++
  pinned pool and side streams.
"""

from .autopilot import Autopilot
from .engine import CopyEngine, Handle, configure, get_engine, reset_stats, stats
from .function import checkpoint, checkpoint_with
from .hf import patch_model, prepare_model_for_training, unpatch_model
from .planner import LayerPlan, Mode, Plan, least_memory, plan, predict
from .policy import LayerCheckpointer, selective_checkpoint_function
from .profile import CopyProfile, LayerProfile, Profile
from .saved_input import OffloadOptions
from .wrap import WrappedLayers, wrap_layers

__version__ = "0.1.0"

__all__ = [
    "Autopilot",
    "CopyEngine",
    "CopyProfile",
    "Handle",
    "LayerCheckpointer",
    "LayerPlan",
    "LayerProfile",
    "Mode",
    "OffloadOptions",
    "Plan",
    "Profile",
    "WrappedLayers",
    "checkpoint",
    "checkpoint_with",
    "configure",
    "get_engine",
    "least_memory",
    "patch_model",
    "plan",
    "predict",
    "prepare_model_for_training",
    "reset_stats",
    "selective_checkpoint_function",
    "stats",
    "unpatch_model",
    "wrap_layers",
]
