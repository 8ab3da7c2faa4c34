"""Comparing tokenizers on a corpus: compression, unknowns, reach of one sequence, speed.

For each tokenizer, on the same documents (the first ``max_chars`` characters of the corpus, read
and NFKC-normalised as ``hetlm prepare`` reads them, encoded by the same rule as packing):

- characters per token (higher: shorter sequences, cheaper training and inference);
- share of ``[UNK]`` tokens (information lost; a WordPiece word with one uncovered character
  becomes a single ``[UNK]``);
- characters covered by one ``seq_len``-token sequence (``(seq_len - 2) x chars/token``);
- vocabulary use: share of the vocabulary that occurs at least once in the sample;
- speed: characters per second in one process (the analyser's and WordPiece's Python cost
  included for MeCab/Sudachi), after a warm-up call: the best of three passes over the first
  ``SPEED_CHARS`` characters (the best, because other processes only ever slow a pass down).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hetlm.data.prepare.corpus import CorpusStats, iter_documents

SPEED_CHARS = 200_000


@dataclass
class TokenizerReport:
    """One tokenizer on one corpus."""

    corpus: str
    tokenizer: str
    kind: str
    vocab_size: int
    documents: int
    characters: int
    tokens: int
    chars_per_token: float
    unk_share: float
    chars_per_sequence: float
    vocab_used: float
    chars_per_second: float


def sample_documents(inputs: Sequence[str | Path], text_field: str, max_chars: int) -> list[str]:
    """The first documents of the corpus, up to ``max_chars`` characters in all."""
    documents, total = [], 0
    for document in iter_documents(inputs, text_field=text_field, stats=CorpusStats()):
        documents.append(document[: max_chars - total])
        total += len(documents[-1])
        if total >= max_chars:
            break
    return documents


def measure(
    tokenizer_dir: str | Path,
    documents: list[str],
    *,
    corpus: str,
    seq_len: int = 512,
    label: str | None = None,
) -> TokenizerReport:
    """The numbers of one tokenizer on ``documents`` (see the module docstring)."""
    from hetlm.data.prepare.encoding import DocumentEncoder, EncoderSpec
    from hetlm.data.tokenizer import load_tokenizer, tokenizer_kind

    tokenizer = load_tokenizer(tokenizer_dir)
    encoder = DocumentEncoder(
        EncoderSpec.for_tokenizer(tokenizer, tokenizer_dir), single_threaded=False
    )
    encoder.ids(documents[:1])  # warm-up: dictionaries, caches
    ids = encoder.ids(documents)
    timed, size = [], 0
    for document in documents:
        timed.append(document[: SPEED_CHARS - size])
        size += len(timed[-1])
        if size >= SPEED_CHARS:
            break
    seconds = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        encoder.ids(timed)
        seconds = min(seconds, time.perf_counter() - started)
    flat = np.fromiter((i for doc in ids for i in doc), dtype=np.int64)
    characters = sum(len(d) for d in documents)
    tokens = max(1, len(flat))
    vocab = len(tokenizer)
    chars_per_token = characters / tokens
    return TokenizerReport(
        corpus=corpus,
        tokenizer=label or Path(tokenizer_dir).name,
        kind=tokenizer_kind(tokenizer),
        vocab_size=vocab,
        documents=len(documents),
        characters=characters,
        tokens=len(flat),
        chars_per_token=round(chars_per_token, 4),
        unk_share=round(float((flat == tokenizer.unk_token_id).mean()) if len(flat) else 0.0, 6),
        chars_per_sequence=round((seq_len - 2) * chars_per_token, 1),
        vocab_used=round(len(np.unique(flat)) / vocab, 4),
        chars_per_second=round(size / max(seconds, 1e-9)),
    )


def compare_tokenizers(
    inputs: Sequence[str | Path],
    tokenizer_dirs: Sequence[str | Path],
    *,
    text_field: str = "text",
    max_chars: int = 1_000_000,
    seq_len: int = 512,
    corpus_label: str | None = None,
) -> list[TokenizerReport]:
    """:func:`measure` every tokenizer on the same sample of the corpus."""
    documents = sample_documents(inputs, text_field, max_chars)
    label = corpus_label or ", ".join(Path(str(i)).name for i in inputs)
    return [measure(d, documents, corpus=label, seq_len=seq_len) for d in tokenizer_dirs]


def markdown_table(reports: Sequence[TokenizerReport], seq_len: int = 512) -> str:
    """The reports as a Markdown table."""
    lines = [
        f"| corpus | tokenizer | type | vocab | chars/token | [UNK] share | chars per "
        f"{seq_len}-token sequence | vocab used | chars/s (1 process) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in reports:
        lines.append(
            f"| {r.corpus} | {r.tokenizer} | {r.kind} | {r.vocab_size:,} | "
            f"{r.chars_per_token:.2f} | {100 * r.unk_share:.2f}% | "
            f"{r.chars_per_sequence:,.0f} | {100 * r.vocab_used:.1f}% | "
            f"{r.chars_per_second:,.0f} |"
        )
    return "\n".join(lines) + "\n"


def reports_json(reports: Sequence[TokenizerReport]) -> list[dict[str, Any]]:
    return [asdict(r) for r in reports]


def write_reports(
    reports: Sequence[TokenizerReport],
    markdown: Path | None,
    json_path: Path | None,
    seq_len: int = 512,
    title: str | None = None,
) -> None:
    """Write the Markdown table (with a title) and/or the JSON list."""
    if markdown is not None:
        head = f"# {title}\n\n" if title else ""
        markdown.parent.mkdir(parents=True, exist_ok=True)
        markdown.write_text(head + markdown_table(reports, seq_len), encoding="utf-8")
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(
            json.dumps(reports_json(reports), ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
        )
