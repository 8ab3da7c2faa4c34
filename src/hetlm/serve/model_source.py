"""Where a served model comes from, and whether it can be served at all.

``hetlm chat``/``serve --model`` takes a local folder or a hub name, like ``sft``, ``eval`` and
``prepare``. A hub name is handed to transformers' ``from_pretrained`` as it is, so it resolves
exactly as transformers resolves it: the local cache under ``HF_HOME`` first, no network with
``HF_HUB_OFFLINE=1``. A *local-looking* path that does not exist is a typo, never a hub name: it
gets a one-line "no such folder" error at once instead of a minute of hub retries.

Generation needs a causal LM. transformers maps BERT-like configs to a causal class too
(``BertLMHeadModel``), so a masked LM would load and then fail in generation; the architectures
the checkpoint was saved with say what it is, and a masked LM is refused up front.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hetlm.errors import HetlmError


@dataclass(frozen=True)
class ModelSource:
    """What ``from_pretrained`` gets: a local folder, or a hub id (``local`` False)."""

    location: str
    local: bool

    @property
    def label(self) -> str:
        """The default model name: the folder's name, or the hub id."""
        return Path(self.location).resolve().name if self.local else self.location


def resolve_model_source(spec: str | Path, what: str = "model") -> ModelSource:
    """A local folder with a ``config.json``, or a hub id; a missing local-looking path is a
    HetlmError that never reaches the hub (the rule of ``hetlm.models.source``, shared by every
    command)."""
    from hetlm.models.source import resolve_model_source as resolve

    text = str(spec)
    location = resolve(spec, what)
    path = Path(location)
    if not path.exists():
        return ModelSource(text, local=False)
    if not path.is_dir():
        raise HetlmError(f"{what} {text} is a file: pass the folder save_pretrained wrote")
    if not (path / "config.json").is_file():
        raise HetlmError(
            f"{what} folder {text} has no config.json (expected a folder "
            "written by save_pretrained)"
        )
    return ModelSource(str(path), local=True)


def hub_error(source: ModelSource, exc: BaseException, what: str = "model") -> HetlmError:
    """A one-line error for a hub name that could not be loaded, saying where it was looked
    up (the cache under HF_HOME, offline or not)."""
    from huggingface_hub import constants

    first = " ".join(str(exc).split())[:300]
    offline = "HF_HUB_OFFLINE is set, so only" if constants.HF_HUB_OFFLINE else "the hub and"
    return HetlmError(
        f"cannot load {what} {source.location!r} (no such local folder, so it was "
        f"taken as a hub name; {offline} the cache {constants.HF_HUB_CACHE} were "
        f"searched): {first}"
    )


def check_causal_lm(config: Any, name: str = "the model") -> None:
    """Refuse a model that cannot generate left to right (a masked LM, a classifier), by the
    shared rule ``hetlm.models.source.model_kind``."""
    from hetlm.models.source import model_kind

    kind = model_kind(config)
    if kind == "causal":
        return
    fix = (
        "hetlm chat/serve generate text left to right; pass a causal LM (a LLaMA-style model, "
        "e.g. from `hetlm sft` or its `hetlm export --merge`)"
    )
    arch = (getattr(config, "architectures", None) or [None])[0]
    label = arch or f"model type {getattr(config, 'model_type', '?')}"
    what = f"a masked LM ({label})" if kind == "masked" else f"a {label} without a causal-LM head"
    raise HetlmError(f"{name}: this is {what}, not a causal LM: {fix}")


def hub_file(source: ModelSource, filename: str) -> Path | None:
    """``filename`` from the model's folder or hub repo (resolved like transformers does), or
    None when the model has no such file."""
    if source.local:
        path = Path(source.location) / filename
        return path if path.is_file() else None
    from transformers.utils import cached_file

    found = cached_file(
        source.location,
        filename,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
        _raise_exceptions_for_gated_repo=False,
    )
    return Path(found) if found else None
