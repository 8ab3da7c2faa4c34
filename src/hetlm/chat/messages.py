"""The chat format: messages, their roles and their order, shared by training and serving.

A conversation is a sequence of :class:`Message` turns: an optional system message first, then
user and assistant turns alternating. Instruction-tuning data (:mod:`hetlm.sft.data`) must end
with the assistant's turn (the response to learn); a request to ``hetlm chat`` / ``hetlm serve``
ends with the user's (the one to answer). A malformed conversation raises :class:`RowError`,
listing every problem found.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    """One turn of a conversation."""

    role: str
    content: str


class RowError(ValueError):
    """Why one row is unusable (a list of problems, reported with the row's location)."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


def parse_messages(raw: Any, *, field: str = "messages") -> tuple[Message, ...]:
    """Check a chat ``messages`` list: roles, order, non-empty text; raise :class:`RowError`."""
    if not isinstance(raw, list) or not raw:
        raise RowError([f"field '{field}' must be a non-empty list of {{role, content}} objects"])
    problems: list[str] = []
    messages: list[Message] = []
    for i, item in enumerate(raw):
        where = f"{field}[{i}]"
        if not isinstance(item, Mapping):
            problems.append(f"{where} must be an object with 'role' and 'content'")
            continue
        role, content = item.get("role"), item.get("content")
        if role not in ROLES:
            problems.append(f"{where}.role {role!r} is not one of {'/'.join(ROLES)}")
            continue
        if not isinstance(content, str):
            problems.append(f"{where}.content must be a string")
            continue
        if not content.strip():
            problems.append(f"{where}.content is empty")
        messages.append(Message(role, content))
    if problems:
        raise RowError(problems)
    check_turn_order(messages, field=field)
    return tuple(messages)


def check_turn_order(
    messages: Sequence[Message], *, field: str = "messages", generation: bool = False
) -> None:
    """System first (optional), then user/assistant alternating from a user turn.

    For training (``generation=False``) the last turn must be the assistant's (the response to
    learn); for generation it must be the user's (the one to answer).
    """
    turns = list(messages)
    offset = 1 if turns and turns[0].role == "system" else 0
    problems = []
    for i, message in enumerate(turns[offset:], start=offset):
        expected = "user" if (i - offset) % 2 == 0 else "assistant"
        if message.role != expected:
            problems.append(
                f"{field}[{i}] has role '{message.role}', expected '{expected}' "
                "(system first, then user and assistant alternating)"
            )
            break
    last = "user" if generation else "assistant"
    if not problems and (len(turns) == offset or turns[-1].role != last):
        problems.append(
            f"{field} must end with a{'n' if last == 'assistant' else ''} {last} message"
        )
    if problems:
        raise RowError(problems)
