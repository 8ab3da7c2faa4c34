"""Pretraining on a MeCab + WordPiece dataset: whole-word masking on, the Japanese BERT
tokenizer saved with the model; and reading a node-local staged copy of the dataset."""

from __future__ import annotations

import json

import pytest
from _dist import run_single
from conftest import tiny_config, write_small_corpus

pytest.importorskip("fugashi")


@pytest.fixture(scope="module")
def mecab_packed(tmp_path_factory):
    from hetlm.data.prepare.pipeline import prepare_dataset
    from hetlm.data.prepare.tokenizer_training import train_tokenizer

    root = tmp_path_factory.mktemp("mecab")
    corpus = write_small_corpus(root / "corpus.jsonl", documents=6, chars=6000)
    tokenizer = train_tokenizer([corpus], root / "tok", vocab_size=3000, tokenizer_type="mecab")
    prepare_dataset(
        [corpus], tokenizer, root / "data", seq_len=32, validation_fraction=0.2, workers=1
    )
    return root / "data"


def test_whole_word_masking_run_saves_a_japanese_bert_tokenizer(mecab_packed, tmp_path):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from hetlm.data import readers

    meta = json.loads((mecab_packed / "hetlm_dataset.json").read_text())
    assert meta["whole_word_masking"]["available"]
    seen = {}
    original = readers.PackedMLMData.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        seen["whole_word"] = self.collator.whole_word

    readers.PackedMLMData.__init__ = spy
    try:
        run_single(tiny_config(mecab_packed, tmp_path, max_steps=2))
    finally:
        readers.PackedMLMData.__init__ = original
    assert seen["whole_word"] is True  # on by default for a word-segmenting tokenizer
    model_dir = tmp_path / "model"
    assert (model_dir / "vocab.txt").is_file()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert type(tokenizer).__name__ == "BertJapaneseTokenizer"
    model = AutoModelForMaskedLM.from_pretrained(model_dir)
    assert model.config.vocab_size == len(tokenizer)


def test_whole_word_masking_refused_for_sentencepiece(tiny_packed, tmp_path):
    from hetlm.errors import HetlmError

    config = tiny_config(tiny_packed, tmp_path)
    config["data"]["whole_word_masking"] = True
    with pytest.raises(HetlmError, match="word-segmenting tokenizer"):
        run_single(config)


def test_training_reads_a_complete_local_copy_and_falls_back_otherwise(
    tiny_packed, tmp_path, capsys
):
    from hetlm.data.staging import stage_dataset

    local = tmp_path / "local" / "data"
    stage_dataset(tiny_packed, local)
    config = tiny_config(tiny_packed, tmp_path / "run", max_steps=1)
    config["data"]["local_copy"] = str(local)
    run_single(config)
    assert "not the local copy" not in capsys.readouterr().out
    victim = next(p for p in local.rglob("*.arrow"))
    victim.write_bytes(victim.read_bytes()[:100])  # a damaged local copy
    config = tiny_config(tiny_packed, tmp_path / "run2", max_steps=1)
    config["data"]["local_copy"] = str(local)
    run_single(config)
    assert "not the local copy" in capsys.readouterr().out
