"""One vocabulary of names: the old spellings of config keys and command-line flags.

Every idea has one name in every command and config, taken from transformers'
``TrainingArguments`` where it has one (``learning_rate``, ``warmup_ratio``,
``lr_scheduler_type``, ``adam_epsilon``, ``save_total_limit``, ``logging_steps`` ...). The
spellings used before stay accepted: each one used prints one line
``hetlm: warning: <old> is deprecated, use <new>`` (once per process, and under a multi-rank
launch on rank 0 only) and means exactly the new name. docs/CONFIG.md has the table.
"""

from __future__ import annotations

import argparse
import os
import warnings
from typing import Any

from hetlm.errors import HetlmError, HetlmWarning

# (section, old key) -> new key, for the pretraining and SFT configs.
RENAMED_KEYS: dict[tuple[str, str], str] = {
    ("train", "lr"): "learning_rate",
    ("train", "adam_eps"): "adam_epsilon",
    ("train", "adam_betas"): "adam_beta1, adam_beta2",  # one pair -> two keys
    ("train", "keep_last"): "save_total_limit",
    ("train", "checkpoint_every"): "save_steps",
    ("train", "eval_every"): "eval_steps",
    ("train", "log_every"): "logging_steps",
    ("train", "eval_batch"): "per_device_eval_batch_size",
    ("train", "eval_samples"): "max_eval_samples",
    ("model", "path"): "init_from",  # hetlm sft: the base model
    ("data", "source"): "dataset",  # hetlm sft: the instruction data
}

# Old command-line flags are declared where the flag is, with ``action=RenamedFlag`` (below), or
# in hetlm.commands.model_args (``--model bert-base``).


def warn_renamed(old: str, new: str) -> None:
    """The deprecation line, once: not again on the other ranks of a launch (every rank parses
    the config; the launching process has printed it already under ``--local-nodes``)."""
    if os.environ.get("RANK", "0") != "0" or "HETLM_RESTART_COUNT" in os.environ:
        return
    warnings.warn(f"{old} is deprecated, use {new}", HetlmWarning, stacklevel=3)


def rename_config_keys(raw: Any) -> Any:
    """A raw config mapping with the old keys under their new names (a warning for each);
    both an old and a new name for the same setting is an error."""
    if not isinstance(raw, dict):
        return raw
    raw = dict(raw)
    for (section, old), new in RENAMED_KEYS.items():
        part = raw.get(section)
        if not isinstance(part, dict) or old not in part:
            continue
        part = raw[section] = dict(part)
        value = part.pop(old)
        targets = [name.strip() for name in new.split(",")]
        clash = [name for name in targets if name in part]
        if clash:
            raise HetlmError(
                f"{section}.{old} and {section}.{clash[0]} are the same setting: "
                f"keep {section}.{clash[0]} only ({section}.{old} is its old name)"
            )
        warn_renamed(f"{section}.{old}", ", ".join(f"{section}.{name}" for name in targets))
        if len(targets) == 1:
            part[targets[0]] = value
        elif isinstance(value, list | tuple) and len(value) == len(targets):
            part.update(zip(targets, value, strict=True))
        else:
            raise HetlmError(
                f"{section}.{old} must be a pair [beta1, beta2]; better, give "
                f"{', '.join(f'{section}.{name}' for name in targets)}"
            )
    return raw


class RenamedFlag(argparse.Action):
    """A flag whose first option string is its name and the others its old spellings:
    ``add_argument("--learning-rate", "--lr", dest="lr", action=RenamedFlag, type=float)``
    stores the value either way and warns when an old spelling was used."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if option_string is not None and option_string != self.option_strings[0]:
            warn_renamed(option_string, self.option_strings[0])
        setattr(namespace, self.dest, values)
