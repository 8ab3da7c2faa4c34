"""The process group and the few collectives the loop needs.

Works the same in one process (no group, collectives are identities) and under torchrun
(gloo on CPU, NCCL on CUDA). Test and user process groups get a finite timeout so a hung peer
ends the run instead of waiting forever: gloo raises in the waiting call; for NCCL hetlm sets
``TORCH_NCCL_ASYNC_ERROR_HANDLING=1`` (the watchdog ends the process after the timeout instead of
leaving it hung; unless set otherwise). Set ``TORCH_NCCL_BLOCKING_WAIT=1`` to have NCCL raise in
the waiting call instead, so the loop can name the ranks that did not arrive (as it does on gloo),
at some cost in overlap. Each collective here records itself in this rank's heartbeat
(``hetlm.train.heartbeat``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from hetlm.train import heartbeat


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    node_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(timeout_s: float = 600.0) -> DistContext:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    node_rank = int(os.environ.get("GROUP_RANK", os.environ.get("NODE_RANK", "0")))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return DistContext(rank, world_size, local_rank, node_rank, device)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(ctx: DistContext, tensor: torch.Tensor) -> torch.Tensor:
    if ctx.enabled:
        heartbeat.enter("all_reduce")
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_tensor(ctx: DistContext, tensor: torch.Tensor) -> list[torch.Tensor]:
    if not ctx.enabled:
        return [tensor]
    heartbeat.enter("all_gather")
    out = [torch.empty_like(tensor) for _ in range(ctx.world_size)]
    dist.all_gather(out, tensor)
    return out


def all_gather_object(ctx: DistContext, obj: object) -> list[object]:
    if not ctx.enabled:
        return [obj]
    heartbeat.enter("all_gather_object")
    out: list[object] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        heartbeat.enter("barrier")
        dist.barrier()


def set_threads_for_rank() -> None:
    """Ranks sharing a machine split its cores (OMP_NUM_THREADS), or they slow each other."""
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads and threads.isdigit() and int(threads) > 0:
        torch.set_num_threads(int(threads))
