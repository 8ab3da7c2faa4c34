"""benchmarks/gpu_check.py --dry-run: the GPU check's code runs on CPU, so it cannot rot.

One run of the whole check with tiny shapes (about a minute on an idle machine); the report must
name every part with a status, and every number of a part that passed must be finite.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PARTS = ("env", "demo", "mlm", "sft", "qlora", "fp16", "multirank", "learning", "domain")


def numbers(value, where=""):
    """Every int/float inside ``value`` with its path (booleans are not numbers here)."""
    if isinstance(value, bool):
        return
    if isinstance(value, int | float):
        yield where, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from numbers(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from numbers(item, f"{where}[{i}]")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gpu_check")
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(
            p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH")) if p
        ),
    )
    run = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=840,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return out


@pytest.mark.timeout(900)
def test_dry_run_reports_every_part(dry_run: Path) -> None:
    report = json.loads((dry_run / "gpu.json").read_text())
    markdown = (dry_run / "gpu.md").read_text()
    assert report["dry_run"] is True
    assert list(report["parts"]) == list(PARTS)
    for name, part in report["parts"].items():
        assert part["status"] in ("ok", "failed", "skipped"), name
        if part["status"] == "skipped":
            assert part["reason"], name
        if part["status"] == "failed":
            assert part["error"], name
        if part["status"] == "ok":
            bad = [(w, v) for w, v in numbers(part) if not math.isfinite(v)]
            assert not bad, f"{name}: {bad}"
    markdown_sections = [line for line in markdown.splitlines() if line.startswith("## ")]
    assert len(markdown_sections) == len(PARTS) + 1  # the goals, then one per part


@pytest.mark.timeout(900)
def test_dry_run_measures_on_cpu_and_skips_what_needs_cuda(dry_run: Path) -> None:
    parts = json.loads((dry_run / "gpu.json").read_text())["parts"]
    # what a CPU can run, runs and passes
    for name in ("env", "demo", "mlm", "sft", "fp16", "learning", "domain"):
        assert parts[name]["status"] == "ok", (name, parts[name])
    assert (
        0 <= parts["learning"]["hetlm_accuracy"] <= 1 and parts["learning"]["baseline_accuracy"] > 0
    )
    assert set(parts["domain"]["rows"]) == {"a", "b", "c"}
    assert all(row["finance_lm_loss"] > 0 for row in parts["domain"]["rows"].values())
    assert parts["demo"]["exit_code"] == 0 and parts["demo"]["summary"]
    assert parts["env"]["import_errors"] == []  # everything hetlm needs imports here
    row = parts["mlm"]["seq32"]
    assert row["trainer"]["tokens_per_s"] > 0 and row["hetlm"]["tokens_per_s"] > 0
    assert row["ratio"] == pytest.approx(
        row["hetlm"]["tokens_per_s"] / row["trainer"]["tokens_per_s"]
    )
    assert row["hetlm"]["mfu"] > 0  # against the CPU entry of the hardware table
    for system in ("trainer", "hetlm", "plain"):
        assert parts["sft"][system]["tokens_per_s"] > 0, system
    assert parts["fp16"]["precision"] == "fp16"
    assert parts["fp16"]["loss_last"] < parts["fp16"]["loss_first"]
    # and what needs a GPU says so
    for name in ("qlora", "multirank"):
        assert (parts[name]["status"], parts[name]["reason"]) == ("skipped", "needs CUDA")
    assert (dry_run / "gpu_check_logs" / "mlm.log").is_file()


def gpu_check_module():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return gpu_check


def test_a_module_that_does_not_import_is_named_with_its_error(tmp_path, monkeypatch) -> None:
    """A carried wheel that is installed but broken (find_spec finds it) is caught in part 1."""
    gpu_check = gpu_check_module()
    (tmp_path / "broken_carried.py").write_text("raise ImportError('pyarrow>=24 is required')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    errors = gpu_check.import_errors(("json", "broken_carried", "not_there_at_all"))
    assert errors == [
        "broken_carried: ImportError: pyarrow>=24 is required",
        "not_there_at_all: ModuleNotFoundError: No module named 'not_there_at_all'",
    ]


def test_a_command_past_its_deadline_is_stopped_with_all_it_started() -> None:
    gpu_check = gpu_check_module()
    run = gpu_check.run_command(["bash", "-c", "setsid sleep 60 & echo $!; wait"], timeout=2)
    assert run["timed_out"] and run["wall_s"] < 30
    grandchild = Path(f"/proc/{int(run['output'].split()[0])}/stat")
    time.sleep(0.5)
    # gone, or a zombie waiting for its new parent to reap it: no longer running
    assert not grandchild.exists() or grandchild.read_text().rsplit(")", 1)[1].split()[0] == "Z"


def test_the_error_line_is_the_cause_not_the_banner() -> None:
    gpu_check = gpu_check_module()
    torchrun = (
        "hetlm: error (rank 0): micro-batches [8, 8] cannot make the global batch 8\n"
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n"
        "====\n  exitcode  : 2\n====\n"
    )
    assert gpu_check.error_line(torchrun).startswith("hetlm: error (rank 0): micro-batches")
    assert (
        gpu_check.error_line("RuntimeError: CUDA out of memory\n=====\n")
        == "RuntimeError: CUDA out of memory"
    )
    result = {
        "seq128": {
            "status": "ok",
            "trainer": {"status": "ok"},
            "hetlm": {"status": "failed", "error": "boom"},
        }
    }
    assert gpu_check.first_failure(result) == "seq128.hetlm: boom"
    assert gpu_check.first_failure({"a": {"status": "ok"}}) is None


def test_a_shape_that_does_not_fit_is_halved_for_both_systems(monkeypatch, tmp_path) -> None:
    import torch

    gpu_check = gpu_check_module()
    ran = []

    def fake_system(ctx, system, data, seq_len, batch, params):
        ran.append((system, batch))
        if batch > 16:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return {"tokens_per_s": 100.0 * (2 if system == "hetlm" else 1)}

    monkeypatch.setattr(gpu_check, "mlm_dataset", lambda ctx, seq_len: tmp_path)
    monkeypatch.setattr(gpu_check, "count_bert_parameters", lambda data, preset: 1000)
    monkeypatch.setattr(gpu_check, "mlm_system", fake_system)
    ctx = gpu_check.PartContext("mlm", gpu_check.GPU, tmp_path, tmp_path, deadline=0.0)
    row = gpu_check.mlm_shape(ctx, 512, 64)
    assert row["batch"] == 16 and row["out_of_memory_at"] == [64, 32]
    assert ran[-2:] == [("trainer", 16), ("hetlm", 16)]
    assert row["ratio"] == 2.0 and row["hetlm"]["status"] == "ok"


def test_every_sft_system_gets_its_peak_gpu_memory(monkeypatch, tmp_path) -> None:
    """The CUDA path of the memory bookkeeping, with torch.cuda faked (no GPU here)."""
    import torch

    gpu_check = gpu_check_module()
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_sft_vs_hf_trainer as sft_bench

    sys.path.remove(str(REPO / "benchmarks"))
    for name, value in {
        "is_available": lambda: True,
        "synchronize": lambda: None,
        "empty_cache": lambda: None,
        "reset_peak_memory_stats": lambda: None,
        "memory_allocated": lambda: 100 * 2**20,
        "max_memory_allocated": lambda: 350 * 2**20,
    }.items():
        monkeypatch.setattr(torch.cuda, name, value)
    bench_result = {
        "real_tokens": [90.0, 90.0, 90.0, 100.0],
        "padded_tokens": [100.0] * 4,
        "step_times": [9.0, 9.0, 9.0, 1.0],
        "losses": [3.0, 2.5, 2.2, 2.0],
    }
    monkeypatch.setattr(sft_bench, "run_trainer", lambda ns, strategy: bench_result)
    monkeypatch.setattr(sft_bench, "run_hetlm", lambda ns, grouping: bench_result)
    monkeypatch.setattr(gpu_check, "plain_lora_loop", lambda ns, warmup: {"tokens_per_s": 50.0})
    ctx = gpu_check.PartContext("sft", gpu_check.GPU, tmp_path, tmp_path, deadline=0.0)
    for system in ("trainer", "hetlm", "plain"):
        entry = gpu_check.sft_system(ctx, {"base": "b", "data": "d"}, system)
        assert entry["peak_memory_mib"] == 250.0, system  # above what was allocated before
    assert entry["tokens_per_s"] == 50.0
    trainer = gpu_check.sft_system(ctx, {"base": "b", "data": "d"}, "trainer")
    assert trainer["tokens_per_s"] == 100.0  # after the 3 warm-up steps of the GPU settings


def test_qlora_without_bitsandbytes_names_the_wheel_to_carry(monkeypatch, tmp_path) -> None:
    import importlib.util

    import torch

    gpu_check = gpu_check_module()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "bitsandbytes" else find_spec(name, *a),
    )
    ctx = gpu_check.PartContext("qlora", gpu_check.GPU, tmp_path, tmp_path, deadline=0.0)
    with pytest.raises(gpu_check.Skipped, match=r"bitsandbytes-0\.\d+\.\d+-py3-none-manylinux"):
        gpu_check.part_qlora(ctx)


def test_the_device_wrapper_leaves_at_most_eight_files_to_bring_back(tmp_path) -> None:
    """benchmarks/gpu_check_device.sh: report and one log archive in $OUT, whatever the parts did
    (here: a budget too small for any of them), and the check's exit code."""
    out, no_wheels = tmp_path / "out", tmp_path / "wheels"
    out.mkdir()
    no_wheels.mkdir()
    bin_dir = Path(sys.executable).parent
    env = dict(
        os.environ,
        OUT=str(out),
        GPU_WHEELS=str(no_wheels),
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",  # its python3 is this Python
    )
    run = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check_device.sh"), "--dry-run", "--budget", "3"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu.json", "gpu.md", "gpu_check_logs.tgz"]
    assert json.loads((out / "gpu.json").read_text())["dry_run"] is True
