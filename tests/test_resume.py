"""Exact resume: 6 steps straight equal 3 steps, stop, resume, 3 more (identical weights)."""

from __future__ import annotations

import json

import pytest
import torch
from _dist import final_weights, max_abs_diff, run_ranks, run_single
from conftest import tiny_config

from hetlm.errors import HetlmError


def _with_dropout(config: dict) -> dict:
    config["model"]["dropout"] = 0.1  # dropout on: the RNG state must be restored as well
    return config


def test_single_process_resume_is_bitwise_exact(tiny_packed, tmp_path):
    straight = _with_dropout(tiny_config(tiny_packed, tmp_path / "straight", max_steps=6))
    run_single(straight)
    stopped = _with_dropout(
        tiny_config(
            tiny_packed, tmp_path / "stopped", max_steps=6, save_steps=2, save_total_limit=1
        )
    )
    summary = run_single(stopped, stop_at_step=3)
    assert summary["stopped_at"] == 3
    assert not (tmp_path / "stopped" / "model").exists()
    ckpts = sorted(p.name for p in (tmp_path / "stopped" / "checkpoints").iterdir())
    assert ckpts == ["step-00000003"]  # save_total_limit=1 pruned step 2
    run_single(stopped, resume=True)
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "stopped")
    assert all(torch.equal(a[k], b[k]) for k in a), f"max diff {max_abs_diff(a, b):.2e}"
    # the metrics show the resume and count no step twice
    records = [
        json.loads(line)
        for line in (tmp_path / "stopped" / "metrics.jsonl").read_text().splitlines()
    ]
    steps = [r["step"] for r in records if "event" not in r]
    assert steps == list(range(1, 7))
    assert any(r.get("event") == "resume" and r["step"] == 3 for r in records)


def test_two_rank_resume_and_resume_with_another_split(tiny_packed, tmp_path):
    straight = tiny_config(
        tiny_packed, tmp_path / "straight", max_steps=6, micro_batch={"per_rank": [3, 5]}
    )
    run_ranks(straight, world=2)
    stopped = tiny_config(
        tiny_packed, tmp_path / "stopped", max_steps=6, micro_batch={"per_rank": [3, 5]}
    )
    run_ranks(stopped, world=2, stop_at_step=3)
    run_ranks(stopped, world=2, resume=True)
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "stopped")
    assert all(torch.equal(a[k], b[k]) for k in a), f"max diff {max_abs_diff(a, b):.2e}"
    # same global batch, other topology: continues with the same data order (split invariance)
    moved = tiny_config(tiny_packed, tmp_path / "stopped", max_steps=6, micro_batch=8)
    for ckpt in (tmp_path / "stopped" / "checkpoints").iterdir():
        if ckpt.name == "step-00000006":
            import shutil

            shutil.rmtree(ckpt)
    run_single(moved, resume=True)
    assert max_abs_diff(a, final_weights(tmp_path / "stopped")) <= 1e-5


def test_resume_refuses_changed_settings_and_missing_checkpoint(tiny_packed, tmp_path):
    with pytest.raises(HetlmError, match="no complete checkpoint"):
        run_single(tiny_config(tiny_packed, tmp_path / "none"), resume=True)
    config = tiny_config(tiny_packed, tmp_path / "run", max_steps=4)
    run_single(config, stop_at_step=2)
    changed = tiny_config(
        tiny_packed, tmp_path / "run", max_steps=4, global_batch=16, micro_batch=16
    )
    with pytest.raises(HetlmError, match="global_batch"):
        run_single(changed, resume=True)
    other_model = tiny_config(tiny_packed, tmp_path / "run", max_steps=4)
    other_model["model"]["preset"] = "small"
    with pytest.raises(HetlmError, match="does not match the model|model"):
        run_single(other_model, resume=True)


def test_interrupted_checkpoint_write_is_skipped(tiny_packed, tmp_path):
    config = tiny_config(tiny_packed, tmp_path, max_steps=4, save_steps=1, save_total_limit=3)
    run_single(config, stop_at_step=2)
    ckpt = tmp_path / "checkpoints" / "step-00000002"
    (ckpt / "optimizer.pt").write_bytes(b"truncated")  # corrupt the newest
    with pytest.warns(UserWarning, match="skipping checkpoint"):
        run_single(config, resume=True)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("event") == "resume" and r["step"] == 1 for r in records)
