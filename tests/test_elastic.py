"""Elastic membership: the same global batch re-split over the ranks present, and a job that
loses a node and gets it back on torchrun agents (c10d rendezvous) and trains the same model.

The split arithmetic is tested on reports of emulated devices; the end-to-end test runs three
emulated nodes (one gloo rank each) as ``hetlm pretrain --elastic`` agents, kills node 2 after
a checkpoint, lets the job continue on two, starts node 2 again, and checks the events, the
metrics (each step once) and the final weights against an uninterrupted run.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import yaml
from _dist import final_weights, max_abs_diff, run_ranks
from conftest import tiny_config

from hetlm.cluster.planner import make_plan
from hetlm.cluster.spec import parse_cluster
from hetlm.config import parse_config
from hetlm.errors import HetlmError
from hetlm.models.presets import bert_config
from hetlm.train.devices import DeviceReport
from hetlm.train.membership import elastic_split, emulated_devices, membership_change

A100 = ("NVIDIA A100-SXM4-80GB", (8, 0), 80)
V100 = ("Tesla V100-SXM2-32GB", (7, 0), 32)


def gpu(rank: int, node: str, model: tuple, local_rank: int = 0) -> DeviceReport:
    name, cc, gib = model
    return DeviceReport(rank, node, "cuda", name, cc, gib * 2**30, node, local_rank)


@pytest.fixture(scope="module")
def three_node_plan(tmp_path_factory) -> Path:
    """A plan for a100 (1 GPU), v100a and v100b (1 GPU each), BERT-small, global batch 96."""
    cluster = parse_cluster(
        {
            "nodes": [
                {"name": "a100", "gpus": {"model": "A100-80GB", "count": 1}},
                {"name": "v100a", "gpus": {"model": "V100-32GB", "count": 1}},
                {"name": "v100b", "gpus": {"model": "V100-32GB", "count": 1}},
            ],
            "network": {"inter_node_gbps": 10},
        }
    )
    plan = make_plan(cluster, bert_config("small", 32000), 96, 128)
    return plan.save(tmp_path_factory.mktemp("plan") / "plan.yaml")


def plan_config(plan_path: Path, tmp_path: Path):
    config = tiny_config(tmp_path / "data", tmp_path / "out", global_batch=96, elastic=True)
    config["train"].pop("micro_batch")
    config["train"]["plan"] = str(plan_path)
    return parse_config(config)


def test_all_planned_nodes_present_keep_the_plans_split(three_node_plan, tmp_path):
    config = plan_config(three_node_plan, tmp_path)
    devices = [gpu(0, "a100", A100), gpu(1, "v100a", V100), gpu(2, "v100b", V100)]
    derived = elastic_split(config, devices, [0, 1, 2])
    assert derived.split == config.load_plan().batch_split
    assert derived.source == f"the plan {three_node_plan}"


def test_a_plan_listing_more_nodes_splits_the_same_batch_over_those_present(
    three_node_plan, tmp_path
):
    config = plan_config(three_node_plan, tmp_path)
    plan = config.load_plan()
    present = [gpu(0, "a100", A100), gpu(1, "v100b", V100)]  # v100a is gone
    derived = elastic_split(config, present, [0, 1])
    assert sum(derived.split.shares) == 96 and derived.split.world_size == 2
    rows = {r.node: r for r in plan.ranks}
    assert derived.caps == [rows["a100"].cap, rows["v100b"].cap]
    for share, cap in zip(derived.split.shares, derived.caps, strict=True):
        assert share <= derived.split.micro_steps * cap  # within each rank's memory
    assert derived.split.shares[0] > derived.split.shares[1]  # the A100 is faster
    assert "2 of its 3 nodes present" in derived.source
    # an unnamed node with a planned GPU model takes that model's row
    stranger = [gpu(0, "a100", A100), gpu(1, "spare-node", V100)]
    assert elastic_split(config, stranger, [0, 1]).split == derived.split


def test_a_node_the_plan_cannot_place_is_named(three_node_plan, tmp_path):
    config = plan_config(three_node_plan, tmp_path)
    h100 = ("NVIDIA H100 80GB HBM3", (9, 0), 80)
    with pytest.raises(HetlmError, match=r"rank 1 runs on node h100-box .*HETLM_NODE_NAME"):
        elastic_split(config, [gpu(0, "a100", A100), gpu(1, "h100-box", h100)], [0, 1])
    with pytest.raises(HetlmError, match="node a100 runs local rank 1 but the plan gives it 1"):
        elastic_split(config, [gpu(0, "a100", A100), gpu(1, "a100", A100, 1)], [0, 0])


def test_one_micro_batch_for_all_ranks_resplits_and_infeasible_batches_fail(tmp_path):
    base = tiny_config(tmp_path, tmp_path / "out", global_batch=12, micro_batch=2, elastic=True)
    config = parse_config(base)
    three = elastic_split(config, emulated_devices(["n0", "n1", "n2"], 1), [0, 1, 2]).split
    assert (three.shares, three.micro_steps) == ((4, 4, 4), 2)
    two = elastic_split(config, emulated_devices(["n0", "n1"], 1), [0, 1]).split
    assert (two.shares, two.micro_steps) == ((6, 6), 3)
    five = elastic_split(config, emulated_devices([f"n{i}" for i in range(5)], 1), [0, 1, 2, 3, 4])
    assert sum(five.split.shares) == 12 and five.split.micro_steps == 2  # 12 / 10: 2 steps
    small = parse_config({**base, "train": {**base["train"], "global_batch": 4}})
    with pytest.raises(HetlmError) as err:
        elastic_split(small, emulated_devices([f"n{i}" for i in range(5)], 1), [0, 1, 2, 3, 4])
    message = str(err.value)
    assert "global batch 4 cannot be made on the 5 ranks present now (nodes n0, n1" in message
    assert "needs at most 4 ranks" in message and "\n" not in message
    per_node = parse_config(
        {**base, "train": {**base["train"], "micro_batch": {"per_node": [2, 2, 2]}}}
    )
    with pytest.raises(HetlmError, match="per_node lists 3 entries but 2 nodes are present"):
        elastic_split(per_node, emulated_devices(["n0", "n1"], 1), [0, 1])


def test_the_engines_an_elastic_run_can_use_are_named_without_single():
    from hetlm.cluster.engines import engines_that

    def resumes_anywhere(info):
        return info.resumes_on_any_world_size

    assert engines_that(resumes_anywhere) == ["single", "ddp", "zero1", "fsdp2"]
    assert engines_that(resumes_anywhere, with_single=False) == ["ddp", "zero1", "fsdp2"]


def test_membership_change_names_who_left_and_joined():
    state = {
        "step": 4,
        "shares": [4, 4, 4],
        "micro_steps": 2,
        "run_plan": {"devices": [d.to_dict() for d in emulated_devices(["a", "b", "c"], 1)]},
    }
    config = parse_config(tiny_config(Path("."), Path("out"), global_batch=12, micro_batch=2))
    now = emulated_devices(["a", "c"], 1)
    split = elastic_split(
        config.model_copy(update={"train": config.train.model_copy(update={"elastic": True})}),
        now,
        [0, 1],
    ).split
    change = membership_change(state, now, split, "train.micro_batch 2")
    assert change is not None
    event = change.event()
    assert event["left"] == ["b/0"] and event["joined"] == []
    assert (event["world_size_before"], event["world_size"], event["shares"]) == (3, 2, [6, 6])
    assert "left: b/0" in change.line() and "[4, 4, 4] in 2 micro-steps -> [6, 6] in 3" in (
        change.line()
    )
    assert membership_change(state, emulated_devices(["a", "b", "c"], 1), split, "x") is None


def test_the_command_line_checks_the_elastic_split_before_any_agent_starts(
    tiny_packed, tmp_path, capsys
):
    from hetlm.cli import main

    config = tiny_config(tiny_packed, tmp_path / "out", global_batch=4, micro_batch=2)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["pretrain", str(path), "--local-nodes", "5", "--elastic"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hetlm: error: the global batch 4 cannot be made on the 5 ranks")
    assert "\n" not in err and not (tmp_path / "out").exists()  # nothing started or written
    assert main(["pretrain", str(path), "--local-nodes", "2", "--min-nodes", "1"]) == 2
    assert "--min-nodes is for an emulated elastic job" in capsys.readouterr().err


# ---------------------------------------------------------------- end to end on torchrun agents


def read_records(output_dir: Path) -> list[dict]:
    path = output_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for(predicate, timeout: float, what: str, job) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        if not job.alive(0):
            raise AssertionError(f"the job ended while waiting for {what}")
        time.sleep(0.3)


def test_a_node_leaves_and_rejoins_and_the_model_is_the_same(tiny_packed, tmp_path, monkeypatch):
    from hetlm.launch.local import ElasticLocalJob

    steps = 40
    train = dict(global_batch=12, micro_batch=2, max_steps=steps, save_steps=2)
    config = tiny_config(tiny_packed, tmp_path / "elastic", elastic=True, **train)
    config["train"]["dist_timeout_s"] = 30
    path = tmp_path / "elastic.yaml"
    path.write_text(yaml.safe_dump(config))
    output = tmp_path / "elastic"
    log = (tmp_path / "agents.log").open("w")
    monkeypatch.setenv("HETLM_FAULT", "slow:seconds=0.25")  # ~4 steps/s: events land mid-run
    job = ElasticLocalJob(
        ["pretrain", str(path), "--quiet", "--elastic"],
        nodes=3,
        min_nodes=2,
        max_restarts=3,
        threads_per_rank=1,
        stderr=log.fileno(),
    )
    job.start()
    try:

        def steps_logged(world: int, at_least: int) -> bool:
            records = read_records(output)
            starts = [i for i, r in enumerate(records) if r.get("event") in ("start", "restart")]
            return any(
                "event" not in r and r["step"] >= at_least and len(r["busy_s_per_rank"]) == world
                for r in records[starts[-1] if starts else 0 :]
            )

        wait_for(lambda: steps_logged(3, 5), 240, "step 5 on three nodes", job)
        job.kill_node(2)
        wait_for(lambda: steps_logged(2, 8), 240, "step 8 on two nodes", job)
        job.start_node(2)
        code = job.wait(timeout=300)
    finally:
        if job.alive(0):
            for i in range(3):
                if job.alive(i):
                    job.kill_node(i)
        log.close()
    assert code == 0, (tmp_path / "agents.log").read_text()[-3000:]
    records = read_records(output)
    changes = [r for r in records if r.get("event") == "membership"]
    assert [(c["world_size_before"], c["world_size"]) for c in changes] == [(3, 2), (2, 3)]
    assert changes[0]["left"] == ["node2/0"] and changes[1]["joined"] == ["node2/0"]
    assert changes[0]["shares"] == [6, 6] and changes[1]["shares"] == [4, 4, 4]
    logged = [r["step"] for r in records if "event" not in r]
    assert logged == list(range(1, steps + 1))  # each step once, none missing
    summary = json.loads((output / "summary.json").read_text())
    assert [(m["world_size_before"], m["world_size"]) for m in summary["membership"]] == [
        (3, 2),
        (2, 3),
    ]
    # the model: split invariance makes it the uninterrupted run's (3 ranks all along)
    reference = tiny_config(tiny_packed, tmp_path / "reference", **train)
    run_ranks(reference, world=3, timeout_s=60)
    diff = max_abs_diff(final_weights(tmp_path / "reference"), final_weights(output))
    assert diff <= 1e-6, f"elastic vs uninterrupted: {diff:.2e}"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
