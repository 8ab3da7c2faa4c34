"""Run metrics: a JSON Lines file (every step), the trackers of ``train.report_to`` (TensorBoard
by default; W&B, MLflow: ``hetlm.train.tracking``), a progress bar, a plot.

Only rank 0 writes. The JSONL file is appended to, so a resumed run continues the same file.
Each step is in it once: a run that resumes from checkpoint k (``--resume``, a torchrun restart,
a rollback) first rewrites the file without the records of steps after k that an earlier attempt
logged before it crashed (``rewind``: atomically, through a temporary file), keeping the
lifecycle events (start, resume, restart, rollback, stop). A torchrun restart adds a ``restart``
event (the attempt number, the step resumed from, the steps dropped).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from hetlm.train.tracking import (
    DEFAULT_REPORT_TO,
    Tracker,
    eval_scalars,
    open_trackers,
    step_scalars,
)

# Events kept when the steps after a checkpoint are dropped; others (eval, heartbeat) belong to
# the step they name.
LIFECYCLE_EVENTS = {"start", "resume", "restart", "rollback", "stop", "end"}


class MetricsLogger:
    def __init__(
        self,
        output_dir: Path,
        *,
        total_steps: int,
        start_step: int,
        enabled: bool,
        log_every: int,
        restart: int | None = None,
        report_to: list[str] | None = None,
        run_config: dict[str, Any] | None = None,
        run_id: str | None = None,
        desc: str = "pretrain",
    ) -> None:
        """``report_to``: tracker names (None: TensorBoard, as before the option existed);
        ``run_config``: the run's config, logged as the trackers' config / params."""
        self.enabled = enabled
        self.run_id = run_id  # stamped on every event (start, resume, restart, eval, end)
        self.log_every = log_every
        self.path = Path(output_dir) / "metrics.jsonl"
        self._bar = None
        self._trackers: list[Tracker] = []
        if not enabled:
            return
        from tqdm.auto import tqdm

        self.path.parent.mkdir(parents=True, exist_ok=True)
        if restart is None:
            from hetlm.train.distributed import job_restart_count

            restart = job_restart_count()
        dropped = rewind_metrics(self.path, start_step) if (start_step or restart) else []
        self._file = self.path.open("a", encoding="utf-8")
        if restart:
            self.event(
                event="restart",
                restart=restart,
                step=start_step,
                resumed_from=start_step or None,
                dropped_steps=dropped,
            )
        self._bar = tqdm(
            total=total_steps,
            initial=start_step,
            desc=desc,
            unit="step",
            dynamic_ncols=True,
            disable=None,
        )
        names = DEFAULT_REPORT_TO if report_to is None else report_to
        self._trackers = open_trackers(
            names, Path(output_dir), config=run_config or {}, resume=bool(start_step or restart)
        )

    def event(self, **fields: Any) -> None:
        """A non-step record (start, resume, eval, end), with the run id; an eval's numbers
        also go to the trackers as ``eval/<name>``."""
        if self.enabled:
            if self.run_id is not None:
                fields = {**fields, "run_id": self.run_id}
            self._file.write(json.dumps(fields, ensure_ascii=False) + "\n")
            self._file.flush()
            if fields.get("event") == "eval" and isinstance(fields.get("step"), int):
                self._track(eval_scalars(fields), fields["step"])

    def rewind(self, step: int) -> list[int]:
        """Drop the records of steps after ``step`` (a rollback to checkpoint ``step``)."""
        if not self.enabled:
            return []
        self._file.close()
        dropped = rewind_metrics(self.path, step)
        self._file = self.path.open("a", encoding="utf-8")
        return dropped

    def step(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        step = record["step"]
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            if step % self.log_every == 0:
                self._bar.set_postfix(
                    loss=f"{record['loss']:.3f}",
                    lr=f"{record['lr']:.2e}",
                    tok_s=f"{record['tokens_per_s']:.0f}",
                )
        if step % self.log_every == 0 or step == 1:
            self._track(step_scalars(record), step)

    def scalar(self, tag: str, value: float, step: int) -> None:
        """One named scalar to every tracker."""
        if self.enabled:
            self._track({tag: float(value)}, step)

    def _track(self, metrics: dict[str, float], step: int) -> None:
        for tracker in self._trackers:
            tracker.log(metrics, step)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        for tracker in self._trackers:
            tracker.close()
        self._trackers = []
        self._file.close()


def rewind_metrics(path: Path, step: int) -> list[int]:
    """Rewrite ``path`` without the records of steps after ``step`` (step records, eval and
    heartbeat events; lifecycle events stay); returns the dropped step numbers."""
    path = Path(path)
    if not path.is_file():
        return []
    kept, dropped = [], []
    lines = path.read_text(encoding="utf-8").splitlines()
    for line, record in _parsed(lines):
        if not isinstance(record, dict):
            continue
        event, at = record.get("event"), record.get("step")
        if isinstance(at, int) and at > step and event not in LIFECYCLE_EVENTS:
            if event is None:
                dropped.append(at)
            continue
        kept.append(line)
    if len(kept) != len(lines):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, path)
    return sorted(dropped)


def _parsed(lines: list[str]) -> list[tuple[str, Any]]:
    """(line, its JSON value) for each line, skipping a line cut by a crash mid-write (or
    blank)."""
    parsed = []
    for line in lines:
        try:
            parsed.append((line, json.loads(line)))
        except ValueError:
            continue
    return parsed


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not Path(path).is_file():
        return []
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [record for _line, record in _parsed(lines)]


def plot_loss(metrics_path: Path, out_png: Path) -> Path | None:
    """Training loss per step and held-out loss at each evaluation, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = {r["step"]: r["loss"] for r in records if r.get("event") is None and "loss" in r}
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("event") == "eval"]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = sorted(train)
    ax.plot(steps, [train[s] for s in steps], label="train MLM loss (global batch)", lw=1)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="held-out MLM loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / masked token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def membership_history(output_dir: Path) -> list[dict[str, Any]]:
    """The job's ``membership`` events so far (from ``metrics.jsonl``): step, world sizes, who
    left and who joined. Empty when the ranks never changed."""
    path = Path(output_dir) / "metrics.jsonl"
    found = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    for line in lines:
        if '"membership"' not in line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") == "membership":
            keys = ("step", "world_size_before", "world_size", "left", "joined")
            found.append({k: record.get(k) for k in keys})
    return found
