"""Fault injection: hetlm survives crashes, hangs, full disks, bad numbers and bad input.

Faults come from ``HETLM_FAULT`` (``hetlm.train.faults``, inert unless set). Where a run is
resumed, its final weights are compared with an uninterrupted run (fp32, CPU). The longer
end-to-end scenarios through the CLI are in ``benchmarks/fault_injection.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from _dist import final_weights, max_abs_diff, run_ranks, run_single
from conftest import tiny_config

from hetlm.errors import HetlmError
from hetlm.train import faults
from hetlm.train.checkpoint import verify_manifest
from hetlm.train.metrics import read_metrics, rewind_metrics

STEPS = 6


def _records(output_dir: Path) -> list[dict]:
    return read_metrics(output_dir / "metrics.jsonl")


def _steps(output_dir: Path) -> list[int]:
    return [r["step"] for r in _records(output_dir) if "event" not in r]


def _ckpt(output_dir: Path, step: int) -> Path:
    return output_dir / "checkpoints" / f"step-{step:08d}"


@pytest.fixture
def fault(monkeypatch):
    """Set HETLM_FAULT for this process (and children started from it)."""

    def set_fault(spec: str) -> None:
        monkeypatch.setenv(faults.ENV, spec)
        faults.reset()

    yield set_fault
    faults.reset()


@pytest.fixture(scope="module")
def reference(tiny_packed, tmp_path_factory):
    """The uninterrupted run: 6 steps, one process, fp32."""
    out = tmp_path_factory.mktemp("reference")
    run_single(tiny_config(tiny_packed, out, max_steps=STEPS))
    return final_weights(out)


def _cli(args: list[str], env: dict[str, str], timeout: float = 240):
    return subprocess.run(
        [sys.executable, "-m", "hetlm.cli", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _write_config(config: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


# ---------------------------------------------------------------- pure pieces


def test_fault_spec_parsing():
    parsed = faults.parse("kill:rank=1:step=3; stall:rank=0:step=2:seconds=1.5;nan:step=4")
    assert [(f.kind, f.rank, f.step) for f in parsed] == [
        ("kill", 1, 3),
        ("stall", 0, 2),
        ("nan", None, 4),
    ]
    assert parsed[1].seconds == 1.5
    assert faults.parse("kill_checkpoint:step=4")[0].rank == 0
    assert faults.parse("") == []
    for bad, message in [
        ("explode:step=1", "unknown fault"),
        ("kill:rank=1", "needs step"),
        ("kill:step=x", "bad setting"),
        ("kill:when=3:step=1", "bad setting"),
    ]:
        with pytest.raises(HetlmError, match=message):
            faults.parse(bad)


def test_rewind_drops_later_steps_and_keeps_lifecycle_events(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [
        {"event": "start", "step": 0},
        {"step": 1},
        {"step": 2},
        {"event": "eval", "step": 2},
        {"step": 3},
        {"event": "eval", "step": 3},
        {"event": "heartbeat", "step": 3},
        {"event": "stop", "step": 3},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 4, "lo')  # cut
    assert rewind_metrics(path, 2) == [3]
    assert read_metrics(path) == [
        {"event": "start", "step": 0},
        {"step": 1},
        {"step": 2},
        {"event": "eval", "step": 2},
        {"event": "stop", "step": 3},
    ]


# ---------------------------------------------------------------- crashes


def test_kill_one_rank_mid_run_torchrun_restarts_and_resumes(tiny_packed, tmp_path, reference):
    """kill -9 of rank 1 at step 4 under --local-nodes 2 --max-restarts 1 (split (3, 5)):
    the job restarts by itself from checkpoint 2; step 3, logged before the crash, is dropped
    and re-run; the weights equal the uninterrupted run's."""
    out = tmp_path / "run"
    config = tiny_config(
        tiny_packed,
        out,
        max_steps=STEPS,
        save_steps=2,
        micro_batch={"per_rank": [3, 5]},
        dist_timeout_s=60,
    )
    path = _write_config(config, tmp_path / "run.yaml")
    done = _cli(
        ["pretrain", str(path), "--local-nodes", "2", "--max-restarts", "1", "--quiet"],
        {faults.ENV: "kill:rank=1:step=4"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "killing rank 1" in done.stdout + done.stderr
    assert "restart 1 of 1" in done.stderr
    records = _records(out)
    restart = next(r for r in records if r.get("event") == "restart")
    assert restart["restart"] == 1 and restart["resumed_from"] == 2
    assert restart["dropped_steps"] == [3]
    assert _steps(out) == list(range(1, STEPS + 1))  # each step once
    assert any(r.get("event") == "heartbeat" and len(r["ranks"]) == 2 for r in records)
    assert max_abs_diff(reference, final_weights(out)) <= 1e-5


def test_kill_one_rank_under_two_torchrun_agents_with_their_own_restarts(
    tiny_packed, tmp_path, reference
):
    """Two plain torchrun agents (c10d rendezvous, as on two nodes) with torchrun's own
    --max-restarts 1; rank 1 is killed at step 4. The agents re-form the group (the agent that
    only re-joined keeps TORCHELASTIC_RESTART_COUNT 0), the new group forms on a fresh prefix of
    the agents' store (not the dead ranks' addresses), and the run resumes from checkpoint 2."""
    out = tmp_path / "run"
    config = tiny_config(
        tiny_packed,
        out,
        max_steps=STEPS,
        save_steps=2,
        micro_batch={"per_rank": [3, 5]},
        dist_timeout_s=30,
    )
    path = _write_config(config, tmp_path / "run.yaml")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {
        **os.environ,
        faults.ENV: "kill:rank=1:step=4",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("HETLM_RESTART_COUNT", None)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc-per-node=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        "--max-restarts=1",
        "--monitor-interval=0.5",
        "-m",
        "hetlm.cli",
        "pretrain",
        str(path),
        "--quiet",
    ]
    agents = [
        subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(2)
    ]
    try:
        logs = [agent.communicate(timeout=120)[0] for agent in agents]
    finally:
        for agent in agents:
            agent.kill()
    assert [a.returncode for a in agents] == [0, 0], "\n".join(log[-3000:] for log in logs)
    assert "killing rank 1" in "".join(logs)
    restart = next(r for r in _records(out) if r.get("event") == "restart")
    assert restart["restart"] == 1 and restart["resumed_from"] == 2
    assert _steps(out) == list(range(1, STEPS + 1))
    assert max_abs_diff(reference, final_weights(out)) <= 1e-5


def test_a_regrouped_attempt_does_not_read_the_previous_attempts_addresses():
    """The agents' store outlives the ranks: a second group of ranks on it (rank 1 starting
    late, as after a restart) must not connect to the first group's dead addresses."""
    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    code = (
        "import torch; from hetlm.train import distributed as D; ctx = D.init_distributed(20); "
        "print('sum', D.all_reduce_sum(ctx, torch.ones(1)).item()); D.shutdown()"
    )
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(store.port),
        "WORLD_SIZE": "2",
        "TORCHELASTIC_USE_AGENT_STORE": "True",
        "OMP_NUM_THREADS": "1",
    }
    for delay in (0.0, 3.0):  # the first attempt, then the restarted one
        ranks = []
        for rank in (0, 1):
            ranks.append(
                subprocess.Popen(
                    [sys.executable, "-c", code],
                    env={**env, "RANK": str(rank)},
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
            time.sleep(delay)
        outs = [r.communicate(timeout=60)[0] for r in ranks]
        assert all("sum 2.0" in out for out in outs), "\n".join(o[-2000:] for o in outs)


def test_kill_during_checkpoint_write_keeps_the_previous_one(tiny_packed, tmp_path, reference):
    config = tiny_config(tiny_packed, tmp_path, max_steps=STEPS, save_steps=2)
    path = _write_config(config, tmp_path / "run.yaml")
    died = _cli(["pretrain", str(path), "--quiet"], {faults.ENV: "kill_checkpoint:step=4"})
    assert died.returncode == -9, died.stderr[-2000:]
    assert (tmp_path / "checkpoints" / ".tmp-step-00000004").is_dir()  # the half-written one
    assert not _ckpt(tmp_path, 4).exists()
    assert verify_manifest(_ckpt(tmp_path, 2)) is None
    run_single(config, resume=True)  # from step 2; the stale staging folder is replaced
    assert not (tmp_path / "checkpoints" / ".tmp-step-00000004").exists()
    b = final_weights(tmp_path)
    assert all(torch.equal(reference[k], b[k]) for k in b), max_abs_diff(reference, b)
    assert _steps(tmp_path) == list(range(1, STEPS + 1))


def test_truncated_checkpoint_file_falls_back_to_the_previous(tiny_packed, tmp_path, reference):
    config = tiny_config(tiny_packed, tmp_path, max_steps=STEPS, save_steps=2)
    run_single(config, stop_at_step=4)
    weights = _ckpt(tmp_path, 4) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.warns(UserWarning, match="step-00000004: model.safetensors has"):
        run_single(config, resume=True)
    assert any(r.get("event") == "resume" and r["step"] == 2 for r in _records(tmp_path))
    b = final_weights(tmp_path)
    assert all(torch.equal(reference[k], b[k]) for k in b), max_abs_diff(reference, b)


# ---------------------------------------------------------------- disk full


def test_full_disk_while_checkpointing_keeps_the_previous_one(tiny_packed, tmp_path, fault):
    fault("enospc:step=4")
    config = tiny_config(tiny_packed, tmp_path, max_steps=STEPS, save_steps=2)
    with pytest.raises(
        HetlmError,
        match=r"could not write checkpoint \S+step-00000004 \(No "
        r"space left on device\); it needs about [\d.]+ MB, "
        r"[\d.]+ \w+ is free on \S+; the previous checkpoint "
        r"\S+step-00000002 is intact",
    ):
        run_single(config)
    assert not (tmp_path / "checkpoints" / ".tmp-step-00000004").exists()
    assert verify_manifest(_ckpt(tmp_path, 2)) is None


# ---------------------------------------------------------------- hangs


def test_stalled_rank_is_named_when_the_collective_times_out(tiny_packed, tmp_path, fault):
    fault("stall:rank=1:step=3:seconds=60")
    config = tiny_config(tiny_packed, tmp_path, max_steps=STEPS, micro_batch={"per_rank": [3, 5]})
    with pytest.raises(
        Exception,
        match=r"did not complete within train.dist_timeout_s=5 s on "
        r"rank 0 .*ranks \[1\] did not arrive \(rank 1: last "
        r"seen at train step 2",
    ):
        run_ranks(config, world=2, timeout_s=5)
    beats = [r for r in _records(tmp_path) if r.get("event") == "heartbeat"]
    assert [b["step"] for b in beats] == [1, 2]
    assert [h["step"] for h in beats[-1]["ranks"]] == [2, 2]


# ---------------------------------------------------------------- numerics


def test_fp16_inf_is_skipped_and_counted(tiny_packed, tmp_path, fault):
    fault("inf:step=3")
    run_single(tiny_config(tiny_packed, tmp_path, max_steps=4, precision="fp16"))
    steps = [r for r in _records(tmp_path) if "event" not in r]
    assert 3 in [r["step"] for r in steps if r["skipped"]]
    assert steps[-1]["skipped_steps"] >= 1


def test_bf16_nan_stops_naming_the_last_good_checkpoint(tiny_packed, tmp_path, fault):
    fault("nan:step=3")
    config = tiny_config(tiny_packed, tmp_path, max_steps=4, precision="bf16", save_steps=2)
    with pytest.raises(
        HetlmError,
        match=r"loss became nan at step 3; last good checkpoint: "
        r"\S*step-00000002; resume from it",
    ):
        run_single(config)


def test_nan_rolls_back_to_the_last_checkpoint_with_a_lower_lr(tiny_packed, tmp_path, fault):
    fault("nan:step=3")
    config = tiny_config(
        tiny_packed,
        tmp_path,
        max_steps=5,
        save_steps=2,
        on_nonfinite="rollback",
        rollback_lr_factor=0.5,
    )
    run_single(config)
    records = _records(tmp_path)
    rollback = next(r for r in records if r.get("event") == "rollback")
    assert (rollback["from_step"], rollback["step"], rollback["lr_factor"]) == (3, 2, 0.5)
    steps = [r for r in records if "event" not in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5]  # the NaN step 3 was replaced
    assert all(r["loss"] == r["loss"] for r in steps)  # no NaN left
    reference = tmp_path / "no-fault"
    fault("")  # no fault
    run_single(tiny_config(tiny_packed, reference, max_steps=5))
    lrs = {r["step"]: r["lr"] for r in _records(reference) if "event" not in r}
    assert steps[1]["lr"] == lrs[2] and steps[3]["lr"] == pytest.approx(0.5 * lrs[4])
    state = json.loads((_ckpt(tmp_path, 5) / "trainer_state.json").read_text())
    assert (state["lr_factor"], state["rollbacks"]) == (0.5, 1)  # a resume keeps the lower lr


def test_rollback_needs_a_checkpoint(tiny_packed, tmp_path, fault):
    fault("nan:step=2")
    config = tiny_config(tiny_packed, tmp_path, max_steps=3, on_nonfinite="rollback")
    with pytest.raises(HetlmError, match="before any checkpoint was written"):
        run_single(config)


# ---------------------------------------------------------------- bad input


def test_missing_dataset_is_one_line(tiny_packed, tmp_path, capsys):
    from hetlm.cli import main

    config = tiny_config(tmp_path / "no-such-dataset", tmp_path / "out")
    code = main(["pretrain", str(_write_config(config, tmp_path / "run.yaml"))])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "no-such-dataset" in err and "hetlm prepare" in err


def test_resume_on_another_dataset_or_model_names_the_difference(tiny_packed, tmp_path):
    config = tiny_config(tiny_packed, tmp_path / "run", max_steps=4)
    run_single(config, stop_at_step=2)
    other = tmp_path / "other-data"
    shutil.copytree(tiny_packed, other)
    meta_path = next(p for p in other.glob("*.json") if "vocab_size" in p.read_text())
    meta = json.loads(meta_path.read_text())
    meta["tokenizer_vocab_hash"] = "0" * 16
    meta_path.write_text(json.dumps(meta))
    moved = tiny_config(other, tmp_path / "run", max_steps=4)
    with pytest.raises(
        HetlmError,
        match=r"tokenizer \(vocabulary hash.*trained on \S+, now "
        r"\S+other-data",
    ):
        run_single(moved, resume=True)
    bigger = tiny_config(tiny_packed, tmp_path / "run", max_steps=4)
    bigger["model"]["preset"] = "small"
    with pytest.raises(HetlmError, match=r"model.preset: checkpoint 'tiny' vs now 'small'"):
        run_single(bigger, resume=True)
