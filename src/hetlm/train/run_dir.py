"""Whose run is in ``run.output_dir``: refuse to start over another run, pick only this run's
checkpoints, and say what ``--overwrite`` deletes.

Every run has a **run id**, generated at a fresh start and kept on resume. It is written to
``<output_dir>/run.json`` (the run the folder belongs to), into every checkpoint's
``trainer_state.json`` and into the metrics events. So:

- a fresh start (no ``--resume``) into a folder that holds another run's artifacts (checkpoints,
  metrics, a final model) is refused unless ``--overwrite`` is given, which deletes those
  artifacts (and says so in one line) and nothing else of the folder;
- ``--resume`` picks the newest valid checkpoint **of the folder's run id**: a stale ``step-20``
  of an older run can never be picked over the new run's ``step-10``;
- ``--resume PATH`` resumes from that checkpoint folder; checkpoints in the folder that would mix
  with it (another run's, or the same run's after PATH) are refused unless ``--overwrite``
  deletes them;
- an automatic restart (torchrun's ``TORCHELASTIC_RESTART_COUNT``, ``HETLM_RESTART_COUNT``) is
  the same run: it resumes from this run's newest checkpoint without ``--resume`` and never
  applies ``--overwrite`` again.

``plan_start`` only reads (the launcher's pre-check uses it); ``apply_start`` (rank 0) deletes
what the plan says and writes ``run.json``.
"""

from __future__ import annotations

import json
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from hetlm.errors import HetlmError
from hetlm.train.checkpoint import CheckpointManager, verify_manifest

RUN_FILE = "run.json"
# What a run writes into its output_dir (hetlm pretrain and hetlm sft): --overwrite deletes
# these and nothing else.
RUN_ARTIFACTS = (
    "checkpoints",
    "metrics.jsonl",
    "summary.json",
    "loss.png",
    "tensorboard",
    "heartbeat",
    "model",
    "adapter",
    "base",
    RUN_FILE,
)
FINISHED_MARKERS = ("summary.json", "model", "adapter")


def new_run_id() -> str:
    """Sortable and unique enough: UTC time plus 6 random hex digits."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def read_run_id(output_dir: Path) -> str | None:
    """The run id ``run.json`` names (None: no run.json, or an unreadable one)."""
    try:
        return json.loads((Path(output_dir) / RUN_FILE).read_text())["run_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read_elastic_job(output_dir: Path) -> str | None:
    """The torchrun job id ``run.json`` recorded for an elastic run (None: none)."""
    try:
        return json.loads((Path(output_dir) / RUN_FILE).read_text()).get("elastic_job")
    except (OSError, ValueError, AttributeError):
        return None


def checkpoint_run_id(path: Path) -> str | None:
    """The run id in a checkpoint's trainer state (None: written before run ids existed)."""
    return CheckpointManager._run_id_of(Path(path))


def existing_artifacts(output_dir: Path) -> list[str]:
    """The run artifacts present in ``output_dir`` (names from RUN_ARTIFACTS). ``run.json``
    alone is no run (a start refused before it wrote anything leaves only that)."""
    output_dir = Path(output_dir)
    present = [
        name
        for name in RUN_ARTIFACTS
        if (output_dir / name).exists()
        and not ((output_dir / name).is_dir() and not any((output_dir / name).iterdir()))
    ]
    return present if set(present) - {RUN_FILE} else []


def describe_run(output_dir: Path) -> str:
    """A few words on what the folder holds, for a refusal."""
    output_dir = Path(output_dir)
    checkpoints = CheckpointManager(output_dir / "checkpoints", 1).complete_checkpoints()
    finished = any((output_dir / name).exists() for name in FINISHED_MARKERS)
    what = "a finished run" if finished else "another run"
    if checkpoints:
        what += f" (checkpoints up to step {checkpoints[-1][0]})"
    return what


@dataclass
class RunStart:
    """What a start does: the run id, the checkpoint to resume from (None: step 0), and the
    paths to delete first (``--overwrite``), with the one line that says so."""

    run_id: str
    resume_from: Path | None
    delete: list[Path] = field(default_factory=list)
    message: str | None = None
    elastic_job: str | None = None  # torchrun's --rdzv-id of an elastic run, kept in run.json


def _this_runs_checkpoints(output_dir: Path, run_id: str | None) -> list[tuple[int, Path]]:
    """Complete checkpoints of ``run_id`` (without a run.json: all of them, legacy folders).
    Checkpoints without a run id (written before run ids existed) count as this run's: a run
    can only share a folder with them by resuming them (a fresh start over them is refused),
    so they are its own earlier steps."""
    found = CheckpointManager(Path(output_dir) / "checkpoints", 1).complete_checkpoints()
    if run_id is None:
        return found
    return [(s, p) for s, p in found if checkpoint_run_id(p) in (None, run_id)]


def latest_of_run(output_dir: Path, run_id: str | None) -> Path | None:
    """The newest checkpoint of ``run_id`` whose files match its manifest."""
    manager = CheckpointManager(Path(output_dir) / "checkpoints", 1)
    allowed = {p for _s, p in _this_runs_checkpoints(output_dir, run_id)}
    return manager.latest_valid(accept=lambda p: p in allowed)


def plan_start(
    output_dir: str | Path,
    *,
    resume: bool | str | Path = False,
    overwrite: bool = False,
    restart: int = 0,
) -> RunStart:
    """Decide how a run starts in ``output_dir`` (reads only; raises a one-line HetlmError)."""
    output_dir = Path(output_dir)
    current = read_run_id(output_dir)
    if restart and current is not None:
        return _plan_restart(output_dir, current, resume)
    if resume is True:
        return _plan_resume_latest(output_dir, current, overwrite)
    if resume:
        return _plan_resume_path(output_dir, Path(resume), current, overwrite)
    return _plan_fresh(output_dir, overwrite)


def _plan_fresh(output_dir: Path, overwrite: bool) -> RunStart:
    present = existing_artifacts(output_dir)
    if not present:
        return RunStart(new_run_id(), None)
    if not overwrite:
        raise HetlmError(
            f"run.output_dir {output_dir} already holds {describe_run(output_dir)}: add "
            "--resume to continue it, --overwrite to delete it and start again, or choose "
            "another run.output_dir"
        )
    return RunStart(
        new_run_id(),
        None,
        [output_dir / name for name in present],
        f"hetlm: --overwrite: deleted the earlier run in {output_dir} "
        f"({', '.join(n for n in present if n != RUN_FILE)})",
    )


def _plan_restart(output_dir: Path, run_id: str, resume: bool | str | Path) -> RunStart:
    """torchrun restarted the job: this run's newest checkpoint, else where it began."""
    found = latest_of_run(output_dir, run_id)
    if found is not None:
        return RunStart(run_id, found)
    if resume and resume is not True:
        return RunStart(run_id, Path(resume))
    return RunStart(run_id, None)


def _plan_resume_latest(output_dir: Path, current: str | None, overwrite: bool) -> RunStart:
    root = output_dir / "checkpoints"
    if current is None:  # a folder from before run ids: refuse a mix of runs it can detect
        ids = {
            checkpoint_run_id(p) for _s, p in CheckpointManager(root, 1).complete_checkpoints()
        } - {None}
        if len(ids) > 1:
            raise HetlmError(
                f"{root} holds checkpoints of {len(ids)} different runs and "
                f"{output_dir / RUN_FILE} is missing: resume one of them with "
                "--resume PATH"
            )
    found = latest_of_run(output_dir, current)
    if found is None:
        raise HetlmError(
            f"no complete checkpoint under {root} to resume from: run without "
            "--resume to start a new run"
        )
    run_id = current or checkpoint_run_id(found) or new_run_id()
    others = [
        p
        for _s, p in CheckpointManager(root, 1).complete_checkpoints()
        if checkpoint_run_id(p) not in (None, run_id)
    ]
    if others and overwrite:
        return RunStart(
            run_id,
            found,
            others,
            f"hetlm: --overwrite: deleted {len(others)} checkpoint(s) of other runs in {root}",
        )
    return RunStart(
        run_id,
        found,
        message=f"hetlm: ignoring {len(others)} checkpoint(s) of other runs in {root}"
        if others
        else None,
    )


def _plan_resume_path(
    output_dir: Path, path: Path, current: str | None, overwrite: bool
) -> RunStart:
    path = path.expanduser()
    if not path.is_dir():
        raise HetlmError(
            f"--resume {path}: no such checkpoint folder (give a "
            f"checkpoints/step-NNNNNNNN folder, or --resume alone for the newest)"
        )
    problem = verify_manifest(path)
    if problem is not None:
        raise HetlmError(
            f"--resume {path}: not a complete checkpoint ({problem}); pick another "
            f"one under {path.parent}"
        )
    run_id = checkpoint_run_id(path) or current or new_run_id()
    if current is not None and current != run_id:
        # the folder belongs to another run: its artifacts would mix with this one's
        present = [name for name in existing_artifacts(output_dir) if name != "checkpoints"]
        if not overwrite:
            raise HetlmError(
                f"run.output_dir {output_dir} holds run {current}, but {path} is a checkpoint of "
                f"run {run_id}: resume into another run.output_dir, or add --overwrite to "
                "delete the other run there"
            )
        start = _with_conflicts(output_dir, path, run_id, overwrite)
        start.delete += [output_dir / name for name in present if name != RUN_FILE]
        start.message = (
            f"hetlm: --overwrite: deleted run {current} in {output_dir} "
            f"({', '.join(present)}) before resuming {path}"
        )
        return start
    return _with_conflicts(output_dir, path, run_id, overwrite)


def _with_conflicts(output_dir: Path, chosen: Path, run_id: str, overwrite: bool) -> RunStart:
    """(--resume PATH) Checkpoints in output_dir that would mix with ``chosen``: another run's,
    or this run's after it (an abandoned branch). Refused, or deleted with --overwrite."""
    step = int(CheckpointManager.load_trainer_state(chosen)["step"])
    conflicts = []
    for s, p in CheckpointManager(output_dir / "checkpoints", 1).complete_checkpoints():
        if p.resolve() == chosen.resolve():
            continue
        other = checkpoint_run_id(p)
        if (other is not None and other != run_id) or s > step:
            conflicts.append(p)
    if not conflicts:
        return RunStart(run_id, chosen)
    names = ", ".join(p.name for p in conflicts[:3]) + (" ..." if len(conflicts) > 3 else "")
    if not overwrite:
        raise HetlmError(
            f"{output_dir / 'checkpoints'} holds {len(conflicts)} checkpoint(s) that would mix "
            f"with {chosen} (another run's, or later steps: {names}): add --overwrite to delete "
            "them, or resume into another run.output_dir"
        )
    return RunStart(
        run_id,
        chosen,
        conflicts,
        f"hetlm: --overwrite: deleted {len(conflicts)} checkpoint(s) that would mix "
        f"with {chosen.name} ({names})",
    )


def apply_start(output_dir: str | Path, start: RunStart, report=print) -> None:
    """(rank 0) Delete what the plan says, say so in one line, and record the run id."""
    output_dir = Path(output_dir)
    for path in start.delete:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    if start.message and report is not None:
        report(start.message)
    output_dir.mkdir(parents=True, exist_ok=True)
    record: dict[str, str] = {
        "run_id": start.run_id,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if start.elastic_job is not None:
        record["elastic_job"] = start.elastic_job
    tmp = output_dir / f".{RUN_FILE}.tmp"
    tmp.write_text(json.dumps(record) + "\n")
    tmp.replace(output_dir / RUN_FILE)
