"""Launch lines, the Slurm script, and `hetlm plan` end to end."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from hetlm.cli import main
from hetlm.cluster.planner import load_plan, make_plan
from hetlm.cluster.spec import parse_cluster
from hetlm.launch.scripts import slurm_script, torchrun_commands
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
    assert "FILL IN: no Slurm host name for node(s) node0, node1" in script
    assert "#SBATCH --nodes=2" in script and "#SBATCH --gres=gpu:2" in script
    assert "hetjob" not in script
    # still runnable: Slurm picks the nodes, srun takes them in allocation order, and the
    # rendezvous is the allocation's first node
    assert "\n#SBATCH --nodelist" not in script
    assert "##SBATCH --nodelist=NODE0_HOSTNAME,NODE1_HOSTNAME" in script
    sruns = [line for line in script.splitlines() if line.startswith("srun")]
    assert "--relative=0" in sruns[0] and "--relative=1" in sruns[1]
    assert 'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in script


def test_slurm_script_for_unequal_nodes_is_a_heterogeneous_job(plan) -> None:
    script = slurm_script(plan, "run.yaml", "plan.yaml", job_name="bert")
    assert script.startswith("#!/bin/bash\n")
    assert script.count("#SBATCH hetjob") == 1
    assert "#SBATCH --gres=gpu:2" in script and "#SBATCH --gres=gpu:1" in script
    # 10.0.0.1 is an IP address: never in --nodelist; the node is left to Slurm, named in a note
    assert "--nodelist=10.0.0.1" not in script
    assert "##SBATCH --nodelist=NODE0_HOSTNAME" in script
    assert "##SBATCH --nodelist=NODE1_HOSTNAME" in script
    sruns = [line for line in script.splitlines() if line.startswith("srun")]
    assert len(sruns) == 2 and "--het-group=0" in sruns[0] and "--het-group=1" in sruns[1]
    assert all(line.endswith("&") for line in sruns) and script.rstrip().endswith("wait")
    assert '--node-rank 1 --nproc-per-node 1 --master-addr "$MASTER_ADDR"' in sruns[1]
    assert (
        'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST_HET_GROUP_0" | head -n 1)'
    ) in script


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


NAMED_CLUSTER = """\
nodes:
  - name: v100
    host: 10.0.0.1
    hostname: gpu-v100-01
    gpus: {model: V100-32GB, count: 2}
  - name: a6000
    host: gpu-a6000-01
    gpus: {model: RTX-A6000, count: 1}
slurm:
  partition: gpu
  time: "2-00:00:00"
  env: source /nfs/envs/hetlm/bin/activate
"""


def _sbatch_directives(script: str) -> list[str]:
    """The lines sbatch reads as options: #SBATCH lines before the first command."""
    directives = []
    for line in script.splitlines()[1:]:
        if line and not line.startswith("#"):
            break
        if line.startswith("#SBATCH "):
            directives.append(line.removeprefix("#SBATCH "))
    return directives


def _plan_cli(tmp_path: Path, cluster_text: str, *extra: str) -> str:
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(cluster_text)
    out = tmp_path / "plan.yaml"
    args = [
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
        "--config",
        "run.yaml",
        *extra,
    ]
    assert main(args) == 0
    return out.with_suffix(".sbatch").read_text()


def test_slurm_script_uses_host_names_partition_time_gres_and_activation(
    tmp_path: Path, capsys
) -> None:
    script = _plan_cli(
        tmp_path,
        NAMED_CLUSTER,
        "--slurm-env",
        "export NCCL_SOCKET_IFNAME=eno1",
        "--slurm-cpus-per-gpu",
        "6",
    )
    directives = _sbatch_directives(script)
    # the host name, not the IP address, even where the file gives both; a host that is a
    # name is used as it is
    assert "--nodelist=gpu-v100-01" in directives and "--nodelist=gpu-a6000-01" in directives
    assert "10.0.0.1" not in script
    assert "--partition=gpu" in directives and "--time=2-00:00:00" in directives
    assert "--gres=gpu:2" in directives and "--gres=gpu:1" in directives
    assert "--cpus-per-task=12" in directives and "--cpus-per-task=6" in directives
    assert "FILL IN" not in script
    lines = script.splitlines()
    activate = lines.index("source /nfs/envs/hetlm/bin/activate")
    export = lines.index("export NCCL_SOCKET_IFNAME=eno1")  # the flag's line after the file's
    sruns = [i for i, line in enumerate(lines) if line.startswith("srun ")]
    assert activate < export < sruns[0]
    assert "MASTER_ADDR=gpu-v100-01  # node 0 of the plan" in lines
    for i, index in enumerate(sruns):
        words = shlex.split(lines[index].removesuffix(" &"))
        assert words[0] == "srun" and "torchrun" in words
        torchrun = words[words.index("torchrun") :]
        assert torchrun[torchrun.index("--master-addr") + 1] == "$MASTER_ADDR"
        assert torchrun[torchrun.index("--node-rank") + 1] == str(i)
        assert f"--het-group={i}" in words
    assert "Slurm script: no host name" not in capsys.readouterr().out


def test_slurm_flags_override_the_cluster_file_and_equal_nodes_are_pinned(tmp_path: Path) -> None:
    cluster = """\
nodes:
  - {hostname: a100-1, host: 192.168.1.11, gpus: {model: A100-80GB, count: 4}}
  - {hostname: a100-2, host: 192.168.1.12, gpus: {model: A100-80GB, count: 4}}
slurm: {partition: short, time: "01:00:00", account: lab}
"""
    script = _plan_cli(tmp_path, cluster, "--slurm-partition", "long", "--slurm-time", "7-00:00:00")
    directives = _sbatch_directives(script)
    assert "--partition=long" in directives and "--time=7-00:00:00" in directives
    assert "--account=lab" in directives and "--nodes=2" in directives
    assert "--nodelist=a100-1,a100-2" in directives and "--gres=gpu:4" in directives
    assert "hetjob" not in script
    sruns = [line for line in script.splitlines() if line.startswith("srun ")]
    assert "--nodelist=a100-1" in sruns[0] and "--nodelist=a100-2" in sruns[1]
    assert "MASTER_ADDR=a100-1" in script
    assert "192.168.1." not in script


def test_without_slurm_settings_the_script_says_what_to_fill_in(tmp_path: Path) -> None:
    script = _plan_cli(tmp_path, CLUSTER)
    directives = _sbatch_directives(script)
    assert not any(d.startswith(("--partition", "--time", "--nodelist")) for d in directives)
    assert "##SBATCH --partition=PARTITION  # FILL IN" in script
    assert "##SBATCH --time=D-HH:MM:SS  # FILL IN" in script
    assert "# FILL IN: activate the environment that has hetlm" in script


@pytest.mark.parametrize(
    ("cluster_text", "extra", "fragment"),
    [
        (CLUSTER, ["--slurm-time", "2days"], "--slurm-time: Slurm time limit '2days'"),
        (CLUSTER + "slurm: {time: soon}\n", [], "slurm.time: Slurm time limit 'soon'"),
        (CLUSTER + "slurm: {partiton: gpu}\n", [], "slurm.partiton: unknown key"),
    ],
)
def test_slurm_setting_errors_are_one_line(
    tmp_path: Path, capsys, cluster_text, extra, fragment
) -> None:
    cluster = tmp_path / "cluster.yaml"
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
    assert err.startswith("hetlm: error: ") and err.count("\n") == 1 and fragment in err, err


@pytest.mark.parametrize(
    "value", ["30", "30:00", "12:00:00", "2-00", "2-12:00", "2-00:00:00", "UNLIMITED"]
)
def test_slurm_time_formats_sbatch_accepts(value: str) -> None:
    from hetlm.cluster.spec import check_slurm_time

    assert check_slurm_time(value) == value


@pytest.mark.parametrize("value", ["2days", "12h", "1:2:3:4", "-1", ""])
def test_slurm_time_formats_sbatch_refuses(value: str) -> None:
    from hetlm.cluster.spec import check_slurm_time

    with pytest.raises(ValueError, match="D-HH:MM:SS"):
        check_slurm_time(value)
