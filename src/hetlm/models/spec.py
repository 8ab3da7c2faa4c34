"""A model named the way hetlm's commands name one: ``TYPE-PRESET`` (``bert-base``,
``llama-7b``) or a folder / ``config.json`` of a Hugging Face model. The planner, the probe and
their commands resolve it here (the library never reaches into the command line for it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hetlm.errors import HetlmError
from hetlm.models.presets import MODEL_TYPES, presets_for


def split_spec(spec: str) -> tuple[str, str] | None:
    """("bert", "base") for "bert-base" (any model type and its presets), else None."""
    for model_type in sorted(MODEL_TYPES, key=len, reverse=True):  # deberta-v2 before others
        if spec.startswith(model_type + "-"):
            preset = spec[len(model_type) + 1 :]
            if preset in presets_for(model_type):
                return model_type, preset
    return None


def resolve_model(spec: str, vocab_size: int, seq_len: int) -> tuple[Any, str]:
    """(transformers config, display name) for ``TYPE-PRESET`` (``bert-base``, ``llama-7b``)
    or a config directory/file."""
    from hetlm.models.presets import model_config

    parts = split_spec(spec)
    path = Path(spec).expanduser()
    if parts is not None and not path.exists():
        model_type, preset = parts
        config = model_config(
            model_type,
            preset,
            vocab_size=vocab_size,
            max_position_embeddings=max(512, seq_len),
            pad_token_id=0,
        )
        return config, spec
    if path.is_file() and path.name.endswith(".json"):
        path = path.parent
    if not (path / "config.json").is_file():
        raise HetlmError(
            f"--model {spec!r} is neither a preset (--model-type TYPE --preset NAME) nor a "
            "directory with a config.json: give one of those"
        )
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise HetlmError(f"cannot read the model config in {path}: {exc}") from None
    limit = getattr(config, "max_position_embeddings", None)
    if limit and seq_len > limit:
        raise HetlmError(
            f"--seq-len {seq_len} exceeds the model's max_position_embeddings "
            f"{limit}: use --seq-len {limit} or less"
        )
    return config, path.name
