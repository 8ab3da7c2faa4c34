"""``bench io`` and ``bench data``: sane numbers, the cache method reported, commands parse."""

from __future__ import annotations

import argparse
import json

import pytest
from _data_fixtures import aozora_slice, paragraph_corpus, trained_tokenizer  # noqa: F401

from hetlm.bench.storage import (
    bench_data,
    bench_io,
    format_data,
    format_io,
    register_data,
    register_io,
)
from hetlm.data.prepare.pipeline import prepare_dataset
from hetlm.errors import HetlmError


def test_bench_io_writes_reads_and_cleans_up(tmp_path):
    result = bench_io(tmp_path, size_mib=4)
    assert result["write_mb_s"] > 0 and result["read_mb_s"] > 0
    assert result["read_uncached_by"].split()[0] in ("drop_caches", "O_DIRECT", "fadvise", "none")
    assert list(tmp_path.iterdir()) == []
    assert "MB/s" in format_io(result) and result["filesystem"]
    with pytest.raises(HetlmError, match="size-mib"):
        bench_io(tmp_path, size_mib=0)


def test_bench_data_reads_random_batches(
    tmp_path,
    paragraph_corpus,  # noqa: F811
    trained_tokenizer,
):  # noqa: F811
    prepare_dataset(
        [paragraph_corpus],
        trained_tokenizer,
        tmp_path / "ds",
        seq_len=32,
        validation_fraction=0.1,
        workers=1,
    )
    result = bench_data(tmp_path / "ds", batch=8, seconds=0.2, tokens_per_s=3200)
    # two separate 0.2 s measurements: their order is load, not code (a loaded CI read
    # 4,937 samples/s unmasked against 9,240 masked), so only their signs are checked
    assert result["read_samples_s"] > 0 and result["read_and_mask_samples_s"] > 0
    assert result["needed_samples_s"] == 100.0 and result["headroom"] > 0
    assert result["read_mb_s"] == pytest.approx(result["read_samples_s"] * 32 * 4 / 1e6, rel=0.01)
    assert "training needs 100 samples/s" in format_data(result)


def test_commands_register_on_the_bench_parser(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    kinds = parser.add_subparsers()
    register_io(kinds)
    register_data(kinds)
    args = parser.parse_args(
        ["io", str(tmp_path), "--size-mib", "2", "--json", str(tmp_path / "out" / "io.json")]
    )
    assert args.func(args) == 0
    assert "write + fsync" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "io.json").read_text())["size_mib"] == 2
    args = parser.parse_args(
        ["data", "somewhere", "--batch", "4", "--tokens-per-s", "1000", "--cold"]
    )
    assert (args.batch, args.tokens_per_s, args.cold, args.split) == (4, 1000.0, True, "train")
