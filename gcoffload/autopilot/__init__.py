"""The memory-budget autopilot: keep, swap, checkpoint or offload each layer, for the fastest step that fits.

* :mod:`.autopilot`: :class:`Autopilot`, which runs each layer call as its plan says.
* :mod:`.passes`, :mod:`.mode_options`, :mod:`.plan_cache`: where a pass begins, what each
  layer runs with, and the plans per shape bucket.
* :mod:`.profile_step` and :mod:`.measure`: the profile step and what it measures.
* :mod:`.profile`: the measured numbers (:class:`Profile`, :class:`LayerProfile`, :class:`CopyProfile`).
* :mod:`.planner`: :func:`fastest_plan`, :func:`predict`, :func:`least_memory`: pure functions of a profile.
* :mod:`.budget`: what ``memory_budget=`` accepts.
"""

from .autopilot import Autopilot
from .planner import LayerPlan, Mode, Plan, fastest_plan, least_memory, predict
from .profile import CopyProfile, LayerProfile, Profile

__all__ = [
    "Autopilot",
    "CopyProfile",
    "LayerPlan",
    "LayerProfile",
    "Mode",
    "Plan",
    "Profile",
    "fastest_plan",
    "least_memory",
    "predict",
]
