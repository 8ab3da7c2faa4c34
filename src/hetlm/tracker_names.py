"""The names ``train.report_to`` accepts, and whether their libraries are installed.

Kept apart from ``hetlm.train.tracking`` (which logs to them) so that the config can check a
run's trackers before any rank starts without importing the training layer.
"""

from __future__ import annotations

import importlib.util
from typing import Any

TRACKERS = ("tensorboard", "wandb", "mlflow")
DEFAULT_REPORT_TO = ["tensorboard"]

# tracker -> (module that must be importable, how to install it)
_REQUIRES = {
    "tensorboard": ("tensorboard", "pip install tensorboard (a dependency of hetlm)"),
    "wandb": ("wandb", "pip install 'hetlm[track]' (or pip install wandb)"),
    "mlflow": ("mlflow", "pip install 'hetlm[track]' (or pip install mlflow)"),
}


def normalize_report_to(value: Any) -> list[str]:
    """``report_to`` as a list of tracker names: a list, one name, a comma-separated string
    (``"wandb,mlflow"`` as on transformers' command line); ``none`` (or ``[]``) for none.
    Raises ValueError (the config turns it into ``train.report_to: ...``)."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ValueError("give a list of tracker names, e.g. [tensorboard, wandb]")
    names = [v.strip().lower() for v in value]
    if "none" in names:
        if len(names) > 1:
            raise ValueError("'none' cannot be combined with other trackers")
        return []
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise ValueError(
            f"unknown tracker {unknown[0]!r}: choose from {', '.join(TRACKERS)} or none"
        )
    return list(dict.fromkeys(names))


def check_installed(names: list[str]) -> None:
    """A ValueError naming the first tracker whose library is missing and how to install it."""
    for name in names:
        module, install = _REQUIRES[name]
        if not _installed(module):
            raise ValueError(
                f"{name} is not installed: {install}, or remove it from train.report_to"
            )


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None
