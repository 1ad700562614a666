"""Will it fit? A model's activation memory and longest context per strategy, from its config alone.

* :mod:`.model_source`: the config from a ``config.json``, a directory or a hub id.
* :mod:`.trace`: the model built on the meta device and one training step traced (:class:`MetaModel`).
* :mod:`.curve`: the trace at any length from three traces (:class:`TraceCurve`).
* :mod:`.hardware`: the GPUs known by name (:data:`GPUS`).
* :mod:`.disk`: the disk tier: which inputs go to disk, and the time it adds.
* :mod:`.estimate`: each strategy's bytes and time, the longest contexts (:func:`capacity`).
* :mod:`.report` and :mod:`.cli`: the tables, the plot, ``python -m gcoffload plan``.
"""

from .disk import Disk
from .estimate import Capacity, Strategy, StrategyFit, capacity
from .hardware import GPUS, Gpu
from .trace import MetaModel, ModelTrace, Weights

__all__ = [
    "GPUS",
    "Capacity",
    "Disk",
    "Gpu",
    "MetaModel",
    "ModelTrace",
    "Strategy",
    "StrategyFit",
    "Weights",
    "capacity",
]
