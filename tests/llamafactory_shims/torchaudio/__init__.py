"""A stand-in for torchaudio, which has no build for the CPU torch the tests run on.

LLaMA-Factory 0.9.5 imports torchaudio at the top of its multimodal data module
(``llamafactory/data/mm_plugin.py``), which every training run imports, even a
text-only one that never loads audio. With this directory on ``sys.path`` that
import succeeds, and any use of torchaudio fails with an error that says why.
"""


def __getattr__(name: str) -> object:
    raise AttributeError(
        f"torchaudio.{name}: torchaudio is not installed; this placeholder (tests/llamafactory_shims) "
        "only lets LLaMA-Factory's text-only training import its multimodal data module"
    )
