"""``hetlm eval`` from the command line: one table for several models, one-line errors."""

from __future__ import annotations

import json
import shutil

import pytest
from _eval_fixtures import (  # noqa: F401
    EVAL_DATA,
    one_torch_thread_fixture,
    tiny_bert_fixture,
    tiny_llama_fixture,
)

from hetlm.cli import main

FAST = [
    "--data-dir",
    str(EVAL_DATA),
    "--seeds",
    "0,1",
    "--epochs",
    "1",
    "--learning-rate",
    "3e-3",
    "--max-length",
    "32",
    "--max-train-examples",
    "64",
    "--mlm-seq-len",
    "32",
]


def test_two_models_land_in_one_table(tiny_bert, tiny_llama, tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(
        [
            "eval",
            "--model",
            str(tiny_bert),
            "--model",
            f"llama={tiny_llama}",
            "--output",
            str(out),
            *FAST,
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    report = json.loads((out / "eval.json").read_text(encoding="utf-8"))
    rows = {(r["model"], r["task"]): r for r in report["rows"]}
    assert set(rows) == {
        ("(majority class)", "chabsa"),
        ("(majority class)", "ews"),
        ("tiny-bert", "chabsa"),
        ("tiny-bert", "ews"),
        ("llama", "chabsa"),
        ("llama", "ews"),
        ("tiny-bert", "mlm:chabsa-test"),
        ("tiny-bert", "mlm:ews-test"),
        ("llama", "clm:chabsa-test"),
        ("llama", "clm:ews-test"),
    }
    for key in [("tiny-bert", "chabsa"), ("llama", "ews")]:
        row = rows[key]
        assert row["seeds"] == [0, 1] and row["accuracy_std"] is not None
        assert 0 <= row["accuracy"] <= 1
        assert 0 <= row["macro_f1"] <= 1
    assert rows[("tiny-bert", "mlm:ews-test")]["loss"] > 0
    assert rows[("llama", "clm:ews-test")]["perplexity"] > 1
    assert report["config"]["split"]["salt"] == "hetlm-eval-v1"
    assert len(report["finetune"]) == 4 and all(len(r["runs"]) == 2 for r in report["finetune"])
    markdown = (out / "eval.md").read_text(encoding="utf-8")
    assert "| llama " in markdown and "mlm:chabsa-test" in markdown and " ± " in markdown
    assert "| tiny-bert" in printed and str(out / "eval.md") in printed


@pytest.mark.parametrize(
    ("flags", "lr", "epochs"),
    [([], 5e-5, 3), (["--linear-probe"], 2e-3, 30), (["--linear-probe", "--epochs", "2"], 2e-3, 2)],
)
def test_the_recipe_defaults_follow_the_protocol(tiny_bert, tmp_path, flags, lr, epochs):
    out = tmp_path / "recipe"
    args = ["eval", "--model", str(tiny_bert), "--tasks", "ews", "--output", str(out)]
    args += ["--data-dir", str(EVAL_DATA), "--seeds", "0", "--max-length", "32"]
    args += ["--max-train-examples", "16", "--max-eval-examples", "8", *flags]
    assert main(args) == 0
    finetune = json.loads((out / "eval.json").read_text(encoding="utf-8"))["config"]["finetune"]
    assert (finetune["lr"], finetune["epochs"], finetune["linear_probe"]) == (
        lr,
        epochs,
        "--linear-probe" in flags,
    )


def test_linear_probe_flag_reaches_the_report(tiny_llama, tmp_path):
    out = tmp_path / "probe"
    code = main(
        [
            "eval",
            "--model",
            str(tiny_llama),
            "--tasks",
            "ews",
            "--linear-probe",
            "--output",
            str(out),
        ]
        + FAST
    )
    assert code == 0
    report = json.loads((out / "eval.json").read_text(encoding="utf-8"))
    assert [r["linear_probe"] for r in report["finetune"]] == [True]
    assert "linear probe" in (out / "eval.md").read_text(encoding="utf-8")


def test_export_splits_alone(tmp_path, capsys):
    assert main(["eval", "--data-dir", str(EVAL_DATA), "--export-splits", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "chabsa_train_documents.jsonl").is_file()
    assert "chABSA documents train" in capsys.readouterr().out


def _no_tokenizer(tmp_path, tiny_bert):
    folder = tmp_path / "model-only"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_bert / name, folder / name)
    return folder


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda tmp, bert: ["--model", str(tmp / "missing")], "no such folder"),
        (lambda tmp, bert: ["--model", str(_no_tokenizer(tmp, bert))], "has no tokenizer files"),
        (lambda tmp, bert: ["--model", str(tmp)], "has no config.json"),
        (
            lambda tmp, bert: ["--model", str(bert), "--tasks", "chabsa,squad"],
            "unknown task 'squad'",
        ),
        (lambda tmp, bert: ["--model", str(bert), "--seeds", "0,x"], "--seeds"),
        (lambda tmp, bert: ["--model", str(bert), "--data-dir", str(tmp)], "not found"),
        (
            lambda tmp, bert: ["--model", str(bert), "--ews-path", str(tmp / "bad.jsonl")],
            "bad.jsonl:1: not valid JSON",
        ),
        (
            lambda tmp, bert: [
                "--model",
                str(bert),
                "--tasks",
                "mlm",
                "--mlm-corpus",
                str(tmp / "nothing.jsonl"),
            ],
            "does not exist",
        ),
        (lambda tmp, bert: ["--model", str(bert), "--epochs", "0"], "epochs must be at least 1"),
        (lambda tmp, bert: [], "no model given"),
        (lambda tmp, bert: ["--model", str(bert), "--device", "cuda:7"], "cuda:7"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(make_args, message, tiny_bert, tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text("{broken\n", encoding="utf-8")
    args = ["eval", *make_args(tmp_path, tiny_bert), "--output", str(tmp_path / "out")]
    if "--data-dir" not in args:
        args += ["--data-dir", str(EVAL_DATA)]
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # refused before any work
