"""gcoffload: gradient checkpointing that parks layer inputs in pinned host memory."""

from .engine import CopyEngine, Handle, configure, get_engine, reset_stats, stats

__version__ = "0.1.0"

__all__ = ["CopyEngine", "Handle", "configure", "get_engine", "reset_stats", "stats"]
