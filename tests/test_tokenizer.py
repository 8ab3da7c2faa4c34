"""Tokenizer training: a folder that plain transformers loads, BERT-style, Japanese round trip."""

from __future__ import annotations

import json
import unicodedata

import pytest
from _data_fixtures import (  # noqa: F401 - fixtures
    TOKENIZER_OPTIONS,
    aozora_slice,
    trained_tokenizer,
    write_jsonl,
)

from hetlm.cli import main
from hetlm.data.prepare.tokenizer_training import train_tokenizer
from hetlm.data.tokenizer import MASK, SPECIAL_TOKENS, load_tokenizer, special_token_ids
from hetlm.errors import HetlmError

SENTENCE = "吾輩は猫である。名前はまだ無い。"
PAIR = ("どこで生れたかとんと見当がつかぬ。", "何でも薄暗いじめじめした所で泣いていた。")


@pytest.fixture(scope="module")
def auto_tokenizer(trained_tokenizer):  # noqa: F811
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(trained_tokenizer))


def test_folder_holds_model_fast_tokenizer_and_record(trained_tokenizer):  # noqa: F811
    names = {p.name for p in trained_tokenizer.iterdir()}
    assert {
        "sentencepiece.model",
        "tokenizer.json",
        "tokenizer_config.json",
        "hetlm_tokenizer.json",
    } <= names
    record = json.loads((trained_tokenizer / "hetlm_tokenizer.json").read_text(encoding="utf-8"))
    assert record["vocab_size"] == TOKENIZER_OPTIONS["vocab_size"]
    assert record["sentencepiece_options"]["model_type"] == "unigram"
    assert {"sentencepiece", "hetlm", "transformers"} <= set(record["versions"])
    assert record["corpus"]["documents"] > 0 and record["created"]
    config = json.loads((trained_tokenizer / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_auto_tokenizer_loads_fast_with_bert_specials_at_0_to_4(auto_tokenizer):
    tok = auto_tokenizer
    assert tok.is_fast
    assert len(tok) == TOKENIZER_OPTIONS["vocab_size"]  # no tokens were added on top
    assert tok.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == [0, 1, 2, 3, 4]
    assert (
        tok.pad_token,
        tok.unk_token,
        tok.cls_token,
        tok.sep_token,
        tok.mask_token,
    ) == SPECIAL_TOKENS
    assert special_token_ids(tok) == {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    assert tok.model_max_length == 512


def test_single_and_pair_encoding_is_bert_style(auto_tokenizer):
    tok = auto_tokenizer
    single = tok(SENTENCE)
    assert single["input_ids"][0] == 2 and single["input_ids"][-1] == 3
    assert set(single["token_type_ids"]) == {0}
    pair = tok(*PAIR)
    ids, types = pair["input_ids"], pair["token_type_ids"]
    first_sep = ids.index(3)
    assert ids[0] == 2 and ids[-1] == 3 and ids.count(3) == 2
    assert types == [0] * (first_sep + 1) + [1] * (len(ids) - first_sep - 1)
    assert pair["attention_mask"] == [1] * len(ids)


def test_japanese_round_trip(auto_tokenizer):
    tok = auto_tokenizer
    for text in (SENTENCE, *PAIR, "ＡＢＣは全角、ｶﾀｶﾅは半角。"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        decoded = tok.decode(ids)
        if tok.unk_token_id not in ids:
            assert decoded == unicodedata.normalize("NFKC", text)
    ids = tok(SENTENCE, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == SENTENCE


def test_mask_in_text_is_one_token(auto_tokenizer):
    tok = auto_tokenizer
    ids = tok(f"吾輩は{MASK}である。")["input_ids"]
    assert ids.count(4) == 1
    assert tok.convert_ids_to_tokens(ids)[ids.index(4)] == MASK
    # the text around [MASK] is tokenized as in running text: no extra "▁" after the mask
    masked = tok(f"吾輩は{MASK}である。", add_special_tokens=False)["input_ids"]
    with_word = tok("吾輩は猫である。", add_special_tokens=False)["input_ids"]
    position = masked.index(4)
    assert (
        masked[:position] + masked[position + 1 :]
        == with_word[:position] + with_word[position + 1 :]
    )


def test_fast_tokenizer_encodes_like_sentencepiece(trained_tokenizer, auto_tokenizer):  # noqa: F811
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(trained_tokenizer / "sentencepiece.model"))
    for text in (SENTENCE, *PAIR, "漱石と芥川の小説を読む。", "abc  def 123"):
        assert auto_tokenizer(text, add_special_tokens=False)["input_ids"] == sp.encode(text)


def test_fill_mask_pipeline_uses_the_tokenizer(auto_tokenizer):
    import torch
    from transformers import BertConfig, BertForMaskedLM, pipeline

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(auto_tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    fill = pipeline("fill-mask", model=BertForMaskedLM(config).eval(), tokenizer=auto_tokenizer)
    results = fill(f"吾輩は{MASK}である。", top_k=3)
    assert len(results) == 3
    assert all(MASK not in r["sequence"] and isinstance(r["token_str"], str) for r in results)


def test_bpe_with_byte_fallback_round_trips_unseen_characters(tmp_path, aozora_slice):  # noqa: F811
    out = train_tokenizer(
        [aozora_slice],
        tmp_path / "bpe",
        model_type="bpe",
        byte_fallback=True,
        vocab_size=1800,
        character_coverage=0.98,
    )
    tok = load_tokenizer(out)
    assert tok.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == [0, 1, 2, 3, 4]
    assert len(tok) == 1800
    for text in (SENTENCE, "寿司🍣と鰻。"):  # the sushi emoji never occurs in the corpus
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == text


def test_load_tokenizer_refuses_unusable_folders(tmp_path, trained_tokenizer):  # noqa: F811
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(HetlmError, match="contains no tokenizer files"):
        load_tokenizer(empty)
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text('{"model_type": "bert"}', encoding="utf-8")
    with pytest.raises(HetlmError, match="contains no tokenizer files"):
        load_tokenizer(checkpoint)
    with pytest.raises(HetlmError, match="no such folder"):
        load_tokenizer(tmp_path / "missing")
    assert load_tokenizer(trained_tokenizer).mask_token_id == 4


def test_load_tokenizer_refuses_a_vocab_without_bert_specials(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(40)} | {"<unk>": 40}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")), unk_token="<unk>"
    )
    tok.save_pretrained(str(tmp_path / "words"))
    with pytest.raises(HetlmError, match=r"lacks the special tokens \[PAD\] \[UNK\] \[CLS\]"):
        load_tokenizer(tmp_path / "words")
    assert len(load_tokenizer(tmp_path / "words", required_tokens=())) == 41


def test_training_errors_are_clear(tmp_path, aozora_slice):  # noqa: F811
    with pytest.raises(HetlmError, match="lower --vocab-size"):
        train_tokenizer([aozora_slice], tmp_path / "t1", vocab_size=100, character_coverage=0.98)
    empty = write_jsonl(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(HetlmError, match="contains no documents"):
        train_tokenizer([empty], tmp_path / "t2", vocab_size=100)
    with pytest.raises(HetlmError, match="character_coverage"):
        train_tokenizer([aozora_slice], tmp_path / "t3", character_coverage=0.5)
    with pytest.raises(HetlmError, match="model_type"):
        train_tokenizer([aozora_slice], tmp_path / "t4", model_type="wordpiece")
    binary = tmp_path / "weights.txt"
    binary.write_bytes(b"\x00\x01" * 100)
    with pytest.raises(HetlmError, match="weights.txt looks like a binary file"):
        train_tokenizer([aozora_slice, binary], tmp_path / "t5", **TOKENIZER_OPTIONS)
    assert not any((tmp_path / name).exists() for name in ("t1", "t2", "t5"))


def test_cli_tokenizer_train(tmp_path, capsys, aozora_slice):  # noqa: F811
    out = tmp_path / "cli_tok"
    code = main(
        [
            "tokenizer",
            "train",
            str(aozora_slice),
            "--output",
            str(out),
            "--vocab-size",
            "1500",
            "--character-coverage",
            "0.98",
            "--model-type",
            "bpe",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0
    assert "documents" in captured.out and str(out) in captured.out
    assert load_tokenizer(out).cls_token_id == 2


def test_cli_tokenizer_train_bad_input_is_one_line(tmp_path, capsys):
    code = main(["tokenizer", "train", str(tmp_path / "nope.txt"), "--output", str(tmp_path / "t")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("hetlm: error: ") and err.count("\n") == 1
    assert "nope.txt does not exist" in err


def test_bpe_encodes_like_sentencepiece_without_transformers_converter(tmp_path, aozora_slice):  # noqa: F811
    """hetlm builds the backend itself (transformers' converter differs between 5.x releases)."""
    import sentencepiece as spm

    out = train_tokenizer(
        [aozora_slice], tmp_path / "bpe", model_type="bpe", vocab_size=1800, character_coverage=0.98
    )
    tok = load_tokenizer(out)
    sp = spm.SentencePieceProcessor(model_file=str(out / "sentencepiece.model"))
    for text in (SENTENCE, *PAIR, "  前後に空白  と 二重  空白 ", "改行\nのある\n文"):
        assert tok(text, add_special_tokens=False)["input_ids"] == sp.encode(text), text
