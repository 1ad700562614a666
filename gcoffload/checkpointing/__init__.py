"""The checkpoint paths: offload a layer's input in forward, prefetch it and recompute in backward.

* :mod:`.dispatch`: :func:`checkpoint` and :func:`checkpoint_with`, and the one
  dispatch every checkpointed call goes through.
* :mod:`.reentrant`: gcoffload's autograd Function.
* :mod:`.nonreentrant`: torch's non-reentrant checkpoint with saved-tensor hooks.
* :mod:`.saved_input`: the saved input, kept or offloaded, its forward chain and prefetch.
* :mod:`.layer_call`: one layer call taken apart once (:class:`LayerCall`).
* :mod:`.options`: :class:`OffloadOptions`.
* :mod:`.replay_state`: RNG and autocast state for the recompute.
* :mod:`.counters`: what was counted, per device and per training step.
"""

from .dispatch import checkpoint, checkpoint_with
from .layer_call import LayerCall
from .options import OffloadOptions

__all__ = ["LayerCall", "OffloadOptions", "checkpoint", "checkpoint_with"]
