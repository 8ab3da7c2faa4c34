"""``hetlm probe``: the two searches, the memory limit, and a real CPU probe of the tiny preset."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from hetlm.cli import main
from hetlm.probe import sysinfo
from hetlm.probe.probe import run_probe, search_by_fit, search_by_trying

GIB = 2**30


@pytest.mark.parametrize("answer", [1, 2, 3, 37, 64, 100])
def test_trying_finds_the_largest_size_that_fits(answer: int) -> None:
    tried: list[int] = []

    def fits(b: int) -> bool:
        tried.append(b)
        return b <= answer

    assert search_by_trying(fits, max_batch=100) == answer
    assert len(tried) <= 2 * answer.bit_length() + 2  # doubling + bisection, not a scan
    assert search_by_trying(lambda b: False, 100) == 0
    assert search_by_trying(lambda b: True, 100) == 100


@pytest.mark.parametrize(
    "base, per_sample, budget",
    [
        (450e6, 10.5e6, 1.0 * GIB),
        (450e6, 10.5e6, 0.6 * GIB),
        (2e9, 80e6, 8 * GIB),
        (300e6, 1e6, 0.31 * GIB),
        (300e6, 1e6, 0.9 * GIB),
    ],
)
def test_fit_search_ends_with_a_measured_bracket(base, per_sample, budget) -> None:
    """Linear peaks with allocator noise (up to half a sample): the answer was measured under
    the budget and the next size up over it, after a handful of measurements."""
    noise = [0.0, 0.4, -0.4, 0.2, -0.2, 0.5, -0.5]
    measured: dict[int, float] = {}

    def peak_of(b: int) -> int:
        measured[b] = base + per_sample * (b + noise[len(measured) % len(noise)])
        return int(measured[b])

    cap = search_by_fit(peak_of, budget, max_batch=4096)
    assert measured[cap] <= budget
    assert cap + 1 in measured and measured[cap + 1] > budget
    assert abs(cap - (budget - base) / per_sample) <= 1
    assert len(measured) <= 8, sorted(measured)


def test_fit_search_treats_a_killed_worker_as_over_and_respects_max_batch() -> None:
    def killed_above_20(b: int) -> int | None:
        return None if b > 20 else 100 + b

    assert search_by_fit(killed_above_20, budget=10**9, max_batch=1000) == 20
    assert search_by_fit(lambda b: 100 + b, budget=10**9, max_batch=50) == 50
    assert search_by_fit(lambda b: None, budget=10**9, max_batch=50) == 0


def test_memory_limit_is_the_tightest_cgroup_level(tmp_path, monkeypatch) -> None:
    root = tmp_path / "cgroup"
    for level, limit in (("", "9223372036854771712"), ("a", str(3 * GIB)), ("a/b", str(5 * GIB))):
        directory = root / "memory" / level
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "memory.limit_in_bytes").write_text(limit + "\n")
    (root / "memory" / "a" / "memory.stat").write_text(f"cache 999\nrss 5\ntotal_rss {GIB // 4}\n")
    monkeypatch.setattr(sysinfo, "CGROUP_ROOT", root)
    monkeypatch.setattr(sysinfo, "_cgroup_paths", lambda: {"memory": "/a/b"})
    assert sysinfo.cgroup_memory_limit() == (3 * GIB, "/a")
    assert sysinfo.cgroup_memory_usage("/a") == GIB // 4
    monkeypatch.setattr(sysinfo, "_cgroup_paths", lambda: {"memory": "/"})
    assert sysinfo.cgroup_memory_limit() is None
    limit, source = sysinfo.default_memory_limit()
    assert limit == int(sysinfo.total_ram_bytes() * 0.9) and "RAM" in source


@pytest.fixture(scope="module")
def tiny_probe(tmp_path_factory) -> tuple[Path, float]:
    path = tmp_path_factory.mktemp("probe") / "probe.yaml"
    started = time.perf_counter()
    code = main(
        [
            "probe",
            "--model-type",
            "bert",
            "--preset",
            "tiny",
            "--seq-len",
            "128",
            "--device",
            "cpu",
            "--memory-gib",
            "0.75",
            "--threads",
            "1",
            "--steps",
            "2",
            "--output",
            str(path),
            "--quiet",
        ]
    )
    assert code == 0
    return path, time.perf_counter() - started


def test_cpu_probe_writes_the_file_the_planner_reads(tiny_probe) -> None:
    from hetlm.cluster.planner import make_plan
    from hetlm.cluster.spec import parse_cluster
    from hetlm.models.presets import bert_config

    path, seconds = tiny_probe
    data = yaml.safe_load(path.read_text())
    assert data["format"] == "hetlm-probe/1" and data["precision"] == "bf16"
    assert data["model"]["name"] == "bert-tiny" and data["seq_len"] == 128
    (device,) = data["devices"]
    speed = data["samples_per_s"][0]
    assert speed > 0 and speed == device["samples_per_s"]
    assert device["max_micro_batch"] == data["max_micro_batch"][0] >= 8
    assert device["peak_memory_gib"] <= device["memory_gib"] == 0.75
    over = [m for m in device["measured"] if m["micro_batch"] == device["max_micro_batch"] + 1]
    assert over and not over[0]["fits"]  # the next size up was measured, over the limit
    assert len(device["measured"]) <= 9, "the search should need a handful of measurements"
    assert seconds < 90  # ~7 s on an idle 2-core machine; generous for a busy one

    cluster = parse_cluster(
        {
            "nodes": [
                {
                    "name": "probed",
                    "gpus": {"model": "cpu", "memory_gib": 0.75},
                    "samples_per_s": path.name,
                },
                {
                    "name": "other",
                    "gpus": {"model": "cpu", "memory_gib": 0.75},
                    "samples_per_s": [speed / 2],
                },
            ]
        },
        base_dir=path.parent,
    )
    assert cluster.devices[0].samples_per_s == pytest.approx(speed)
    plan = make_plan(cluster, bert_config("tiny", 32000), 30, 128)
    assert [r.speed_source for r in plan.ranks] == ["measured", "measured"]
    assert plan.ranks[0].share == 2 * plan.ranks[1].share  # speed decides the shares


def test_a_smaller_memory_limit_gives_a_smaller_micro_batch(tiny_probe) -> None:
    big = yaml.safe_load(tiny_probe[0].read_text())["devices"][0]
    result = run_probe("bert-tiny", 128, device="cpu", memory_gib=0.6, threads=1, steps=1)
    small = result.devices[0]
    assert 1 <= small.max_micro_batch < big["max_micro_batch"]
    assert small.peak_bytes <= 0.6 * GIB
    assert small.memory_source == "--memory-gib"


def test_cuda_search_catches_out_of_memory_and_times_the_answer(monkeypatch) -> None:
    """The CUDA driver without a GPU: a fake step runner that raises at sizes above 45."""
    import torch

    from hetlm.probe import probe, worker

    tried: list[int] = []

    class FakeRunner:
        def __init__(self, *args, **kwargs) -> None:
            pass

        def measure(self, size: int, warmup: int = 1, steps: int = 1):
            tried.append(size)
            if size > 45:
                return worker.Measurement(size, fits=False, note="out of memory")
            return worker.Measurement(
                size, True, peak_bytes=size * 2**20, step_s=[size / 100.0] * steps
            )

        def close(self) -> None:
            pass

    class Props:
        total_memory = 80 * GIB
        name = "Fake GPU"

    fractions: list[float] = []
    monkeypatch.setattr(worker, "StepRunner", FakeRunner)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: Props)
    monkeypatch.setattr(
        torch.cuda,
        "set_per_process_memory_fraction",
        lambda fraction, index: fractions.append(fraction),
    )
    spec = {"seq_len": 128, "precision": "bf16"}
    result = probe.probe_cuda(spec, None, 0, 20 * GIB, 0, 1024, 1, 3, lambda m: None)
    assert result.max_micro_batch == 45 and result.samples_per_s == pytest.approx(100.0)
    assert result.memory_bytes == 20 * GIB and result.device == "cuda:0"
    assert fractions == [0.25, 1.0]  # the smaller limit is enforced, then lifted again
    assert tried[:7] == [1, 2, 4, 8, 16, 32, 64] and tried[-1] == 45


def test_the_probe_times_the_training_runs_own_step() -> None:
    """StepRunner wraps the model in the run's engine and steps it with ``train_step``: on a
    fixed batch the weights move and the masked-LM loss falls, as in training."""
    import torch
    from transformers import BertConfig

    from hetlm.probe.worker import StepRunner
    from hetlm.train.engines.ddp import DDPEngine

    config = BertConfig(
        vocab_size=500,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
    )
    runner = StepRunner(config, 16, "fp32", threads=1)
    try:
        assert isinstance(runner.engine, DDPEngine)
        batch = runner.batch(4)
        before = [p.detach().clone() for p in runner.engine.unwrapped.parameters()]

        def loss() -> float:
            with torch.no_grad():
                total, _ = runner.engine.unwrapped(**batch.model_inputs())
            return float(total) / batch.num_targets

        first = loss()
        for _ in range(5):
            runner.step(batch)
        after = list(runner.engine.unwrapped.parameters())
        assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
        assert loss() < first
        assert runner.measure(4).fits
    finally:
        runner.close()
