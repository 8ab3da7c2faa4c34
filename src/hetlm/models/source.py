"""Where a model or tokenizer comes from, decided once for every command.

``resolve_model_source(name_or_path, what)`` is the one rule (``prepare --tokenizer``, ``sft``'s
``model.init_from``, ``pretrain``'s ``model.init_from``, ``eval --model``; ``chat``/``serve`` may
use it too): an existing folder is used as it is; a name that *looks* local never goes to the
hub, where a typo would cost a minute of retries and end in a connection error, but fails at
once with "no such folder". Hub ids are ``name`` or ``org/name``; local-looking is anything
else: ``./x``, ``../x``, ``/x``, ``~/x``, ``a/b/c``, a trailing ``/``, ``runs/x`` (hetlm's
usual output folder), or ``p/x`` where the folder ``p`` exists here (``runs/tokk`` for a typo
of ``runs/tok``).

``model_kind`` / ``require_causal_lm`` / ``check_positions`` are the checks on a model config
that commands needing a causal LM (``sft``, ``chat``, ``serve``) or a sequence length make
before loading any weights.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any

from hetlm.errors import HetlmError

# First path components that are hetlm's local folders, never hub organisations.
LOCAL_PREFIXES = ("runs",)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")


def looks_local(name_or_path: str | Path) -> bool:
    """Whether a name that does not exist must have meant a local folder (see the module)."""
    if isinstance(name_or_path, Path):
        return True
    text = str(name_or_path)
    if text.startswith(("/", ".", "~")) or text.endswith("/") or (os.sep != "/" and os.sep in text):
        return True
    if not _HUB_ID.match(text):
        return True
    if "/" in text:
        first = text.split("/", 1)[0]
        return first in LOCAL_PREFIXES or Path(first).is_dir()
    return False


def resolve_model_source(name_or_path: str | Path, what: str) -> str:
    """An existing local path (``~`` expanded), or a hub name unchanged; a local-looking name
    that does not exist raises a one-line HetlmError at once. ``what`` names the option in the
    message (e.g. ``"model.init_from"``, ``"--tokenizer"``)."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.exists():
        return str(path)
    if not looks_local(name_or_path):
        return text
    raise HetlmError(
        f"{what} {text}: no such folder (relative to {Path.cwd()}){_hint(path)}; "
        "check the path (a hub name is org/name)"
    )


def _hint(path: Path) -> str:
    """`` (did you mean runs/tok?)`` when the parent folder has a close name."""
    parent = path.parent
    if not parent.is_dir():
        return ""
    try:
        names = [p.name for p in parent.iterdir()]
    except OSError:
        return ""
    close = difflib.get_close_matches(path.name, names, n=1, cutoff=0.6)
    return f" (did you mean {parent / close[0]}?)" if close else ""


# ---------------------------------------------------------------- what the config says


def model_kind(config: Any) -> str:
    """``causal`` (a decoder: next-token loss), ``masked`` (an encoder: masked LM) or
    ``other``. The saved architecture decides when it says; otherwise the model type's
    registration, the masked-LM one first (BERT has a causal-LM class too, but is an encoder).
    """
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_MASKED_LM_MAPPING

    for arch in getattr(config, "architectures", None) or []:
        if arch.endswith(("ForCausalLM", "LMHeadModel")):
            return "causal"
        if arch.endswith(("ForMaskedLM", "ForPreTraining")):
            return "masked"
    if type(config) in MODEL_FOR_MASKED_LM_MAPPING:
        return "masked"
    return "causal" if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING else "other"


def is_causal_lm(config: Any) -> bool:
    """Whether a checkpoint is a decoder (next-token loss) rather than an encoder."""
    return model_kind(config) == "causal"


def require_causal_lm(config: Any, source: str, what: str, command: str) -> None:
    """Refuse a masked LM (or any non-decoder) where ``command`` generates or trains on next
    tokens, in one line, before loading weights into the wrong head."""
    kind = model_kind(config)
    if kind == "causal":
        return
    arch = (getattr(config, "architectures", None) or [type(config).__name__])[0]
    what_it_is = "a masked LM" if kind == "masked" else "not a causal LM"
    raise HetlmError(
        f"{what} {source} is {what_it_is} ({arch}), {command} needs a causal LM (LLaMA family)"
    )


def check_positions(
    config: Any, length: int, option: str, source: str, what: str, fix: str | None = None
) -> None:
    """Refuse sequences longer than the model's position table (``max_position_embeddings``):
    an absolute table would crash on them, rotary positions were never trained that far.
    ``fix``: how to shorten them (default: ``set <option>: <positions> or less``)."""
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and length > positions:
        fix = (fix or "set {option}: {positions} or less").format(
            option=option, positions=positions
        )
        raise HetlmError(
            f"{option} {length} is longer than the {positions} positions of {what} "
            f"{source} (max_position_embeddings): {fix}"
        )
