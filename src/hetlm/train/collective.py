"""File I/O that every rank does together, so that one rank's failure cannot hang the others.

A rank that raised while its peers went on to the next collective would leave them waiting
until the process group's timeout: :func:`collective_io` gathers every rank's outcome first,
and if any rank failed, every rank raises that error (the first rank's) as one line.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from hetlm.errors import HetlmError
from hetlm.train import distributed as D

T = TypeVar("T")


def collective_io(ctx: D.DistContext, action: Callable[[], T]) -> T:
    """Run ``action`` (file I/O) on every rank; if any rank failed (``HetlmError`` or
    ``OSError``), every rank raises its error (no hang). Returns this rank's result."""
    outcome: tuple[T] | None = None  # (the result,) where the action succeeded here
    error: str | None = None
    try:
        outcome = (action(),)
    except (HetlmError, OSError) as exc:
        error = str(exc)
    errors = [e for e in D.all_gather_object(ctx, error) if e]
    if errors:
        raise HetlmError(errors[0])
    assert outcome is not None
    return outcome[0]
