"""Cluster description: a YAML file of nodes, their GPUs and the network, parsed strictly.

The file is small and written by hand, so every mistake must come back as one line that names the
field and says what to write instead; unknown keys are errors (a typo such as ``cuont`` must not
silently become the default). Example::

    nodes:
      - name: node0                 # optional, default node0, node1, ...
        host: 10.0.0.1              # optional; launch lines show NODE0_HOST until it is given
        hostname: gpu-v100-01       # optional: the Slurm node name (--nodelist); default: host
                                    # when host is a name rather than an IP address
        gpus: {model: V100-32GB, count: 2}
        samples_per_s: [120.0, 118.0]   # optional measured speeds, one per GPU, or a probe file
      - gpus: {memory_gib: 24, tflops: 100, count: 1, precisions: [fp32, fp16]}
    network: {inter_node_gbps: 10, intra_node_gbps: 100}
    slurm:                          # optional: for the generated sbatch script
      partition: gpu
      time: "2-00:00:00"
      env: ["source /nfs/envs/hetlm/bin/activate"]   # shell lines run before the launch

Ranks are numbered node by node (node 0's GPUs first), which is how torchrun assigns global ranks
when each node is started with its ``--node-rank``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hetlm.cluster.hardware import GpuModel, find_gpu, host_memory_gib, known_names
from hetlm.errors import HetlmError

Precision = Literal["fp32", "tf32", "fp16", "bf16", "fp8", "int8"]
DEFAULT_CUSTOM_PRECISIONS = ("fp32", "fp16")  # every CUDA GPU since Pascal computes in fp16


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GpuSpec(_Strict):
    """The GPUs of one node: a table ``model``, or explicit numbers, or a model with overrides."""

    model: str | None = None
    count: int = Field(1, ge=1)
    memory_gib: float | None = Field(None, gt=0)
    #: Peak dense TFLOP/s: one number for every precision listed, or a mapping per precision.
    tflops: float | dict[Precision, float] | None = None
    precisions: list[Precision] | None = None

    @field_validator("model")
    @classmethod
    def _not_ambiguous(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                find_gpu(value)
            except HetlmError as exc:  # "V100" could be 16 or 32 GB: keep collecting errors
                raise ValueError(str(exc)) from None
        return value

    @field_validator("tflops")
    @classmethod
    def _positive_tflops(cls, value: Any) -> Any:
        values = value.values() if isinstance(value, dict) else [value]
        if any(v is not None and v <= 0 for v in values):
            raise ValueError("tflops must be positive")
        return value

    @model_validator(mode="after")
    def _complete(self) -> GpuSpec:
        known = find_gpu(self.model) if self.model else None
        if known is None and self.memory_gib is None:
            if self.model:
                raise ValueError(
                    f"unknown GPU model {self.model!r}: known models are "
                    f"{', '.join(known_names())}; or give memory_gib and tflops for another device"
                )
            raise ValueError("give a GPU model (e.g. model: V100-32GB) or memory_gib and tflops")
        if isinstance(self.tflops, dict) and self.precisions:
            missing = sorted(set(self.precisions) - set(self.tflops))
            if missing:
                raise ValueError(f"tflops has no number for precisions {missing}")
        return self


class NodeSpec(_Strict):
    name: str | None = None
    host: str | None = None
    #: The node's host name as Slurm knows it (``--nodelist`` takes names, not IP addresses).
    hostname: str | None = None
    gpus: GpuSpec
    #: Measured samples/s per GPU (``hetlm probe``), or the path of a probe file holding them.
    samples_per_s: list[float] | str | None = None

    @field_validator("samples_per_s", mode="before")
    @classmethod
    def _speeds(cls, value: Any) -> Any:
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and v > 0 for v in value
        ):
            raise ValueError(
                "must be a list of positive numbers (one per GPU) or a probe file path"
            )
        return [float(v) for v in value]

    @model_validator(mode="after")
    def _speeds_match_gpus(self) -> NodeSpec:
        if isinstance(self.samples_per_s, list) and len(self.samples_per_s) != self.gpus.count:
            raise ValueError(
                f"samples_per_s has {len(self.samples_per_s)} values but the node has "
                f"{self.gpus.count} GPUs: give one measured speed per GPU"
            )
        gpus = self.gpus
        if (
            (gpus.model is None or find_gpu(gpus.model) is None)
            and gpus.tflops is None
            and self.samples_per_s is None
        ):
            raise ValueError("a GPU without a known model needs tflops or measured samples_per_s")
        return self


class NetworkSpec(_Strict):
    inter_node_gbps: float = Field(10.0, gt=0)  # between nodes, Gbit/s (10 GbE)
    intra_node_gbps: float = Field(100.0, gt=0)  # between GPUs of one node (PCIe/NVLink), Gbit/s


class SlurmSpec(_Strict):
    """Defaults for the generated sbatch script (``hetlm plan --slurm-*`` override them)."""

    partition: str | None = None
    time: str | None = None
    account: str | None = None
    cpus_per_gpu: int = Field(4, ge=1)
    #: Shell lines run in the batch script before the launch (activate the environment, module
    #: load, exports); srun passes the resulting environment on to every node.
    env: list[str] = Field(default_factory=list)

    @field_validator("env", mode="before")
    @classmethod
    def _lines(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("time", mode="before")
    @classmethod
    def _slurm_time(cls, value: Any) -> str | None:
        return None if value is None else check_slurm_time(str(value))


_SLURM_TIME = re.compile(r"(\d+-\d{1,2}(:\d{1,2}){0,2}|\d+(:\d{1,2}){0,2})")


def check_slurm_time(value: str) -> str:
    """``value`` if it is a time limit sbatch accepts (minutes, MM:SS, HH:MM:SS, D-HH,
    D-HH:MM, D-HH:MM:SS, UNLIMITED); a ValueError saying the formats otherwise."""
    value = value.strip()
    if _SLURM_TIME.fullmatch(value) or value.upper() in ("UNLIMITED", "INFINITE"):
        return value
    raise ValueError(
        f"Slurm time limit {value!r} is not one of minutes, HH:MM:SS or "
        "D-HH:MM:SS (e.g. 2-00:00:00 for two days)"
    )


class ClusterSpec(_Strict):
    nodes: list[NodeSpec] = Field(min_length=1)
    network: NetworkSpec = Field(default_factory=NetworkSpec)
    slurm: SlurmSpec = Field(default_factory=SlurmSpec)

    @model_validator(mode="after")
    def _unique_names(self) -> ClusterSpec:
        names = [n.name or f"node{i}" for i, n in enumerate(self.nodes)]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"node names must be unique, {duplicates} repeat")
        return self


@dataclass(frozen=True)
class Device:
    """One rank: a device on a node, with its measured speed if the cluster file gives one."""

    rank: int
    node_index: int
    local_rank: int
    gpu: GpuModel
    samples_per_s: float | None = None
    #: Largest micro-batch ``hetlm probe`` measured to fit (a ceiling for the planner's caps).
    max_micro_batch: int | None = None


@dataclass(frozen=True)
class Node:
    name: str
    host: str | None
    devices: tuple[Device, ...]
    hostname: str | None = None


@dataclass(frozen=True)
class Cluster:
    nodes: tuple[Node, ...]
    inter_node_gbps: float = 10.0
    intra_node_gbps: float = 100.0
    source: str = "cluster"
    slurm: SlurmSpec = dataclasses.field(default_factory=SlurmSpec)

    @property
    def devices(self) -> tuple[Device, ...]:
        return tuple(d for node in self.nodes for d in node.devices)

    @property
    def world_size(self) -> int:
        return len(self.devices)

    @property
    def ranks_per_node(self) -> list[int]:
        return [len(node.devices) for node in self.nodes]

    @property
    def slowest_link_gbps(self) -> float:
        """Ring collectives run at the pace of their slowest hop: the inter-node link if any."""
        return self.inter_node_gbps if len(self.nodes) > 1 else self.intra_node_gbps


def format_validation_error(exc: ValidationError, what: str) -> str:
    """A cluster or plan file's validation errors as one line (``hetlm.user_files``)."""
    from hetlm.user_files import format_validation_error as format_errors

    return format_errors(exc, what, keys_help="docs/PLANNER.md for the format")


def _resolve_gpu(spec: GpuSpec) -> GpuModel:
    known = find_gpu(spec.model) if spec.model else None
    if known is not None and known.is_cpu and spec.memory_gib is None:
        known = dataclasses.replace(known, memory_gib=round(host_memory_gib() / spec.count, 2))
    if known is None:
        precisions = spec.precisions or (
            list(spec.tflops) if isinstance(spec.tflops, dict) else list(DEFAULT_CUSTOM_PRECISIONS)
        )
        tflops = spec.tflops
        peaks = (
            {p: float(tflops[p]) for p in precisions}
            if isinstance(tflops, dict)
            else {p: float(tflops or 0.0) for p in precisions}
        )
        name = spec.model or f"custom-{spec.memory_gib:g}GiB"
        return GpuModel(name=name, memory_gib=float(spec.memory_gib or 0), peak_tflops=peaks)
    overrides: dict[str, Any] = {}
    if spec.memory_gib is not None:
        overrides["memory_gib"] = float(spec.memory_gib)
    if spec.tflops is not None or spec.precisions is not None:
        precisions = spec.precisions or list(known.peak_tflops)
        if isinstance(spec.tflops, dict):
            peaks = {
                p: float(spec.tflops.get(p, known.peak_tflops.get(p, 0.0))) for p in precisions
            }
        elif spec.tflops is not None:
            peaks = {p: float(spec.tflops) for p in precisions}
        else:
            peaks = {p: known.peak_tflops.get(p, 0.0) for p in precisions}
        overrides["peak_tflops"] = {p: v for p, v in peaks.items() if v > 0} or peaks
    return dataclasses.replace(known, **overrides) if overrides else known


def _read_probe_caps(value: str, base_dir: Path) -> list[int] | None:
    """``max_micro_batch`` of a probe file written by ``hetlm probe``, if it has one."""
    import yaml

    path = Path(value).expanduser()
    path = path if path.is_absolute() else base_dir / path
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    caps = data.get("max_micro_batch") if isinstance(data, dict) else None
    if (
        isinstance(caps, list)
        and caps
        and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in caps)
    ):
        return [int(c) for c in caps]
    return None


def _read_probe_file(value: str, base_dir: Path, where: str) -> list[float]:
    """Measured speeds from a probe file: YAML/JSON list, or a mapping with ``samples_per_s``."""
    import yaml

    path = Path(value).expanduser()
    if not path.is_absolute():
        path = base_dir / path
    if not path.is_file():
        raise HetlmError(
            f"{where}: probe file {path} does not exist: run `hetlm probe` on that "
            "node or write the measured speeds as a list"
        )
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise HetlmError(f"{where}: probe file {path} is not valid YAML/JSON ({exc})") from None
    if isinstance(data, dict):
        data = data.get("samples_per_s")
    if (
        not isinstance(data, list)
        or not data
        or not all(isinstance(v, int | float) and not isinstance(v, bool) and v > 0 for v in data)
    ):
        raise HetlmError(
            f"{where}: probe file {path} must hold a list of positive samples/s "
            "(or a mapping with a samples_per_s list)"
        )
    return [float(v) for v in data]


def parse_cluster(data: Any, source: str = "cluster", base_dir: Path | None = None) -> Cluster:
    """Validate a parsed cluster description and resolve it into ranks."""
    if not isinstance(data, dict):
        raise HetlmError(
            f"{source}: the cluster description must be a mapping with a 'nodes' list, got "
            f"{type(data).__name__}: see docs/PLANNER.md for an example"
        )
    try:
        spec = ClusterSpec.model_validate(data)
    except ValidationError as exc:
        raise HetlmError(
            format_validation_error(exc, f"{source}: invalid cluster description")
        ) from None
    base_dir = base_dir or Path.cwd()
    nodes: list[Node] = []
    rank = 0
    for i, node_spec in enumerate(spec.nodes):
        gpu = _resolve_gpu(node_spec.gpus)
        speeds: list[float | None] = [None] * node_spec.gpus.count
        probe_caps: list[int | None] = [None] * node_spec.gpus.count
        if isinstance(node_spec.samples_per_s, str):
            measured_caps = _read_probe_caps(node_spec.samples_per_s, base_dir)
            if measured_caps is not None and len(measured_caps) == node_spec.gpus.count:
                probe_caps = list(measured_caps)
            measured = _read_probe_file(
                node_spec.samples_per_s, base_dir, f"{source}: nodes.{i}.samples_per_s"
            )
            if len(measured) != node_spec.gpus.count:
                raise HetlmError(
                    f"{source}: nodes.{i}.samples_per_s: the probe file has {len(measured)} "
                    f"speeds but the node has {node_spec.gpus.count} GPUs: probe every GPU"
                )
            speeds = list(measured)
        elif node_spec.samples_per_s is not None:
            speeds = list(node_spec.samples_per_s)
        devices = []
        for local_rank in range(node_spec.gpus.count):
            devices.append(
                Device(
                    rank=rank,
                    node_index=i,
                    local_rank=local_rank,
                    gpu=gpu,
                    samples_per_s=speeds[local_rank],
                    max_micro_batch=probe_caps[local_rank],
                )
            )
            rank += 1
        nodes.append(
            Node(
                name=node_spec.name or f"node{i}",
                host=node_spec.host,
                devices=tuple(devices),
                hostname=node_spec.hostname,
            )
        )
    return Cluster(
        nodes=tuple(nodes),
        inter_node_gbps=spec.network.inter_node_gbps,
        intra_node_gbps=spec.network.intra_node_gbps,
        source=source,
        slurm=spec.slurm,
    )


def load_cluster(path: str | Path) -> Cluster:
    """Read a cluster YAML file; every problem is a one-line HetlmError."""
    from hetlm.user_files import read_yaml

    data = read_yaml(
        path,
        "cluster file",
        allow_empty=False,
        missing_fix="give the path of a YAML file describing the nodes, at least "
        "one (see docs/PLANNER.md)",
        syntax_fix="fix the indentation or quoting there",
    )
    return parse_cluster(data, source=str(path), base_dir=Path(path).parent)
