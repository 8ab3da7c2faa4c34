"""Reading corpora: shapes, normalisation, and every kind of damage counted rather than fatal."""

from __future__ import annotations

import json
import time

import pytest

from hetlm.data.prepare.corpus import CorpusStats, iter_documents, require_documents, resolve_inputs
from hetlm.errors import HetlmError


def read(inputs, **kwargs) -> tuple[list[str], CorpusStats]:
    stats = CorpusStats()
    return list(iter_documents(inputs, stats=stats, **kwargs)), stats


def test_plain_text_documents_are_separated_by_blank_lines(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("一行目。\n二行目。\n\n別の文書。\n\n\n　\n三つ目。\n", encoding="utf-8")
    docs, stats = read([path])
    assert docs == ["一行目。\n二行目。", "別の文書。", "三つ目。"]
    assert (stats.files, stats.documents) == (1, 3)
    assert stats.characters == sum(len(d) for d in docs)


def test_crlf_and_bom_are_handled(tmp_path):
    path = tmp_path / "win.txt"
    path.write_bytes("\ufeff一。\r\n二。\r\n\r\n三。\r\n".encode())
    docs, _ = read([path])
    assert docs == ["一。\n二。", "三。"]


def test_jsonl_with_a_custom_text_field(tmp_path):
    path = tmp_path / "b.jsonl"
    rows = [{"body": "本文その一", "text": "x"}, {"body": "本文\nその二"}]
    path.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
    )
    docs, stats = read([path], text_field="body")
    assert docs == ["本文その一", "本文\nその二"]
    assert stats.bad_records == 0


def test_directories_recursive_sorted_and_globs(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("B\n", encoding="utf-8")
    (tmp_path / "a.jsonl").write_text('{"text": "A"}\n', encoding="utf-8")
    (tmp_path / "sub" / "c.json").write_text('{"text": "C"}\n', encoding="utf-8")
    (tmp_path / "notes.csv").write_text("ignored\n", encoding="utf-8")
    docs, stats = read([tmp_path])
    assert docs == ["A", "B", "C"]
    assert stats.files == 3
    docs, _ = read([str(tmp_path / "*.txt"), str(tmp_path / "**" / "*.json")])
    assert docs == ["B", "C"]
    # hidden folders are skipped; a single path string is one input
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "old.txt").write_text("hidden\n", encoding="utf-8")
    assert read(str(tmp_path))[0] == ["A", "B", "C"]
    # the same file reached twice is read once
    assert resolve_inputs([tmp_path / "b.txt", str(tmp_path / "b.*")]) == [tmp_path / "b.txt"]


def test_glob_without_match_and_missing_path_name_the_input(tmp_path):
    with pytest.raises(HetlmError, match=r"nothing\*\.txt.*matches no files"):
        read([str(tmp_path / "nothing*.txt")])
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(HetlmError, match=f"{missing} does not exist"):
        read([missing])
    (tmp_path / "empty").mkdir()
    with pytest.raises(HetlmError, match="contains no .txt"):
        read([tmp_path / "empty"])


def test_nfkc_normalisation_on_and_off(tmp_path):
    path = tmp_path / "w.txt"
    path.write_text("ＡＢＣ１２３ｱｲｳ㈱\n", encoding="utf-8")
    assert read([path])[0] == ["ABC123アイウ(株)"]
    assert read([path], normalize=False)[0] == ["ＡＢＣ１２３ｱｲｳ㈱"]


def test_undecodable_bytes_are_replaced_and_counted(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes("良い行\n".encode() + b"\xff\xfe\x80bad\n" + "次\n".encode())
    docs, stats = read([path])
    assert docs == ["良い行\n\ufffdbad\n次"]
    assert stats.undecodable_lines == 1
    assert "U+FFFD" in stats.summary()


def test_lone_surrogate_escapes_in_json_are_replaced(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"text": "a\\ud800b"}\n', encoding="utf-8")
    docs, stats = read([path])
    assert docs == ["a\ufffdb"]
    assert stats.undecodable_lines == 1


def test_empty_documents_are_skipped_and_counted(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_text(
        '{"text": ""}\n{"text": "  \\n\\u3000 "}\n{"text": "中身"}\n\n', encoding="utf-8"
    )
    docs, stats = read([path])
    assert docs == ["中身"]
    assert stats.empty_skipped == 2
    assert "2 empty" in stats.summary()


def test_a_10mb_line_is_split_not_fatal(tmp_path):
    path = tmp_path / "huge.txt"
    line = "あいうえお" * 700_000  # 3.5M characters, 10.5 MB of UTF-8, no newline
    path.write_text("前\n\n" + line + "\n\n後\n", encoding="utf-8")
    started = time.perf_counter()
    docs, stats = read([path], max_line_chars=20000)
    assert time.perf_counter() - started < 20
    assert docs[0] == "前" and docs[-1] == "後"
    middle = docs[1:-1]
    assert "".join(middle).replace("\n", "") == line
    assert max(len(p) for d in middle for p in d.split("\n")) <= 20000
    assert stats.long_lines_split == 1
    # the 3.5M-character document is yielded in parts of at most max_document_chars
    assert len(middle) == 4 and stats.long_documents_split == 1


def test_long_lines_inside_json_text_are_split(tmp_path):
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"text": "短い\n" + "x" * 25}) + "\n", encoding="utf-8")
    docs, stats = read([path], max_line_chars=10)
    assert docs == ["短い\nxxxxxxxxxx\nxxxxxxxxxx\nxxxxx"]
    assert stats.long_lines_split == 1


def test_bad_json_records_are_skipped_with_locations(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text(
        "\n".join(
            [
                '{"text": "一"}',
                '{"text": "broken',  # invalid JSON
                '{"title": "no text"}',  # missing field
                '{"text": 42}',  # not a string
                '["a", "list"]',  # not an object
                '{"text": "二"}',
            ]
        )
        + "\n",
        encoding="utf-8",
    )
    docs, stats = read([path])
    assert docs == ["一", "二"]
    assert stats.bad_records == 4
    assert stats.bad_record_examples == [f"{path}:{n}" for n in (2, 3, 4, 5)]
    assert f"{path}:2" in stats.summary()


def test_json_array_file_is_refused_with_a_hint(tmp_path):
    path = tmp_path / "array.json"
    path.write_text('[\n{"text": "a"}\n]\n', encoding="utf-8")
    with pytest.raises(HetlmError, match="JSON array, not JSON Lines"):
        read([path])


def test_binary_file_is_refused_by_name(tmp_path):
    path = tmp_path / "model.txt"
    path.write_bytes(b"PK\x03\x04\x00\x00binary" * 10)
    with pytest.raises(HetlmError, match=f"{path} looks like a binary file"):
        read([path])


def test_require_documents_explains_an_empty_corpus(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"content": "wrong field"}\n', encoding="utf-8")
    docs, stats = read([path])
    assert docs == []
    with pytest.raises(HetlmError, match=r"contains no documents.*'text'"):
        require_documents(stats, [path])
    require_documents(CorpusStats(documents=1), [path])  # no error


def test_streaming_reads_lazily(tmp_path):
    """The iterator yields before reading later files: a bad second file fails only on reaching it."""
    good, bad = tmp_path / "1.txt", tmp_path / "2.txt"
    good.write_text("最初\n", encoding="utf-8")
    bad.write_bytes(b"\x00\x00")
    docs = iter_documents([good, bad])
    assert next(docs) == "最初"
    with pytest.raises(HetlmError, match="binary"):
        next(docs)


def test_summary_is_one_paragraph(tmp_path):
    stats = CorpusStats(
        files=2,
        documents=10,
        characters=1234,
        empty_skipped=1,
        bad_records=1,
        bad_record_examples=["f.jsonl:3"],
        undecodable_lines=2,
        long_lines_split=1,
    )
    text = stats.summary()
    assert "\n" not in text
    for part in ("2 file(s)", "10 documents", "1,234 characters", "f.jsonl:3", "overlong"):
        assert part in text


# ---------------------------------------------------------------- clear messages, new formats


def test_bad_records_name_the_reason_and_strict_stops_at_file_and_line(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"text": "一"}\n{"title": "no text"}\n{"text": 42}\n', encoding="utf-8")
    docs, stats = read([path])
    assert docs == ["一"]
    assert stats.bad_record_reasons == {
        "missing field 'text'": 1,
        "field 'text' is not a string": 1,
    }
    assert "1 missing field 'text'" in stats.summary() and f"{path}:2" in stats.summary()
    with pytest.raises(HetlmError, match=rf"{path}:2: missing field 'text'"):
        read([path], strict=True)


def test_undecodable_lines_are_located_and_strict_refuses_them(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes("良い行\n".encode() + b"\xff\xfebad\n" + "次\n".encode())
    _, stats = read([path])
    assert stats.undecodable_examples == [f"{path}:2"] and f"{path}:2" in stats.summary()
    with pytest.raises(HetlmError, match=rf"{path}:2: undecodable bytes"):
        read([path], strict=True)


def test_a_shift_jis_file_is_refused_with_a_hint(tmp_path):
    path = tmp_path / "sjis.txt"
    path.write_bytes("吾輩は猫である。\n名前はまだ無い。\nどこで生れたか。\n".encode("cp932"))
    with pytest.raises(HetlmError, match=r"sjis.txt is not UTF-8.*iconv -f CP932"):
        read([path])
    jsonl = tmp_path / "sjis.jsonl"
    jsonl.write_bytes(
        "".join(f'{{"text": "{t}"}}\n' for t in ("売上高", "前年同期", "増加")).encode("cp932")
    )
    with pytest.raises(HetlmError, match="not UTF-8"):
        read([jsonl])


def test_parquet_and_arrow_columns_stream_with_row_locations(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"text": ["ＡＢＣ一", None, "二\n三"], "n": [1, 2, 3]})
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=1)
    with (
        pa.OSFile(str(tmp_path / "t.arrow"), "wb") as sink,
        pa.ipc.new_file(sink, table.schema) as writer,
    ):  # the IPC *file* format
        writer.write_table(table)
    for name in ("t.parquet", "t.arrow"):
        docs, stats = read([tmp_path / name])
        assert docs == ["ABC一", "二\n三"]
        assert stats.bad_records == 1 and stats.bad_record_examples == [f"{tmp_path / name}:2"]
        with pytest.raises(HetlmError, match=rf"{name}:row 2: null text"):
            read([tmp_path / name], strict=True)
    with pytest.raises(HetlmError, match="has no column 'body'"):
        read([tmp_path / "t.parquet"], text_field="body")
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really")
    with pytest.raises(HetlmError, match="cannot read .*broken.parquet"):
        read([broken])


def test_cleaner_strips_control_characters_and_counts():
    from hetlm.data.prepare.cleaning import CleaningOptions, DocumentCleaner

    cleaner = DocumentCleaner()
    kept = list(
        cleaner.filter(
            [
                "正常な文書です。ここまで",
                "制御\x00文字\x1bを含む\t文書。\n次の行",
                "正常な文書です。ここまで",
                "短い",
            ]
        )
    )
    assert kept == ["正常な文書です。ここまで", "制御文字を含む\t文書。\n次の行"]
    stats = cleaner.stats
    assert (stats.kept, stats.duplicates_removed, stats.short_removed) == (2, 1, 1)
    assert (stats.control_documents, stats.control_chars) == (1, 2)
    assert list(DocumentCleaner(CleaningOptions.off()).filter(["短", "短"])) == ["短", "短"]
    with pytest.raises(HetlmError, match="min_doc_chars"):
        CleaningOptions(min_doc_chars=-1)
