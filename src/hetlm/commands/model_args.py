"""The model options of ``hetlm plan`` and ``hetlm probe``, named as in the run config.

``--model-type`` and ``--preset`` are ``model.type`` and ``model.preset``; ``--model DIR`` is a
folder (or ``config.json``) of a Hugging Face model, as ``model.init_from``. The old spelling
``--model bert-base`` is still accepted, with a deprecation line.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hetlm.errors import HetlmError
from hetlm.models.presets import MODEL_TYPES, presets_for
from hetlm.models.spec import split_spec
from hetlm.names import warn_renamed


def add_model_arguments(parser: argparse.ArgumentParser, default_preset: str | None) -> None:
    parser.add_argument(
        "--model-type",
        choices=MODEL_TYPES,
        default=None,
        help="model.type of the run (default bert)",
    )
    preset_default = f" (default {default_preset})" if default_preset else ""
    parser.add_argument(
        "--preset",
        default=None,
        help="model.preset of the run: tiny|small|base|large, llama also "
        f"1b|7b|13b{preset_default}",
    )
    parser.add_argument(
        "--model",
        default=None,
        metavar="DIR",
        help="instead of a preset: a directory / config.json of a Hugging Face "
        "model config (e.g. the model.init_from of the run)",
    )


def model_spec(args: argparse.Namespace, default_preset: str | None) -> str:
    """``TYPE-PRESET`` or a model directory, from --model-type/--preset or --model."""
    if args.model is not None:
        if args.model_type is not None or args.preset is not None:
            raise HetlmError("give either --model DIR or --model-type/--preset, not both")
        parts = split_spec(args.model)
        if parts is not None and not Path(args.model).expanduser().exists():
            warn_renamed(f"--model {args.model}", f"--model-type {parts[0]} --preset {parts[1]}")
        return args.model
    preset = args.preset or default_preset
    if preset is None:
        raise HetlmError(
            "give the model: --model-type TYPE --preset NAME (as model.type and "
            "model.preset in the run config), or --model DIR (a model folder)"
        )
    model_type = args.model_type or "bert"
    if preset not in presets_for(model_type):
        raise HetlmError(
            f"--preset {preset!r} is not a {model_type} preset: choose one of "
            f"{', '.join(presets_for(model_type))}"
        )
    return f"{model_type}-{preset}"
