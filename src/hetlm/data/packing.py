"""Tokenize a corpus in parallel and pack it into fixed-length sequences on disk.

The packed format avoids padding entirely: within each split, documents' token streams are joined
with ``[SEP]`` between documents, the stream is cut into chunks of ``seq_len - 2`` tokens, and
each sequence is ``[CLS] + chunk + [SEP]``. What does not fill a chunk is carried into the next
sequence; only the final partial sequence of each split is dropped (and reported).

Documents go to train or validation *whole* (see :func:`is_validation_document`), so no text
leaks from one split into the other; validation always gets at least one sequence when the
corpus allows (see :class:`ValidationReserve`). Tokenization runs in worker processes but packing is
sequential in document order, so the output is the same for any number of workers.

Output (``output_dir``): a ``datasets.DatasetDict`` {"train", "validation"} saved with
``save_to_disk`` (Arrow, memory-mapped when loaded), one column ``input_ids`` of fixed-size
int32 lists, plus ``hetlm_dataset.json`` describing it (see :func:`load_packed_dataset`).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import heapq
import json
import os
import shutil
import tempfile
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from hetlm.data.corpus import (
    CorpusStats,
    as_input_list,
    check_text_files,
    iter_documents,
    require_documents,
    resolve_inputs,
)
from hetlm.errors import HetlmError

META_FILE = "hetlm_dataset.json"
FORMAT = "hetlm-packed-v1"
SPLITS = ("train", "validation")
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

    def summary(self) -> str:
        """One paragraph: sequences per split, what was dropped, where it went, the corpus."""
        t, v = self.train, self.validation
        text = (f"Packed {t.documents + v.documents:,} documents ({t.tokens + v.tokens:,} tokens) "
                f"into {t.sequences:,} train and {v.sequences:,} validation sequences of "
                f"{self.seq_len} tokens (vocabulary {self.vocab_size:,}); dropped the last "
                f"partial sequence of each split ({t.dropped_tail_tokens:,} train and "
                f"{v.dropped_tail_tokens:,} validation tokens).")
        if self.documents_without_tokens:
            text += f" Skipped {self.documents_without_tokens:,} document(s) with no tokens."
        return f"{text} Saved to {self.output_dir}. {self.corpus.summary()}"


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
            rows[:, 1:-1] = np.asarray(self.buffer[:n * self.chunk], dtype=np.int32).reshape(
                n, self.chunk)
            del self.buffer[:n * self.chunk]
            self.counts.sequences += n
        return rows

    def finish(self) -> SplitCounts:
        """Drop the final partial sequence, recording how many tokens it had."""
        self.counts.dropped_tail_tokens = len(self.buffer)
        self.buffer = []
        return self.counts


# ---------------------------------------------------------------- parallel tokenization

_WORKER_TOKENIZER: Any = None


def _init_worker(tokenizer_json: str, single_threaded: bool) -> None:
    """Build the backend tokenizer once per process (from its JSON: cheap, picklable)."""
    global _WORKER_TOKENIZER
    if single_threaded:
        # Each worker process is one core's worth of work; Rust threads would oversubscribe.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    _WORKER_TOKENIZER = Tokenizer.from_str(tokenizer_json)


def _encode_batch(texts: list[str]) -> list[list[int]]:
    """Token ids of each document, without special tokens (the packer adds [CLS]/[SEP])."""
    encodings = _WORKER_TOKENIZER.encode_batch_fast(texts, add_special_tokens=False)
    return [e.ids for e in encodings]


def _batched(items: Iterable[str], size: int) -> Iterator[list[str]]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def tokenize_documents(documents: Iterable[str], tokenizer_json: str, *, workers: int,
                       batch_docs: int) -> Iterator[list[int]]:
    """Token ids of each document, in document order, tokenized by ``workers`` processes.

    At most ``2 * workers`` batches are in flight, so a fast reader never queues the whole corpus
    in memory (``Pool.imap`` would consume its input eagerly). Workers are spawned, not forked:
    forking a process that already runs tokenizer/torch threads can deadlock.
    """
    batches = _batched(documents, batch_docs)
    if workers == 1:
        _init_worker(tokenizer_json, single_threaded=False)
        for batch in batches:
            yield from _encode_batch(batch)
        return
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_init_worker, initargs=(tokenizer_json, True)) as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append(pool.apply_async(_encode_batch, (batch,)))
            if len(pending) >= 2 * workers:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()


# ---------------------------------------------------------------- writing


class _SplitWriter:
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


def packed_features(seq_len: int):
    """The dataset schema: ``input_ids``, a fixed-length list of int32."""
    from datasets import Features, List, Value

    return Features({"input_ids": List(Value("int32"), length=seq_len)})


# ---------------------------------------------------------------- the whole preparation


@dataclass
class _Options:
    seq_len: int
    validation_fraction: float
    seed: int
    workers: int
    batch_docs: int
    text_field: str
    normalize: bool
    inputs: list[str] = field(default_factory=list)


def _check_options(seq_len: int, validation_fraction: float, workers: int | None,
                   batch_docs: int) -> int:
    """Validate the numeric options; return the worker count to use."""
    if seq_len < 3:
        raise HetlmError(f"seq_len must be at least 3 ([CLS] + tokens + [SEP]), got {seq_len}")
    if not 0.0 < validation_fraction < 1.0:
        raise HetlmError(f"validation_fraction must be between 0 and 1 (exclusive), got "
                         f"{validation_fraction}; 0.02 is typical")
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


def _check_output_dir(output_dir: Path, overwrite: bool) -> None:
    """Refuse to clobber: a non-empty folder only with ``overwrite``, and only a hetlm dataset."""
    if not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise HetlmError(f"output {output_dir} is a file: choose a folder path for the dataset")
    if not any(output_dir.iterdir()):
        return
    if not overwrite:
        raise HetlmError(f"output folder {output_dir} already exists and is not empty: choose "
                         "another --output or pass --overwrite to replace it")
    if not (output_dir / META_FILE).is_file():
        raise HetlmError(f"refusing to overwrite {output_dir}: it is not a hetlm dataset (no "
                         f"{META_FILE}); delete it yourself or choose another --output")


def prepare_dataset(inputs: Sequence[str | Path], tokenizer_dir: str | Path,
                    output_dir: str | Path, *, seq_len: int = 128,
                    validation_fraction: float = 0.02, text_field: str = "text",
                    normalize: bool = True, workers: int | None = None, seed: int = 0,
                    batch_docs: int = 256, overwrite: bool = False) -> PrepareSummary:
    """Tokenize the corpus and save packed train/validation sequences to ``output_dir``.

    The result appears under ``output_dir`` only when complete: it is built in a temporary
    sibling folder and renamed into place, so a crash never leaves half a dataset there.
    ``workers`` defaults to the CPUs this process may use.
    """
    from hetlm.data.tokenizer import load_tokenizer

    workers = _check_options(seq_len, validation_fraction, workers, batch_docs)
    output_dir = Path(output_dir)
    _check_output_dir(output_dir, overwrite)
    files = resolve_inputs(inputs)
    check_text_files(files)  # input errors before any work
    tokenizer = load_tokenizer(tokenizer_dir)
    options = _Options(seq_len, validation_fraction, seed, workers, batch_docs, text_field,
                       normalize, [str(i) for i in as_input_list(inputs)])

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent))
    try:
        summary = _build(files, tokenizer, Path(tokenizer_dir), staging, options)
        _move_into_place(staging / "dataset", output_dir, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    summary.output_dir = output_dir
    return summary


def _build(files: list[Path], tokenizer: Any, tokenizer_dir: Path, staging: Path,
           options: _Options) -> PrepareSummary:
    """Tokenize, pack and write everything under ``staging``; return the counts.

    Usually one pass. When the hashed split leaves validation without a full sequence (a small
    corpus, or a few large documents), a second pass adds the training documents with the
    smallest split hash until it has one: still a function of (seed, corpus) only.
    """
    from hetlm.data.tokenizer import special_token_ids

    special = special_token_ids(tokenizer)
    tokenizer_json = tokenizer.backend_tokenizer.to_str()
    result = _pack_pass(files, tokenizer_json, special, staging, options, frozenset())
    if result.counts["validation"].sequences == 0 and result.reserve_pick:
        result = _pack_pass(files, tokenizer_json, special, staging, options,
                            frozenset(result.reserve_pick))
    require_documents(result.stats, options.inputs, options.text_field)
    _check_counts(result.counts, options.seq_len)
    summary = PrepareSummary(staging, options.seq_len, len(tokenizer), result.counts["train"],
                             result.counts["validation"], result.stats, result.without_tokens)
    _save_dataset_dict(staging, options.seq_len)
    meta = _metadata(summary, tokenizer, tokenizer_dir, special, options)
    (staging / "dataset" / META_FILE).write_text(
        json.dumps(meta, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return summary


@dataclass
class _PassResult:
    counts: dict[str, SplitCounts]
    stats: CorpusStats
    without_tokens: int
    reserve_pick: set[int]  # documents to add to validation if it has no full sequence


def _pack_pass(files: list[Path], tokenizer_json: str, special: dict[str, int], staging: Path,
               options: _Options, extra_validation: frozenset[int]) -> _PassResult:
    """One read-tokenize-pack pass writing ``staging/raw/{train,validation}.arrow``."""
    stats = CorpusStats()
    documents = iter_documents(files, text_field=options.text_field,
                               normalize=options.normalize, stats=stats)
    token_lists = tokenize_documents(documents, tokenizer_json, workers=options.workers,
                                     batch_docs=options.batch_docs)
    (staging / "raw").mkdir(exist_ok=True)
    writers = {name: _SplitWriter(staging / "raw" / f"{name}.arrow", options.seq_len)
               for name in SPLITS}
    packers = {name: SequencePacker(options.seq_len, special["cls"], special["sep"])
               for name in SPLITS}
    reserve = ValidationReserve(options.seq_len - 2)
    without_tokens = 0
    for index, ids in enumerate(token_lists):
        if not ids:
            without_tokens += 1
            continue
        score = split_score(index, options.seed)
        if score < options.validation_fraction or index in extra_validation:
            name = "validation"
        else:
            name = "train"
            reserve.offer(score, index, len(ids))
        writers[name].write(packers[name].add(ids))
    for writer in writers.values():
        writer.close()
    counts = {name: packer.finish() for name, packer in packers.items()}
    pick = reserve.pick(packers["validation"].stream_tokens, counts["validation"].documents)
    return _PassResult(counts, stats, without_tokens, pick)


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


def _check_counts(counts: dict[str, SplitCounts], seq_len: int) -> None:
    total = sum(c.tokens for c in counts.values())
    for name in SPLITS:
        if counts[name].sequences == 0:
            raise HetlmError(f"the corpus is too small: its {total:,} tokens give no full "
                             f"{name} sequence of {seq_len} tokens; add text, lower --seq-len, "
                             "or change --validation-fraction")


def _save_dataset_dict(staging: Path, seq_len: int) -> None:
    """Turn the raw Arrow files into a ``save_to_disk`` DatasetDict (streamed, memory-mapped)."""
    from datasets import Dataset, DatasetDict

    splits = {name: Dataset.from_file(str(staging / "raw" / f"{name}.arrow")) for name in SPLITS}
    DatasetDict(splits).save_to_disk(str(staging / "dataset"))


def _metadata(summary: PrepareSummary, tokenizer: Any, tokenizer_dir: Path,
              special: dict[str, int], options: _Options) -> dict[str, Any]:
    from hetlm import __version__
    from hetlm.data.tokenizer import vocab_hash

    splits = {"train": asdict(summary.train), "validation": asdict(summary.validation)}
    return {
        "format": FORMAT,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "hetlm_version": __version__,
        "seq_len": options.seq_len,
        "vocab_size": summary.vocab_size,
        "special_token_ids": special,
        "tokenizer_dir": str(tokenizer_dir.resolve()) if tokenizer_dir.exists()
        else str(tokenizer_dir),
        "tokenizer_vocab_hash": vocab_hash(tokenizer),
        "inputs": options.inputs,
        "text_field": options.text_field,
        "normalize": options.normalize,
        "validation_fraction": options.validation_fraction,
        "seed": options.seed,
        "documents": summary.train.documents + summary.validation.documents,
        "tokens": summary.train.tokens + summary.validation.tokens,
        "documents_without_tokens": summary.documents_without_tokens,
        "num_sequences": {name: counts["sequences"] for name, counts in splits.items()},
        "splits": splits,
        "corpus": {**summary.corpus.as_dict(), "summary": summary.corpus.summary()},
    }


def _move_into_place(built: Path, output_dir: Path, staging: Path) -> None:
    """Rename the finished dataset to its final name; an old one is moved aside first."""
    if output_dir.exists():
        output_dir.rename(staging / "replaced")  # same parent folder: an atomic rename
    built.rename(output_dir)


# ---------------------------------------------------------------- loading


def load_packed_dataset(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """Load a dataset written by :func:`prepare_dataset`: (DatasetDict, metadata dict)."""
    path = Path(path)
    if not path.exists():
        raise HetlmError(f"dataset {path} does not exist: create it with `hetlm prepare`")
    meta_path = path / META_FILE
    if not path.is_dir() or not meta_path.is_file():
        raise HetlmError(f"{path} is not a hetlm dataset (no {META_FILE}): create it with "
                         "`hetlm prepare`")
    meta = _read_meta(meta_path)
    dataset = _load_splits(path)
    _check_matches_meta(dataset, meta, path)
    return dataset, meta


def _read_meta(meta_path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise HetlmError(f"{meta_path} is unreadable ({exc}): re-create the dataset with "
                         "`hetlm prepare --overwrite`") from exc
    missing = [k for k in ("seq_len", "vocab_size", "special_token_ids") if k not in meta]
    if not isinstance(meta, dict) or missing:
        raise HetlmError(f"{meta_path} lacks {', '.join(missing) or 'its fields'}: re-create the "
                         "dataset with `hetlm prepare --overwrite`")
    return meta


def _load_splits(path: Path) -> Any:
    from datasets import DatasetDict, load_from_disk

    try:
        dataset = load_from_disk(str(path))
    except Exception as exc:  # datasets raises many types for damaged folders
        message = " ".join(str(exc).split())
        raise HetlmError(f"dataset {path} is corrupt or incomplete ({type(exc).__name__}: "
                         f"{message}); re-create it with `hetlm prepare --overwrite`") from exc
    if not isinstance(dataset, DatasetDict) or set(dataset) != set(SPLITS):
        raise HetlmError(f"dataset {path} does not hold the splits {' and '.join(SPLITS)}: "
                         "re-create it with `hetlm prepare --overwrite`")
    return dataset


def _check_matches_meta(dataset: Any, meta: dict[str, Any], path: Path) -> None:
    expected = packed_features(int(meta["seq_len"]))
    for name in SPLITS:
        if dataset[name].features != expected:
            raise HetlmError(f"dataset {path}: the {name} split has features "
                             f"{dataset[name].features}, not input_ids of length {meta['seq_len']}"
                             f" as {META_FILE} says; re-create it with `hetlm prepare --overwrite`")
        recorded = meta.get("num_sequences", {}).get(name)
        if recorded is not None and recorded != len(dataset[name]):
            raise HetlmError(f"dataset {path}: the {name} split has {len(dataset[name])} rows but "
                             f"{META_FILE} says {recorded}; re-create it with "
                             "`hetlm prepare --overwrite`")
