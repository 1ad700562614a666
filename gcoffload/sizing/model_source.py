"""A model's config from what a user names: a ``config.json``, a model directory, or a hub id."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["load_config"]


def load_config(model: Any) -> Any:
    """The transformers config of ``model``: a config, a ``config.json`` path, a directory or a hub id.

    Only the config is read; no weights are downloaded.

    Raises:
        ValueError: the file is not a model config, or the hub cannot be
            reached (the message gives the local-config route).
        ImportError: transformers is missing.
    """
    try:
        import transformers
    except ImportError:
        raise ImportError("gcoffload plan needs transformers: pip install 'gcoffload[hf]'") from None
    if isinstance(model, transformers.PretrainedConfig):
        return model
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a config, a config.json path, a directory or a hub id, got {model!r}")
    path = Path(model).expanduser()
    if path.is_file():
        return _from_file(path, transformers)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"model: {path} is a directory without a config.json")
        return _from_file(path / "config.json", transformers)
    try:
        return transformers.AutoConfig.from_pretrained(str(model))
    except OSError as error:
        raise ValueError(
            f"model: {str(model)!r} is no local file or directory, and its config could not be fetched from "
            f"the Hugging Face Hub ({str(error).splitlines()[0]}). Download its config.json where there is "
            f"network (https://huggingface.co/{model}/blob/main/config.json) and pass the file: "
            "python -m gcoffload plan ./config.json"
        ) from None


def _from_file(path: Path, transformers: Any) -> Any:
    try:
        values = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"model: {path} is not a readable JSON config ({error})") from None
    model_type = values.pop("model_type", None) if isinstance(values, dict) else None
    if model_type is None:
        raise ValueError(f"model: {path} has no 'model_type'; is it a transformers config.json?")
    try:
        return transformers.AutoConfig.for_model(model_type, **values)
    except ValueError as error:
        raise ValueError(f"model: {path}: {error}") from None
