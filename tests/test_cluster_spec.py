"""Cluster files: the documented shape parses; every kind of mistake is one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest

from hetlm.cluster.spec import load_cluster, parse_cluster
from hetlm.errors import HetlmError

EXAMPLE = """\
nodes:
  - name: node0
    host: 10.0.0.1
    gpus: {model: V100-32GB, count: 2}
    samples_per_s: [120.0, 118.0]
  - gpus: {model: RTX-A6000, count: 2}
  - gpus: {memory_gib: 24, tflops: 100, count: 1, precisions: [fp32, fp16]}
network: {inter_node_gbps: 10, intra_node_gbps: 100}
"""


def write(tmp_path: Path, text: str, name: str = "cluster.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_example_parses_into_ranks(tmp_path: Path) -> None:
    cluster = load_cluster(write(tmp_path, EXAMPLE))
    assert cluster.world_size == 5 and cluster.ranks_per_node == [2, 2, 1]
    assert [n.name for n in cluster.nodes] == ["node0", "node1", "node2"]
    assert [d.rank for d in cluster.devices] == [0, 1, 2, 3, 4]
    assert [(d.node_index, d.local_rank) for d in cluster.devices] == [
        (0, 0),
        (0, 1),
        (1, 0),
        (1, 1),
        (2, 0),
    ]
    assert [d.samples_per_s for d in cluster.devices] == [120.0, 118.0, None, None, None]
    assert cluster.nodes[0].host == "10.0.0.1" and cluster.nodes[1].host is None
    custom = cluster.devices[4].gpu
    assert custom.memory_gib == 24 and custom.peak_tflops == {"fp32": 100.0, "fp16": 100.0}
    assert cluster.slowest_link_gbps == 10


def test_defaults_and_overrides() -> None:
    cluster = parse_cluster({"nodes": [{"gpus": {"model": "a100_40gb", "memory_gib": 38}}]})
    assert cluster.world_size == 1 and cluster.devices[0].gpu.name == "A100-40GB"
    assert cluster.devices[0].gpu.memory_gib == 38
    assert (cluster.inter_node_gbps, cluster.intra_node_gbps) == (10, 100)
    assert cluster.slowest_link_gbps == 100  # one node: only intra-node links
    cpu = parse_cluster({"nodes": [{"gpus": {"model": "cpu", "count": 2}}]}).devices[0].gpu
    assert cpu.is_cpu and cpu.memory_gib > 0


def test_unknown_model_with_explicit_numbers_is_a_custom_device() -> None:
    cluster = parse_cluster(
        {
            "nodes": [
                {
                    "gpus": {
                        "model": "RTX 2080 Ti",
                        "memory_gib": 11,
                        "tflops": {"fp32": 13.4, "fp16": 53.8},
                    }
                }
            ]
        }
    )
    gpu = cluster.devices[0].gpu
    assert gpu.name == "RTX 2080 Ti" and gpu.peak("fp16") == 53.8 and not gpu.supports("bf16")


def test_probe_file_gives_speeds(tmp_path: Path) -> None:
    write(tmp_path, "samples_per_s: [50, 52.5]\ngpu: V100-32GB\n", "probe.yaml")
    text = "nodes:\n  - gpus: {model: V100-32GB, count: 2}\n    samples_per_s: probe.yaml\n"
    cluster = load_cluster(write(tmp_path, text))
    assert [d.samples_per_s for d in cluster.devices] == [50.0, 52.5]


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("nodes:\n  - gpus: {model: V100-32GB, cuont: 2}\n", ["nodes.0.gpus.cuont", "unknown key"]),
        ("nodes:\n  - gpus: {model: V100-32GB}\n    speed: 3\n", ["nodes.0.speed", "unknown key"]),
        (
            "nodes:\n  - gpus: {model: V100-32GB}\nnetwork: {inter_node_gbps: -1}\n",
            ["network.inter_node_gbps", "greater than 0"],
        ),
        (
            "nodes:\n  - gpus: {model: V100-32GB, count: 0}\n",
            ["nodes.0.gpus.count", "greater than or equal to 1"],
        ),
        ("nodes:\n  - gpus: {model: V100-32GB, count: two}\n", ["nodes.0.gpus.count", "'two'"]),
        (
            "nodes:\n  - gpus: {model: V200}\n",
            ["nodes.0.gpus", "unknown GPU model 'V200'", "memory_gib"],
        ),
        ("nodes:\n  - gpus: {model: V100}\n", ["nodes.0.gpus.model", "V100-16GB or V100-32GB"]),
        ("nodes:\n  - gpus: {count: 2}\n", ["nodes.0.gpus", "memory_gib"]),
        ("nodes:\n  - gpus: {memory_gib: 24}\n", ["nodes.0", "tflops or measured samples_per_s"]),
        (
            "nodes:\n  - gpus: {model: T4, count: 2}\n    samples_per_s: [1.0]\n",
            ["nodes.0", "1 values but the node has 2 GPUs"],
        ),
        (
            "nodes:\n  - gpus: {model: T4}\n    samples_per_s: [-3]\n",
            ["nodes.0.samples_per_s", "positive numbers"],
        ),
        ("nodes:\n  - gpus: {model: T4, precisions: [fp64]}\n", ["nodes.0.gpus.precisions.0"]),
        (
            "nodes:\n  - {name: a, gpus: {model: T4}}\n  - {name: a, gpus: {model: T4}}\n",
            ["unique", "'a'"],
        ),
        ("nodes: []\n", ["nodes", "at least 1"]),
        ("network: {}\n", ["nodes", "required key is missing"]),
        ("nodes:\n  - host: x\n", ["nodes.0.gpus", "required key is missing"]),
        ("nodes: 3\n", ["nodes", "valid list"]),
        ("- gpus: {model: T4}\n", ["mapping with a 'nodes' list", "got list"]),
    ],
)
def test_bad_files_give_one_line_naming_the_fields(
    tmp_path: Path, text: str, fragments: list[str]
) -> None:
    with pytest.raises(HetlmError) as info:
        load_cluster(write(tmp_path, text))
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_all_bad_fields_are_reported_at_once(tmp_path: Path) -> None:
    text = "nodes:\n  - gpus: {model: T4, count: 0}\n  - gpus: {model: T4}\n    hots: x\n"
    with pytest.raises(HetlmError) as info:
        load_cluster(write(tmp_path, text))
    assert "nodes.0.gpus.count" in str(info.value) and "nodes.1.hots" in str(info.value)


def test_file_level_errors(tmp_path: Path) -> None:
    with pytest.raises(HetlmError, match="does not exist"):
        load_cluster(tmp_path / "missing.yaml")
    with pytest.raises(HetlmError, match="is a directory"):
        load_cluster(tmp_path)
    with pytest.raises(HetlmError, match="is empty"):
        load_cluster(write(tmp_path, "# nothing yet\n"))
    with pytest.raises(HetlmError, match=r"not valid YAML at line 3"):
        load_cluster(write(tmp_path, "nodes:\n  - gpus: {model: T4\n  - gpus: [\n"))
    with pytest.raises(HetlmError, match="probe file .* does not exist"):
        load_cluster(write(tmp_path, "nodes:\n  - gpus: {model: T4}\n    samples_per_s: p.json\n"))
    write(tmp_path, "[1, 2, 3]", "p.json")
    with pytest.raises(HetlmError, match="3 speeds but the node has 1 GPUs"):
        load_cluster(write(tmp_path, "nodes:\n  - gpus: {model: T4}\n    samples_per_s: p.json\n"))


def test_probe_file_max_micro_batch_caps_the_plan(tmp_path):
    """The planner's memory model may overestimate what fits; a probed cap is a ceiling."""
    import yaml

    from hetlm.cluster.planner import make_plan
    from hetlm.cluster.spec import parse_cluster
    from hetlm.models.presets import bert_config

    (tmp_path / "p0.yaml").write_text(
        yaml.safe_dump({"samples_per_s": [100.0], "max_micro_batch": [5]})
    )
    (tmp_path / "p1.yaml").write_text(yaml.safe_dump({"samples_per_s": [100.0]}))
    cluster = parse_cluster(
        {
            "nodes": [
                {"gpus": {"model": "cpu", "count": 1, "memory_gib": 8}, "samples_per_s": "p0.yaml"},
                {"gpus": {"model": "cpu", "count": 1, "memory_gib": 8}, "samples_per_s": "p1.yaml"},
            ]
        },
        base_dir=tmp_path,
    )
    assert cluster.devices[0].max_micro_batch == 5
    assert cluster.devices[1].max_micro_batch is None
    plan = make_plan(cluster, bert_config("tiny", vocab_size=1000), 40, 32)
    row0 = plan.ranks[0]
    assert row0.cap == 5
    assert max(row0.micro_batches) <= 5
    assert sum(r.share for r in plan.ranks) == 40
