"""Tiny checkpoints for the evaluation tests, built once per session (a few seconds).

Test modules import the ``*_fixture`` functions (registered under the short names
``tiny_bert``, ``tiny_llama``, ``one_torch_thread``) so the argument names do not shadow imports.

A SentencePiece tokenizer trained on the synthetic fixture text (tests/fixtures/eval_data), a
tiny BERT and a tiny LLaMA built from configs, each saved with ``save_pretrained`` next to the
tokenizer, exactly as a real checkpoint folder is. A module-level cache shares them between the
test modules that import these fixtures.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

EVAL_DATA = Path(__file__).resolve().parent / "fixtures" / "eval_data"
CHABSA = EVAL_DATA / "finance_chabsa" / "chabsa_annotations.jsonl"
EWS = EVAL_DATA / "finance_economy_watchers" / "ews_current_2024H2.jsonl"

_CACHE: dict[str, Path] = {}


def fixture_texts() -> list[str]:
    """Every text of both fixture files (sentences and comments)."""
    texts = []
    for line in CHABSA.read_text(encoding="utf-8").splitlines():
        texts.extend(s["sentence"] for s in json.loads(line)["sentences"])
    for line in EWS.read_text(encoding="utf-8").splitlines():
        texts.append(json.loads(line)["追加説明及び具体的状況の説明"])
    return texts


def _tokenizer(root: Path) -> Path:
    if "tokenizer" not in _CACHE:
        from hetlm.data.prepare.tokenizer_training import train_tokenizer

        corpus = root / "fixture_text.jsonl"
        corpus.write_text(
            "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in fixture_texts()),
            encoding="utf-8",
        )
        _CACHE["tokenizer"] = train_tokenizer([corpus], root / "tokenizer", vocab_size=300)
    return _CACHE["tokenizer"]


def _save_with_tokenizer(model, tokenizer_dir: Path, out: Path) -> Path:
    model.save_pretrained(out)
    for item in tokenizer_dir.iterdir():
        shutil.copy(item, out / item.name)
    return out


@pytest.fixture(scope="session", name="tiny_bert")
def tiny_bert_fixture(tmp_path_factory) -> Path:
    """A ``BertForMaskedLM`` (tiny preset, random weights) saved with its tokenizer."""
    if "bert" not in _CACHE:
        import torch
        from transformers import AutoTokenizer, BertForMaskedLM

        from hetlm.models.presets import bert_config

        root = tmp_path_factory.mktemp("eval_models")
        tokenizer_dir = _tokenizer(root)
        vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
        torch.manual_seed(0)
        model = BertForMaskedLM(bert_config("tiny", vocab, max_position_embeddings=128))
        _CACHE["bert"] = _save_with_tokenizer(model, tokenizer_dir, root / "tiny-bert")
    return _CACHE["bert"]


@pytest.fixture(scope="session", name="tiny_llama")
def tiny_llama_fixture(tmp_path_factory, tiny_bert) -> Path:
    """A ``LlamaForCausalLM`` (2 layers, hidden 32) saved with the same tokenizer."""
    if "llama" not in _CACHE:
        import torch
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tokenizer_dir = _CACHE["tokenizer"]
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=128,
            pad_token_id=tokenizer.pad_token_id,
        )
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        _CACHE["llama"] = _save_with_tokenizer(
            model, tokenizer_dir, tiny_bert.parent / "tiny-llama"
        )
    return _CACHE["llama"]


@pytest.fixture(autouse=True, name="one_torch_thread")
def one_torch_thread_fixture():
    """Tiny models run fastest on one thread, and on a busy machine two spinning OpenMP
    threads per process slowed fine-tuning 10x in measurements; restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
