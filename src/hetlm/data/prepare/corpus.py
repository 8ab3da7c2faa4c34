"""Reading raw text corpora as a stream of documents.

Everything downstream (tokenizer training, packing) sees one shape: an iterator of document
strings. This module turns the shapes people actually have on disk into that stream:

- plain text (``.txt`` or any other explicit file): one sentence per line, a blank line between
  documents; a document is its lines joined with ``"\\n"``;
- JSON Lines (``.jsonl``/``.json``): one object per line, the text in ``text_field``;
- Parquet (``.parquet``) and Arrow IPC files (``.arrow``, e.g. a ``datasets`` cache file): the
  column ``text_field``, read one record batch at a time (see :mod:`hetlm.data.prepare.sources` for
  Hugging Face ``datasets`` by name).

It streams (one document in memory at a time) and is forgiving about the things real corpora
contain, while counting them in :class:`CorpusStats` so nothing is dropped silently: undecodable
bytes are replaced with U+FFFD, empty documents and bad JSON records are skipped, overlong lines
are split, and the summary names the first few places (``file:line``). Only problems that mean
"this is not the input you meant" raise :class:`HetlmError`: a missing path, a pattern that
matches nothing, a binary file, a file that is mostly not UTF-8 (Shift_JIS, say), a Parquet
file without the text column. ``strict=True`` turns every skipped record or undecodable line
into such an error, with its ``file:line``.
"""

from __future__ import annotations

import glob
import json
import re
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from hetlm.data.prepare.sources import HFSource
from hetlm.errors import HetlmError

CORPUS_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet", ".arrow")
JSONL_SUFFIXES = (".jsonl", ".json")
COLUMNAR_SUFFIXES = (".parquet", ".arrow")
BINARY_SNIFF_BYTES = 8192
MAX_BAD_RECORD_EXAMPLES = 5
# A file whose first lines are mostly undecodable is in another encoding: refuse it rather than
# feed U+FFFD soup to the tokenizer. Checked over the first ENCODING_CHECK_LINES non-blank lines.
ENCODING_CHECK_LINES = 64
ENCODING_BAD_SHARE = 0.5
# Beyond that check (a file half UTF-8, half Shift_JIS), a file whose replaced characters
# (U+FFFD: undecodable bytes, or already in the text) exceed this share of its characters, or
# that has a line mostly replaced, gets a warning first in the summary (an error with --strict).
REPLACED_WARN_SHARE = 0.001
COLUMNAR_BATCH_ROWS = 1024
# Lone surrogates come from undecodable bytes (surrogateescape) or from JSON "\udXXX" escapes;
# neither can be encoded to UTF-8 later (Arrow, tokenizers), so both become U+FFFD here.
_SURROGATES = re.compile("[\ud800-\udfff]+")
_GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass
class CorpusStats:
    """What reading the corpus found: counts of documents and of everything skipped or repaired."""

    files: int = 0
    documents: int = 0
    characters: int = 0
    empty_skipped: int = 0
    undecodable_lines: int = 0
    long_lines_split: int = 0
    long_documents_split: int = 0
    bad_records: int = 0
    bad_record_examples: list[str] = field(default_factory=list)
    bad_record_reasons: dict[str, int] = field(default_factory=dict)
    undecodable_examples: list[str] = field(default_factory=list)
    encoding_warnings: list[str] = field(default_factory=list)

    def note_bad_record(
        self, path: Path | str, line_number: int, reason: str = "bad record"
    ) -> None:
        """Count a skipped record, by reason, and keep its location for the first few."""
        self.bad_records += 1
        self.bad_record_reasons[reason] = self.bad_record_reasons.get(reason, 0) + 1
        if len(self.bad_record_examples) < MAX_BAD_RECORD_EXAMPLES:
            self.bad_record_examples.append(f"{path}:{line_number}")

    def note_undecodable(self, where: str) -> None:
        """Count a line with undecodable bytes, keeping the first few locations."""
        self.undecodable_lines += 1
        if len(self.undecodable_examples) < MAX_BAD_RECORD_EXAMPLES:
            self.undecodable_examples.append(where)

    def warning_lines(self) -> list[str]:
        """``hetlm: warning: ...`` lines, to print before any summary (files that are probably
        not all UTF-8)."""
        return [f"hetlm: warning: {text}" for text in self.encoding_warnings]

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready copy, for metadata files."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    def summary(self) -> str:
        """One human paragraph: what was read, and what was skipped or repaired and why."""
        text = (
            f"Read {self.files:,} file(s): {self.documents:,} documents, "
            f"{self.characters:,} characters."
        )
        notes = []
        if self.empty_skipped:
            notes.append(f"skipped {self.empty_skipped:,} empty document(s)")
        if self.bad_records:
            where = ", ".join(self.bad_record_examples)
            reasons = ", ".join(f"{n:,} {r}" for r, n in sorted(self.bad_record_reasons.items()))
            why = reasons or "invalid JSON, not an object, or no string text field"
            notes.append(f"skipped {self.bad_records:,} bad record(s) ({why}), e.g. at {where}")
        if self.undecodable_lines:
            where = ", ".join(self.undecodable_examples)
            at = f", e.g. at {where}" if where else ""
            notes.append(
                f"replaced undecodable bytes with U+FFFD on {self.undecodable_lines:,} "
                f"line(s) (is every file UTF-8?){at}"
            )
        if self.long_lines_split:
            notes.append(f"split {self.long_lines_split:,} overlong line(s) into pieces")
        if self.long_documents_split:
            notes.append(f"split {self.long_documents_split:,} overlong document(s) into parts")
        if notes:
            joined = "; ".join(notes)
            text += f" {joined[0].upper()}{joined[1:]}."
        return text


# ---------------------------------------------------------------- finding the files


def resolve_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Expand files, directories (recursively) and glob patterns into a sorted list of files.

    Order is deterministic (each input in turn, its files sorted) because document indices, and so
    the train/validation split, depend on it. A file named twice is read once.
    """
    inputs = as_input_list(inputs)
    if not inputs:
        raise HetlmError("no corpus inputs given: pass one or more files, directories or globs")
    files: list[Path] = []
    seen: set[Path] = set()
    for item in inputs:
        for path in _expand_one(str(item)):
            key = path.resolve()
            if key not in seen:
                seen.add(key)
                files.append(path)
    return files


def as_input_list(inputs: Sequence[str | Path] | str | Path) -> list[str | Path]:
    """A single path or pattern is one input, not a sequence of characters."""
    return [inputs] if isinstance(inputs, str | Path) else list(inputs)


def _expand_one(item: str) -> list[Path]:
    path = Path(item)
    if path.is_file():
        return [path]
    if path.is_dir():
        found = _corpus_files_under(path)
        if not found:
            raise HetlmError(
                f"directory {path} contains no {'/'.join(CORPUS_SUFFIXES)} files: "
                "point to the corpus files or the folder that holds them"
            )
        return found
    if _GLOB_CHARS.search(item):
        matches = sorted(Path(m) for m in glob.glob(item, recursive=True))
        found = [m for m in matches if m.is_file()]
        for folder in (m for m in matches if m.is_dir()):
            found.extend(_corpus_files_under(folder))
        if not found:
            raise HetlmError(
                f"the pattern {item!r} matches no files: check the pattern "
                "(quote it so the shell does not expand it)"
            )
        return found
    raise HetlmError(f"corpus path {item} does not exist: check the path")


def _corpus_files_under(folder: Path) -> list[Path]:
    """Corpus files below ``folder``, skipping hidden ones (.git, .cache, partial outputs)."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix.lower() in CORPUS_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def check_text_files(files: Sequence[Path]) -> None:
    """Refuse binary files up front, before a long job would meet them halfway through.

    Parquet and Arrow files are binary by design; they are checked for being readable instead.
    """
    for path in files:
        if path.suffix.lower() in COLUMNAR_SUFFIXES:
            continue
        _check_not_binary(path)


def _check_not_binary(path: Path) -> None:
    """Refuse files with NUL bytes near the start: binaries, archives, UTF-16 text."""
    with path.open("rb") as f:
        head = f.read(BINARY_SNIFF_BYTES)
    if b"\x00" in head:
        raise HetlmError(
            f"{path} looks like a binary file (NUL bytes in its first "
            f"{BINARY_SNIFF_BYTES} bytes): pass UTF-8 text or JSON Lines files only "
            "(UTF-16 text must be converted to UTF-8)"
        )


# ---------------------------------------------------------------- per-line cleaning


class _LineCleaner:
    """Repairs and normalises lines of text; overlong lines become several pieces."""

    def __init__(
        self, normalize: bool, max_line_chars: int, stats: CorpusStats, strict: bool = False
    ):
        if max_line_chars < 1:
            raise HetlmError(f"max_line_chars must be at least 1, got {max_line_chars}")
        self.normalize = normalize
        self.max_line_chars = max_line_chars
        self.stats = stats
        self.strict = strict
        self.start_file(Path())

    def start_file(self, path: Path) -> None:
        """Reset the per-file encoding check and counts of replaced characters."""
        self.path = path
        self.checked_lines = 0
        self.bad_lines = 0
        self.file_chars = 0
        self.replaced_chars = 0
        self.replaced_lines = 0
        self.mostly_replaced_lines = 0

    def finish_file(self) -> None:
        """A file whose replaced characters exceed REPLACED_WARN_SHARE of its characters, or
        with a line mostly replaced, is probably partly in another encoding: a warning that
        leads the summary, or with --strict an error."""
        share = self.replaced_chars / max(1, self.file_chars)
        if not (share > REPLACED_WARN_SHARE or self.mostly_replaced_lines):
            return
        text = (
            f"{self.path}: {self.replaced_chars:,} replaced character(s) (U+FFFD) on "
            f"{self.replaced_lines:,} line(s), {share:.1%} of its {self.file_chars:,} "
            "characters: is part of it in another encoding (Shift_JIS? iconv -f CP932 -t "
            "UTF-8)?"
        )
        if self.strict:
            raise HetlmError(f"{text} Convert it, or drop --strict to train on the U+FFFD")
        self.stats.encoding_warnings.append(text + " --strict makes this an error")

    def repair(self, text: str, line_number: int = 0) -> str:
        """Replace lone surrogates (undecodable bytes) with U+FFFD, counting the line once.

        Also the encoding check: when most of a file's first lines are undecodable it is not
        UTF-8 at all, and it is refused with a hint rather than read as U+FFFD soup.
        """
        bad = _SURROGATES.search(text) is not None
        self._count_replaced(_SURROGATES.sub("\ufffd", text) if bad else text)
        if self.checked_lines < ENCODING_CHECK_LINES and text.strip():
            self.checked_lines += 1
            self.bad_lines += bad
            if (
                self.bad_lines > ENCODING_CHECK_LINES * ENCODING_BAD_SHARE
                or self.bad_lines >= 3
                and self.bad_lines == self.checked_lines
            ):
                raise HetlmError(
                    f"{self.path} is not UTF-8 ({self.bad_lines} of its first "
                    f"{self.checked_lines} lines have undecodable bytes, e.g. "
                    f"{self.path}:{line_number}); convert it, e.g. "
                    "iconv -f CP932 -t UTF-8 for Shift_JIS"
                )
        if not bad:
            return text
        where = f"{self.path}:{line_number}"
        if self.strict:
            raise HetlmError(
                f"{where}: undecodable bytes (not UTF-8); fix or convert the file, "
                "or drop --strict to replace them with U+FFFD"
            )
        self.stats.note_undecodable(where)
        return _SURROGATES.sub("\ufffd", text)

    def _count_replaced(self, repaired: str) -> None:
        """U+FFFD in the repaired text (each run of undecodable bytes is one), for finish_file."""
        self.file_chars += len(repaired)
        replaced = repaired.count("\ufffd")
        if replaced:
            self.replaced_chars += replaced
            self.replaced_lines += 1
            self.mostly_replaced_lines += 2 * replaced >= len(repaired.strip())

    def pieces(self, line: str) -> list[str]:
        """The line, NFKC-normalised, cut into pieces of at most ``max_line_chars``."""
        n = self.max_line_chars
        parts = [line] if len(line) <= n else [line[i : i + n] for i in range(0, len(line), n)]
        if len(parts) > 1:
            self.stats.long_lines_split += 1
        if self.normalize:
            parts = [unicodedata.normalize("NFKC", p) for p in parts]
        return parts


# ---------------------------------------------------------------- the two file shapes


def _read_lines(f: TextIO, limit: int) -> Iterator[tuple[int, str, bool]]:
    """(line number, text without newline, whether it continues an overlong line).

    ``readline(limit)`` bounds memory: a 10 MB line arrives in ``limit``-sized pieces.
    """
    number, continued = 0, False
    while True:
        chunk = f.readline(limit)
        if not chunk:
            return
        if not continued:
            number += 1
        ends = chunk.endswith("\n")
        yield number, chunk.rstrip("\n") if ends else chunk, continued
        continued = not ends


def _plain_text_documents(
    f: TextIO, cleaner: _LineCleaner, max_document_chars: int, stats: CorpusStats
) -> Iterator[str]:
    """Documents are runs of non-blank lines; whitespace-only lines separate them."""
    lines: list[str] = []
    size = 0
    last_long = 0  # number of the last line counted as overlong
    split_counted = False  # whether the current document was already counted as split
    for number, raw, continued in _read_lines(f, cleaner.max_line_chars):
        if continued:
            if not raw:
                continue  # the newline right after a line of exactly max_line_chars
            if number != last_long:
                stats.long_lines_split += 1
                last_long = number
        elif not raw.strip():
            if lines:
                yield "\n".join(lines)
            lines, size, split_counted = [], 0, False
            continue
        text = cleaner.repair(raw, number)
        piece = unicodedata.normalize("NFKC", text) if cleaner.normalize else text
        if lines and size + len(piece) > max_document_chars:
            stats.long_documents_split += 0 if split_counted else 1
            split_counted = True
            yield "\n".join(lines)
            lines, size = [], 0
        lines.append(piece)
        size += len(piece) + 1
    if lines:
        yield "\n".join(lines)


def _jsonl_documents(
    f: TextIO,
    path: Path,
    text_field: str,
    cleaner: _LineCleaner,
    max_document_chars: int,
    stats: CorpusStats,
) -> Iterator[str]:
    """One document per JSON object; bad lines are counted and skipped, never fatal."""
    for number, raw in enumerate(f, start=1):
        if not raw.strip():
            continue
        if number == 1 and raw.lstrip().startswith("["):
            raise HetlmError(
                f"{path} is a JSON array, not JSON Lines: write one object per line "
                "(e.g. jq -c '.[]' in.json > out.jsonl)"
            )
        text, reason = _record_text(raw, text_field)
        if text is None:
            if cleaner.strict:
                raise HetlmError(
                    f"{path}:{number}: {reason} (--text-field {text_field!r}); fix "
                    "the record, or drop --strict to skip and count such records"
                )
            stats.note_bad_record(path, number, reason)
            continue
        text = cleaner.repair(text, number)
        yield from _split_document(_clean_text(text, cleaner), max_document_chars, stats)


def _record_text(raw: str, text_field: str) -> tuple[str | None, str]:
    """(the record's text, or None and why not)."""
    try:
        record = json.loads(raw)
    except ValueError:
        # surrogateescape'd bytes make json fail too: call that what it is
        if _SURROGATES.search(raw):
            return None, "undecodable bytes"
        return None, "invalid JSON"
    if not isinstance(record, dict):
        return None, "not a JSON object"
    if text_field not in record:
        return None, f"missing field {text_field!r}"
    text = record[text_field]
    if not isinstance(text, str):
        return None, f"field {text_field!r} is not a string"
    return text, ""


def _columnar_documents(
    path: Path, text_field: str, cleaner: _LineCleaner, max_document_chars: int, stats: CorpusStats
) -> Iterator[str]:
    """The ``text_field`` column of a Parquet or Arrow file, one record batch at a time."""
    from hetlm.data.prepare.sources import iter_column_batches

    row = 0
    for column in iter_column_batches(path, text_field, COLUMNAR_BATCH_ROWS):
        for text in column:
            row += 1
            if not isinstance(text, str):
                reason = "null text" if text is None else f"field {text_field!r} is not a string"
                if cleaner.strict:
                    raise HetlmError(
                        f"{path}:row {row}: {reason}; fix the data, or drop "
                        "--strict to skip and count such rows"
                    )
                stats.note_bad_record(path, row, reason)
                continue
            yield from _split_document(_clean_text(text, cleaner), max_document_chars, stats)


def _clean_text(text: str, cleaner: _LineCleaner) -> str:
    return "\n".join(piece for line in text.split("\n") for piece in cleaner.pieces(line))


def _split_document(text: str, max_document_chars: int, stats: CorpusStats) -> Iterator[str]:
    """Yield the text whole, or in parts at line boundaries when it exceeds the cap."""
    if len(text) <= max_document_chars:
        yield text
        return
    stats.long_documents_split += 1
    part: list[str] = []
    size = 0
    for line in text.split("\n"):
        if part and size + len(line) > max_document_chars:
            yield "\n".join(part)
            part, size = [], 0
        part.append(line)
        size += len(line) + 1
    if part:
        yield "\n".join(part)


# ---------------------------------------------------------------- public entry points


def iter_documents(
    inputs: Sequence[str | Path],
    *,
    text_field: str = "text",
    normalize: bool = True,
    max_line_chars: int = 20000,
    max_document_chars: int = 1_000_000,
    stats: CorpusStats | None = None,
    strict: bool = False,
) -> Iterator[str]:
    """Stream the documents of every input file, in a deterministic order.

    ``normalize`` applies Unicode NFKC (full-width ASCII to ASCII, half-width kana to full-width),
    so the same text always becomes the same tokens. Lines longer than ``max_line_chars`` are
    split into pieces (joined by newlines); documents longer than ``max_document_chars`` (e.g. a
    plain-text file without blank lines) are yielded in parts, so memory stays bounded. Pass a
    :class:`CorpusStats` to learn what was read, skipped and repaired; check
    ``stats.documents`` (or call :func:`require_documents`) after iterating. ``strict`` makes
    a bad record or an undecodable line an error naming its ``file:line``.
    """
    stats = stats if stats is not None else CorpusStats()
    files = resolve_inputs(inputs)
    cleaner = _LineCleaner(normalize, max_line_chars, stats, strict)
    for path in files:
        documents = _documents_of_file(path, text_field, cleaner, max_document_chars, stats)
        yield from count_documents(documents, stats)


def iter_text_documents(
    texts: Iterator[object],
    *,
    where: str,
    text_field: str = "text",
    normalize: bool = True,
    max_line_chars: int = 20000,
    max_document_chars: int = 1_000_000,
    stats: CorpusStats,
    strict: bool = False,
) -> Iterator[str]:
    """Documents from already-extracted texts (e.g. rows of a ``datasets`` stream).

    ``where`` names the source in messages (``where:row N``); non-string texts are bad records.
    """
    cleaner = _LineCleaner(normalize, max_line_chars, stats, strict)
    cleaner.start_file(Path(where))

    def documents() -> Iterator[str]:
        for row, text in enumerate(texts, start=1):
            if not isinstance(text, str):
                reason = "null text" if text is None else f"field {text_field!r} is not a string"
                if strict:
                    raise HetlmError(
                        f"{where}:row {row}: {reason}; fix the data, or drop "
                        "--strict to skip and count such rows"
                    )
                stats.note_bad_record(where, row, reason)
                continue
            text = cleaner.repair(text, row)
            yield from _split_document(_clean_text(text, cleaner), max_document_chars, stats)
        cleaner.finish_file()

    stats.files += 1
    yield from count_documents(documents(), stats)


def count_documents(documents: Iterator[str], stats: CorpusStats) -> Iterator[str]:
    """Skip and count empty documents; count the others and their characters."""
    for document in documents:
        if not document.strip():
            stats.empty_skipped += 1
            continue
        stats.documents += 1
        stats.characters += len(document)
        yield document


def _documents_of_file(
    path: Path, text_field: str, cleaner: _LineCleaner, max_document_chars: int, stats: CorpusStats
) -> Iterator[str]:
    cleaner.start_file(path)
    if path.suffix.lower() in COLUMNAR_SUFFIXES:
        stats.files += 1
        yield from _columnar_documents(path, text_field, cleaner, max_document_chars, stats)
        return
    _check_not_binary(path)
    stats.files += 1
    # surrogateescape keeps undecodable bytes visible (as lone surrogates) so they can be counted.
    with path.open("r", encoding="utf-8-sig", errors="surrogateescape") as f:
        if path.suffix.lower() in JSONL_SUFFIXES:
            yield from _jsonl_documents(f, path, text_field, cleaner, max_document_chars, stats)
        else:
            yield from _plain_text_documents(f, cleaner, max_document_chars, stats)
    cleaner.finish_file()


def require_documents(
    stats: CorpusStats, inputs: Sequence[str | Path] | str | Path, text_field: str = "text"
) -> None:
    """Raise a clear error when a finished pass over the corpus found no documents."""
    if stats.documents > 0:
        return
    names = ", ".join(str(i) for i in as_input_list(inputs))
    details = (
        f"{stats.files} file(s) read, {stats.bad_records} bad record(s), "
        f"{stats.empty_skipped} empty document(s)"
    )
    raise HetlmError(
        f"corpus {names} contains no documents ({details}); check the path and, for "
        f"JSON Lines, that each record has a string field {text_field!r} "
        "(--text-field)"
    )


def iter_corpus(
    files: Sequence[Path],
    hf: HFSource | None,
    *,
    text_field: str = "text",
    normalize: bool = True,
    stats: CorpusStats,
    strict: bool = False,
) -> Iterator[str]:
    """Every document: the files in order, then the ``datasets`` stream (when given)."""
    if files:
        yield from iter_documents(
            files, text_field=text_field, normalize=normalize, stats=stats, strict=strict
        )
    if hf is not None:
        yield from iter_text_documents(
            hf.texts(text_field),
            where=hf.label(),
            text_field=text_field,
            normalize=normalize,
            stats=stats,
            strict=strict,
        )
