"""Where each rank runs, and what it tells the others about its device.

NCCL needs one GPU per rank: two ranks on one GPU fail at the first collective ("Duplicate GPU
detected"). So a rank gets ``cuda:LOCAL_RANK`` with NCCL only when its node has at least as many
visible GPUs as ranks (``LOCAL_WORLD_SIZE``; ``CUDA_VISIBLE_DEVICES`` is respected because torch
counts only the visible ones). When ranks outnumber GPUs, the node's ranks train on the CPU with
gloo, and rank 0 of the node says so in one line. gloo could carry CUDA tensors, but only for
all-reduce and broadcast: FSDP's all-gather and reduce-scatter, and hetlm's own all-gathers, would
fail, so the CPU is the layout that works for every engine.

``HETLM_DEVICE`` overrides the choice: ``cpu`` (e.g. the test suite, whose references are CPU
numbers), ``cuda`` (an error if no GPU is visible), ``auto`` (the default).

Every rank then reports a :class:`DeviceReport` (host, device name, compute capability, memory);
the run plan (``hetlm.train.run_plan``) resolves the job's precision from all of them.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch

from hetlm.cluster.precision import (
    CPU_AUTO_PRECISIONS,
    CPU_PRECISIONS,
    DeviceSupport,
    cuda_precisions,
)
from hetlm.errors import HetlmError

DEVICE_ENV = "HETLM_DEVICE"


@dataclass(frozen=True)
class Placement:
    """One rank's device and process-group backend; ``note`` is the line to print, if any."""

    device: torch.device
    backend: str
    note: str | None = None


def requested_device() -> str:
    value = os.environ.get(DEVICE_ENV, "auto").strip().lower() or "auto"
    if value not in ("auto", "cpu", "cuda"):
        raise HetlmError(f"{DEVICE_ENV}={value!r}: use auto, cpu or cuda")
    return value


def place_rank(
    local_rank: int, local_world_size: int, visible_gpus: int, requested: str = "auto"
) -> Placement:
    """The device and backend of one rank (a pure function, so every layout is testable)."""
    cpu = Placement(torch.device("cpu"), "gloo")
    if requested == "cpu":
        return cpu
    if visible_gpus == 0:
        if requested == "cuda":
            raise HetlmError(
                f"{DEVICE_ENV}=cuda but no CUDA GPU is visible (check "
                "CUDA_VISIBLE_DEVICES and the driver), or set it to auto/cpu"
            )
        return cpu
    if local_world_size <= visible_gpus:
        return Placement(torch.device("cuda", local_rank), "nccl")
    note = (
        f"hetlm: {local_world_size} ranks on this node share {visible_gpus} visible "
        f"GPU{'s' if visible_gpus > 1 else ''}: NCCL needs one GPU per rank, so these ranks "
        f"train on the CPU with gloo; start at most {visible_gpus} rank"
        f"{'s' if visible_gpus > 1 else ''} per node to train on the GPU"
    )
    if requested == "cuda":
        raise HetlmError(
            note.removeprefix("hetlm: ").replace(
                "so these ranks train on the CPU with gloo",
                f"and {DEVICE_ENV}=cuda forbids the CPU",
            )
        )
    return Placement(cpu.device, cpu.backend, note if local_rank == 0 else None)


def local_placement() -> Placement:
    """This process's placement, from torchrun's environment."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    requested = requested_device()
    visible = torch.cuda.device_count() if requested != "cpu" and torch.cuda.is_available() else 0
    return place_rank(local_rank, local_world, visible, requested)


def default_device() -> str:
    """``cuda`` when a GPU is visible and ``HETLM_DEVICE`` allows it, else ``cpu`` (for the
    single-process commands: eval, chat)."""
    if requested_device() == "cpu" or not torch.cuda.is_available():
        return "cpu"
    return "cuda"


def gpu_slices(visible: list[str], nodes: int, ranks_per_node: int) -> list[str] | None:
    """``CUDA_VISIBLE_DEVICES`` for each of ``nodes`` emulated nodes on this machine
    (``--local-nodes``): each gets its own GPUs when there are enough, else None (the caller
    hides the GPUs: ranks that would share one train on the CPU)."""
    if not visible or len(visible) < nodes * ranks_per_node:
        return None
    return [",".join(visible[i * ranks_per_node : (i + 1) * ranks_per_node]) for i in range(nodes)]


def visible_gpu_ids() -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` entries."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip() and d.strip() != "-1"]
    if requested_device() == "cpu" or not torch.cuda.is_available():
        return []
    return [str(i) for i in range(torch.cuda.device_count())]


# ---------------------------------------------------------------- what a rank reports


NODE_ENV = "HETLM_NODE_NAME"


def node_name() -> str:
    """This node's name as a plan knows it: ``HETLM_NODE_NAME`` (set by ``--local-nodes`` for
    its emulated nodes; set it on a cluster whose host names are not the plan's), else the host
    name."""
    return os.environ.get(NODE_ENV) or socket.gethostname()


@dataclass(frozen=True)
class DeviceReport:
    """One rank's device, as all ranks see it after the start-up gather."""

    rank: int
    host: str
    kind: str  # "cuda" or "cpu"
    name: str
    capability: tuple[int, int] | None
    memory_bytes: int
    # the node as the plan names it (HETLM_NODE_NAME, else the host name) and the rank's index
    # on it: what elastic training matches a plan's rows by (hetlm.train.membership)
    node: str = ""
    local_rank: int = 0

    @classmethod
    def local(cls, rank: int, device: torch.device) -> DeviceReport:
        host = socket.gethostname()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":
            props = torch.cuda.get_device_properties(device)
            return cls(
                rank,
                host,
                "cuda",
                props.name,
                (props.major, props.minor),
                int(props.total_memory),
                node_name(),
                local_rank,
            )
        from hetlm.cluster.hardware import host_memory_gib

        memory = int(host_memory_gib() * 2**30)
        return cls(rank, host, "cpu", "cpu", None, memory, node_name(), local_rank)

    def describe(self) -> str:
        cc = (
            f", compute capability {self.capability[0]}.{self.capability[1]}"
            if self.capability
            else ""
        )
        return f"rank {self.rank} ({self.name}{cc}) on {self.host}"

    def support(self) -> DeviceSupport:
        if self.kind == "cuda" and self.capability is not None:
            return DeviceSupport(self.describe(), cuda_precisions(self.capability))
        return DeviceSupport(self.describe(), CPU_PRECISIONS, CPU_AUTO_PRECISIONS)

    def to_dict(self) -> dict:
        return {
            "rank": self.rank,
            "host": self.host,
            "kind": self.kind,
            "name": self.name,
            "capability": list(self.capability) if self.capability else None,
            "memory_gib": round(self.memory_bytes / 2**30, 2),
            "node": self.node or self.host,
            "local_rank": self.local_rank,
        }
