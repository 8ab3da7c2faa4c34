"""Input checks where a user can err (issue 14): one line each, before any heavy work.

A masked LM given to ``hetlm sft``, a max_length / seq_len beyond the model's positions, a
mistyped local folder (never tried on the hub), a corpus partly in another encoding.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml
from _data_fixtures import aozora_slice, aozora_texts, trained_tokenizer  # noqa: F401 - fixtures
from _sft_fixtures import build_tokenizer, dolly_rows
from conftest import AOZORA, tiny_config

from hetlm.cli import main
from hetlm.errors import HetlmError
from hetlm.models.source import looks_local, resolve_model_source


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    """A tiny BertForMaskedLM and a tiny LLaMA of 256 positions, each with a tokenizer, and a
    few instruction rows."""
    import torch
    from transformers import BertConfig, BertForMaskedLM, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("bases")
    tokenizer = build_tokenizer(root / "bert")
    torch.manual_seed(0)
    BertForMaskedLM(
        BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
        )
    ).save_pretrained(root / "bert")
    build_tokenizer(root / "llama")
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=256,
        )
    ).save_pretrained(root / "llama")
    data = root / "data.jsonl"
    data.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in dolly_rows(16)), encoding="utf-8"
    )
    return {"bert": root / "bert", "llama": root / "llama", "data": data}


def _sft_yaml(tmp_path: Path, model: Path, data: Path, **data_options) -> Path:
    config = {
        "run": {"output_dir": str(tmp_path / "out")},
        "model": {"init_from": str(model)},
        "data": {"dataset": str(data), "template": "ja-alpaca", **data_options},
        "lora": {"r": 2, "alpha": 4},
        "train": {"global_batch": 4, "micro_batch": 4, "max_steps": 1, "precision": "fp32"},
    }
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _one_line_error(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("hetlm: error:"), err
    return err[0]


def test_sft_on_a_masked_lm_is_one_line(bases, tmp_path, capsys):
    path = _sft_yaml(tmp_path, bases["bert"], bases["data"], max_length=256)
    assert main(["sft", str(path)]) != 0
    line = _one_line_error(capsys)
    assert (
        f"model.init_from {bases['bert']} is a masked LM (BertForMaskedLM), hetlm sft needs a "
        "causal LM (LLaMA family)"
    ) in line


def test_sft_max_length_beyond_the_positions_is_one_line_with_the_fix(bases, tmp_path, capsys):
    path = _sft_yaml(tmp_path, bases["llama"], bases["data"])  # the default max_length: 1024
    assert main(["sft", str(path)]) != 0
    line = _one_line_error(capsys)
    assert "data.max_length 1024 is longer than the 256 positions" in line
    assert "set data.max_length: 256 or less" in line


def test_pretrain_seq_len_beyond_the_positions_of_init_from(tiny_packed, tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    short = tmp_path / "short-bert"
    BertForMaskedLM(
        BertConfig(
            vocab_size=3000,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=16,
        )
    ).save_pretrained(short)
    config = tiny_config(tiny_packed, tmp_path / "run")
    config["model"] = {"type": "bert", "init_from": str(short)}
    from _dist import run_single

    with pytest.raises(
        HetlmError,
        match=r"seq_len 32 is longer than the 16 positions.*"
        r"--seq-len 16 or less",
    ):
        run_single(config)


def test_a_mistyped_local_folder_fails_at_once_without_the_hub(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "tok").mkdir(parents=True)
    started = time.perf_counter()
    code = main(["prepare", str(AOZORA), "--tokenizer", "runs/tokk", "--output", "data"])
    elapsed = time.perf_counter() - started
    assert code != 0
    line = _one_line_error(capsys)
    assert "--tokenizer runs/tokk: no such folder" in line and "runs/tok?" in line
    assert elapsed < 2.0, f"{elapsed:.1f} s"


def test_which_names_are_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for name in (
        "./x",
        "../x",
        "/x",
        "~/nowhere-hetlm",
        "runs/x",
        "a/b/c",
        "x/",
        "models/x",
        "has space",
    ):
        assert looks_local(name), name
        with pytest.raises(HetlmError, match="no such folder"):
            resolve_model_source(name, "model.path")
    for name in ("rinna/japanese-gpt2-small", "bert-base-uncased", "org/name"):
        assert not looks_local(name), name
        assert resolve_model_source(name, "model.path") == name
    assert resolve_model_source("models", "model.path") == "models"


def _mixed_encoding_file(path: Path) -> Path:
    """Aozora text: most lines UTF-8, the last 30 in Shift_JIS."""
    texts = aozora_texts(records=2, chars=15000)
    lines = [line for line in "\n".join(texts).split("\n") if line.strip()]
    # a blank line after each: every line a document, so both splits get some
    path.write_bytes(
        "\n\n".join(lines[:-30]).encode("utf-8")
        + b"\n\n"
        + "\n\n".join(lines[-30:]).encode("cp932", errors="replace")
        + b"\n"
    )
    return path


def test_a_file_partly_in_shift_jis_warns_first_and_strict_refuses(
    trained_tokenizer,  # noqa: F811
    tmp_path,
    capsys,
):
    mixed = _mixed_encoding_file(tmp_path / "mixed.txt")
    args = [
        "prepare",
        str(mixed),
        "--tokenizer",
        str(trained_tokenizer),
        "--seq-len",
        "32",
        "--workers",
        "1",
    ]
    assert main(args + ["--output", str(tmp_path / "data")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"hetlm: warning: {mixed}: ")
    assert "replaced character(s) (U+FFFD) on 30 line(s)" in lines[0]
    # short lines, not one paragraph: what was packed, where it went, what was read
    assert [line.split()[0] for line in lines[1:3]] == ["Packed", "Dropped"]
    assert any(line.startswith("Saved to") for line in lines)
    assert any(line.startswith("Read 1 file(s)") for line in lines)
    assert main(args + ["--output", str(tmp_path / "strict"), "--strict"]) != 0
    assert "undecodable bytes" in _one_line_error(capsys)


def test_a_few_replaced_characters_do_not_warn(tmp_path):
    from hetlm.data.prepare.corpus import CorpusStats, iter_documents

    clean = tmp_path / "clean.txt"
    text = "\n".join(aozora_texts(records=2, chars=10000))  # 20,000 characters
    clean.write_bytes(text.encode("utf-8") + "\nたった一つの\ufffd。\n".encode())
    stats = CorpusStats()
    list(iter_documents([clean], stats=stats))
    assert stats.encoding_warnings == []


def test_instruction_data_partly_in_shift_jis_warns(tmp_path):
    from hetlm.errors import HetlmWarning
    from hetlm.sft.data import load_examples

    rows = [json.dumps(r, ensure_ascii=False) for r in dolly_rows(8)]
    data = tmp_path / "rows.jsonl"
    data.write_bytes(
        "\n".join(rows[:6]).encode("utf-8")
        + b"\n"
        + "\n".join(rows[6:]).encode("cp932", errors="replace")
        + b"\n"
    )
    with pytest.warns(HetlmWarning, match=r"rows.jsonl: .* replaced character\(s\) \(U\+FFFD\)"):
        assert len(load_examples(data)) == 8
