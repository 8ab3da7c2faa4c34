"""Tokenizing documents in worker processes, for fast and slow (MeCab/Sudachi) tokenizers alike.

A worker needs its own tokenizer. A fast tokenizer travels as its ``tokenizer.json`` string (cheap
and exact); a slow one (``BertJapaneseTokenizer``: Python WordPiece over a C analyser) is loaded
in the worker from its folder with ``AutoTokenizer``, exactly as a user would load it.

How a document becomes ids (``encode_document``):

- fast tokenizers encode the whole document, as ``tokenizer(document)`` does;
- word-segmenting tokenizers encode it line by line (lines over 4,096 characters in pieces) and
  concatenate: words never span lines, Sudachi refuses inputs over 49,149 bytes, and MeCab's
  cost grows with the input length. Blank lines give no tokens either way.

Workers return each batch as one flat ``int32`` array plus lengths: pickling numbers as arrays
instead of Python lists is several times cheaper for the main process.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from hetlm.data.segmenters import MAX_SEGMENT_CHARS


@dataclass(frozen=True)
class EncoderSpec:
    """How a worker gets the tokenizer: ``kind`` "fast" (payload: tokenizer JSON) or
    "pretrained" (payload: the tokenizer folder, loaded with ``AutoTokenizer``)."""

    kind: str
    payload: str

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, tokenizer_dir: str | os.PathLike) -> EncoderSpec:
        if getattr(tokenizer, "is_fast", False):
            return cls("fast", tokenizer.backend_tokenizer.to_str())
        return cls("pretrained", str(tokenizer_dir))

    @property
    def rule(self) -> str:
        """The document-to-ids rule, in words (recorded in the dataset metadata)."""
        if self.kind == "fast":
            return "whole document, no special tokens"
        return (
            f"line by line (lines over {MAX_SEGMENT_CHARS} characters in pieces), "
            "concatenated, no special tokens"
        )


def document_pieces(document: str) -> list[str]:
    """The non-blank lines of a document, long lines cut into pieces of MAX_SEGMENT_CHARS."""
    pieces = []
    for line in document.split("\n"):
        if not line.strip():
            continue
        pieces.extend(
            line[i : i + MAX_SEGMENT_CHARS] for i in range(0, len(line), MAX_SEGMENT_CHARS)
        )
    return pieces


class DocumentEncoder:
    """Turns a batch of documents into (flat ids, lengths) with the tokenizer of a spec."""

    def __init__(self, spec: EncoderSpec, single_threaded: bool):
        if single_threaded:
            # Each worker process is one core's worth of work; Rust threads would oversubscribe.
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
        self.spec = spec
        if spec.kind == "fast":
            from tokenizers import Tokenizer

            self.fast = Tokenizer.from_str(spec.payload)
            self.slow = None
        else:
            import warnings

            from transformers import AutoTokenizer
            from transformers.utils import logging

            logging.set_verbosity_error()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                self.slow = AutoTokenizer.from_pretrained(spec.payload)
            self.slow.model_max_length = 1 << 40  # no "sequence too long" warnings
            self.fast = None

    def ids(self, texts: list[str]) -> list[list[int]]:
        if self.fast is not None:
            return [e.ids for e in self.fast.encode_batch_fast(texts, add_special_tokens=False)]
        out = []
        for text in texts:
            pieces = document_pieces(text)
            encoded = self.slow(pieces, add_special_tokens=False)["input_ids"] if pieces else []
            out.append([i for piece in encoded for i in piece])
        return out

    def arrays(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        ids = self.ids(texts)
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter((i for x in ids for i in x), dtype=np.int32, count=int(lengths.sum()))
        return flat, lengths


_WORKER: dict[str, Any] = {}


def _worker_init(spec: EncoderSpec) -> None:
    """Only stores the spec: building the tokenizer here could fail, and a failing ``Pool``
    initializer makes the pool restart workers forever instead of raising."""
    _WORKER["spec"] = spec
    _WORKER.pop("encoder", None)


def _worker_encoder(single_threaded: bool = True) -> DocumentEncoder:
    if "encoder" not in _WORKER:
        _WORKER["encoder"] = DocumentEncoder(_WORKER["spec"], single_threaded)
    return _WORKER["encoder"]


def _encode_arrays(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return _worker_encoder().arrays(texts)


def encode_batches(
    batches: Iterable[tuple[Any, list[str]]], spec: EncoderSpec, *, workers: int
) -> Iterator[tuple[Any, np.ndarray, np.ndarray]]:
    """(tag, flat ids, lengths) for each (tag, texts) batch, in order.

    At most ``4 * workers`` batches are in flight (enough to keep every worker busy while the
    main process reads, or finishes a chunk), so a fast reader never queues the whole corpus
    in memory (``Pool.imap`` would consume its input eagerly). Workers are spawned, not forked:
    forking a process that already runs tokenizer/torch threads can deadlock.
    """
    if workers == 1:
        encoder = DocumentEncoder(spec, single_threaded=False)
        for tag, texts in batches:
            yield (tag, *encoder.arrays(texts))
        return
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_worker_init, initargs=(spec,)) as pool:
        pending: deque = deque()
        for tag, texts in batches:
            pending.append((tag, pool.apply_async(_encode_arrays, (texts,))))
            if len(pending) >= 4 * workers:
                tag_out, result = pending.popleft()
                yield (tag_out, *result.get())
        while pending:
            tag_out, result = pending.popleft()
            yield (tag_out, *result.get())
