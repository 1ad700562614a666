"""Builds the C++ extension on first use and loads it from a cache afterwards.

The sources ship inside the installed package (``gcoffload/csrc``; in a source
checkout they are read from ``csrc/`` next to the package). They are compiled
with ``torch.utils.cpp_extension.load`` and ninja into a directory keyed by the
torch version, the Python version and a hash of the sources, so a change to
any of them builds afresh and two environments never share a stale binary.

Environment variables:
    GCOFFLOAD_CACHE_DIR: where builds go (default ``$XDG_CACHE_HOME/gcoffload``,
        else ``~/.cache/gcoffload``).
    GCOFFLOAD_VERBOSE_BUILD: set to 1 to show the compiler's output.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import ModuleType

import torch

__all__ = ["ExtensionInfo", "extension_info", "load"]

CACHE_DIR_ENV = "GCOFFLOAD_CACHE_DIR"
VERBOSE_BUILD_ENV = "GCOFFLOAD_VERBOSE_BUILD"

_SOURCES = ("pinned_pool.cpp", "copy_engine.cpp", "bindings.cpp")
_CFLAGS = ("-O3", "-Wall", "-Wextra", "-Wno-unused-parameter")
_COMPLETE_MARKER = "build.complete"
_ERROR_CONTEXT_LINES = 25

_lock = threading.Lock()
_module: ModuleType | None = None


class ExtensionInfo:
    """Where the extension for this environment lives and whether it is built."""

    def __init__(self, source_dir: Path, build_dir: Path, name: str) -> None:
        self.source_dir = source_dir
        self.build_dir = build_dir
        self.name = name

    @property
    def library(self) -> Path:
        return self.build_dir / f"{self.name}.so"

    @property
    def built(self) -> bool:
        return (self.build_dir / _COMPLETE_MARKER).is_file() and self.library.is_file()


def _source_dir() -> Path:
    package = Path(__file__).resolve().parent
    for candidate in (package / "csrc", package.parent / "csrc"):
        if all((candidate / source).is_file() for source in _SOURCES):
            return candidate
    raise RuntimeError(
        f"gcoffload: the C++ sources were not found next to {package}. "
        "Reinstall the package with `pip install .` from a gcoffload checkout."
    )


def _cache_root() -> Path:
    configured = os.environ.get(CACHE_DIR_ENV)
    if configured:
        return Path(configured).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "gcoffload"


def _source_key(source_dir: Path, cflags: tuple[str, ...]) -> str:
    """A hash of the C++ sources in ``source_dir`` (names and contents) and the flags they build with."""
    digest = hashlib.sha256()
    for path in sorted(source_dir.iterdir()):
        if path.suffix in {".h", ".cpp"}:
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    digest.update(" ".join(cflags).encode())
    return digest.hexdigest()[:16]


def _build_dir(prefix: str, key: str) -> Path:
    """Where a build of sources with ``key`` goes for this torch and Python."""
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    return _cache_root() / f"{prefix}torch-{torch.__version__}-{python}-{key}"


def extension_info() -> ExtensionInfo:
    """Locates the build for this torch, Python and source tree (builds nothing)."""
    source_dir = _source_dir()
    key = _source_key(source_dir, _CFLAGS)
    return ExtensionInfo(source_dir, _build_dir("", key), f"gcoffload_ext_{key}")


def load() -> ModuleType:
    """Returns the extension module, building it first if this environment has none.

    Raises:
        RuntimeError: no C++ compiler or ninja, or the build failed; the message
            quotes the compiler's last error lines and says what to install.
    """
    global _module
    if _module is not None:
        return _module
    with _lock:
        if _module is None:
            info = extension_info()
            _module = _import(info) if info.built else _build(info)
    return _module


def _import(info: ExtensionInfo) -> ModuleType:
    spec = importlib.util.spec_from_file_location(info.name, info.library)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"gcoffload: cannot load the extension from {info.library}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _require_toolchain() -> None:
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(
            f"gcoffload builds its C++ extension on first use and needs a C++ compiler, "
            f"but `{compiler}` was not found. Install one (Debian/Ubuntu: "
            "`apt install g++`; Fedora: `dnf install gcc-c++`; conda: "
            "`conda install -c conda-forge cxx-compiler`) or set CXX to its path."
        )
    if shutil.which("ninja") is None:
        try:
            import ninja  # the PyPI wheel ships the binary next to the module
        except ImportError:
            raise RuntimeError(
                "gcoffload builds its C++ extension with ninja, which was not found. "
                "Install it with `pip install ninja`."
            ) from None
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


class _DropCudaHomeNotice(logging.Filter):
    """Drops torch's "No CUDA runtime is found, using CUDA_HOME=..." warning.

    torch.utils.cpp_extension logs it when imported on a machine that has a
    CUDA toolkit but no GPU. The extension never uses CUDA_HOME (it is built
    without CUDA), so the warning would only contradict the promise that no
    CUDA toolkit is needed.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No CUDA runtime is found")


def _import_cpp_extension() -> ModuleType:
    logger = logging.getLogger("torch.utils.cpp_extension")
    quiet = _DropCudaHomeNotice()
    logger.addFilter(quiet)
    try:
        from torch.utils import cpp_extension
    finally:
        logger.removeFilter(quiet)
    return cpp_extension


def _build(info: ExtensionInfo) -> ModuleType:
    cpp_extension = _import_cpp_extension()
    _require_toolchain()
    verbose = os.environ.get(VERBOSE_BUILD_ENV, "") not in ("", "0")
    print(
        f"gcoffload: building the C++ extension once for torch {torch.__version__} "
        f"into {info.build_dir} (about a minute; later runs load it from there)",
        file=sys.stderr,
        flush=True,
    )
    started = time.monotonic()
    info.build_dir.mkdir(parents=True, exist_ok=True)
    try:
        module = cpp_extension.load(
            name=info.name,
            sources=[str(info.source_dir / source) for source in _SOURCES],
            extra_cflags=list(_CFLAGS),
            build_directory=str(info.build_dir),
            with_cuda=False,
            verbose=verbose,
        )
    except (RuntimeError, subprocess.CalledProcessError, OSError) as error:
        raise RuntimeError(_build_failure_message(str(error), verbose)) from error
    (info.build_dir / _COMPLETE_MARKER).write_text(torch.__version__ + "\n")
    print(f"gcoffload: extension built in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    return module


def _build_failure_message(output: str, verbose: bool) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    quoted = (errors or lines)[-_ERROR_CONTEXT_LINES:]
    advice = (
        "Check that the C++ compiler supports C++17 and matches the one torch was "
        "built with (g++ 9 or newer on Linux), and that torch's headers are installed."
    )
    if not verbose:
        advice += f" Set {VERBOSE_BUILD_ENV}=1 to see the full compiler output."
    return "gcoffload: building the C++ extension failed:\n  " + "\n  ".join(quoted) + "\n" + advice
