"""``train.report_to``: TensorBoard, W&B (offline) and MLflow (a file store) each get the step
scalars, the evaluations, the run config and the run name, read back through the tools' own
readers; a missing library is a one-line error naming the extra. Tiny 3-step runs in-process:
pretraining (tiny BERT) for TensorBoard and W&B, instruction tuning (tiny LLaMA + LoRA) for
MLflow, so both commands' loops are covered.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml
from _dist import run_single
from _wandb_reader import find_run_file, history, read_records, run_info
from conftest import tiny_config

from hetlm.errors import HetlmError


def _step_records(output_dir: Path) -> list[dict]:
    lines = (output_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if "event" not in r]


def _eval_records(output_dir: Path) -> list[dict]:
    lines = (output_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if r.get("event") == "eval"]


def _requires(module: str):
    return pytest.mark.skipif(
        importlib.util.find_spec(module) is None,
        reason=f"{module} is not installed (pip install 'hetlm[track]')",
    )


@_requires("tensorboard")
def test_tensorboard_is_the_default_and_reads_back(tiny_packed, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb-run"
    config = tiny_config(tiny_packed, out, max_steps=3, eval_steps=2)
    assert "report_to" not in config["train"]  # the default
    run_single(config)
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    steps = _step_records(out)
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "step_time_s"):
        logged = events.Scalars(f"train/{key}")
        assert [e.step for e in logged] == [1, 2, 3], key
        assert [e.value for e in logged] == pytest.approx([r[key] for r in steps], rel=1e-6)
    assert [e.step for e in events.Scalars("train/tokens_per_s_per_rank/0")] == [1, 2, 3]
    evals = _eval_records(out)
    assert [e.step for e in events.Scalars("eval/loss")] == [2, 3]
    assert [e.value for e in events.Scalars("eval/loss")] == pytest.approx(
        [r["eval_loss"] for r in evals], rel=1e-6
    )
    assert not (out / "trackers.json").exists()  # TensorBoard needs no run id


@_requires("wandb")
def test_wandb_offline_run_reads_back(tiny_packed, tmp_path, monkeypatch):
    wandb_dir = tmp_path / "wandb-files"
    wandb_dir.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(wandb_dir))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    out = tmp_path / "wandb-run"
    run_single(tiny_config(tiny_packed, out, max_steps=3, eval_steps=2, report_to=["wandb"]))
    assert not (out / "tensorboard").exists()  # only what report_to names
    records = read_records(find_run_file(wandb_dir))
    info = run_info(records)
    assert info["name"] == "wandb-run" and info["project"] == "hetlm"
    assert json.loads((out / "trackers.json").read_text())["wandb"] == info["id"]
    assert info["config"]["train"]["max_steps"] == 3
    assert info["config"]["train"]["report_to"] == ["wandb"]
    assert info["config"]["model"]["type"] == "bert"
    rows = history(records)
    train_rows = [r for r in rows if "train/loss" in r]
    steps = _step_records(out)
    assert [r["train/global_step"] for r in train_rows] == [1, 2, 3]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "samples_per_s"):
        assert [r[f"train/{key}"] for r in train_rows] == pytest.approx(
            [s[key] for s in steps], rel=1e-9
        ), key
    eval_rows = [r for r in rows if "eval/loss" in r]
    assert [r["train/global_step"] for r in eval_rows] == [2, 3]
    assert [r["eval/loss"] for r in eval_rows] == pytest.approx(
        [e["eval_loss"] for e in _eval_records(out)], rel=1e-9
    )


@pytest.fixture(scope="module")
def sft_inputs(tmp_path_factory) -> dict[str, Path]:
    """A tokenizer and 24 short dolly-ja rows (as tests/test_sft_train.py)."""
    from _sft_fixtures import build_tokenizer, dolly_rows

    root = tmp_path_factory.mktemp("sft_tracking")
    build_tokenizer(root / "tokenizer")
    rows = [
        r
        for r in dolly_rows(200, start=400)
        if len(r["instruction"]) + len(r["input"]) + len(r["output"]) < 160
    ][:24]
    data = root / "data.jsonl"
    data.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
    )
    return {"tokenizer": root / "tokenizer", "data": data}


def _sft_config(inputs: dict[str, Path], output_dir: Path, **train) -> dict:
    base = {
        "global_batch": 4,
        "micro_batch": 4,
        "max_steps": 3,
        "learning_rate": 2e-3,
        "warmup_steps": 0,
        "precision": "fp32",
        "max_eval_samples": 4,
        "logging_steps": 1,
    }
    base.update(train)
    return {
        "run": {"output_dir": str(output_dir), "seed": 0},
        "model": {"preset": "tiny", "tokenizer": str(inputs["tokenizer"])},
        "data": {
            "dataset": str(inputs["data"]),
            "template": "ja-alpaca",
            "max_length": 192,
            "validation_fraction": 0.2,
        },
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": base,
    }


@_requires("mlflow")
def test_mlflow_file_store_reads_back_and_resume_continues_the_run(
    sft_inputs, tmp_path, monkeypatch
):
    import torch
    from mlflow.tracking import MlflowClient

    from hetlm.sft.config import parse_sft_config
    from hetlm.sft.train import run_sft

    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for this opt-in
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    out = tmp_path / "sft-run"
    config = parse_sft_config(_sft_config(sft_inputs, out, report_to="mlflow", save_steps=1))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_sft(config, stop_at_step=2)
        first_id = json.loads((out / "trackers.json").read_text())["mlflow"]
        run_sft(config, resume=True)  # continues the same MLflow run
    finally:
        torch.set_num_threads(threads)
    run_id = json.loads((out / "trackers.json").read_text())["mlflow"]
    assert run_id == first_id
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.run_name == "sft-run" and run.info.status == "FINISHED"
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == "hetlm"
    assert len(client.search_runs([run.info.experiment_id])) == 1
    params = run.data.params
    assert params["train.max_steps"] == "3" and params["lora.r"] == "4"
    assert params["train.report_to"] == '["mlflow"]'
    steps = _step_records(out)
    for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
        history_ = sorted(client.get_metric_history(run_id, f"train/{key}"), key=lambda m: m.step)
        assert [m.step for m in history_] == [1, 2, 3], key
        assert [m.value for m in history_] == pytest.approx([s[key] for s in steps], rel=1e-9)
    evals = client.get_metric_history(run_id, "eval/loss")
    assert [(m.step, m.value) for m in evals] == [
        (3, pytest.approx(_eval_records(out)[-1]["eval_loss"], rel=1e-9))
    ]


def test_report_to_spellings_and_errors(tiny_packed, tmp_path, monkeypatch, capsys):
    from hetlm import tracker_names as tracking
    from hetlm.cli import main
    from hetlm.config import parse_config

    def report_to(value):
        return parse_config(tiny_config(tiny_packed, tmp_path, report_to=value)).train.report_to

    monkeypatch.setattr(tracking, "_installed", lambda module: True)
    assert report_to("wandb, mlflow") == ["wandb", "mlflow"]
    assert report_to(["tensorboard", "tensorboard"]) == ["tensorboard"]
    assert report_to("none") == [] and report_to(["none"]) == []
    with pytest.raises(HetlmError, match="unknown tracker 'comet'"):
        report_to(["comet"])
    with pytest.raises(HetlmError, match="'none' cannot be combined"):
        report_to(["none", "wandb"])
    # a missing library: one line, before anything starts, naming the extra
    monkeypatch.setattr(tracking, "_installed", lambda module: module != "wandb")
    path = tmp_path / "run.yaml"
    path.write_text(
        yaml.safe_dump(
            tiny_config(tiny_packed, tmp_path / "run", report_to=["tensorboard", "wandb"])
        )
    )
    assert main(["pretrain", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert "train.report_to" in err and "wandb is not installed" in err
    assert "pip install 'hetlm[track]'" in err
    assert not (tmp_path / "run").exists()


def test_only_rank_0_tracks(tmp_path, monkeypatch):
    from hetlm.train import metrics

    def refuse(*args, **kwargs):
        raise AssertionError("a tracker was opened on a rank other than 0")

    monkeypatch.setattr(metrics, "open_trackers", refuse)
    logger = metrics.MetricsLogger(
        tmp_path,
        total_steps=3,
        start_step=0,
        enabled=False,
        log_every=1,
        report_to=["wandb", "mlflow"],
        restart=0,
    )
    logger.step({"step": 1, "loss": 1.0, "lr": 1e-3, "tokens_per_s": 10.0})
    logger.event(event="eval", step=1, eval_loss=1.0)
    logger.close()
    assert not any(tmp_path.iterdir())
