"""Naming, checking and loading the checkpoints to evaluate.

A checkpoint is a folder written by ``save_pretrained`` (model + tokenizer) or a hub name. The
checks here turn the silent failures of ``transformers`` into one-line errors: version 5 loads a
folder without tokenizer files as an *empty* tokenizer (every token unknown), which would give
plausible-looking but meaningless numbers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hetlm.errors import HetlmError

# Files that make a folder a tokenizer for AutoTokenizer (fast and slow formats of the families
# hetlm evaluates: BERT/ELECTRA WordPiece, RoBERTa BPE, DeBERTaV2/LLaMA SentencePiece).
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "spiece.model",
    "spm.model",
    "tokenizer.model",
    "sentencepiece.bpe.model",
    "sentencepiece.model",
    "vocab.json",
)
MIN_VOCAB = 16


@dataclass(frozen=True)
class ModelSpec:
    """A checkpoint and the name it has in the table."""

    name: str
    path: str

    @property
    def is_local(self) -> bool:
        return Path(self.path).expanduser().exists()


def parse_model_specs(values: Sequence[str]) -> list[ModelSpec]:
    """``--model`` values: ``PATH``, ``HUB/NAME`` or ``LABEL=PATH``; names made unique.

    A plain path is named by its last components, as many as it takes to tell the models apart
    (``runs/a/model`` and ``runs/b/model`` become ``a/model`` and ``b/model``).
    """
    if not values:
        raise HetlmError("no model given: pass --model DIR (several --model for one table)")
    labels: list[str | None] = []
    paths: list[str] = []
    for value in values:
        label, sep, path = value.partition("=")
        if sep and label and "/" not in label and path:
            labels.append(label)
            paths.append(path)
        else:
            labels.append(None)
            paths.append(value)
    names = _short_names(paths)
    specs = [
        ModelSpec(label or name, path)
        for label, name, path in zip(labels, names, paths, strict=True)
    ]
    seen = [s.name for s in specs]
    duplicates = sorted({n for n in seen if seen.count(n) > 1})
    if duplicates:
        raise HetlmError(
            f"two --model values have the name {duplicates[0]!r}: give them labels "
            "(--model LABEL=PATH)"
        )
    return specs


def _short_names(paths: Sequence[str]) -> list[str]:
    parts = [Path(p.rstrip("/")).parts or (p,) for p in paths]
    for depth in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return list(paths)


def check_model(spec: ModelSpec) -> None:
    """Refuse a missing folder, one without a model config, or one without tokenizer files."""
    from hetlm.models.source import resolve_model_source

    path = Path(resolve_model_source(spec.path, "model")).expanduser()
    if not path.exists():
        return  # a hub name: transformers resolves it (from the local cache when offline)
    if not path.is_dir():
        raise HetlmError(f"model {spec.path} is a file: pass the checkpoint folder")
    if not (path / "config.json").is_file():
        raise HetlmError(
            f"{spec.path} has no config.json: it is not a transformers checkpoint "
            "(pass the folder that save_pretrained wrote)"
        )
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise HetlmError(
            f"{spec.path} has no tokenizer files ({', '.join(TOKENIZER_FILES)}): "
            "save the tokenizer next to the model (tokenizer.save_pretrained) or "
            "copy the tokenizer folder's files into it"
        )


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence load reports and progress bars while loading (the table is the output)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()


def load_tokenizer(spec: ModelSpec) -> Any:
    """The checkpoint's tokenizer, refusing an empty or broken one."""
    from transformers import AutoTokenizer

    check_model(spec)
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(spec.path)
    except Exception as exc:  # any load failure is a problem with the user's checkpoint
        where = "" if spec.is_local else " (no such folder here; tried it as a hub model name)"
        raise HetlmError(
            f"cannot load the tokenizer of {spec.path}{where}: {_one_line(exc)}"
        ) from exc
    if len(tokenizer) < MIN_VOCAB:
        raise HetlmError(
            f"the tokenizer of {spec.path} has only {len(tokenizer)} tokens: it is "
            "empty or broken; save the real tokenizer into the checkpoint folder"
        )
    return tokenizer


def load_config(spec: ModelSpec) -> Any:
    from transformers import AutoConfig

    check_model(spec)
    try:
        return AutoConfig.from_pretrained(spec.path)
    except Exception as exc:
        raise HetlmError(f"cannot read the model config of {spec.path}: {_one_line(exc)}") from exc


def check_positions(spec: ModelSpec, length: int, option: str) -> None:
    """Refuse sequences longer than the model's position embeddings (an index error later)."""
    positions = getattr(load_config(spec), "max_position_embeddings", None)
    if isinstance(positions, int) and length > positions:
        raise HetlmError(
            f"{option} {length} exceeds the {positions} positions of {spec.path}: lower {option}"
        )


def is_causal_lm(config: Any) -> bool:
    """Whether a checkpoint is a decoder (next-token loss) rather than an encoder (masked LM);
    the rule is ``hetlm.models.source.model_kind``."""
    from hetlm.models.source import is_causal_lm as rule

    return rule(config)


def load_model(spec: ModelSpec, auto_class: Any, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
    """``auto_class.from_pretrained`` with its loading info, errors as one line."""
    check_model(spec)
    try:
        with quiet_transformers():
            model, info = auto_class.from_pretrained(spec.path, output_loading_info=True, **kwargs)
    except Exception as exc:
        raise HetlmError(
            f"cannot load {spec.path} as {auto_class.__name__}: {_one_line(exc)}"
        ) from exc
    return model, info


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; other names are checked.

    Evaluation runs in fp32 on any device, so a table does not depend on where it was made
    beyond floating-point noise.
    """
    import torch

    if name == "auto":
        from hetlm.train.devices import default_device

        return default_device()
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise HetlmError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda":
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if visible == 0 or (device.index is not None and device.index >= visible):
            raise HetlmError(
                f"device {name} requested but {visible} CUDA GPU(s) are visible: "
                "use --device cpu or a visible GPU"
            )
    return name


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:400] + (" ..." if len(text) > 400 else "")
