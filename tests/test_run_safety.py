"""Nothing is lost by accident (issue 14): another run's output_dir is refused, --overwrite
says what it deletes, --resume PATH, a run id per checkpoint, --extend for a changed max_steps."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from _dist import run_single
from conftest import tiny_config

from hetlm.cli import main
from hetlm.errors import HetlmError
from hetlm.train.run_dir import checkpoint_run_id, read_run_id


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _steps(run: Path) -> list[int]:
    return [r["step"] for r in _records(run) if "event" not in r]


def _lrs(run: Path) -> dict[int, float]:
    return {r["step"]: r["lr"] for r in _records(run) if "event" not in r}


def _ckpt(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:08d}"


def test_rerun_into_a_finished_dir_is_refused_and_overwrite_starts_again(
    tiny_packed, tmp_path, capsys
):
    run = tmp_path / "run"
    config = tiny_config(tiny_packed, run, max_steps=2, save_steps=1, save_total_limit=5)
    run_single(config)
    first_id = read_run_id(run)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["pretrain", str(path)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--resume" in err[0] and "--overwrite" in err[0], err
    assert "finished run" in err[0]
    # nothing was touched: same files, same contents, metrics without a second copy
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before
    assert _steps(run) == [1, 2]

    assert main(["pretrain", str(path), "--overwrite", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "--overwrite: deleted the earlier run" in out and "checkpoints" in out
    new_id = read_run_id(run)
    assert new_id != first_id
    assert _steps(run) == [1, 2]  # not [1, 2, 1, 2]
    assert {r.get("run_id") for r in _records(run) if "event" in r} == {new_id}
    assert all(checkpoint_run_id(p) == new_id for p in (run / "checkpoints").iterdir())


def test_a_stale_checkpoint_of_another_run_is_never_picked(tiny_packed, tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    run_single(
        tiny_config(tiny_packed, old, max_steps=4, save_steps=2, save_total_limit=5), stop_at_step=4
    )
    config = tiny_config(tiny_packed, new, max_steps=4, save_steps=2, save_total_limit=1)
    run_single(config, stop_at_step=2)
    # the old run's newer step-4 lands in the new run's folder (an old-code rerun, a copy)
    shutil.copytree(_ckpt(old, 4), _ckpt(new, 4))
    assert checkpoint_run_id(_ckpt(new, 4)) != read_run_id(new)
    summary = run_single(config, resume=True)
    assert summary["steps"] == 4
    resumes = [r for r in _records(new) if r.get("event") == "resume"]
    assert [r["step"] for r in resumes] == [2]  # from its own step-2, not the stale step-4
    assert _steps(new) == [1, 2, 3, 4]
    # its own final step-4 replaced the stale one (keep_last counts this run's only)
    assert checkpoint_run_id(_ckpt(new, 4)) == read_run_id(new)


def test_resume_from_a_chosen_checkpoint(tiny_packed, tmp_path, capsys):
    run = tmp_path / "run"
    config = tiny_config(tiny_packed, run, max_steps=4, save_steps=1, save_total_limit=5)
    run_single(config, stop_at_step=3)
    run_id = read_run_id(run)
    with pytest.raises(HetlmError, match="no such checkpoint folder"):
        run_single(config, resume=tmp_path / "nowhere")
    # later checkpoints of the same run would mix with a resume from step 1
    with pytest.raises(HetlmError, match="would mix.*--overwrite"):
        run_single(config, resume=_ckpt(run, 1))
    summary = run_single(config, resume=_ckpt(run, 1), overwrite=True)
    assert summary["steps"] == 4 and read_run_id(run) == run_id
    assert "deleted 2 checkpoint(s)" in capsys.readouterr().out
    assert [r["step"] for r in _records(run) if r.get("event") == "resume"] == [1]
    assert _steps(run) == [1, 2, 3, 4]


def test_raising_max_steps_needs_extend_and_the_lr_never_jumps(tiny_packed, tmp_path, capsys):
    run = tmp_path / "run"
    config = tiny_config(
        tiny_packed, run, max_steps=4, warmup_steps=1, save_steps=1, save_total_limit=5
    )
    run_single(config, stop_at_step=2)
    lr_at_2 = _lrs(run)[2]  # the lr the next step uses: 1e-3 * (4 - 2) / 3
    assert lr_at_2 == pytest.approx(1e-3 * 2 / 3)
    longer = tiny_config(
        tiny_packed, run, max_steps=8, warmup_steps=1, save_steps=1, save_total_limit=5
    )
    with pytest.raises(HetlmError, match="--extend continue.*--extend restart"):
        run_single(longer, resume=True)
    assert _steps(run) == [1, 2]
    run_single(longer, resume=True, extend="continue")
    assert "--extend continue: max_steps 4 -> 8" in capsys.readouterr().out
    lrs = _lrs(run)
    # from the current lr down to 0 at step 8, linearly; never above where it was
    for step in range(2, 9):
        assert lrs[step] == pytest.approx(lr_at_2 * (8 - step) / 6)
    # a later plain resume keeps the extended schedule (stored in the checkpoint)
    run_single(longer, resume=_ckpt(run, 5), overwrite=True)
    assert _lrs(run)[6] == pytest.approx(lr_at_2 * 2 / 6)
    # a finished run's lr is 0: continue would train at 0, restart warms up again
    longest = tiny_config(
        tiny_packed, run, max_steps=10, warmup_steps=2, save_steps=1, save_total_limit=5
    )
    with pytest.raises(HetlmError, match="already 0.*--extend restart"):
        run_single(longest, resume=True, extend="continue")
    run_single(longest, resume=True, extend="restart")
    lrs = _lrs(run)
    assert lrs[8] == 0.0 and lrs[9] == pytest.approx(1e-3) and lrs[10] == 0.0


def test_an_automatic_restart_resumes_this_run_without_resume(
    tiny_packed, tmp_path, monkeypatch, capsys
):
    run = tmp_path / "run"
    config = tiny_config(tiny_packed, run, max_steps=4, save_steps=2, save_total_limit=5)
    run_single(config, stop_at_step=2)
    monkeypatch.setenv("HETLM_RESTART_COUNT", "1")
    # as torchrun restarts it: the same arguments, even --overwrite, which is not applied again
    run_single(config, overwrite=True)
    assert "restart 1: resuming from" in capsys.readouterr().out
    assert _steps(run) == [1, 2, 3, 4]
    assert [r["step"] for r in _records(run) if r.get("event") == "resume"] == [2]


def test_resume_options_on_the_command_line():
    from hetlm.cli import build_parser
    from hetlm.commands.run_options import fix_resume_argument

    parser = build_parser()
    for argv, config, resume in (
        (["pretrain", "run.yaml", "--resume"], "run.yaml", True),
        (["pretrain", "--resume", "run.yaml"], "run.yaml", True),  # not a checkpoint PATH
        (["sft", "run.yaml", "--resume", "ck/step-00000010"], "run.yaml", "ck/step-00000010"),
        (["sft", "run.yaml"], "run.yaml", False),
    ):
        args = parser.parse_args(argv)
        fix_resume_argument(args)
        assert (args.config, args.resume) == (config, resume), argv
    args = parser.parse_args(["pretrain", "run.yaml", "--extend", "continue"])
    with pytest.raises(HetlmError, match="add --resume"):
        fix_resume_argument(args)


def _fake_checkpoint(run: Path, step: int, run_id: str | None) -> Path:
    """A complete checkpoint folder as far as run_dir looks (trainer state + manifest)."""
    from hetlm.train.checkpoint import write_manifest

    path = _ckpt(run, step)
    path.mkdir(parents=True)
    state = {"step": step} | ({"run_id": run_id} if run_id else {})
    (path / "trainer_state.json").write_text(json.dumps(state))
    write_manifest(path)
    return path


def test_run_dir_plans_for_folders_from_before_run_ids(tmp_path):
    from hetlm.train.run_dir import apply_start, plan_start

    legacy = tmp_path / "legacy"
    old = _fake_checkpoint(legacy, 4, None)
    start = plan_start(legacy, resume=True)  # adopts them: a new id, resumes the newest
    assert start.resume_from == old and start.run_id
    apply_start(legacy, start, report=None)
    # a restart before this run wrote a checkpoint resumes the adopted one, not step 0
    assert plan_start(legacy, resume=True, restart=1).resume_from == old
    assert plan_start(legacy, restart=1).resume_from == old
    # a legacy folder with checkpoints of two runs (ids, no run.json) is not guessed at
    mixed = tmp_path / "mixed"
    _fake_checkpoint(mixed, 2, "a")
    _fake_checkpoint(mixed, 4, "b")
    with pytest.raises(HetlmError, match="2 different runs.*--resume PATH"):
        plan_start(mixed, resume=True)
    assert plan_start(mixed, resume=_ckpt(mixed, 2), overwrite=True).delete == [_ckpt(mixed, 4)]
