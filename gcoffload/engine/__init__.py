"""The engine: per-device copy engines over the C++ pinned pool and side streams, and its loader.

* :mod:`.extension`: builds the C++ extension (``csrc/``) on first use.
* :mod:`.copy_engine`: :class:`CopyEngine`, offload / prefetch / fetch on one device.
* :mod:`.registry`: :func:`get_engine`, :func:`configure`, one engine per device.
* :mod:`.host_settings`: the host budget and what happens past it.
"""

from .copy_engine import CopyEngine, Handle
from .registry import configure, existing_engines, get_engine

__all__ = ["CopyEngine", "Handle", "configure", "existing_engines", "get_engine"]
