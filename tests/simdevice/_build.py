"""Builds simdev's C++ backend once per source tree and torch version, then imports it.

The build goes next to gcoffload's own (``gcoffload._ext._cache_root()``) in a
directory keyed by the torch version, the Python version and a hash of the
sources and flags, so an edit rebuilds and two environments never share a
binary. Set ``GCOFFLOAD_VERBOSE_BUILD=1`` to see the compiler's output.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import torch

from gcoffload import _ext

__all__ = ["BuildError", "load_extension"]

_SOURCE_DIR = Path(__file__).resolve().parent / "csrc"
_CFLAGS = ("-O1", "-Wall", "-Wextra", "-Wno-unused-parameter")


class BuildError(RuntimeError):
    """The backend cannot be built here (no compiler, no ninja, or a compile error)."""


def load_extension() -> ModuleType:
    """Imports the compiled backend, building it first if this environment has none.

    Importing it registers the PrivateUse1 device guard, allocators, hooks and
    kernels with torch.

    Raises:
        BuildError: the build is impossible or failed; the message says why.
    """
    key = _ext._source_key(_SOURCE_DIR, _CFLAGS)
    info = _ext.ExtensionInfo(_SOURCE_DIR, _ext._build_dir("simdev-", key), f"simdev_ext_{key}")
    return _ext._import(info) if info.built else _build(info.build_dir, info.name)


def _build(build_dir: Path, name: str) -> ModuleType:
    from torch.utils import cpp_extension

    try:
        _ext._require_toolchain()
    except RuntimeError as error:
        raise BuildError(f"simdev cannot be built: {error}") from None
    verbose = os.environ.get(_ext.VERBOSE_BUILD_ENV, "") not in ("", "0")
    print(f"simdev: building the simulated device into {build_dir}", file=sys.stderr, flush=True)
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        module = cpp_extension.load(
            name=name,
            sources=[str(path) for path in sorted(_SOURCE_DIR.glob("*.cpp"))],
            extra_cflags=list(_CFLAGS),
            build_directory=str(build_dir),
            with_cuda=False,
            verbose=verbose,
        )
    except (RuntimeError, subprocess.CalledProcessError, OSError) as error:
        lines = [line for line in str(error).splitlines() if "error:" in line] or [str(error)]
        raise BuildError("simdev: building the backend failed:\n  " + "\n  ".join(lines[-25:])) from error
    (build_dir / _ext._COMPLETE_MARKER).write_text(torch.__version__ + "\n")
    return module
