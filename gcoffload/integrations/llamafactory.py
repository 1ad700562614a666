"""LLaMA-Factory with gcoffload's checkpointing.

In place of ``llamafactory-cli train config.yaml``::

    python -m gcoffload llamafactory train config.yaml [key=value ...]
    torchrun --nproc_per_node 2 -m gcoffload llamafactory train config.yaml   # several processes

or, in a script of your own, call :func:`install` before LLaMA-Factory loads
the model. Either way LLaMA-Factory's gradient checkpointing (on unless
``disable_gradient_checkpointing: true``) goes through gcoffload, and
``use_unsloth_gc: true`` offloads each checkpointed layer's input to pinned
host memory; see :func:`gcoffload.prepare_model_for_training`.

``train`` runs LLaMA-Factory's trainer in this process, as each process of
``llamafactory-cli train`` does, and ends with one line per device saying how
many layer inputs gcoffload offloaded. Unlike the CLI, it does not start
``torchrun`` by itself on a multi-GPU machine (those processes would run
LLaMA-Factory without gcoffload): launch it with ``torchrun`` as above.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import sys

from ..autopilot.budget import MemoryBudget
from ..checkpointing.counters import stats
from ..checkpointing.options import DEFAULT_MIN_OFFLOAD_BYTES, OffloadOptions
from .hf import prepare_model_for_training

__all__ = ["add_arguments", "install", "main"]

INSTALL_HINT = (
    "LLaMA-Factory is not installed in this environment. Install it with `pip install llamafactory` "
    "(its own requirements pick transformers, peft and trl versions), then run this command again."
)

# Where LLaMA-Factory defines prepare_model_for_training and where it calls it
# (through a module-level name, looked up at each call).
_MODULES = ("llamafactory.model.model_utils.checkpointing", "llamafactory.model.patcher")


def install(options: OffloadOptions | None = None, memory_budget: object = None) -> None:
    """Makes LLaMA-Factory prepare every model it loads for training with gcoffload.

    Args:
        options: how checkpointed inputs are kept, used as given; None (the
            default): LLaMA-Factory's ``use_unsloth_gc`` says whether to offload.
        memory_budget: turns on the autopilot (see :func:`gcoffload.patch_model`).

    Raises:
        ModuleNotFoundError: LLaMA-Factory is not installed; the message says how to install it.
    """
    prepare = functools.partial(prepare_model_for_training, options=options, memory_budget=memory_budget)
    for name in _MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name is not None and error.name.split(".")[0] == "llamafactory":
                raise ModuleNotFoundError(INSTALL_HINT, name="llamafactory") from None
            raise
        module.prepare_model_for_training = prepare


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def _memory_budget(text: str) -> MemoryBudget:
    try:
        return MemoryBudget.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``llamafactory`` command's options to ``parser``."""
    tuning = parser.add_argument_group(
        "offload tuning", "given any of these, checkpointed inputs are offloaded whatever use_unsloth_gc says"
    )
    tuning.add_argument("--prefetch-depth", type=_non_negative, help="inputs copied back ahead (default 1)")
    tuning.add_argument("--keep-resident", type=_non_negative, help="last inputs kept on the GPU (default 1)")
    tuning.add_argument(
        "--min-offload-bytes",
        type=_non_negative,
        help=f"smaller layer inputs stay on the GPU (default {DEFAULT_MIN_OFFLOAD_BYTES})",
    )
    parser.add_argument(
        "--memory-budget",
        type=_memory_budget,
        help="turn on the autopilot: keep, swap, checkpoint or offload each layer, for the fastest step "
        "whose activations fit: bytes, a size such as 20GiB, a fraction of GPU memory such as 0.5, or auto",
    )
    parser.add_argument("command", choices=["train"], help="LLaMA-Factory's command")
    parser.add_argument("config", help="LLaMA-Factory's config file (.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value settings overriding the config file")


def _options(arguments: argparse.Namespace) -> OffloadOptions | None:
    tuned = {
        name: getattr(arguments, name)
        for name in ("prefetch_depth", "keep_resident", "min_offload_bytes")
        if getattr(arguments, name) is not None
    }
    return OffloadOptions(offload=True, **tuned) if tuned else None


def main(arguments: argparse.Namespace) -> int:
    """``[options] train CONFIG [key=value ...]``: LLaMA-Factory's ``train``, with gcoffload."""
    try:
        install(_options(arguments), memory_budget=arguments.memory_budget)
    except ModuleNotFoundError as error:
        if error.name != "llamafactory":
            raise
        print(f"gcoffload: {error}", file=sys.stderr)
        return 1
    from llamafactory.train.tuner import run_exp

    # LLaMA-Factory reads the config file and its overrides from sys.argv.
    sys.argv = [sys.argv[0], arguments.config, *arguments.overrides]
    run_exp()
    for device, counters in stats()["devices"].items():
        print(
            f"gcoffload: {device}: {counters['checkpointed_layers']} checkpointed layer calls, "
            f"{counters.get('offloads', 0)} inputs offloaded "
            f"({counters.get('offloaded_bytes', 0) / 2**20:.1f} MiB), "
            f"{counters.get('prefetch_hits', 0)} of them prefetched",
            file=sys.stderr,
        )
    return 0
