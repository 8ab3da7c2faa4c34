"""The process group and the few collectives the loop needs.

Works the same in one process (no group, collectives are identities) and under torchrun
(gloo on CPU, NCCL on CUDA, one GPU per rank; where ranks outnumber a node's GPUs they train on
the CPU with gloo: ``hetlm.train.devices``). Test and user process groups get a finite timeout so a hung peer
ends the run instead of waiting forever: gloo raises in the waiting call; for NCCL hetlm sets
``TORCH_NCCL_ASYNC_ERROR_HANDLING=1`` (the watchdog ends the process after the timeout instead of
leaving it hung; unless set otherwise). Set ``TORCH_NCCL_BLOCKING_WAIT=1`` to have NCCL raise in
the waiting call instead, so the loop can name the ranks that did not arrive (as it does on gloo),
at some cost in overlap. Each collective here records itself in this rank's heartbeat
(``hetlm.train.heartbeat``).

Under torchrun (c10d rendezvous) the ranks of every attempt share one store, the agents', and
torch keys the process group's handshake by name only: after ``torchrun --max-restarts`` re-forms
the group, a new rank could read a dead rank's address from the previous attempt ("Gloo
connectFullMesh failed ... Connection refused", or a hang). hetlm therefore puts each attempt's
group under its own prefix of that store (``_init_on_agent_store``).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from hetlm.train import heartbeat
from hetlm.train.devices import local_placement


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
    placement = local_placement()  # one GPU per rank with NCCL, else the CPU with gloo
    device, backend = placement.device, placement.backend
    if placement.note:
        print(placement.note, flush=True)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    if world_size > 1 and not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s)
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            _init_on_agent_store(backend, rank, world_size, timeout)
        else:
            dist.init_process_group(backend=backend, timeout=timeout)
    return DistContext(rank, world_size, local_rank, node_rank, device)


GENERATION_KEY = "hetlm/generation"


def _init_on_agent_store(backend: str, rank: int, world_size: int, timeout: timedelta) -> None:
    """The process group on the torchrun agents' store, under ``hetlm/attempt-G/``.

    The agents' store outlives the ranks (one per job, not per attempt), so each attempt needs
    its own namespace, and every rank of the attempt must pick the same one. Agents count their
    restarts apart (one restarted only because a peer re-joined keeps 0), so that count cannot
    name it; a counter in the store can: every rank reads G, and once all of them have joined
    (a barrier) rank 0 increments it, before any rank could fail and start the next attempt. A
    rank whose group fails to form increments it too, so the keys of an attempt that died while
    forming are not in the next one's way either."""
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size,
        is_master=False,
        timeout=timeout,
    )
    generation = store.add(GENERATION_KEY, 0)
    try:
        dist.init_process_group(
            backend=backend,
            timeout=timeout,
            rank=rank,
            world_size=world_size,
            store=dist.PrefixStore(f"hetlm/attempt-{generation}", store),
        )
        dist.barrier()
    except BaseException:
        with contextlib.suppress(Exception):
            store.add(GENERATION_KEY, 1)
        raise
    if rank == 0:
        store.add(GENERATION_KEY, 1)


# ---------------------------------------------------------------- restarts


def restart_count() -> int:
    """Which attempt this rank is in (0: the first): torchrun's ``TORCHELASTIC_RESTART_COUNT``
    or ``HETLM_RESTART_COUNT`` (``--local-nodes --max-restarts``), whichever is larger. torch
    agents count only their own workers' failures (an agent that restarted because a peer node
    re-joined keeps 0), so the job-wide count (``job_restart_count``) is the maximum over the
    ranks."""
    counts = [
        os.environ.get(name, "0") for name in ("TORCHELASTIC_RESTART_COUNT", "HETLM_RESTART_COUNT")
    ]
    return max(int(v) if v.isdigit() else 0 for v in counts)


_job_restart: int | None = None


def set_job_restart_count(count: int | None) -> None:
    """(run_pretraining, after gathering every rank's count) the job-wide restart count."""
    global _job_restart
    _job_restart = count


def job_restart_count() -> int:
    return restart_count() if _job_restart is None else _job_restart


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
