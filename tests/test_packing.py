"""Packing: exact [SEP]-joined streams, document-level splits, determinism, safe output folders."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from _data_fixtures import (  # noqa: F401 - fixtures
    aozora_slice,
    paragraph_corpus,
    trained_tokenizer,
    write_jsonl,
)

from hetlm.cli import main
from hetlm.data.packed import META_FILE, load_packed_dataset
from hetlm.data.prepare.corpus import iter_documents
from hetlm.data.prepare.packing import (
    SequencePacker,
    ValidationReserve,
    is_validation_document,
    split_score,
)
from hetlm.data.prepare.pipeline import prepare_dataset
from hetlm.errors import HetlmError

SEQ_LEN = 32
FRACTION = 0.1
CLS, SEP = 2, 3


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, paragraph_corpus, trained_tokenizer):  # noqa: F811
    out = tmp_path_factory.mktemp("prepared") / "ds"
    summary = prepare_dataset(
        [paragraph_corpus],
        trained_tokenizer,
        out,
        seq_len=SEQ_LEN,
        validation_fraction=FRACTION,
        workers=1,
        batch_docs=16,
    )
    return out, summary


def rows(dataset_dir, split) -> np.ndarray:
    """The split's rows as stored: Arrow fixed-size lists of int32."""
    import pyarrow as pa

    dataset, _ = load_packed_dataset(dataset_dir)
    column = dataset[split].with_format("arrow")[:].column("input_ids").combine_chunks()
    assert column.type == pa.list_(pa.int32(), column.type.list_size)
    return column.flatten().to_numpy().reshape(-1, column.type.list_size)


def expected_streams(
    corpus, tokenizer_dir, fraction, seed=0, extra=(), min_doc_chars=10
) -> dict[str, list[int]]:
    """An independent re-statement of the cleaning, split and join rules, using the plain HF
    tokenizer: documents shorter than ``min_doc_chars`` and repeats are dropped, the others keep
    their index in the stream read."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    streams: dict[str, list[int]] = {"train": [], "validation": []}
    seen = set()
    for index, doc in enumerate(iter_documents([corpus])):
        if len(doc.strip()) < min_doc_chars or doc in seen:
            continue
        seen.add(doc)
        ids = tok(doc, add_special_tokens=False)["input_ids"]
        val = is_validation_document(index, seed, fraction) or index in extra
        stream = streams["validation" if val else "train"]
        stream.extend(([SEP] if stream else []) + ids)
    return streams


def assert_packs_streams(dataset_dir, summary, streams, seq_len):
    chunk = seq_len - 2
    for split, counts in (("train", summary.train), ("validation", summary.validation)):
        inner = rows(dataset_dir, split)[:, 1:-1].reshape(-1).tolist()
        stream = streams[split]
        assert inner == stream[: len(inner)]  # overflow carried, nothing skipped or repeated
        assert counts.dropped_tail_tokens == len(stream) - len(inner) < chunk
        assert counts.sequences == len(inner) // chunk > 0


def test_every_sequence_is_cls_chunk_sep_of_seq_len(prepared):
    out, _ = prepared
    for split in ("train", "validation"):
        data = rows(out, split)
        assert data.dtype == np.int32 and data.shape[1] == SEQ_LEN and len(data) > 0
        assert (data[:, 0] == CLS).all() and (data[:, -1] == SEP).all()
        assert not (data[:, 1:-1] == CLS).any()


def test_inner_tokens_reproduce_the_joined_stream_exactly(
    prepared,
    paragraph_corpus,  # noqa: F811
    trained_tokenizer,
):  # noqa: F811
    out, summary = prepared
    streams = expected_streams(paragraph_corpus, trained_tokenizer, FRACTION)
    assert_packs_streams(out, summary, streams, SEQ_LEN)


def test_validation_is_topped_up_with_the_lowest_scored_documents(tmp_path, trained_tokenizer):  # noqa: F811
    """3 documents at fraction 0.01: the hash picks none, so the lowest-scored one is moved."""
    texts = [
        "吾輩は猫である。名前はまだ無い。" * 4,
        "どこで生れたかとんと見当がつかぬ。" * 4,
        "何でも薄暗いじめじめした所でニャーニャー泣いていた。" * 4,
    ]
    corpus = write_jsonl(tmp_path / "three.jsonl", texts)
    assert not any(is_validation_document(i, 0, 0.01) for i in range(3))
    summary = prepare_dataset(
        [corpus],
        trained_tokenizer,
        tmp_path / "out",
        seq_len=16,
        validation_fraction=0.01,
        workers=1,
    )
    lowest = min(range(3), key=lambda i: split_score(i, 0))
    assert (summary.train.documents, summary.validation.documents) == (2, 1)
    streams = expected_streams(corpus, trained_tokenizer, 0.01, extra={lowest})
    assert_packs_streams(tmp_path / "out", summary, streams, 16)


def test_validation_reserve_keeps_only_what_one_sequence_needs():
    reserve = ValidationReserve(needed_tokens=10)
    for index, (score, tokens) in enumerate([(0.9, 4), (0.2, 3), (0.5, 6), (0.1, 2), (0.3, 30)]):
        reserve.offer(score, index, tokens)
    # lowest scores first: 3 (0.1, 2 tokens), 1 (0.2, 3), 4 (0.3, 30) reach 10 with separators
    assert {index for _, index, _ in reserve.heap} == {3, 1, 4}
    assert reserve.pick(validation_stream_tokens=0, validation_documents=0) == {3, 1, 4}
    assert reserve.pick(validation_stream_tokens=5, validation_documents=1) == {3, 1}
    assert reserve.pick(validation_stream_tokens=10, validation_documents=2) == set()


def test_splits_are_disjoint_by_document(prepared, paragraph_corpus):  # noqa: F811
    out, summary = prepared
    documents = sum(1 for _ in iter_documents([paragraph_corpus]))
    removed = summary.cleaning.short_removed + summary.cleaning.duplicates_removed
    assert summary.train.documents + summary.validation.documents == documents - removed
    assert 0 < summary.validation.documents < documents * 0.3
    _, meta = load_packed_dataset(out)
    assert meta["splits"]["train"]["documents"] == summary.train.documents


def test_validation_assignment_is_a_seeded_pure_function():
    picks = [is_validation_document(i, 7, 0.1) for i in range(20000)]
    assert picks == [is_validation_document(i, 7, 0.1) for i in range(20000)]
    assert 0.09 < sum(picks) / len(picks) < 0.11
    assert picks != [is_validation_document(i, 8, 0.1) for i in range(20000)]


def test_packer_carries_overflow_and_reports_the_tail():
    packer = SequencePacker(seq_len=6, cls_id=CLS, sep_id=SEP)
    assert packer.add([10, 11, 12]).shape == (0, 6)
    got = packer.add([20, 21, 22, 23, 24, 25, 26])  # stream: 10 11 12 3 20 21 22 23 24 25 26
    assert got.tolist() == [[2, 10, 11, 12, 3, 3], [2, 20, 21, 22, 23, 3]]
    counts = packer.finish()
    assert (counts.documents, counts.tokens, counts.sequences) == (2, 10, 2)
    assert counts.dropped_tail_tokens == 3  # 24 25 26


def test_deterministic_across_runs_and_worker_counts(
    tmp_path,
    paragraph_corpus,  # noqa: F811
    trained_tokenizer,
    prepared,
):  # noqa: F811
    reference, _ = prepared
    one = prepare_dataset(
        [paragraph_corpus],
        trained_tokenizer,
        tmp_path / "one",
        seq_len=SEQ_LEN,
        validation_fraction=FRACTION,
        workers=1,
        batch_docs=5,
    )
    two = prepare_dataset(
        [paragraph_corpus],
        trained_tokenizer,
        tmp_path / "two",
        seq_len=SEQ_LEN,
        validation_fraction=FRACTION,
        workers=2,
        batch_docs=5,
    )
    for split in ("train", "validation"):
        expected = rows(reference, split)
        assert np.array_equal(rows(tmp_path / "one", split), expected)
        assert np.array_equal(rows(tmp_path / "two", split), expected)
    assert one.train == two.train and one.validation == two.validation


def test_metadata_describes_the_dataset(prepared, trained_tokenizer):  # noqa: F811
    out, summary = prepared
    dataset, meta = load_packed_dataset(out)
    assert meta["seq_len"] == SEQ_LEN and meta["vocab_size"] == 1500
    assert meta["special_token_ids"] == {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    assert meta["tokenizer_dir"] == str(trained_tokenizer.resolve())
    assert meta["tokenizer_vocab_hash"].startswith("sha256:")
    assert meta["num_sequences"] == {
        "train": len(dataset["train"]),
        "validation": len(dataset["validation"]),
    }
    assert (
        meta["splits"]["validation"]["dropped_tail_tokens"]
        == summary.validation.dropped_tail_tokens
    )
    cleaning = meta["cleaning"]
    assert (
        meta["corpus"]["documents"] - cleaning["short_removed"] - cleaning["duplicates_removed"]
        == meta["documents"]
        == cleaning["kept"]
    )
    assert "Packed" in summary.summary() and str(out) in summary.summary()


def test_output_dir_is_never_clobbered(
    tmp_path,
    paragraph_corpus,
    trained_tokenizer,  # noqa: F811
    prepared,
):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "precious.txt").write_text("keep me", encoding="utf-8")
    kwargs = dict(seq_len=SEQ_LEN, validation_fraction=FRACTION, workers=1)
    with pytest.raises(HetlmError, match="not empty.*--overwrite"):
        prepare_dataset([paragraph_corpus], trained_tokenizer, busy, **kwargs)
    with pytest.raises(HetlmError, match="not a hetlm dataset"):
        prepare_dataset([paragraph_corpus], trained_tokenizer, busy, overwrite=True, **kwargs)
    assert (busy / "precious.txt").read_text(encoding="utf-8") == "keep me"
    # an existing dataset is replaced with overwrite=True
    copy = tmp_path / "copy"
    shutil.copytree(prepared[0], copy)
    (copy / "stale-marker").write_text("old", encoding="utf-8")
    prepare_dataset([paragraph_corpus], trained_tokenizer, copy, overwrite=True, **kwargs)
    assert not (copy / "stale-marker").exists()
    assert load_packed_dataset(copy)[1]["seq_len"] == SEQ_LEN
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "copy"]  # no partial folders


def test_empty_corpus_is_an_error_and_leaves_nothing(tmp_path, trained_tokenizer):  # noqa: F811
    corpus = write_jsonl(tmp_path / "empty.jsonl", ["", "   "])
    with pytest.raises(HetlmError, match="contains no documents"):
        prepare_dataset([corpus], trained_tokenizer, tmp_path / "out", workers=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl"]


def test_corpus_too_small_for_a_sequence(tmp_path, trained_tokenizer):  # noqa: F811
    corpus = write_jsonl(tmp_path / "tiny.jsonl", ["吾輩は猫である。名前はまだ無い。"])
    with pytest.raises(HetlmError, match="too small"):
        prepare_dataset([corpus], trained_tokenizer, tmp_path / "out", seq_len=64, workers=1)


def test_load_packed_dataset_errors(tmp_path, prepared):
    with pytest.raises(HetlmError, match="does not exist"):
        load_packed_dataset(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(HetlmError, match="not a hetlm dataset"):
        load_packed_dataset(tmp_path / "plain")
    broken = tmp_path / "broken"
    shutil.copytree(prepared[0], broken)
    for arrow in (broken / "train").glob("*.arrow"):
        arrow.write_bytes(b"garbage")
    with pytest.raises(HetlmError, match="corrupt or incomplete"):
        load_packed_dataset(broken)
    bad_meta = tmp_path / "bad_meta"
    shutil.copytree(prepared[0], bad_meta)
    (bad_meta / META_FILE).write_text("{not json", encoding="utf-8")
    with pytest.raises(HetlmError, match="unreadable"):
        load_packed_dataset(bad_meta)
    mismatch = tmp_path / "mismatch"
    shutil.copytree(prepared[0], mismatch)
    meta = json.loads((mismatch / META_FILE).read_text(encoding="utf-8"))
    meta["seq_len"] = SEQ_LEN * 2
    (mismatch / META_FILE).write_text(json.dumps(meta), encoding="utf-8")
    with pytest.raises(HetlmError, match="not input_ids of length"):
        load_packed_dataset(mismatch)


def test_bad_options_are_refused(tmp_path, paragraph_corpus, trained_tokenizer):  # noqa: F811
    for kwargs, message in (
        (dict(seq_len=2), "seq_len"),
        (dict(validation_fraction=0.0), "validation_fraction"),
        (dict(workers=0), "workers"),
    ):
        with pytest.raises(HetlmError, match=message):
            prepare_dataset([paragraph_corpus], trained_tokenizer, tmp_path / "o", **kwargs)
    empty = tmp_path / "no_tokenizer"
    empty.mkdir()
    with pytest.raises(HetlmError, match="no tokenizer files"):
        prepare_dataset([paragraph_corpus], empty, tmp_path / "o")


def test_cli_prepare(tmp_path, capsys, paragraph_corpus, trained_tokenizer):  # noqa: F811
    out = tmp_path / "cli_ds"
    code = main(
        [
            "prepare",
            str(paragraph_corpus),
            "--tokenizer",
            str(trained_tokenizer),
            "--output",
            str(out),
            "--seq-len",
            "48",
            "--workers",
            "1",
            "--validation-fraction",
            "0.05",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0
    assert "Packed" in captured.out and "validation sequences of 48 tokens" in captured.out
    assert load_packed_dataset(out)[1]["seq_len"] == 48


def test_cli_prepare_bad_input_is_one_line(tmp_path, capsys, trained_tokenizer):  # noqa: F811
    corpus = write_jsonl(tmp_path / "wrong_field.jsonl", ["a", "b"], field="body")
    code = main(
        [
            "prepare",
            str(corpus),
            "--tokenizer",
            str(trained_tokenizer),
            "--output",
            str(tmp_path / "o"),
            "--workers",
            "1",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("hetlm: error: ") and err.count("\n") == 1
    assert "contains no documents" in err and "--text-field" in err
