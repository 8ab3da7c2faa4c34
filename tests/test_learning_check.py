"""benchmarks/learning_check.py --dry-run: both systems train, are scored on the same held-out
positions, and the table, JSON and plot are written (the CPU and GPU runs use the same code)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "learning_check.py"


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("learning-check")
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    done = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--dry-run",
            "--threads",
            "1",
            "--out",
            str(out),
            "--cache",
            str(out / "cache"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_dry_run_writes_table_json_and_plot(dry_run):
    results = json.loads((dry_run / "learning_check_dry_run.json").read_text())
    setup = results["setup"]
    baseline = results["baselines"][0]
    assert 0 < baseline["accuracy"] < 0.5 and baseline["loss"] > 0 and baseline["targets"] > 0
    for system in ("hetlm", "trainer"):
        (run,) = results["runs"][system]
        assert len(run["losses"]) == setup["steps"]
        assert all(math.isfinite(x) for x in run["losses"])
        assert [e["step"] for e in run["eval"]] == list(
            range(setup["eval_every"], setup["steps"] + 1, setup["eval_every"])
        )
        assert run["train_time_s"] > 0
    hetlm, trainer = results["runs"]["hetlm"][0], results["runs"]["trainer"][0]
    # the same initial weights: the first steps' losses agree up to the masking's sampling
    assert hetlm["losses"][0] == pytest.approx(trainer["losses"][0], abs=0.3)
    summary = results["summary"]
    assert summary["goal_accuracy"] == pytest.approx(2 * summary["baseline_accuracy"])
    table = (dry_run / "learning_check_dry_run.md").read_text()
    assert "Most-frequent-token baseline" in table and "| hetlm |" in table
    assert "| HF Trainer |" in table
    assert (dry_run / "learning_check_dry_run.png").stat().st_size > 10_000


def test_both_are_scored_on_the_same_positions(dry_run):
    """hetlm's own held-out accuracy is what the Trainer's scorer gives its final model."""
    from transformers import AutoModelForMaskedLM

    from hetlm.evaluate.heldout import score_mlm

    spec = importlib.util.spec_from_file_location("learning_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("learning_check", module)  # its dataclasses look their module up
    spec.loader.exec_module(module)
    results = json.loads((dry_run / "learning_check_dry_run.json").read_text())
    setup = module.SETUPS["dry_run"]
    data = next((dry_run / "cache").glob("data-*"))
    rows, collator, baseline = module.held_out(setup, data, seed=0)
    assert baseline.as_dict() == results["baselines"][0]
    model = AutoModelForMaskedLM.from_pretrained(
        dry_run / "cache" / "run-dry_run-hetlm-seed0" / "model"
    ).eval()
    _, correct, count = score_mlm(model, rows, collator, batch_size=16)
    assert count == baseline.targets
    assert correct / count == pytest.approx(results["runs"]["hetlm"][0]["eval"][-1]["accuracy"])


def test_causal_dry_run_scores_both_on_next_tokens(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    done = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--dry-run",
            "--causal",
            "--threads",
            "1",
            "--out",
            str(tmp_path),
            "--cache",
            str(tmp_path / "cache"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "learning_check_dry_run_llama.json").read_text())
    assert results["setup"]["model_type"] == "llama"
    rows, seq_len = results["setup"]["eval_samples"], results["setup"]["seq_len"]
    assert results["baselines"][0]["targets"] <= rows * (seq_len - 1)
    for system in ("hetlm", "trainer"):
        final = results["runs"][system][0]["eval"][-1]
        assert final["step"] == results["setup"]["steps"] and math.isfinite(final["loss"])
    assert "--causal" in (tmp_path / "learning_check_dry_run_llama.md").read_text()
