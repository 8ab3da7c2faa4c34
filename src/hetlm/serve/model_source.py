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

import os
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


def looks_local(text: str) -> bool:
    """A path, not a hub id: starts with ``./ ../ / ~`` (or is ``.``/``..``), starts with
    ``runs/``, has more than one ``/`` (hub ids are ``name`` or ``org/name``), uses the OS's own
    separator, or has a parent folder that exists here."""
    if text.startswith(("/", "~", "./", "../")) or text in (".", "..") or text.startswith(
            "runs/"):
        return True
    if text.count("/") > 1 or (os.sep != "/" and os.sep in text):
        return True
    parent = Path(text).parent
    return str(parent) not in ("", ".") and parent.is_dir()


def resolve_model_source(spec: str | Path, what: str = "model") -> ModelSource:
    """A local folder with a ``config.json``, or a hub id; a missing local-looking path is a
    HetlmError that never reaches the hub."""
    text = str(spec)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise HetlmError(f"{what} {text} is a file: pass the folder save_pretrained wrote")
        if not (path / "config.json").is_file():
            raise HetlmError(f"{what} folder {text} has no config.json (expected a folder "
                             "written by save_pretrained)")
        return ModelSource(str(path), local=True)
    if isinstance(spec, Path) or looks_local(text):
        raise HetlmError(f"{what} {text}: no such folder (a local path is never looked up on "
                         "the hub): check the path, or give a hub name like org/name")
    return ModelSource(text, local=False)


def hub_error(source: ModelSource, exc: BaseException, what: str = "model") -> HetlmError:
    """A one-line error for a hub name that could not be loaded, saying where it was looked
    up (the cache under HF_HOME, offline or not)."""
    from huggingface_hub import constants

    first = " ".join(str(exc).split())[:300]
    offline = "HF_HUB_OFFLINE is set, so only" if constants.HF_HUB_OFFLINE else "the hub and"
    return HetlmError(f"cannot load {what} {source.location!r} (no such local folder, so it was "
                      f"taken as a hub name; {offline} the cache {constants.HF_HUB_CACHE} were "
                      f"searched): {first}")


def check_causal_lm(config: Any, name: str = "the model") -> None:
    """Refuse a model that cannot generate left to right (a masked LM, a classifier)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    def names(mapping: dict[str, Any]) -> set[str]:
        out: set[str] = set()
        for value in mapping.values():
            out.update(value if isinstance(value, (list, tuple)) else [value])
        return out

    causal = names(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    architectures = list(getattr(config, "architectures", None) or [])
    fix = ("hetlm chat/serve generate text left to right; pass a causal LM (a LLaMA-style model, "
           "e.g. from `hetlm sft` or its `hetlm export --merge`)")
    if architectures:
        if any(a in causal or a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
            return
        arch = architectures[0]
        masked = arch in names(MODEL_FOR_MASKED_LM_MAPPING_NAMES) or arch.endswith(
            ("ForMaskedLM", "ForPreTraining"))
        kind = f"a masked LM ({arch})" if masked else f"a {arch}"
        raise HetlmError(f"{name}: this is {kind}, not a causal LM: {fix}")
    model_type = getattr(config, "model_type", None)
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder",
                                                                        False):
        raise HetlmError(f"{name}: this is a masked LM (model type {model_type}), not a causal "
                         f"LM: {fix}")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise HetlmError(f"{name}: model type {model_type} has no causal-LM head, so it cannot "
                         f"generate: {fix}")


def hub_file(source: ModelSource, filename: str) -> Path | None:
    """``filename`` from the model's folder or hub repo (resolved like transformers does), or
    None when the model has no such file."""
    if source.local:
        path = Path(source.location) / filename
        return path if path.is_file() else None
    from transformers.utils import cached_file

    found = cached_file(source.location, filename, _raise_exceptions_for_missing_entries=False,
                        _raise_exceptions_for_connection_errors=False,
                        _raise_exceptions_for_gated_repo=False)
    return Path(found) if found else None
