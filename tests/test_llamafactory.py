"""The real LLaMA-Factory, trained through ``python -m gcoffload llamafactory``, against its own run.

LLaMA-Factory pins its own versions of transformers, PEFT and TRL, so it lives
in an environment of its own (see .ci/run: torch 2.9.1, whose torchaudio build
its multimodal data module imports), where these tests run alone; they are
skipped where it is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import hf_models
import pytest

pytestmark = pytest.mark.hf
if importlib.util.find_spec("llamafactory") is None:
    pytest.skip(
        "LLaMA-Factory is not installed (CI runs these in an environment of its own)", allow_module_level=True
    )

import yaml  # noqa: E402  (LLaMA-Factory depends on it)

STEPS = 3
LAYERS = 4
TIMEOUT_S = 600


def write_model_and_data(root: Path) -> tuple[Path, Path]:
    """A tiny Llama with its tokenizer, and an Alpaca-format dataset, saved locally (no hub)."""
    model_dir, data_dir = root / "model", root / "data"
    hf_models.model("llama", layers=LAYERS).save_pretrained(model_dir)
    hf_models.tokenizer().save_pretrained(model_dir)
    ids = hf_models.batch(size=2 * STEPS, length=16, seed=11).clamp(min=2)
    records = [
        {"instruction": hf_models.words(row[:8]), "input": "", "output": hf_models.words(row[8:])}
        for row in ids
    ]
    data_dir.mkdir()
    (data_dir / "tiny.json").write_text(json.dumps(records))
    (data_dir / "dataset_info.json").write_text(json.dumps({"tiny": {"file_name": "tiny.json"}}))
    return model_dir, data_dir


def write_config(root: Path, model_dir: Path, data_dir: Path, name: str, use_unsloth_gc: bool) -> Path:
    config = {
        "model_name_or_path": str(model_dir),
        "stage": "sft",
        "do_train": True,
        "finetuning_type": "lora",
        "lora_target": "q_proj,v_proj",
        "dataset": "tiny",
        "dataset_dir": str(data_dir),
        "template": "empty",
        "cutoff_len": 32,
        "overwrite_cache": True,
        "output_dir": str(root / name),
        "logging_steps": 1,
        "save_strategy": "no",
        "per_device_train_batch_size": 2,
        "learning_rate": 1.0e-2,
        "max_steps": STEPS,
        "report_to": "none",
        "seed": 7,
        "use_unsloth_gc": use_unsloth_gc,
        "plot_loss": False,
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def train(command: list[str], config: Path) -> tuple[list[float], str]:
    """Runs one training in a fresh process; returns its per-step losses (LLaMA-Factory's log) and stderr."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, "-m", *command, "train", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    log = Path(yaml.safe_load(config.read_text())["output_dir"]) / "trainer_log.jsonl"
    losses = [entry["loss"] for entry in map(json.loads, log.read_text().splitlines()) if "loss" in entry]
    return losses, result.stderr


def test_use_unsloth_gc_offloads_and_matches_llama_factorys_own_run(tmp_path):
    model_dir, data_dir = write_model_and_data(tmp_path)
    expected, _ = train(["llamafactory.cli"], write_config(tmp_path, model_dir, data_dir, "stock", False))
    patched = ["gcoffload", "llamafactory", "--min-offload-bytes", "0"]  # the tiny model's inputs are 4 KiB
    losses, stderr = train(patched, write_config(tmp_path, model_dir, data_dir, "gcoffload", True))
    assert len(expected) == STEPS and losses == expected
    (summary,) = [line for line in stderr.splitlines() if line.startswith("gcoffload: cpu:")]
    assert f"{STEPS * LAYERS} checkpointed layer calls, {STEPS * (LAYERS - 1)} inputs offloaded" in summary, (
        summary
    )
