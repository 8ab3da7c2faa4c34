"""Instruction-tuning data: JSON Lines files or a ``datasets`` name into :class:`Example` objects.

Two row shapes are read, and may be mixed in one file:

- **instruction** (Alpaca, llm-japanese-dataset, databricks-dolly-ja):
  ``{"instruction": ..., "input": ..., "output": ...}``; ``input`` is optional and may be empty;
  ``context`` / ``response`` (English dolly) are accepted for ``input`` / ``output``; an optional
  ``system`` field replaces the template's preamble;
- **chat**: ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}``, an
  optional system message first, then user and assistant turns alternating, ending with the
  assistant.

Files are JSON Lines (``.jsonl``, or ``.json`` with one object per line); a ``.json`` file that
holds one JSON array (Alpaca's ``alpaca_data.json``) is read as a list of rows.

Unlike the pretraining corpus reader (which skips and counts bad records), a bad instruction row
is an error: a row without a response would otherwise teach the model to answer with nothing,
and silently dropping rows changes the data someone curated by hand. All bad rows are collected
and reported together, each as ``file:line: problem``, so one run finds every one of them.
"""

from __future__ import annotations

import glob
import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hetlm.chat.messages import Message, RowError, parse_messages
from hetlm.errors import HetlmError

# Canonical field name -> accepted names, in order of preference.
INSTRUCTION_FIELDS = {
    "instruction": ("instruction",),
    "input": ("input", "context"),
    "output": ("output", "response"),
}
LOCAL_SUFFIXES = (".jsonl", ".json")
MAX_REPORTED_ERRORS = 20


@dataclass(frozen=True)
class Example:
    """One training conversation, ending with the assistant response to learn.

    ``context`` is the instruction shape's ``input``: templates place it themselves (the Japanese
    template gives it its own ``### 入力:`` section, a chat template appends it to the first user
    message), so it is kept apart from the messages rather than pasted in here.
    """

    messages: tuple[Message, ...]
    context: str = ""
    index: int = 0  # position in the whole data set (files in the order given)
    source: str = ""  # "file.jsonl:17", for messages about this example

    @property
    def response(self) -> str:
        """The final assistant message: the text the loss is on."""
        return self.messages[-1].content


# ---------------------------------------------------------------- one row


def _text_field(
    row: Mapping[str, Any], canonical: str, *, required: bool, problems: list[str]
) -> str:
    names = INSTRUCTION_FIELDS.get(canonical, (canonical,))
    name = next((n for n in names if n in row and row[n] is not None), None)
    if name is None:
        if required:
            problems.append(f"missing field '{canonical}'")
        return ""
    value = row[name]
    if not isinstance(value, str):
        problems.append(f"field '{name}' must be a string, got {type(value).__name__}")
        return ""
    if required and not value.strip():
        problems.append(f"field '{name}' is empty")
    return value


def _parse_instruction_row(row: Mapping[str, Any]) -> tuple[tuple[Message, ...], str]:
    problems: list[str] = []
    instruction = _text_field(row, "instruction", required=True, problems=problems)
    context = _text_field(row, "input", required=False, problems=problems)
    output = _text_field(row, "output", required=True, problems=problems)
    system = _text_field(row, "system", required=False, problems=problems)
    if problems:
        raise RowError(problems)
    messages = [Message("user", instruction), Message("assistant", output)]
    if system.strip():
        messages.insert(0, Message("system", system))
    return tuple(messages), context


def parse_row(row: Any) -> tuple[tuple[Message, ...], str]:
    """One decoded row (either shape) into (messages, context); raise :class:`RowError`."""
    if not isinstance(row, Mapping):
        raise RowError([f"expected a JSON object, got {type(row).__name__}"])
    if "messages" in row:
        return parse_messages(row["messages"]), ""
    if "instruction" in row:
        return _parse_instruction_row(row)
    keys = ", ".join(sorted(map(str, row))) or "none"
    raise RowError([f"neither a 'messages' list nor an 'instruction' field (keys: {keys})"])


# ---------------------------------------------------------------- sources


def _is_json_array(path: Path) -> bool:
    """A ``.json`` file holding one array of rows (Alpaca's ``alpaca_data.json`` shape)."""
    if path.suffix != ".json":
        return False
    with path.open(encoding="utf-8", errors="replace") as f:
        head = f.read(4096).lstrip("\ufeff \t\r\n")
    return head.startswith("[")


def _iter_json_array(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        rows = json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except json.JSONDecodeError as exc:
        yield f"{path}:{exc.lineno}", exc
        return
    for number, row in enumerate(rows):
        yield f"{path}:item {number}", row


def _iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    """(location, decoded row or the JSONDecodeError) for each non-blank line; a ``.json``
    file holding one array is read whole, its rows located as ``file.json:item N``."""
    if _is_json_array(path):
        yield from _iter_json_array(path)
        return
    chars = replaced = replaced_lines = 0
    with path.open(encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            chars += len(line)
            if "\ufffd" in line:
                replaced += line.count("\ufffd")
                replaced_lines += 1
            try:
                yield f"{path}:{number}", json.loads(line)
            except json.JSONDecodeError as exc:
                yield f"{path}:{number}", exc
    _warn_replaced(path, chars, replaced, replaced_lines)


def _warn_replaced(path: Path, chars: int, replaced: int, lines: int) -> None:
    """A file with more replaced characters (U+FFFD) than ``REPLACED_WARN_SHARE`` of its text
    is probably partly in another encoding: say so (``hetlm: warning: ...``)."""
    import warnings

    from hetlm.data.prepare.corpus import REPLACED_WARN_SHARE
    from hetlm.errors import HetlmWarning

    if replaced > REPLACED_WARN_SHARE * max(1, chars):
        warnings.warn(
            f"{path}: {replaced:,} replaced character(s) (U+FFFD) on {lines:,} "
            f"line(s), {replaced / max(1, chars):.1%} of its characters: is part of it "
            "in another encoding (Shift_JIS? iconv -f CP932 -t UTF-8)?",
            HetlmWarning,
            stacklevel=3,
        )


def _local_files(source: str | Path) -> list[Path] | None:
    """The files a local source names (file, folder of *.jsonl/*.json, or glob); None if none."""
    text = str(source)
    if any(ch in text for ch in "*?["):
        matches = sorted(Path(p) for p in glob.glob(text, recursive=True))
        if not matches:
            raise HetlmError(f"no instruction data files match {text!r}")
        return matches
    path = Path(text).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in LOCAL_SUFFIXES and p.is_file())
        if not files:
            raise HetlmError(f"{path} has no .jsonl or .json files")
        return files
    if path.is_file():
        return [path]
    if path.suffix in LOCAL_SUFFIXES or text.startswith((".", "/", "~")):
        raise HetlmError(f"instruction data file {text} does not exist")
    return None  # not a local path: a datasets name


def _iter_dataset_rows(
    name: str, split: str, load_kwargs: Mapping[str, Any]
) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split, **load_kwargs)
    except Exception as exc:  # offline, unknown name, bad split: all user-fixable
        raise HetlmError(f"could not load the dataset {name!r} (split {split!r}): {exc}") from exc
    label = f"{name}[{split}]"
    for number, row in enumerate(dataset):
        yield f"{label}:row {number}", row


def iter_rows(
    source: str | Path | Sequence[str | Path], *, split: str = "train", **load_kwargs: Any
) -> Iterator[tuple[str, Any]]:
    """(location, row) pairs from local files or, when ``source`` is no local path, from
    ``datasets.load_dataset(source, split=split, **load_kwargs)`` (e.g. ``"json"`` with
    ``data_files=...``, or a Hub name)."""
    sources = [source] if isinstance(source, (str, Path)) else list(source)
    for item in sources:
        files = None if load_kwargs else _local_files(item)
        if files is None:
            yield from _iter_dataset_rows(str(item), split, load_kwargs)
        else:
            for path in files:
                yield from _iter_jsonl(path)


def load_examples(
    source: str | Path | Sequence[str | Path], *, split: str = "train", **load_kwargs: Any
) -> list[Example]:
    """Read every row; raise one :class:`HetlmError` listing all bad rows (``file:line: ...``)."""
    examples: list[Example] = []
    errors: list[str] = []
    for location, row in iter_rows(source, split=split, **load_kwargs):
        if isinstance(row, json.JSONDecodeError):
            errors.append(f"{location}: invalid JSON ({row.msg} at column {row.colno})")
            continue
        try:
            messages, context = parse_row(row)
        except RowError as exc:
            errors.extend(f"{location}: {problem}" for problem in exc.problems)
            continue
        examples.append(Example(messages, context, index=len(examples), source=location))
    if errors:
        raise HetlmError(format_errors(errors, examples_ok=len(examples)))
    if not examples:
        raise HetlmError(f"no instruction examples found in {source}")
    return examples


def format_errors(errors: Sequence[str], *, examples_ok: int) -> str:
    """All problems on one line (the CLI prints a HetlmError as one line), the first few shown."""
    shown = "; ".join(errors[:MAX_REPORTED_ERRORS])
    more = len(errors) - MAX_REPORTED_ERRORS
    tail = f"; ... and {more} more" if more > 0 else ""
    return (
        f"{len(errors)} problem{'s' if len(errors) != 1 else ''} in the instruction data "
        f"({examples_ok} good rows; fix or remove the bad ones): {shown}{tail}"
    )


# ---------------------------------------------------------------- validation split


def in_validation(index: int, fraction: float, seed: int) -> bool:
    """Whether example ``index`` is held out: a pure function of (seed, index).

    A hash, not a shuffled list, so adding rows at the end never moves an existing example from
    one split to the other, and every rank computes the same answer without communication.
    """
    if fraction <= 0:
        return False
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


def split_validation(
    examples: Iterable[Example], fraction: float, seed: int = 0
) -> tuple[list[Example], list[Example]]:
    """(train, validation) by :func:`in_validation` on each example's index."""
    if not 0 <= fraction < 1:
        raise HetlmError(f"validation fraction must be in [0, 1), got {fraction}")
    train: list[Example] = []
    validation: list[Example] = []
    for example in examples:
        (validation if in_validation(example.index, fraction, seed) else train).append(example)
    return train, validation
