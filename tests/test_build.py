"""The JIT build: cache, the one-line notice, toolchain errors, the CLI."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gcoffload
from gcoffload.__main__ import main
from gcoffload.engine import extension as _ext

LOAD = "import gcoffload.engine as e; e.get_engine('cpu'); print(e.extension.extension_info().library)"


def run_python(code: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True, timeout=900
    )


def test_the_installed_package_carries_its_sources():
    info = _ext.extension_info()
    assert {"pinned_pool.cpp", "copy_engine.cpp", "bindings.cpp", "fence.h"} <= {
        path.name for path in info.source_dir.iterdir()
    }
    package = Path(gcoffload.__file__).resolve().parent
    installed = package.parent.name == "site-packages"
    assert info.source_dir == (package / "csrc" if installed else package.parent / "csrc")


def test_first_use_builds_once_with_two_notices_then_loads_from_the_cache(tmp_path):
    env = {**os.environ, "GCOFFLOAD_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("GCOFFLOAD_VERBOSE_BUILD", None)
    first = run_python(LOAD, env, tmp_path)
    assert first.returncode == 0, first.stderr
    notices = first.stderr.splitlines()
    assert len(notices) == 2, first.stderr
    assert "building the C++ extension once" in notices[0] and "about a minute" in notices[0]
    assert notices[1].startswith("gcoffload: the C++ extension built in ")
    library = Path(first.stdout.strip())
    assert library.is_file() and library.is_relative_to(tmp_path / "cache")
    assert f"torch-{torch.__version__}" in str(library.parent)

    second = run_python(LOAD, env, tmp_path)
    assert second.returncode == 0, second.stderr
    assert "building" not in second.stderr
    assert second.stdout.strip() == str(library)


# A CUDA build of torch on a machine with a CUDA toolkit and no GPU, as far as
# torch's build helper can tell when it is imported.
CUDA_TORCH_WITHOUT_GPU = """
import logging, torch
logging.basicConfig()
torch.cuda._is_compiled = lambda: True
torch.version.cuda = torch.version.cuda or "13.0"
torch.cuda.is_available = lambda: False
"""


@pytest.mark.parametrize("importer", ["torch", "gcoffload"])
def test_the_build_does_not_warn_about_a_cuda_runtime_it_never_uses(tmp_path, importer):
    env = {**os.environ, "CUDA_HOME": str(tmp_path)}
    code = CUDA_TORCH_WITHOUT_GPU + (
        "import torch.utils.cpp_extension"
        if importer == "torch"
        else "gcoffload.engine.extension._import_cpp_extension()"
    )
    if importer == "gcoffload":
        code = "import gcoffload.engine.extension\n" + code
    result = run_python(code, env, tmp_path)
    assert result.returncode == 0, result.stderr
    # torch's own import shows the warning is there to drop.
    assert ("No CUDA runtime is found" in result.stderr) == (importer == "torch"), result.stderr


def test_a_missing_compiler_is_a_runtime_error_that_says_what_to_install(tmp_path):
    env = {**os.environ, "GCOFFLOAD_CACHE_DIR": str(tmp_path), "CXX": "no-such-compiler"}
    result = run_python(LOAD, env, tmp_path)
    assert result.returncode != 0
    assert "RuntimeError" in result.stderr
    assert "no-such-compiler" in result.stderr and "apt install g++" in result.stderr


def test_a_missing_ninja_says_to_pip_install_it(monkeypatch):
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name: None if name == "ninja" else real_which(name))
    monkeypatch.setitem(sys.modules, "ninja", None)
    with pytest.raises(RuntimeError, match="pip install ninja"):
        _ext._require_toolchain()


def test_a_failed_build_quotes_the_compiler_error(tmp_path, monkeypatch):
    sources = tmp_path / "csrc"
    shutil.copytree(_ext.extension_info().source_dir, sources)
    broken = sources / "copy_engine.cpp"
    broken.write_text(broken.read_text() + "\nint gcoffload_broken_symbol = undeclared_identifier_xyz;\n")
    monkeypatch.setenv("GCOFFLOAD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("GCOFFLOAD_VERBOSE_BUILD", raising=False)
    broken_extension = _ext.CppExtension(
        "gcoffload", sources, _ext._SOURCES, _ext._CFLAGS, "the C++ extension"
    )
    with pytest.raises(RuntimeError) as failure:
        broken_extension.load()
    message = str(failure.value)
    assert "building the C++ extension failed" in message
    assert "undeclared_identifier_xyz" in message
    assert "GCOFFLOAD_VERBOSE_BUILD=1" in message


def test_cli_build_and_info(tmp_path):
    build = subprocess.run(
        [sys.executable, "-m", "gcoffload", "build"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert build.returncode == 0, build.stderr
    assert "extension ready" in build.stdout

    info = subprocess.run(
        [sys.executable, "-m", "gcoffload", "info", "--json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert info.returncode == 0, info.stderr
    report = json.loads(info.stdout)
    assert report["gcoffload"] == gcoffload.__version__
    assert report["torch"] == torch.__version__
    assert report["extension"]["built"] is True
    assert Path(report["extension"]["path"]).is_file()
    assert report["settings"]["over_budget"] == "keep", "info reports the host settings"
    assert report["stats"]["devices"] == {}, "info creates no engine"


@pytest.mark.usefixtures("users_device")
def test_cli_info_prints_nested_counters_as_indented_lines(capsys):
    assert main(["info"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert not any("{" in line for line in lines), "no mapping printed on one line"
    assert {"extension:", "settings:", "stats:", "  devices:", "  pools:"} <= set(lines)
    assert any(line.startswith("  host_budget_bytes: ") for line in lines)


def test_cli_errors_show_the_usage_of_the_subcommand_they_are_in(capsys):
    with pytest.raises(SystemExit) as raised:
        main(["info", "--bogus"])
    assert raised.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("usage: python -m gcoffload info [-h] [--json]")
    assert "unrecognized arguments: --bogus" in error


@pytest.mark.skipif(importlib.util.find_spec("llamafactory") is not None, reason="LLaMA-Factory is installed")
def test_the_llamafactory_command_without_llamafactory_says_how_to_install_it(capsys):
    assert main(["llamafactory", "train", "config.yaml"]) == 1
    assert "pip install llamafactory" in capsys.readouterr().err


def test_info_into_a_closed_pipe_prints_no_traceback(tmp_path):
    # `true` exits at once, long before gcoffload has imported torch: every write meets a closed pipe,
    # as the tail of `... | head` does.
    command = f"{sys.executable} -m gcoffload info --json | true"
    result = subprocess.run(command, shell=True, cwd=tmp_path, capture_output=True, text=True)
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, result.stderr


PLAIN_CHECKPOINTING = """
import torch
import gcoffload
from gcoffload.engine import extension

layers = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(3))
gcoffload.wrap_layers(layers, gcoffload.OffloadOptions(offload=False))
hidden = torch.randn(4, 16, requires_grad=True)
for layer in layers:
    hidden = layer(hidden)
hidden.sum().backward()
print(gcoffload.stats()["devices"]["cpu"]["recomputes"], extension.is_loaded())
"""


def test_plain_checkpointing_works_where_the_extension_cannot_build(tmp_path):
    env = {**os.environ, "GCOFFLOAD_CACHE_DIR": str(tmp_path / "empty-cache"), "CXX": "/nonexistent/c++"}
    result = run_python(PLAIN_CHECKPOINTING, env, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["3", "False"], (
        "three recomputes counted, and no extension built or loaded"
    )
    assert "building" not in result.stderr
