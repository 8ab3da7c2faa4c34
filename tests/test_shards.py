"""Chunked preparation at scale: shard + merge == one run, stopped runs resume, memory is flat,
cleaning is counted, Parquet/Arrow/datasets inputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from _data_fixtures import (  # noqa: F401 - fixtures
    aozora_slice,
    aozora_texts,
    paragraph_corpus,
    trained_tokenizer,
    write_jsonl,
)

from hetlm.cli import main
from hetlm.data.packed import load_packed_dataset
from hetlm.data.prepare.cleaning import CleaningOptions, HashSet
from hetlm.data.prepare.pipeline import merge_shards, prepare_dataset
from hetlm.data.prepare.shards import SHARD_FILE, parse_shard
from hetlm.errors import HetlmError

SEQ_LEN = 32
CHUNK_CHARS = 4000  # the paragraph corpus (~36k characters) makes about 9 chunks
KW = dict(seq_len=SEQ_LEN, validation_fraction=0.1, workers=1, chunk_chars=CHUNK_CHARS)


def rows(folder: Path) -> dict[str, np.ndarray]:
    dataset, _ = load_packed_dataset(folder)
    return {s: np.asarray(dataset[s].with_format("numpy")["input_ids"]) for s in dataset}


def assert_same_dataset(a: Path, b: Path) -> None:
    ra, rb = rows(a), rows(b)
    for split in ("train", "validation"):
        assert np.array_equal(ra[split], rb[split]), split
    ma, mb = load_packed_dataset(a)[1], load_packed_dataset(b)[1]
    for key in (
        "splits",
        "num_sequences",
        "documents",
        "tokens",
        "chunks",
        "cleaning",
        "corpus",
        "tokenizer_vocab_hash",
    ):
        if key == "cleaning":
            assert {k: v for k, v in ma[key].items()} == {k: v for k, v in mb[key].items()}
        else:
            assert ma[key] == mb[key], key


@pytest.fixture(scope="module")
def single(tmp_path_factory, paragraph_corpus, trained_tokenizer):  # noqa: F811
    out = tmp_path_factory.mktemp("single") / "ds"
    summary = prepare_dataset([paragraph_corpus], trained_tokenizer, out, **KW)
    assert summary.chunks >= 6
    return out


def test_shards_merged_equal_a_single_run(
    tmp_path,
    single,
    paragraph_corpus,  # noqa: F811
    trained_tokenizer,
):  # noqa: F811
    shards = []
    for i in range(3):
        folder = tmp_path / f"shard{i}"
        summary = prepare_dataset([paragraph_corpus], trained_tokenizer, folder, shard=(i, 3), **KW)
        assert summary.shard == (i, 3) and summary.complete
        assert json.loads((folder / SHARD_FILE).read_text("utf-8"))["complete"]
        shards.append(folder)
    merged = merge_shards(shards[::-1], tmp_path / "merged")  # any order on the command line
    assert "3 shard(s)" in merged.summary() and "linked" in merged.summary()
    assert_same_dataset(single, tmp_path / "merged")
    # the chunk files are hard links, not copies
    arrow = next((tmp_path / "merged" / "train").glob("*.arrow"))
    assert arrow.stat().st_nlink == 2
    from datasets import load_from_disk

    assert len(load_from_disk(str(tmp_path / "merged"))["train"]) == len(rows(single)["train"])


def test_merge_refuses_incomplete_or_mismatched_shards(
    tmp_path,
    paragraph_corpus,  # noqa: F811
    trained_tokenizer,
):  # noqa: F811
    a = tmp_path / "a"
    prepare_dataset([paragraph_corpus], trained_tokenizer, a, shard=(0, 2), **KW)
    with pytest.raises(HetlmError, match="each of the shards 0..1 exactly once"):
        merge_shards([a], tmp_path / "out")
    b = tmp_path / "b"
    prepare_dataset([paragraph_corpus], trained_tokenizer, b, shard=(1, 2), **{**KW, "seq_len": 64})
    with pytest.raises(HetlmError, match="other settings.*seq_len"):
        merge_shards([a, b], tmp_path / "out")
    c = tmp_path / "c"
    prepare_dataset([paragraph_corpus], trained_tokenizer, c, shard=(1, 2), max_chunks=1, **KW)
    with pytest.raises(HetlmError, match="not finished"):
        merge_shards([a, c], tmp_path / "out")
    with pytest.raises(HetlmError, match="not a shard folder"):
        merge_shards([a, tmp_path], tmp_path / "out")
    # resuming a shard with other options is refused unless --overwrite
    with pytest.raises(HetlmError, match="other settings"):
        prepare_dataset([paragraph_corpus], trained_tokenizer, a, shard=(0, 2), **{**KW, "seed": 5})
    assert not (tmp_path / "out").exists()
    assert parse_shard("2/4") == (2, 4)
    for bad in ("4/4", "x", "1/0"):
        with pytest.raises(HetlmError, match="--shard"):
            parse_shard(bad)


def test_a_stopped_run_resumes_from_its_chunks(
    tmp_path,
    single,
    paragraph_corpus,  # noqa: F811
    trained_tokenizer,
):  # noqa: F811
    out = tmp_path / "ds"
    first = prepare_dataset([paragraph_corpus], trained_tokenizer, out, max_chunks=2, **KW)
    assert not first.complete and first.chunks_this_run == 2 and not out.exists()
    assert "run the same command again" in first.summary()
    second = prepare_dataset([paragraph_corpus], trained_tokenizer, out, **KW)
    assert second.complete and second.chunks_resumed == 2
    assert second.chunks_this_run == second.chunks - 2
    assert_same_dataset(single, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # the work folder is gone


def test_a_killed_run_resumes(
    tmp_path,
    single,
    paragraph_corpus,  # noqa: F811
    trained_tokenizer,
):  # noqa: F811
    """SIGKILL mid-run (after 2 chunks are committed), then the same command completes."""
    out, work = tmp_path / "ds", tmp_path / ".ds.partial"
    args = [
        "prepare",
        str(paragraph_corpus),
        "--tokenizer",
        str(trained_tokenizer),
        "--output",
        str(out),
        "--seq-len",
        str(SEQ_LEN),
        "--validation-fraction",
        "0.1",
        "--workers",
        "1",
        "--chunk-chars",
        str(CHUNK_CHARS),
    ]
    slow = textwrap.dedent("""
        import sys, time
        import hetlm.data.prepare.pipeline as p
        original = p._finish_chunk
        def slow(*a, **k):
            marker = original(*a, **k)
            time.sleep(0.5)  # room to be killed between chunks
            return marker
        p._finish_chunk = slow
        from hetlm.cli import main
        sys.exit(main(sys.argv[1:]))
    """)
    process = subprocess.Popen([sys.executable, "-c", slow, *args], cwd=tmp_path)
    deadline = time.time() + 60
    while len(list((work / "chunks").glob("c*.json"))) < 2 and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    committed = len(list((work / "chunks").glob("c*.json")))
    assert committed >= 2 and not out.exists()
    assert main(args) == 0
    assert_same_dataset(single, out)
    assert not work.exists()


def test_options_changed_after_a_stop_start_over(
    tmp_path,
    paragraph_corpus,  # noqa: F811
    trained_tokenizer,
):  # noqa: F811
    out = tmp_path / "ds"
    prepare_dataset([paragraph_corpus], trained_tokenizer, out, max_chunks=1, **KW)
    summary = prepare_dataset([paragraph_corpus], trained_tokenizer, out, **{**KW, "seed": 3})
    assert (
        summary.chunks_resumed == 0
        and "Discarded an unfinished earlier run" in summary.summary()
        and "seed" in summary.summary()
    )


def test_cleaning_removes_and_counts(tmp_path, trained_tokenizer):  # noqa: F811
    texts = aozora_texts(records=4, chars=3000)
    corpus = write_jsonl(
        tmp_path / "dirty.jsonl",
        [
            texts[0],
            texts[1],
            texts[0],  # an exact duplicate
            "短い。",  # 3 characters
            texts[2].replace("。", "。\x00\x1b", 5),  # control characters
            texts[1],
            texts[3],
        ],
    )
    out = tmp_path / "ds"
    summary = prepare_dataset(
        [corpus], trained_tokenizer, out, seq_len=SEQ_LEN, validation_fraction=0.2, workers=1
    )
    c = summary.cleaning
    assert (c.duplicates_removed, c.short_removed, c.kept) == (2, 1, 4)
    assert (c.control_documents, c.control_chars) == (1, 10)
    text = summary.summary()
    assert "removed 2 exact-duplicate" in text and "shorter than 10" in text
    assert "stripped 10 control" in text
    meta = load_packed_dataset(out)[1]
    assert meta["cleaning"]["duplicates_removed"] == 2 and meta["documents"] == 4
    off = prepare_dataset(
        [corpus],
        trained_tokenizer,
        tmp_path / "off",
        seq_len=SEQ_LEN,
        validation_fraction=0.2,
        workers=1,
        cleaning=CleaningOptions.off(),
    )
    assert off.train.documents + off.validation.documents == 7
    assert "duplicate removal off" in off.summary()


def test_cli_cleaning_switches(tmp_path, capsys, trained_tokenizer):  # noqa: F811
    texts = aozora_texts(records=3, chars=3000)
    corpus = write_jsonl(tmp_path / "c.jsonl", [texts[0], texts[0], texts[1], texts[2], "短"])
    assert (
        main(
            [
                "prepare",
                str(corpus),
                "--tokenizer",
                str(trained_tokenizer),
                "--output",
                str(tmp_path / "o"),
                "--seq-len",
                "32",
                "--workers",
                "1",
                "--keep-duplicates",
                "--min-doc-chars",
                "0",
                "--validation-fraction",
                "0.3",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "duplicate removal off" in out and "no minimum length" in out
    assert load_packed_dataset(tmp_path / "o")[1]["documents"] == 5


def test_hash_set_is_compact_and_exact():
    hashes = HashSet(buffer_size=64)
    values = np.random.default_rng(0).integers(0, 2**63, size=5000).tolist()
    assert all(hashes.add(v) for v in values)
    assert not any(hashes.add(v) for v in values[::7])
    assert len(hashes) == 5000 and len(hashes.buffer) < 5000 and hashes.sorted.dtype == np.uint64
    assert values[123] in hashes and (values[123] ^ 1) not in hashes


def test_parquet_arrow_and_datasets_inputs_read_like_jsonl(
    tmp_path, monkeypatch, trained_tokenizer
):  # noqa: F811
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = aozora_texts(records=6, chars=2500)
    jsonl = write_jsonl(tmp_path / "c.jsonl", texts)
    table = pa.table({"id": list(range(6)), "text": texts})
    pq.write_table(table, tmp_path / "c.parquet", row_group_size=2)
    with (
        pa.OSFile(str(tmp_path / "c.arrow"), "wb") as sink,
        pa.ipc.new_stream(sink, table.schema) as writer,
    ):
        writer.write_table(table, max_chunksize=4)
    from hetlm.data.prepare.sources import HFSource

    kwargs = dict(seq_len=SEQ_LEN, validation_fraction=0.2, workers=1)
    prepare_dataset([jsonl], trained_tokenizer, tmp_path / "j", **kwargs)
    prepare_dataset([tmp_path / "c.parquet"], trained_tokenizer, tmp_path / "p", **kwargs)
    prepare_dataset([tmp_path / "c.arrow"], trained_tokenizer, tmp_path / "a", **kwargs)
    hf = HFSource("parquet", data_files=(str(tmp_path / "c.parquet"),))
    prepare_dataset([], trained_tokenizer, tmp_path / "h", hf=hf, **kwargs)
    for other in ("p", "a", "h"):
        for split in ("train", "validation"):
            assert np.array_equal(rows(tmp_path / "j")[split], rows(tmp_path / other)[split])
    assert load_packed_dataset(tmp_path / "h")[1]["hf_dataset"]["name"] == "parquet"
    with pytest.raises(HetlmError, match=r"c.parquet has no column 'body'"):
        prepare_dataset(
            [tmp_path / "c.parquet"], trained_tokenizer, tmp_path / "x", text_field="body", **kwargs
        )
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'cc100' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(HetlmError, match=r"cannot open the dataset hf:cc100/ja\[train\].*reach"):
        prepare_dataset([], trained_tokenizer, tmp_path / "y", hf=HFSource("cc100", "ja"), **kwargs)


MEMORY_SCRIPT = """
import json, os, resource, sys
from pathlib import Path
from hetlm.data.prepare.pipeline import prepare_dataset

def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))

corpus, tokenizer, out = sys.argv[1:4]
small = Path(out).parent / "warm.jsonl"
with open(corpus, encoding="utf-8") as f:
    small.write_text("".join(next(f) for _ in range(200)), encoding="utf-8")
# warm-up on a small slice: imports, tokenizer, Arrow writer, allocator pools
prepare_dataset([small], tokenizer, Path(out).parent / "warm", seq_len=128, workers=1,
                chunk_chars=1_000_000)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak RSS mark
before = status("VmRSS")
summary = prepare_dataset([corpus], tokenizer, out, seq_len=128, workers=1,
                          chunk_chars=1_000_000)
print(json.dumps({"growth": status("VmHWM") - before, "chunks": summary.chunks,
                  "tokens": summary.train.tokens + summary.validation.tokens}))
"""


def test_memory_stays_flat_on_a_corpus_larger_than_the_budget(tmp_path, trained_tokenizer):  # noqa: F811
    """~24 MB of text (8M characters, ~6M tokens): peak RSS grows by < 48 MB.

    Holding the corpus's token ids as Python lists would take ~200 MB, as a numpy array 24 MB
    plus the text itself; chunks of 1M characters keep the growth to a chunk's worth.
    """
    texts = aozora_texts(records=130, chars=200_000)
    corpus = tmp_path / "big.jsonl"
    size = 0
    with corpus.open("w", encoding="utf-8") as f:
        n = 0
        while size < 24_000_000:
            for text in texts:
                for start in range(0, len(text), 3000):
                    line = (
                        json.dumps(
                            {"text": f"第{n}節。" + text[start : start + 3000]}, ensure_ascii=False
                        )
                        + "\n"
                    )
                    f.write(line)
                    size += len(line.encode())
                    n += 1
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            MEMORY_SCRIPT,
            str(corpus),
            str(trained_tokenizer),
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        check=True,
    )
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"peak RSS growth {measured['growth'] / 2**20:.1f} MiB")  # visible with -s
    assert measured["chunks"] >= 8 and measured["tokens"] > 4_000_000
    assert measured["growth"] < 48 * 2**20, measured
