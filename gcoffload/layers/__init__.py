"""What happens to each layer of a stack: the selective rule, the per-layer checkpointer, wrapping.

* :mod:`.rule`: a layer is checkpointed iff gradients flow through it.
* :mod:`.checkpointer`: :class:`LayerCheckpointer`, the per-layer checkpoint function.
* :mod:`.wrap`: :func:`wrap_layers` for any stack of PyTorch layers.
"""

from .checkpointer import LayerCheckpointer
from .rule import selective_checkpoint_function
from .wrap import WrappedLayers, wrap_layers

__all__ = ["LayerCheckpointer", "WrappedLayers", "selective_checkpoint_function", "wrap_layers"]
