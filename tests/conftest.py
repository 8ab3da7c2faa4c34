"""Shared fixtures: a tiny corpus, tokenizer and packed dataset built once per test session."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# The suite's references (split invariance, exact resume) are CPU numbers on gloo ranks, and its
# multi-rank tests emulate nodes on one machine: on a GPU machine they would otherwise put every
# rank on cuda:0. GPU paths are checked by benchmarks/gpu_check.py (its --dry-run runs here).
os.environ.setdefault("HETLM_DEVICE", "cpu")

REPO = Path(__file__).resolve().parents[1]
AOZORA = REPO / "data" / "general_aozora" / "aozora_soseki_akutagawa.jsonl"


def write_small_corpus(path: Path, documents: int = 12, chars: int = 15000) -> Path:
    """The first works of the shipped Aozora corpus, each cut to ``chars`` characters."""
    with AOZORA.open(encoding="utf-8") as src, path.open("w", encoding="utf-8") as out:
        for _, line in zip(range(documents), src, strict=False):
            text = json.loads(line)["text"][:chars]
            out.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_packed(tmp_path_factory) -> Path:
    """A packed dataset (seq_len 32) with its tokenizer (vocab 3000), for training tests."""
    from hetlm.data.prepare.pipeline import prepare_dataset
    from hetlm.data.prepare.tokenizer_training import train_tokenizer

    root = tmp_path_factory.mktemp("tiny_packed")
    corpus = write_small_corpus(root / "corpus.jsonl")
    tokenizer = train_tokenizer([corpus], root / "tokenizer", vocab_size=3000)
    prepare_dataset(
        [corpus], tokenizer, root / "data", seq_len=32, validation_fraction=0.2, workers=1
    )
    return root / "data"


def tiny_config(dataset: Path, output_dir: Path, **train) -> dict:
    """A fp32, dropout-free tiny-BERT run configuration (split invariance needs both)."""
    base = {
        "global_batch": 8,
        "micro_batch": 8,
        "max_steps": 3,
        "learning_rate": 1e-3,
        "warmup_steps": 1,
        "precision": "fp32",
        "max_eval_samples": 32,
        "logging_steps": 1,
    }
    base.update(train)
    return {
        "run": {"output_dir": str(output_dir), "seed": 0},
        "data": {"dataset": str(dataset)},
        "model": {"type": "bert", "preset": "tiny", "dropout": 0.0},
        "train": base,
    }
