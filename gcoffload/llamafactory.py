"""LLaMA-Factory with gcoffload's checkpointing.

In place of ``llamafactory-cli train config.yaml``::

    python -m gcoffload.llamafactory train config.yaml [key=value ...]
    torchrun --nproc_per_node 2 -m gcoffload.llamafactory train config.yaml   # several processes

or, in a script of your own, call :func:`install` before LLaMA-Factory loads
the model. Either way LLaMA-Factory's gradient checkpointing (on unless
``disable_gradient_checkpointing: true``) goes through gcoffload, and
``use_unsloth_gc: true`` offloads each checkpointed layer's input to pinned
host memory; see :func:`gcoffload.hf.prepare_model_for_training`.

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

from .budget import MemoryBudget
from .engine import stats
from .hf import prepare_model_for_training
from .saved_input import DEFAULT_MIN_OFFLOAD_BYTES, OffloadOptions

__all__ = ["install", "main"]

# Where LLaMA-Factory defines prepare_model_for_training and where it calls it
# (through a module-level name, looked up at each call).
_MODULES = ("llamafactory.model.model_utils.checkpointing", "llamafactory.model.patcher")


def install(options: OffloadOptions | None = None, memory_budget: object = None) -> None:
    """Makes LLaMA-Factory prepare every model it loads for training with gcoffload.

    Args:
        options: ``prefetch_depth``, ``keep_resident`` and ``min_offload_bytes``
            (default: :class:`gcoffload.OffloadOptions`'s); LLaMA-Factory's
            ``use_unsloth_gc`` says whether to offload.
        memory_budget: turns on the autopilot (see :func:`gcoffload.patch_model`).

    Raises:
        ModuleNotFoundError: LLaMA-Factory is not installed.
    """
    prepare = functools.partial(prepare_model_for_training, options=options, memory_budget=memory_budget)
    for name in _MODULES:
        importlib.import_module(name).prepare_model_for_training = prepare


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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gcoffload.llamafactory",
        description="LLaMA-Factory's train command with gcoffload's checkpointing.",
    )
    parser.add_argument("--prefetch-depth", type=_non_negative, default=1, help="inputs copied back ahead")
    parser.add_argument("--keep-resident", type=_non_negative, default=1, help="last inputs kept on the GPU")
    parser.add_argument(
        "--min-offload-bytes",
        type=_non_negative,
        default=DEFAULT_MIN_OFFLOAD_BYTES,
        help="smaller layer inputs stay on the GPU",
    )
    parser.add_argument(
        "--memory-budget",
        type=_memory_budget,
        help="turn on the autopilot: keep, checkpoint or offload each layer, for the fastest step whose "
        "activations fit: bytes, a size such as 20GiB, a fraction of GPU memory such as 0.5, or auto",
    )
    parser.add_argument("command", choices=["train"], help="LLaMA-Factory's command")
    parser.add_argument("config", help="LLaMA-Factory's config file (.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value settings overriding the config file")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``[options] train CONFIG [key=value ...]``: LLaMA-Factory's ``train``, with gcoffload."""
    arguments = _parser().parse_args(argv)
    install(
        OffloadOptions(True, arguments.prefetch_depth, arguments.keep_resident, arguments.min_offload_bytes),
        memory_budget=arguments.memory_budget,
    )
    from llamafactory.train.tuner import run_exp

    # LLaMA-Factory reads the config file and its overrides from sys.argv.
    sys.argv = [sys.argv[0], arguments.config, *arguments.overrides]
    run_exp()
    for device, counters in stats()["engines"].items():
        print(
            f"gcoffload: {device}: {counters['checkpointed_layers']} checkpointed layer calls, "
            f"{counters['offloads']} inputs offloaded ({counters['offloaded_bytes'] / 2**20:.1f} MiB), "
            f"{counters['prefetch_hits']} of them prefetched",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
