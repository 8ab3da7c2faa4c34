"""``hetlm bench net``: size parsing, the nccl-tests formulas, and a real 2-rank gloo run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hetlm.bench.net import bus_factor, format_size, message_sizes, parse_size
from hetlm.cli import main
from hetlm.errors import HetlmError


def test_sizes_are_binary_and_doubling() -> None:
    assert parse_size("1M") == 2**20
    assert parse_size("4MB") == parse_size("4MiB") == 4 * 2**20
    assert parse_size("1g") == 2**30
    assert parse_size("4096") == 4096
    assert message_sizes(2**20, 2**30) == [2**k for k in range(20, 31)]
    assert message_sizes(2**20, 5 * 2**20) == [2**20, 2**21, 2**22]
    assert [format_size(s) for s in (2**20, 2**30, 3 * 2**10, 100)] == ["1M", "1G", "3K", "100B"]
    for bad in ("", "1T", "abc", "2"):
        with pytest.raises(HetlmError):
            parse_size(bad)
    with pytest.raises(HetlmError, match="above --max-size"):
        message_sizes(2**22, 2**20)


def test_bus_factor_is_the_ring_traffic() -> None:
    """nccl-tests: busbw = algbw x 2(n-1)/n (0 for one rank, 1 for two, -> 2 for many)."""
    assert [bus_factor(n) for n in (1, 2, 4, 8)] == [0.0, 1.0, 1.5, 1.75]


def test_outside_torchrun_is_a_one_line_error(capsys, monkeypatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["bench", "net", "--max-size", "1M"]) == 2
    assert "--local-nodes" in capsys.readouterr().err


def test_two_local_ranks_on_gloo_give_a_positive_table(tmp_path) -> None:
    prefix = tmp_path / "net"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "hetlm.cli",
            "bench",
            "net",
            "--local-nodes",
            "2",
            "--min-size",
            "1M",
            "--max-size",
            "4M",
            "--iters",
            "5",
            "--output",
            str(prefix),
            "--timeout-s",
            "60",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(prefix.with_suffix(".json").read_text())
    assert data["backend"] == "gloo" and data["world_size"] == 2 and data["nodes"] == 2
    rows = data["rows"]
    assert [r["size_bytes"] for r in rows] == [2**20, 2**21, 2**22]
    for r in rows:
        assert r["time_s"] > 0 and r["algbw_gbps"] > 0
        assert r["algbw_gbps"] == pytest.approx(r["size_bytes"] / r["time_s"] / 1e9)
        assert r["busbw_gbps"] == pytest.approx(r["algbw_gbps"])  # 2(n-1)/n = 1 for n = 2
        assert 3 <= r["iters"] <= 5
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")][1:]
    assert [line.split("|")[1].strip() for line in table] == ["1M", "2M", "4M"]
    for line in table:
        algbw, busbw = (float(cell) for cell in line.strip("|").split("|")[-2:])
        assert algbw > 0 and busbw > 0
    assert prefix.with_suffix(".md").read_text().count("\n| ") == 4  # header + 3 rows
