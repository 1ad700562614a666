"""Builds simdev's C++ backend once per source tree and torch version, then imports it.

The build goes into gcoffload's extension cache, through the same loader as
gcoffload's own extension (:class:`gcoffload.engine.extension.CppExtension`).
Set ``GCOFFLOAD_VERBOSE_BUILD=1`` to see the compiler's output.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from gcoffload.engine.extension import CppExtension

__all__ = ["BuildError", "load_extension"]

_SOURCE_DIR = Path(__file__).resolve().parent / "csrc"
_EXTENSION = CppExtension(
    "simdev",
    _SOURCE_DIR,
    tuple(sorted(path.name for path in _SOURCE_DIR.glob("*.cpp"))),
    ("-O1", "-Wall", "-Wextra", "-Wno-unused-parameter"),
    "the simulated device",
)


class BuildError(RuntimeError):
    """The backend cannot be built here (no compiler, no ninja, or a compile error)."""


def load_extension() -> ModuleType:
    """Imports the compiled backend, building it first if this environment has none.

    Importing it registers the PrivateUse1 device guard, allocators, hooks and
    kernels with torch.

    Raises:
        BuildError: the build is impossible or failed; the message says why.
    """
    try:
        return _EXTENSION.load()
    except RuntimeError as error:
        raise BuildError(str(error)) from None
