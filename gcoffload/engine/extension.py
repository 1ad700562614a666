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

__all__ = ["CppExtension", "ExtensionInfo", "cache_root", "extension_info", "is_loaded", "load"]

CACHE_DIR_ENV = "GCOFFLOAD_CACHE_DIR"
VERBOSE_BUILD_ENV = "GCOFFLOAD_VERBOSE_BUILD"

_SOURCES = ("pinned_pool.cpp", "disk_file.cpp", "disk_tier.cpp", "copy_engine.cpp", "bindings.cpp")
_CFLAGS = ("-O3", "-Wall", "-Wextra", "-Wno-unused-parameter")
_COMPLETE_MARKER = "build.complete"
_ERROR_CONTEXT_LINES = 25


class ExtensionInfo:
    """Where one build of a C++ extension lives and whether it is complete."""

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


class CppExtension:
    """A C++ torch extension JIT-built into gcoffload's cache on first use, then imported from there.

    The build directory is keyed by the torch version, the Python version and
    a hash of the sources and flags, so an edit rebuilds and two environments
    never share a binary.

    Args:
        prefix: what the build directory's and the module's names start with.
        source_dir: the directory holding ``sources``; every ``.h`` and ``.cpp``
            in it is part of the hash.
        sources: the ``.cpp`` files to compile, relative to ``source_dir``.
        cflags: compiler flags.
        describe: how the build announces itself on stderr ("the C++ extension").
    """

    def __init__(
        self, prefix: str, source_dir: Path, sources: tuple[str, ...], cflags: tuple[str, ...], describe: str
    ) -> None:
        self.prefix = prefix
        self.source_dir = source_dir
        self.sources = sources
        self.cflags = cflags
        self.describe = describe
        self._lock = threading.Lock()
        self._module: ModuleType | None = None

    def info(self) -> ExtensionInfo:
        """Where the build for this torch, Python and source tree goes (builds nothing)."""
        key = _source_key(self.source_dir, self.cflags)
        python = f"py{sys.version_info.major}{sys.version_info.minor}"
        build_dir = cache_root() / f"{self.prefix}-torch-{torch.__version__}-{python}-{key}"
        return ExtensionInfo(self.source_dir, build_dir, f"{self.prefix.replace('-', '_')}_ext_{key}")

    def load(self) -> ModuleType:
        """The extension module, built first if this environment has none.

        Raises:
            RuntimeError: no C++ compiler or ninja, or the build failed; the
                message quotes the compiler's last error lines and says what to do.
        """
        if self._module is not None:
            return self._module
        with self._lock:
            if self._module is None:
                info = self.info()
                self._module = _import(info) if info.built else self._build(info)
        return self._module

    def _build(self, info: ExtensionInfo) -> ModuleType:
        cpp_extension = _import_cpp_extension()
        _require_toolchain()
        verbose = os.environ.get(VERBOSE_BUILD_ENV, "") not in ("", "0")
        print(
            f"gcoffload: building {self.describe} once for torch {torch.__version__} "
            f"into {info.build_dir} (about a minute; later runs load it from there)",
            file=sys.stderr,
            flush=True,
        )
        started = time.monotonic()
        info.build_dir.mkdir(parents=True, exist_ok=True)
        try:
            module = cpp_extension.load(
                name=info.name,
                sources=[str(self.source_dir / source) for source in self.sources],
                extra_cflags=list(self.cflags),
                build_directory=str(info.build_dir),
                with_cuda=False,
                verbose=verbose,
            )
        except (RuntimeError, subprocess.CalledProcessError, OSError) as error:
            raise RuntimeError(_build_failure_message(self.describe, str(error), verbose)) from error
        (info.build_dir / _COMPLETE_MARKER).write_text(torch.__version__ + "\n")
        print(
            f"gcoffload: {self.describe} built in {time.monotonic() - started:.0f} s",
            file=sys.stderr,
            flush=True,
        )
        return module


def _package_sources() -> Path:
    package = Path(__file__).resolve().parents[1]
    for candidate in (package / "csrc", package.parent / "csrc"):
        if all((candidate / source).is_file() for source in _SOURCES):
            return candidate
    raise RuntimeError(
        f"gcoffload: the C++ sources were not found next to {package}. "
        "Reinstall the package with `pip install .` from a gcoffload checkout."
    )


def cache_root() -> Path:
    """Where builds go: ``$GCOFFLOAD_CACHE_DIR``, else ``$XDG_CACHE_HOME/gcoffload``."""
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


_extension: CppExtension | None = None


def _gcoffload_extension() -> CppExtension:
    global _extension
    if _extension is None:
        _extension = CppExtension("gcoffload", _package_sources(), _SOURCES, _CFLAGS, "the C++ extension")
    return _extension


def extension_info() -> ExtensionInfo:
    """Locates gcoffload's own build for this torch, Python and source tree (builds nothing)."""
    return _gcoffload_extension().info()


def load() -> ModuleType:
    """gcoffload's extension module (PinnedPool, CopyEngine), built first if this environment has none.

    Raises:
        RuntimeError: no C++ compiler or ninja, or the build failed.
    """
    return _gcoffload_extension().load()


def is_loaded() -> bool:
    """Whether the extension is imported in this process (nothing is built or imported to answer)."""
    return _extension is not None and _extension._module is not None


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
            "`conda install -c conda-forge cxx-compiler`) or set CXX to its path. "
            "Plain checkpointing (offload=False) needs no extension."
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


def _build_failure_message(describe: str, output: str, verbose: bool) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    quoted = (errors or lines)[-_ERROR_CONTEXT_LINES:]
    advice = (
        "Check that the C++ compiler supports C++17 and matches the one torch was "
        "built with (g++ 9 or newer on Linux), and that torch's headers are installed."
    )
    if not verbose:
        advice += f" Set {VERBOSE_BUILD_ENV}=1 to see the full compiler output."
    return f"gcoffload: building {describe} failed:\n  " + "\n  ".join(quoted) + "\n" + advice
