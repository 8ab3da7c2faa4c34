"""Experiment trackers (``train.report_to``): TensorBoard, Weights & Biases, MLflow.

Each back-end is driven through its own library, so a run shows up where the lab already looks,
with the names those tools use: one run per training run, named after ``run.output_dir``, the
whole run config as its config (W&B) or params (MLflow, flattened to ``train.lr`` etc.), the
scalars of the step records as ``train/<name>`` and the evaluations as ``eval/<name>``.

Only rank 0 tracks (``MetricsLogger`` builds the trackers only there). A resumed run (``--resume``
or a torchrun restart) continues the same W&B / MLflow run: their ids are kept in
``<output_dir>/trackers.json``. After a resume that drops steps an earlier attempt had logged,
W&B plots against ``train/global_step`` (so a step logged again is accepted) and MLflow keeps
both values of such a step in the metric's history.

Where the tracker is configured is the library's own business: ``WANDB_PROJECT`` (default
``hetlm``), ``WANDB_MODE=offline``, ``WANDB_DIR`` (default: the output_dir), ``MLFLOW_TRACKING_URI``,
``MLFLOW_EXPERIMENT_NAME`` (default ``hetlm``).

This module imports no tracking library at import time: the config validation calls
``check_installed`` to give a one-line error naming the extra to install before anything starts.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Protocol

from hetlm.tracker_names import (  # noqa: F401  (the names this module logs to)
    DEFAULT_REPORT_TO,
    TRACKERS,
    check_installed,
    normalize_report_to,
)

IDS_FILE = "trackers.json"


class Tracker(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def step_scalars(record: dict[str, Any]) -> dict[str, float]:
    """The scalars of a step record as ``train/<key>``; per-rank lists as
    ``train/<key>/<rank>`` (the per-rank tokens/s of a mixed cluster); flags and the step
    itself left out."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if key == "step" or isinstance(value, bool):
            continue
        if isinstance(value, int | float):
            out[f"train/{key}"] = float(value)
        elif isinstance(value, list) and all(isinstance(v, int | float) for v in value):
            out.update({f"train/{key}/{i}": float(v) for i, v in enumerate(value)})
    return out


def eval_scalars(fields: dict[str, Any]) -> dict[str, float]:
    """An eval event's numbers as ``eval/<name>`` (``eval_loss`` -> ``eval/loss``)."""
    return {
        f"eval/{key.removeprefix('eval_')}": float(value)
        for key, value in fields.items()
        if key not in ("event", "step")
        and isinstance(value, int | float)
        and not isinstance(value, bool)
    }


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as ``{"train.lr": "0.0005", ...}`` (MLflow params are flat strings)."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value if isinstance(value, str) else json.dumps(value)
    return flat


def open_trackers(
    names: list[str], output_dir: Path, *, config: dict[str, Any], resume: bool
) -> list[Tracker]:
    """The trackers of ``names`` for the run in ``output_dir`` (rank 0 only). ``resume``:
    continue the W&B / MLflow runs recorded in ``trackers.json`` (a fresh start makes new
    ones)."""
    from hetlm.errors import HetlmError

    try:
        check_installed(names)
    except ValueError as exc:
        raise HetlmError(f"train.report_to: {exc}") from None
    output_dir = Path(output_dir)
    ids_path = output_dir / IDS_FILE
    ids: dict[str, str] = {}
    if resume and ids_path.is_file():
        try:
            ids = json.loads(ids_path.read_text(encoding="utf-8"))
        except ValueError:
            ids = {}
    trackers: list[Tracker] = []
    opened: dict[str, str] = {}
    for name in names:
        if name == "tensorboard":
            trackers.append(TensorBoardTracker(output_dir / "tensorboard"))
        elif name == "wandb":
            tracker = WandbTracker(output_dir, config=config, run_id=ids.get("wandb"))
            opened["wandb"] = tracker.run_id
            trackers.append(tracker)
        elif name == "mlflow":
            tracker = MlflowTracker(output_dir, config=config, run_id=ids.get("mlflow"))
            opened["mlflow"] = tracker.run_id
            trackers.append(tracker)
    if opened:
        ids_path.write_text(json.dumps(opened, indent=1), encoding="utf-8")
    return trackers


class TensorBoardTracker:
    """``torch.utils.tensorboard`` event files in ``<output_dir>/tensorboard``."""

    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self._writer.add_scalar(key, value, step)

    def close(self) -> None:
        self._writer.close()


class WandbTracker:
    """One W&B run; the project from ``WANDB_PROJECT`` (default ``hetlm``), files under
    ``WANDB_DIR`` or the output_dir; ``WANDB_MODE=offline`` for nodes without internet."""

    def __init__(self, output_dir: Path, *, config: dict[str, Any], run_id: str | None) -> None:
        import wandb

        from hetlm.errors import HetlmError

        try:
            self._run = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "hetlm"),
                name=output_dir.name,
                config=config,
                dir=None if os.environ.get("WANDB_DIR") else str(output_dir),
                id=run_id,
                resume="allow" if run_id else None,
            )
        except Exception as exc:  # wandb.errors.UsageError/CommError: no login, no network
            raise HetlmError(
                f"wandb could not start a run: {_one_line(exc)}; run `wandb login` "
                "or set WANDB_MODE=offline"
            ) from None
        # a step logged again after a resume is accepted when plotted against this metric
        self._run.define_metric("train/global_step")
        self._run.define_metric("*", step_metric="train/global_step", step_sync=True)
        self.run_id: str = self._run.id

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._run.log({**metrics, "train/global_step": step})

    def close(self) -> None:
        self._run.finish()


class MlflowTracker:
    """One MLflow run in the experiment ``MLFLOW_EXPERIMENT_NAME`` (default ``hetlm``) of the
    store ``MLFLOW_TRACKING_URI`` (a server, ``sqlite:///mlflow.db``, or a ``file://`` folder
    with ``MLFLOW_ALLOW_FILE_STORE=true`` on MLflow 3)."""

    def __init__(self, output_dir: Path, *, config: dict[str, Any], run_id: str | None) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        from hetlm.errors import HetlmError

        try:
            self._client = client = MlflowClient()
            if run_id is not None and _mlflow_run_exists(client, run_id):
                known = client.get_run(run_id).data.params
                client.update_run(run_id, status="RUNNING")
            else:
                name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "hetlm")
                experiment = client.get_experiment_by_name(name)
                experiment_id = (
                    experiment.experiment_id
                    if experiment is not None
                    else client.create_experiment(name)
                )
                run_id = client.create_run(
                    experiment_id,
                    run_name=output_dir.name,
                    tags={"hetlm.output_dir": str(output_dir)},
                ).info.run_id
                known = {}
            # a resumed run keeps the params it started with (MLflow refuses to change one)
            params = [Param(k, v) for k, v in flatten(config).items() if k not in known]
            for i in range(0, len(params), 100):  # log_batch takes at most 100 params
                client.log_batch(run_id, params=params[i : i + 100])
        except Exception as exc:  # MlflowException: a store it cannot open, a server away
            uri = getattr(getattr(self, "_client", None), "tracking_uri", "?")
            raise HetlmError(
                f"mlflow could not start a run in {uri}: {_one_line(exc)}; set "
                "MLFLOW_TRACKING_URI (a server, sqlite:///mlflow.db, or a file:// "
                "folder with MLFLOW_ALLOW_FILE_STORE=true)"
            ) from None
        self.run_id: str = run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key, value, now, step) for key, value in metrics.items()]
        for i in range(0, len(batch), 1000):
            self._client.log_batch(self.run_id, metrics=batch[i : i + 1000])

    def close(self) -> None:
        self._client.set_terminated(self.run_id)


def _mlflow_run_exists(client: Any, run_id: str) -> bool:
    try:
        client.get_run(run_id)
    except Exception:  # MlflowException RESOURCE_DOES_NOT_EXIST (another store, deleted)
        return False
    return True


def _one_line(exc: BaseException) -> str:
    """The first sentence of an exception's message, on one line."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    first = text.split(". ")[0]
    return first if len(first) <= 300 else first[:297] + "..."
