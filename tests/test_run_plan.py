"""The run plan: one precision, engine and split for the whole job, whatever each rank sees.

The multi-rank tests let the ranks *report* different GPUs (an RTX A6000 beside a V100) while
they really run on the CPU: the plan must resolve fp16 on both (before, each rank chose its own
precision and the fp16 rank waited alone in the overflow all-reduce), refuse bf16 naming the V100,
and stop a rank that resolved another plan instead of hanging.
"""

from __future__ import annotations

import json
import os

import pytest
from _dist import run_ranks
from conftest import tiny_config

from hetlm.cluster.precision import DeviceSupport, choose_job_precision, cuda_precisions
from hetlm.errors import HetlmError
from hetlm.topology import BatchSplit
from hetlm.train.devices import DeviceReport
from hetlm.train.run_plan import check_agreement, resolve_plan

A6000 = ("NVIDIA RTX A6000", (8, 6))
V100 = ("Tesla V100-SXM2-32GB", (7, 0))


def report(rank: int, gpu: tuple[str, tuple[int, int]] | None) -> DeviceReport:
    if gpu is None:
        return DeviceReport(rank, f"node{rank}", "cpu", "cpu", None, 2**34)
    return DeviceReport(rank, f"node{rank}", "cuda", gpu[0], gpu[1], 32 * 2**30)


@pytest.mark.parametrize(
    ("capability", "expected"),
    [
        ((9, 0), {"bf16", "fp16", "fp32"}),
        ((8, 0), {"bf16", "fp16", "fp32"}),
        ((7, 5), {"fp16", "fp32"}),
        ((7, 0), {"fp16", "fp32"}),
        ((6, 0), {"fp16", "fp32"}),
        ((5, 2), {"fp32"}),
    ],
)
def test_bf16_is_decided_by_compute_capability(capability, expected):
    # not by torch.cuda.is_bf16_supported(), which says True on a V100 (emulated bf16)
    assert cuda_precisions(capability) == expected


@pytest.mark.parametrize(
    ("gpus", "expected"),
    [
        ([A6000, A6000], "bf16"),
        ([A6000, V100], "fp16"),
        ([V100, V100], "fp16"),
        ([None, None], "bf16"),
        ([None, V100], "fp32"),
        ([("GTX 980", (5, 2)), A6000], "fp32"),
    ],
)
def test_auto_is_what_every_rank_supports(gpus, expected):
    # a CPU beside a V100: fp32, since auto never picks fp16 on a CPU (test-only there)
    devices = [report(r, g).support() for r, g in enumerate(gpus)]
    assert choose_job_precision("auto", devices) == expected


def test_explicit_bf16_names_the_rank_that_lacks_it():
    devices = [report(0, A6000).support(), report(1, V100).support()]
    with pytest.raises(HetlmError) as err:
        choose_job_precision("bf16", devices)
    message = str(err.value)
    assert "rank 1 (Tesla V100-SXM2-32GB, compute capability 7.0) on node1" in message
    assert "rank 0" not in message and "use train.precision fp16" in message
    with pytest.raises(HetlmError, match="must be auto, fp32, fp16, bf16"):
        choose_job_precision("fp8", devices)
    assert choose_job_precision("fp32", devices) == "fp32"


def test_cpu_takes_fp16_only_when_asked():
    cpu = DeviceSupport("cpu", frozenset({"bf16", "fp16", "fp32"}), frozenset({"bf16", "fp32"}))
    assert choose_job_precision("fp16", [cpu]) == "fp16"
    assert choose_job_precision("auto", [cpu]) == "bf16"


def test_plan_file_precision_is_checked_against_the_present_devices():
    class PlanFile:  # the fields resolve_plan reads from a loaded hetlm plan
        precision, engine, zero_stage = "bf16", "ddp", 0

    split = BatchSplit.from_micro_batches(8, [4, 4])
    devices = [report(0, A6000), report(1, V100)]
    with pytest.raises(HetlmError, match=r"rank 1 \(Tesla V100.*the plan p.yaml chose bf16"):
        resolve_plan(
            requested_precision="auto",
            engine="auto",
            zero_stage="auto",
            split=split,
            devices=devices,
            plan_file=PlanFile(),
            plan_path="p.yaml",
        )
    plan = resolve_plan(
        requested_precision="fp16",
        engine="auto",
        zero_stage="auto",
        split=split,
        devices=devices,
        plan_file=PlanFile(),
        plan_path="p.yaml",
    )
    assert (plan.precision, plan.engine, plan.zero_stage) == ("fp16", "ddp", 0)
    assert plan.to_dict()["devices"][1]["capability"] == [7, 0]


def test_disagreeing_ranks_are_named():
    devices = [report(0, A6000), report(1, V100)]
    check_agreement([("fp16",), ("fp16",)], devices, ["a", "a"])
    with pytest.raises(
        HetlmError,
        match=r"rank 0 resolved fp16.*rank 1 \(Tesla V100.*resolved "
        r"fp32.*same config",
    ):
        check_agreement([("fp16",), ("fp32",)], devices, ["fp16", "fp32"])


# ---------------------------------------------------------------- on two gloo ranks


def report_a6000_and_v100() -> None:
    """(worker setup) rank 0 says it is an RTX A6000, rank 1 a V100; both really run on CPU."""
    gpu = A6000 if os.environ["RANK"] == "0" else V100

    def local(cls, rank, device):
        return DeviceReport(rank, f"node{rank}", "cuda", gpu[0], gpu[1], 48 * 2**30)

    DeviceReport.local = classmethod(local)


def rank_1_reads_another_precision() -> None:
    """(worker setup) rank 1 resolves its plan from a config that asks for fp32."""
    from hetlm.train import run_plan

    original = run_plan.resolve_plan

    def resolve(**kwargs):
        if os.environ["RANK"] == "1":
            kwargs["requested_precision"] = "fp32"
        return original(**kwargs)

    run_plan.resolve_plan = resolve


def test_mixed_generations_train_in_fp16_on_every_rank(tiny_packed, tmp_path):
    config = tiny_config(
        tiny_packed, tmp_path, max_steps=2, precision="auto", micro_batch={"per_rank": [3, 5]}
    )
    run_ranks(config, world=2, setup="test_run_plan.report_a6000_and_v100", timeout_s=30)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    start = next(r for r in records if r.get("event") == "start")
    assert start["precision"] == "fp16"
    assert [d["name"] for d in start["devices"]] == [A6000[0], V100[0]]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["precision"] == "fp16"
    state = json.loads(
        (tmp_path / "checkpoints" / "step-00000002" / "trainer_state.json").read_text()
    )
    assert state["run_plan"]["precision"] == "fp16"
    assert state["run_plan"]["devices"][1]["capability"] == [7, 0]


def test_explicit_bf16_on_a_v100_fails_on_every_rank_naming_it(tiny_packed, tmp_path):
    config = tiny_config(
        tiny_packed, tmp_path, max_steps=2, precision="bf16", micro_batch={"per_rank": [3, 5]}
    )
    with pytest.raises(Exception, match=r"rank 1 \(Tesla V100-SXM2-32GB, compute capability 7\.0"):
        run_ranks(config, world=2, setup="test_run_plan.report_a6000_and_v100", timeout_s=30)


def test_a_rank_with_another_plan_stops_the_job_by_name(tiny_packed, tmp_path):
    config = tiny_config(
        tiny_packed, tmp_path, max_steps=2, precision="bf16", micro_batch={"per_rank": [3, 5]}
    )
    with pytest.raises(Exception, match=r"disagree on the run plan.*rank 1 \(cpu\).*fp32"):
        run_ranks(
            config, world=2, setup="test_run_plan.rank_1_reads_another_precision", timeout_s=30
        )


# ---------------------------------------------------------------- where each rank runs


def test_placement_for_every_gpu_layout():
    from hetlm.train.devices import place_rank

    none = place_rank(0, 2, visible_gpus=0)
    assert (none.device.type, none.backend, none.note) == ("cpu", "gloo", None)
    enough = [place_rank(r, 2, visible_gpus=2) for r in range(2)]
    assert [(str(p.device), p.backend) for p in enough] == [("cuda:0", "nccl"), ("cuda:1", "nccl")]
    more = place_rank(1, 4, visible_gpus=8)
    assert (str(more.device), more.backend) == ("cuda:1", "nccl")
    shared = [place_rank(r, 2, visible_gpus=1) for r in range(2)]
    assert all((p.device.type, p.backend) == ("cpu", "gloo") for p in shared)
    assert "2 ranks on this node share 1 visible GPU" in shared[0].note
    assert shared[1].note is None  # said once per node
    assert place_rank(0, 1, visible_gpus=1, requested="cpu").device.type == "cpu"
    with pytest.raises(HetlmError, match="HETLM_DEVICE=cuda but no CUDA GPU is visible"):
        place_rank(0, 1, visible_gpus=0, requested="cuda")
    with pytest.raises(HetlmError, match="HETLM_DEVICE=cuda forbids the CPU"):
        place_rank(0, 2, visible_gpus=1, requested="cuda")


def test_emulated_nodes_get_their_own_gpus_or_none(monkeypatch, capsys):
    from hetlm.launch.local import agent_gpus
    from hetlm.train.devices import gpu_slices, visible_gpu_ids

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3,5")
    assert visible_gpu_ids() == ["2", "3", "5"]  # CUDA_VISIBLE_DEVICES is respected
    assert agent_gpus(3, 1) == ["2", "3", "5"]
    assert gpu_slices(["2", "3", "5", "7"], 2, 2) == ["2,3", "5,7"]
    assert agent_gpus(2, 2) == ["", ""]  # 4 ranks, 3 GPUs: all on the CPU, said once
    assert "4 ranks on this machine, 3 visible GPUs" in capsys.readouterr().err
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert agent_gpus(2, 1) is None  # nothing to divide
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setenv("HETLM_DEVICE", "cpu")
    assert visible_gpu_ids() == []
    monkeypatch.setenv("HETLM_DEVICE", "gpu0")
    with pytest.raises(HetlmError, match="use auto, cpu or cuda"):
        visible_gpu_ids()
