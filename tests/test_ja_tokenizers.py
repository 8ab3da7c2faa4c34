"""MeCab/Sudachi + WordPiece tokenizers: AutoTokenizer round trip, the analyser's own words,
packing with slow tokenizers in worker processes, comparison, clear errors."""

from __future__ import annotations

import json
import sys
import unicodedata

import numpy as np
import pytest
from _data_fixtures import (  # noqa: F401 - fixtures
    FINANCE_SENTENCE,
    aozora_slice,
    mecab_tokenizer,
    paragraph_corpus,
    sudachi_tokenizer,
    trained_tokenizer,
    write_jsonl,
)

from hetlm.cli import main
from hetlm.data.collators import MLMCollator, continuation_mask
from hetlm.data.packed import load_packed_dataset
from hetlm.data.prepare.corpus import iter_documents
from hetlm.data.prepare.encoding import document_pieces
from hetlm.data.prepare.packing import is_validation_document
from hetlm.data.prepare.pipeline import prepare_dataset
from hetlm.data.prepare.tokenizer_training import train_tokenizer
from hetlm.data.segmenters import SegmenterSpec, build_segmenter, segment
from hetlm.data.tokenizer import load_tokenizer
from hetlm.errors import HetlmError

pytest.importorskip("fugashi")
pytest.importorskip("sudachipy")

KINDS = ("mecab", "sudachi")
# SudachiPy 0.7 deprecates Dictionary.create, which transformers' SudachiTokenizer calls
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def folders(mecab_tokenizer, sudachi_tokenizer):  # noqa: F811
    return {"mecab": mecab_tokenizer, "sudachi": sudachi_tokenizer}


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_through_auto_tokenizer(kind, folders, tmp_path):
    from transformers import AutoTokenizer

    folder = folders[kind]
    assert {"vocab.txt", "tokenizer_config.json", "hetlm_tokenizer.json"} <= {
        p.name for p in folder.iterdir()
    }
    tok = AutoTokenizer.from_pretrained(str(folder))
    assert type(tok).__name__ == "BertJapaneseTokenizer" and tok.word_tokenizer_type == kind
    assert tok.convert_tokens_to_ids(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]) == [
        0,
        1,
        2,
        3,
        4,
    ]
    assert 1000 < len(tok) <= 2000
    pair = tok("吾輩は猫である。", "名前はまだ無い。")
    first_sep = pair["input_ids"].index(3)
    assert pair["input_ids"][0] == 2 and pair["input_ids"][-1] == 3
    assert pair["token_type_ids"] == [0] * (first_sep + 1) + [1] * (
        len(pair["input_ids"]) - first_sep - 1
    )
    # save and load again: the same encoding; decoding gives the text back (spaces aside)
    tok.save_pretrained(str(tmp_path / "again"))
    again = AutoTokenizer.from_pretrained(str(tmp_path / "again"))
    for text in ("吾輩は猫である。名前はまだ無い。", FINANCE_SENTENCE, "ＡＢＣと[MASK]。"):
        ids = tok(text)["input_ids"]
        assert again(text)["input_ids"] == ids
        if tok.unk_token_id not in ids:
            decoded = tok.decode(ids, skip_special_tokens=False)
            expected = "[CLS]" + unicodedata.normalize("NFKC", text) + "[SEP]"
            assert "".join(decoded.split()) == expected
    assert tok("当社[MASK]は")["input_ids"].count(4) == 1
    assert load_tokenizer(folder).mask_token_id == 4


def test_segmentation_is_what_the_analyser_gives(folders):
    import fugashi
    import unidic_lite
    from sudachipy import Dictionary, SplitMode
    from transformers import AutoTokenizer

    tagger = fugashi.GenericTagger(f'-d "{unidic_lite.DICDIR}" -r "{unidic_lite.DICDIR}/mecabrc"')
    mecab_words = [w.surface for w in tagger(FINANCE_SENTENCE)]
    sudachi = Dictionary(dict="core").create(SplitMode.C)
    sudachi_words = [m.surface() for m in sudachi.tokenize(FINANCE_SENTENCE)]
    assert mecab_words[:5] == ["当社", "グループ", "の", "売上", "高"]
    assert "売上高" in sudachi_words
    for kind, expected in (("mecab", mecab_words), ("sudachi", sudachi_words)):
        spec = SegmenterSpec(kind, sudachi_mode="C")
        assert segment(build_segmenter(spec), FINANCE_SENTENCE) == expected
        loaded = AutoTokenizer.from_pretrained(str(folders[kind]))
        assert loaded.word_tokenizer.tokenize(FINANCE_SENTENCE) == expected
        # WordPiece pieces of each word concatenate back to the word
        pieces = loaded.tokenize(FINANCE_SENTENCE)
        words = "".join(
            p.removeprefix("##") if p.startswith("##") else f" {p}" for p in pieces
        ).split()
        assert words == [w for w in expected] or loaded.unk_token in pieces


def test_the_record_says_how_it_was_made(folders):
    record = json.loads((folders["sudachi"] / "hetlm_tokenizer.json").read_text("utf-8"))
    assert record["type"] == "sudachi"
    assert record["segmenter"]["sudachi_mode"] == "C"
    assert {"sudachipy", "sudachidict_core"} <= set(record["segmenter"]["versions"])
    options = record["wordpiece_options"]
    assert options["vocab_size"] == 2000 and options["continuing_subword_prefix"] == "##"
    assert 0 < options["alphabet"] <= (2000 - 5) // 4
    assert options["sentences_sampled"] == options["sentences_seen"] > 0
    assert record["corpus"]["documents"] == 12 and record["cleaning"]["kept"] == 12
    config = json.loads((folders["mecab"] / "tokenizer_config.json").read_text("utf-8"))
    assert config["tokenizer_class"] == "BertJapaneseTokenizer"
    assert config["mecab_kwargs"]["mecab_dic"] == "unidic_lite"


def test_input_sentence_size_samples_lines(tmp_path, aozora_slice):  # noqa: F811
    out = train_tokenizer(
        [aozora_slice],
        tmp_path / "small",
        tokenizer_type="mecab",
        vocab_size=1000,
        input_sentence_size=200,
        workers=1,
    )
    options = json.loads((out / "hetlm_tokenizer.json").read_text("utf-8"))["wordpiece_options"]
    assert options["sentences_sampled"] == 200 < options["sentences_seen"]


def test_missing_analyser_names_the_extra(
    tmp_path,
    monkeypatch,
    aozora_slice,  # noqa: F811
    folders,
):
    monkeypatch.setitem(sys.modules, "sudachipy", None)  # import sudachipy now fails
    with pytest.raises(HetlmError, match=r"sudachipy.*pip install 'hetlm\[ja\]'"):
        train_tokenizer([aozora_slice], tmp_path / "t", tokenizer_type="sudachi")
    with pytest.raises(HetlmError, match=r"pip install 'hetlm\[ja\]'"):
        load_tokenizer(folders["sudachi"])
    monkeypatch.setitem(sys.modules, "ipadic", None)
    with pytest.raises(HetlmError, match="pip install ipadic"):
        train_tokenizer([aozora_slice], tmp_path / "t", tokenizer_type="mecab", mecab_dic="ipadic")


def test_packing_with_a_slow_tokenizer_in_workers(tmp_path, folders, paragraph_corpus):  # noqa: F811
    """Two worker processes load the MeCab tokenizer from its folder; the stream is exact."""
    from transformers import AutoTokenizer

    out = tmp_path / "ds"
    summary = prepare_dataset(
        [paragraph_corpus],
        folders["mecab"],
        out,
        seq_len=32,
        validation_fraction=0.1,
        workers=2,
        batch_docs=20,
    )
    tok = AutoTokenizer.from_pretrained(str(folders["mecab"]))
    train_stream: list[int] = []
    seen = set()
    for index, doc in enumerate(iter_documents([paragraph_corpus])):
        if len(doc.strip()) < 10 or doc in seen:
            continue
        seen.add(doc)
        if is_validation_document(index, 0, 0.1):
            continue
        ids = [
            i
            for piece in document_pieces(doc)
            for i in tok(piece, add_special_tokens=False)["input_ids"]
        ]
        train_stream.extend(([3] if train_stream else []) + ids)
    dataset, meta = load_packed_dataset(out)
    inner = np.asarray(dataset["train"]["input_ids"])[:, 1:-1].reshape(-1).tolist()
    assert inner == train_stream[: len(inner)] and summary.train.sequences == len(inner) // 30
    # the metadata says how to mask whole words
    assert meta["tokenizer_type"] == "mecab" and meta["whole_word_masking"]["available"]
    continuation = continuation_mask(meta)
    vocab = tok.get_vocab()
    assert {t for t, i in vocab.items() if continuation[i]} == {
        t for t in vocab if t.startswith("##")
    }
    collator = MLMCollator(
        seq_len=32,
        vocab_size=meta["vocab_size"],
        mask_id=4,
        special_ids=[0, 1, 2, 3, 4],
        whole_word=True,
        continuation=continuation,
    )
    rows = np.asarray(dataset["train"][:8]["input_ids"])
    assert collator(rows, np.arange(8), epoch=0).num_targets > 0


def test_sentencepiece_datasets_have_no_word_pieces(
    tmp_path,
    trained_tokenizer,  # noqa: F811
    paragraph_corpus,
):  # noqa: F811
    prepare_dataset(
        [paragraph_corpus],
        trained_tokenizer,
        tmp_path / "sp",
        seq_len=32,
        validation_fraction=0.1,
        workers=1,
    )
    meta = load_packed_dataset(tmp_path / "sp")[1]
    assert meta["tokenizer_type"] == "sentencepiece"
    assert meta["continuation_token_ids"] is None and continuation_mask(meta) is None


def test_cli_train_sudachi_and_compare(
    tmp_path,
    capsys,
    aozora_slice,
    folders,  # noqa: F811
    trained_tokenizer,
):  # noqa: F811
    out = tmp_path / "sudachi_b"
    assert (
        main(
            [
                "tokenizer",
                "train",
                str(aozora_slice),
                "--output",
                str(out),
                "--type",
                "sudachi",
                "--sudachi-mode",
                "B",
                "--vocab-size",
                "1500",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    assert "sudachi+WordPiece" in capsys.readouterr().out
    config = json.loads((out / "tokenizer_config.json").read_text("utf-8"))
    assert config["sudachi_kwargs"]["sudachi_split_mode"] == "B"

    finance = write_jsonl(
        tmp_path / "finance.jsonl",
        [FINANCE_SENTENCE * 3] * 2 + ["売上高は前年同期比で減少しました。" * 4],
    )
    report = tmp_path / "report.md"
    assert (
        main(
            [
                "tokenizer",
                "compare",
                str(finance),
                "--tokenizer",
                str(trained_tokenizer),
                "--tokenizer",
                str(folders["mecab"]),
                "--max-chars",
                "5000",
                "--output",
                str(report),
                "--json",
                str(tmp_path / "r.json"),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "chars/token" in printed and "| mecab |" in printed
    rows = json.loads((tmp_path / "r.json").read_text("utf-8"))
    assert [r["kind"] for r in rows] == ["sentencepiece", "mecab"]
    for r in rows:
        assert r["characters"] == len(FINANCE_SENTENCE) * 6 + 17 * 4
        assert r["chars_per_token"] > 0.5 and 0 <= r["unk_share"] < 0.5
        assert 0 < r["vocab_used"] < 1 and r["chars_per_second"] > 0
        assert r["chars_per_sequence"] == pytest.approx(510 * r["chars_per_token"], rel=1e-3)
    assert report.read_text("utf-8").startswith("# Tokenizer comparison")
