"""Launch lines, the Slurm script, and `hetlm plan` end to end."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from hetlm.cli import main
from hetlm.cluster.launch_scripts import slurm_script, torchrun_commands
from hetlm.cluster.planner import load_plan, make_plan
from hetlm.cluster.spec import parse_cluster
from hetlm.models.presets import bert_config

CLUSTER = """\
nodes:
  - name: v100
    host: 10.0.0.1
    gpus: {model: V100-32GB, count: 2}
  - name: a6000
    gpus: {model: RTX A6000, count: 1}
network: {inter_node_gbps: 10}
"""


@pytest.fixture(scope="module")
def plan():
    cluster = parse_cluster(
        {
            "nodes": [
                {"name": "v100", "host": "10.0.0.1", "gpus": {"model": "V100-32GB", "count": 2}},
                {"name": "a6000", "gpus": {"model": "RTX-A6000", "count": 1}},
            ]
        }
    )
    return make_plan(cluster, bert_config("small", 32000), 96, 128)


def test_one_torchrun_per_node(plan) -> None:
    lines = torchrun_commands(plan, "run.yaml", "runs/plan.yaml")
    assert len(lines) == 2
    first, second = (shlex.split(line) for line in lines)
    assert first[:11] == [
        "torchrun",
        "--nnodes",
        "2",
        "--node-rank",
        "0",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "10.0.0.1",
        "--master-port",
        "29500",
    ]
    assert first[11:] == ["-m", "hetlm.cli", "pretrain", "run.yaml", "--plan", "runs/plan.yaml"]
    assert second[2:7] == ["2", "--node-rank", "1", "--nproc-per-node", "1"]
    assert second[8] == "10.0.0.1"  # every node rendezvous at node 0
    assert all("hostname" not in line for line in lines)


def test_missing_host_is_a_marked_placeholder() -> None:
    cluster = parse_cluster(
        {"nodes": [{"gpus": {"model": "T4", "count": 2}}, {"gpus": {"model": "T4", "count": 2}}]}
    )
    plan = make_plan(cluster, bert_config("tiny", 1000), 32, 64)
    lines = torchrun_commands(plan)
    assert all("--master-addr NODE0_HOST" in line for line in lines)
    script = slurm_script(plan)
    assert "FILL IN: replace NODE0_HOST, NODE1_HOST" in script
    assert "#SBATCH --nodes=2" in script and "#SBATCH --gpus-per-node=2" in script
    assert "hetjob" not in script


def test_slurm_script_for_unequal_nodes_is_a_heterogeneous_job(plan) -> None:
    script = slurm_script(plan, "run.yaml", "plan.yaml", job_name="bert")
    assert script.startswith("#!/bin/bash\n")
    assert script.count("#SBATCH hetjob") == 1
    assert "#SBATCH --gpus-per-node=2" in script and "#SBATCH --gpus-per-node=1" in script
    assert "#SBATCH --nodelist=10.0.0.1" in script and "#SBATCH --nodelist=NODE1_HOST" in script
    sruns = [line for line in script.splitlines() if line.startswith("srun")]
    assert len(sruns) == 2 and "--het-group=0" in sruns[0] and "--het-group=1" in sruns[1]
    assert all(line.endswith("&") for line in sruns) and script.rstrip().endswith("wait")
    assert '--node-rank 1 --nproc-per-node 1 --master-addr "$MASTER_ADDR"' in sruns[1]
    assert "MASTER_ADDR=10.0.0.1" in script


def test_cli_plan_writes_plan_and_slurm_script(tmp_path: Path, capsys) -> None:
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(CLUSTER)
    out = tmp_path / "out" / "plan.yaml"
    code = main(
        [
            "plan",
            str(cluster),
            "--model",
            "bert-small",
            "--global-batch",
            "96",
            "--seq-len",
            "128",
            "--output",
            str(out),
            "--steps",
            "1000",
            "--config",
            "run.yaml",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    plan = load_plan(out)
    assert plan.world_size == 3 and plan.precision == "fp16" and plan.model.name == "bert-small"
    assert sum(r.share for r in plan.ranks) == 96
    sbatch = out.with_suffix(".sbatch")
    assert sbatch.is_file() and "--plan" in sbatch.read_text()
    assert "V100-32GB" in printed and "RTX-A6000" in printed
    assert "samples/s" in printed and "GPU-days" in printed
    assert f"pretrain run.yaml --plan {out}" in printed
    assert "FILL IN: replace NODE1_HOST" in printed


def test_cli_plan_accepts_a_config_directory(tmp_path: Path) -> None:
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text("nodes:\n  - gpus: {model: cpu, count: 2, memory_gib: 8}\n")
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    config = bert_config("tiny", 500).to_dict()
    (model_dir / "config.json").write_text(json.dumps(config))
    out = tmp_path / "plan.yaml"
    assert (
        main(
            [
                "plan",
                str(cluster),
                "--model",
                str(model_dir),
                "--global-batch",
                "8",
                "--seq-len",
                "64",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    plan = load_plan(out)
    assert plan.precision == "bf16" and plan.model.vocab_size == 500


@pytest.mark.parametrize(
    ("cluster_text", "extra", "fragment"),
    [
        ("nodes:\n  - gpus: {model: V100-32GB, cuont: 2}\n", [], "nodes.0.gpus.cuont"),
        ("nodes: [\n", [], "not valid YAML at line"),
        (None, [], "does not exist"),
        ("nodes:\n  - gpus: {model: V100-32GB}\n", ["--precision", "bf16"], "V100-32GB"),
        ("nodes:\n  - gpus: {model: T4}\n", ["--model", "bert-huge"], "neither a preset"),
    ],
)
def test_cli_errors_are_one_line_with_exit_2(
    tmp_path: Path, capsys, cluster_text, extra, fragment
) -> None:
    cluster = tmp_path / "cluster.yaml"
    if cluster_text is not None:
        cluster.write_text(cluster_text)
    args = [
        "plan",
        str(cluster),
        "--model",
        "bert-tiny",
        "--global-batch",
        "8",
        "--seq-len",
        "64",
        "--output",
        str(tmp_path / "plan.yaml"),
        *extra,
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("hetlm: error: ") and err.count("\n") == 1 and fragment in err
    assert not (tmp_path / "plan.yaml").exists()
