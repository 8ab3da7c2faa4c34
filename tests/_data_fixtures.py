"""Shared fixtures for the corpus, tokenizer and packing tests.

A small slice of the shipped Aozora corpus (about 180k characters) and one tokenizer trained on
it once per test session (about 1 s): tokenizer training is the slow part, so both test modules
share the same folder through a module-level cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
AOZORA = REPO / "data" / "general_aozora" / "aozora_soseki_akutagawa.jsonl"
SLICE_RECORDS = 12
SLICE_CHARS = 15000  # per record
TOKENIZER_OPTIONS = dict(vocab_size=1500, character_coverage=0.98)

_CACHE: dict[str, Path] = {}


def aozora_texts(records: int = SLICE_RECORDS, chars: int = SLICE_CHARS) -> list[str]:
    """The first ``chars`` characters of the first ``records`` works."""
    texts = []
    with AOZORA.open(encoding="utf-8") as f:
        for line in f:
            texts.append(json.loads(line)["text"][:chars])
            if len(texts) == records:
                break
    return texts


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    with path.open("w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({field: text}, ensure_ascii=False) + "\n")
    return path


@pytest.fixture(scope="session")
def aozora_slice(tmp_path_factory) -> Path:
    """JSON Lines: a slice of the shipped corpus, text in "text"."""
    if "slice" not in _CACHE:
        folder = tmp_path_factory.mktemp("aozora")
        _CACHE["slice"] = write_jsonl(folder / "slice.jsonl", aozora_texts())
    return _CACHE["slice"]


@pytest.fixture(scope="session")
def trained_tokenizer(tmp_path_factory, aozora_slice) -> Path:
    """A unigram tokenizer (vocab 1500) trained on the slice; do not modify its folder."""
    if "tokenizer" not in _CACHE:
        from hetlm.data.prepare.tokenizer_training import train_tokenizer

        out = tmp_path_factory.mktemp("tokenizer") / "tok"
        _CACHE["tokenizer"] = train_tokenizer([aozora_slice], out, **TOKENIZER_OPTIONS)
    return _CACHE["tokenizer"]


@pytest.fixture(scope="session")
def paragraph_corpus(tmp_path_factory) -> Path:
    """JSON Lines with a few hundred short documents (paragraphs of the slice) for packing."""
    if "paragraphs" not in _CACHE:
        paragraphs = []
        for text in aozora_texts(records=6, chars=6000):
            paragraphs.extend(p for p in text.split("\n") if p.strip())
        folder = tmp_path_factory.mktemp("paragraphs")
        _CACHE["paragraphs"] = write_jsonl(folder / "paragraphs.jsonl", paragraphs)
    return _CACHE["paragraphs"]


WORDPIECE_OPTIONS = dict(vocab_size=2000, workers=1)
FINANCE_SENTENCE = "当社グループの売上高は前年同期比で増加しました。"


def _wordpiece_tokenizer(kind: str, tmp_path_factory, corpus: Path, **options) -> Path:
    """A MeCab or Sudachi + WordPiece tokenizer on the slice (skips when not installed)."""
    pytest.importorskip("fugashi" if kind == "mecab" else "sudachipy")
    key = f"{kind}:{sorted(options.items())}"
    if key not in _CACHE:
        from hetlm.data.prepare.tokenizer_training import train_tokenizer

        out = tmp_path_factory.mktemp(f"tok_{kind}") / kind
        _CACHE[key] = train_tokenizer(
            [corpus], out, tokenizer_type=kind, **{**WORDPIECE_OPTIONS, **options}
        )
    return _CACHE[key]


@pytest.fixture(scope="session")
def mecab_tokenizer(tmp_path_factory, aozora_slice) -> Path:
    """MeCab (unidic-lite) + WordPiece, vocab 2000, trained on the slice."""
    return _wordpiece_tokenizer("mecab", tmp_path_factory, aozora_slice)


@pytest.fixture(scope="session")
def sudachi_tokenizer(tmp_path_factory, aozora_slice) -> Path:
    """Sudachi (mode C, core) + WordPiece, vocab 2000, trained on the slice."""
    return _wordpiece_tokenizer("sudachi", tmp_path_factory, aozora_slice, sudachi_mode="C")
