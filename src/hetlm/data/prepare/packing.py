"""Tokenize a corpus in parallel and pack it into fixed-length sequences on disk.

The packed format avoids padding entirely: within each split, documents' token streams are joined
with ``[SEP]`` between documents, the stream is cut into pieces of ``seq_len - 2`` tokens, and
each sequence is ``[CLS] + piece + [SEP]``. What does not fill a piece is carried into the next
sequence; only the final partial sequence of each split *of each chunk* is dropped (and
reported). A chunk is ``chunk_chars`` characters of documents (4M by default): the unit of
resuming and of sharding across nodes (see :mod:`hetlm.data.prepare.shards`); a corpus smaller than one
chunk is packed exactly as one stream.

Documents go to train or validation *whole* (see :func:`is_validation_document`), so no text
leaks from one split into the other; validation always gets at least one sequence when the
chunk allows (see :class:`ValidationReserve`). Tokenization runs in worker processes but packing
follows document order, so the output is the same for any number of workers or shards.

Output (``output_dir``): a ``datasets.DatasetDict`` {"train", "validation"} in the
``save_to_disk`` layout (Arrow, memory-mapped when loaded; ``datasets.load_from_disk`` reads it),
one column ``input_ids`` of fixed-size int32 lists, plus ``hetlm_dataset.json`` describing it
(see :func:`load_packed_dataset`) and ``hetlm_manifest.json`` (size and sha256 of every file, for
``hetlm stage``).
"""

from __future__ import annotations

import hashlib
import heapq
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np

from hetlm.data.packed import META_FILE, SPLITS, packed_features
from hetlm.data.prepare.cleaning import CleaningOptions, CleaningStats
from hetlm.data.prepare.corpus import CorpusStats
from hetlm.data.prepare.encoding import EncoderSpec, encode_batches
from hetlm.errors import HetlmError

_WRITE_ROWS = 4096  # rows per Arrow record batch


# ---------------------------------------------------------------- results


@dataclass
class SplitCounts:
    """Counts for one split; ``dropped_tail_tokens`` is the unpacked end of its token stream."""

    documents: int = 0
    tokens: int = 0
    sequences: int = 0
    dropped_tail_tokens: int = 0


@dataclass
class PrepareSummary:
    """What ``prepare_dataset`` wrote."""

    output_dir: Path
    seq_len: int
    vocab_size: int
    train: SplitCounts
    validation: SplitCounts
    corpus: CorpusStats
    documents_without_tokens: int = 0
    cleaning: CleaningStats | None = None
    cleaning_options: CleaningOptions | None = None
    chunks: int = 0  # chunks in the corpus (all shards)
    chunks_this_run: int | None = 0  # chunks tokenized by this invocation (None: a merge)
    chunks_resumed: int = 0  # chunks found finished from an earlier, stopped run
    shard: tuple[int, int] | None = None  # (i, n) for a shard folder, None for a dataset
    complete: bool = True  # False when stopped early (max_chunks): run again
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """Short lines: warnings first (``hetlm: warning: ...``, e.g. a file partly in another
        encoding), then sequences per split, what was dropped, chunks, where it went, the corpus
        and the cleaning."""
        t, v = self.train, self.validation
        what = "Packed" if self.shard is None else f"Shard {self.shard[0]}/{self.shard[1]}: packed"
        lines = list(self.corpus.warning_lines())
        lines.append(
            f"{what} {t.documents + v.documents:,} documents ({t.tokens + v.tokens:,} "
            f"tokens) into {t.sequences:,} train and {v.sequences:,} validation "
            f"sequences of {self.seq_len} tokens (vocabulary {self.vocab_size:,})."
        )
        lines.append(
            f"Dropped the last partial sequence of each split "
            f"({t.dropped_tail_tokens:,} train and {v.dropped_tail_tokens:,} "
            "validation tokens)."
        )
        if self.documents_without_tokens:
            lines.append(f"Skipped {self.documents_without_tokens:,} document(s) with no tokens.")
        if self.chunks and self.chunks_this_run is None:
            lines.append(f"Chunks: {self.chunks:,}.")
        elif self.chunks:
            lines.append(
                f"Chunks: {self.chunks:,} in the corpus, {self.chunks_this_run:,} "
                f"tokenized now, {self.chunks_resumed:,} resumed from an earlier run."
            )
        if not self.complete:
            lines.append("Stopped early: run the same command again to continue.")
        lines.extend(self.notes)
        lines.append(f"Saved to {self.output_dir}.")
        lines.append(self.corpus.summary())
        if self.cleaning is not None and self.cleaning_options is not None:
            lines.append(self.cleaning.summary(self.cleaning_options))
        return "\n".join(lines)


# ---------------------------------------------------------------- the split and the packer


def split_score(index: int, seed: int) -> float:
    """A seeded hash of the document index, uniform in [0, 1)."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def is_validation_document(index: int, seed: int, fraction: float) -> bool:
    """Whether document ``index`` goes to validation: ``split_score < fraction``.

    A pure function of (seed, index): independent of workers, batch sizes or the other
    documents, so the same corpus always splits the same way. (Only when this leaves validation
    without one full sequence are the lowest-scored training documents moved over; see
    :class:`ValidationReserve`.)
    """
    return split_score(index, seed) < fraction


class SequencePacker:
    """Joins documents with ``[SEP]`` and cuts ``[CLS] + chunk + [SEP]`` rows of ``seq_len``."""

    def __init__(self, seq_len: int, cls_id: int, sep_id: int):
        self.seq_len, self.cls_id, self.sep_id = seq_len, cls_id, sep_id
        self.chunk = seq_len - 2
        self.buffer: list[int] = []  # the stream not yet packed (always < chunk between calls)
        self.counts = SplitCounts()

    @property
    def stream_tokens(self) -> int:
        """Tokens of the joined stream so far (documents plus separators)."""
        return self.counts.sequences * self.chunk + len(self.buffer)

    def add(self, ids: Sequence[int]) -> np.ndarray:
        """Append one document; return the rows it completed, shape (n, seq_len), int32."""
        if self.counts.documents:
            self.buffer.append(self.sep_id)
        self.buffer.extend(ids)
        self.counts.documents += 1
        self.counts.tokens += len(ids)
        n = len(self.buffer) // self.chunk
        rows = np.empty((n, self.seq_len), dtype=np.int32)
        if n:
            rows[:, 0] = self.cls_id
            rows[:, -1] = self.sep_id
            rows[:, 1:-1] = np.asarray(self.buffer[: n * self.chunk], dtype=np.int32).reshape(
                n, self.chunk
            )
            del self.buffer[: n * self.chunk]
            self.counts.sequences += n
        return rows

    def finish(self) -> SplitCounts:
        """Drop the final partial sequence, recording how many tokens it had."""
        self.counts.dropped_tail_tokens = len(self.buffer)
        self.buffer = []
        return self.counts


def pack_documents(
    documents: Sequence[np.ndarray], seq_len: int, cls_id: int, sep_id: int
) -> tuple[np.ndarray, SplitCounts]:
    """All of :class:`SequencePacker` at once, vectorised: (rows, counts) of these documents."""
    chunk = seq_len - 2
    if not len(documents):
        return np.empty((0, seq_len), dtype=np.int32), SplitCounts()
    separator = np.array([sep_id], dtype=np.int32)
    parts: list[np.ndarray] = []
    for k, ids in enumerate(documents):
        if k:
            parts.append(separator)
        parts.append(ids)
    stream = np.concatenate(parts).astype(np.int32, copy=False)
    n = len(stream) // chunk
    rows = np.empty((n, seq_len), dtype=np.int32)
    rows[:, 0] = cls_id
    rows[:, -1] = sep_id
    rows[:, 1:-1] = stream[: n * chunk].reshape(n, chunk)
    tokens = len(stream) - (len(documents) - 1)
    counts = SplitCounts(
        documents=len(documents),
        tokens=tokens,
        sequences=n,
        dropped_tail_tokens=len(stream) - n * chunk,
    )
    return rows, counts


# ---------------------------------------------------------------- parallel tokenization


def _batched(items: Iterable[str], size: int) -> Iterator[list[str]]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def tokenize_documents(
    documents: Iterable[str], tokenizer: str | EncoderSpec, *, workers: int, batch_docs: int
) -> Iterator[list[int]]:
    """Token ids of each document, in document order, tokenized by ``workers`` processes.

    ``tokenizer`` is a fast tokenizer's JSON or an :class:`EncoderSpec` (which also covers the
    slow MeCab/Sudachi tokenizers). See :mod:`hetlm.data.prepare.encoding`.
    """
    spec = tokenizer if isinstance(tokenizer, EncoderSpec) else EncoderSpec("fast", tokenizer)
    batches = ((None, batch) for batch in _batched(documents, batch_docs))
    for _, flat, lengths in encode_batches(batches, spec, workers=workers):
        start = 0
        for length in lengths.tolist():
            yield flat[start : start + length].tolist()
            start += length


# ---------------------------------------------------------------- writing


class SplitWriter:
    """Streams rows of one split into an Arrow file, in record batches of bounded size."""

    def __init__(self, path: Path, seq_len: int):
        from datasets.arrow_writer import ArrowWriter

        self.path, self.seq_len = path, seq_len
        self.writer = ArrowWriter(features=packed_features(seq_len), path=str(path))
        self.pending: list[np.ndarray] = []
        self.pending_rows = 0

    def write(self, rows: np.ndarray) -> None:
        if len(rows):
            self.pending.append(rows)
            self.pending_rows += len(rows)
        if self.pending_rows >= _WRITE_ROWS:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if not self.pending:
            return
        flat = np.concatenate(self.pending).reshape(-1)
        column = pa.FixedSizeListArray.from_arrays(pa.array(flat, type=pa.int32()), self.seq_len)
        self.writer.write_table(pa.table({"input_ids": column}))
        self.pending, self.pending_rows = [], 0

    def close(self) -> None:
        self._flush()
        self.writer.finalize()


# ---------------------------------------------------------------- the whole preparation


def check_pack_options(
    seq_len: int, validation_fraction: float, workers: int | None, batch_docs: int
) -> int:
    """Validate the numeric options; return the worker count to use."""
    if seq_len < 3:
        raise HetlmError(f"seq_len must be at least 3 ([CLS] + tokens + [SEP]), got {seq_len}")
    if not 0.0 < validation_fraction < 1.0:
        raise HetlmError(
            f"validation_fraction must be between 0 and 1 (exclusive), got "
            f"{validation_fraction}; 0.02 is typical"
        )
    if batch_docs < 1:
        raise HetlmError(f"batch_docs must be at least 1, got {batch_docs}")
    if workers is None:
        try:
            workers = len(os.sched_getaffinity(0))
        except AttributeError:
            workers = os.cpu_count() or 1
    if workers < 1:
        raise HetlmError(f"workers must be at least 1, got {workers}")
    return workers


def check_output_dir(output_dir: Path, overwrite: bool) -> None:
    """Refuse to clobber: a non-empty folder only with ``overwrite``, and only a hetlm dataset."""
    if not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise HetlmError(f"output {output_dir} is a file: choose a folder path for the dataset")
    if not any(output_dir.iterdir()):
        return
    if not overwrite:
        raise HetlmError(
            f"output folder {output_dir} already exists and is not empty: choose "
            "another --output or pass --overwrite to replace it"
        )
    if not (output_dir / META_FILE).is_file():
        raise HetlmError(
            f"refusing to overwrite {output_dir}: it is not a hetlm dataset (no "
            f"{META_FILE}); delete it yourself or choose another --output"
        )


class ValidationReserve:
    """The training documents with the smallest split scores, enough for one sequence.

    Kept while streaming, in bounded memory (only as many documents as one sequence needs), so
    that a validation split left empty by the hashed rule can be topped up deterministically.
    """

    def __init__(self, needed_tokens: int):
        self.needed = needed_tokens
        self.heap: list[tuple[float, int, int]] = []  # (-score, index, tokens): max score on top
        self.total = 0  # tokens + one separator per kept document

    def offer(self, score: float, index: int, tokens: int) -> None:
        heapq.heappush(self.heap, (-score, index, tokens))
        self.total += tokens + 1
        while self.heap and self.total - (self.heap[0][2] + 1) >= self.needed:
            self.total -= heapq.heappop(self.heap)[2] + 1

    def pick(self, validation_stream_tokens: int, validation_documents: int) -> set[int]:
        """Documents (lowest scores first) that bring the validation stream to one chunk."""
        have = validation_stream_tokens - (0 if validation_documents else 1)
        chosen: set[int] = set()
        for _, index, tokens in sorted(self.heap, reverse=True):
            if have >= self.needed:
                break
            chosen.add(index)
            have += tokens + 1
        return chosen


def check_counts(counts: dict[str, SplitCounts], seq_len: int) -> None:
    """Each split needs at least one full sequence."""
    total = sum(c.tokens for c in counts.values())
    for name in SPLITS:
        if counts[name].sequences == 0:
            raise HetlmError(
                f"the corpus is too small: its {total:,} tokens give no full "
                f"{name} sequence of {seq_len} tokens; add text, lower --seq-len, "
                "or change --validation-fraction"
            )
