"""Emulated nodes on one machine: ``hetlm pretrain --local-nodes N``.

Starts N ``torchrun`` agents on 127.0.0.1 (static rendezvous), exactly as N real nodes would be
started, so a user without a cluster sees the multi-node path work. GPUs are divided among the
emulated nodes (``CUDA_VISIBLE_DEVICES``) when there is one per rank (NCCL); otherwise every
rank trains on the CPU with gloo, said in one line (``agent_gpus``). Each agent
gets its share of the machine's cores (OMP_NUM_THREADS), since ranks on one machine that all
use every core slow each other down.

Restarts (``max_restarts``): when the job fails (a rank killed, a hung collective), every agent
is stopped and all are started again, on a fresh port, with ``HETLM_RESTART_COUNT`` = the attempt
number; the ranks then resume from the latest good checkpoint by themselves
(``hetlm.train.pretrain.run_pretraining``). The launcher restarts the whole job rather than
passing ``--max-restarts`` to torchrun: torch's static rendezvous cannot re-form a group, and
torchrun counts restarts per agent (K failures per node, not per job). Plain torchrun with
``--rdzv-backend c10d --max-restarts K`` across nodes works too (docs/FAULTS.md).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

from hetlm.launch_output import pump_filtered


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def torchrun_command(
    *,
    nnodes: int,
    node_rank: int,
    nproc_per_node: int,
    master_addr: str,
    master_port: int,
    args: list[str],
    max_restarts: int = 0,
    rank_prefix: list[str] | None = None,
) -> list[str]:
    """The agent's command line. ``rank_prefix`` runs each rank as ``PREFIX python -m hetlm.cli
    ...`` (torchrun ``--no-python``), e.g. to put the ranks, not the agent, in a cgroup."""
    program = ["-m", "hetlm.cli", *args]
    if rank_prefix:
        program = ["--no-python", *rank_prefix, sys.executable, "-m", "hetlm.cli", *args]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={nnodes}",
        f"--node-rank={node_rank}",
        f"--nproc-per-node={nproc_per_node}",
        f"--master-addr={master_addr}",
        f"--master-port={master_port}",
        f"--max-restarts={max_restarts}",
        *program,
    ]


def run_local_nodes(
    args: list[str],
    *,
    nodes: int,
    nproc_per_node: int = 1,
    max_restarts: int = 0,
    threads_per_rank: int | None = None,
    master_addr: str = "127.0.0.1",
    agent_prefixes: list[list[str]] | None = None,
    rank_prefixes: list[list[str]] | None = None,
) -> int:
    """Run ``hetlm <args>`` as ``nodes`` torchrun agents on this machine; returns the exit code.

    For emulated heterogeneous nodes (benchmarks/emulated_cluster.py): node i's agent command is
    prefixed by ``agent_prefixes[i]`` (e.g. ``ip netns exec NS``: the agent and its ranks in a
    network namespace, with ``master_addr`` node 0's address there) and its ranks by
    ``rank_prefixes[i]`` (e.g. a command that moves itself into a cgroup, then execs the rank).
    """
    for attempt in range(max_restarts + 1):
        code = _run_once(
            args,
            nodes=nodes,
            nproc_per_node=nproc_per_node,
            threads_per_rank=threads_per_rank,
            master_addr=master_addr,
            agent_prefixes=agent_prefixes,
            rank_prefixes=rank_prefixes,
            attempt=attempt,
        )
        if code == 0 or attempt == max_restarts:
            return code
        print(
            f"hetlm: the job failed (exit {code}); restart {attempt + 1} of {max_restarts}: "
            "every rank resumes from the latest good checkpoint",
            file=sys.stderr,
            flush=True,
        )
    return code


def _run_once(
    args: list[str],
    *,
    nodes: int,
    nproc_per_node: int,
    threads_per_rank: int | None,
    master_addr: str,
    agent_prefixes: list[list[str]] | None,
    rank_prefixes: list[list[str]] | None,
    attempt: int,
) -> int:
    port = free_port()
    ranks = nodes * nproc_per_node
    threads = threads_per_rank or max(1, (os.cpu_count() or 1) // ranks)
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(threads),
        PYTHONUNBUFFERED="1",
        HETLM_RESTART_COUNT=str(attempt),
    )
    gpus = agent_gpus(nodes, nproc_per_node, announce=attempt == 0)
    agents = [
        subprocess.Popen(
            [
                *(agent_prefixes[i] if agent_prefixes else []),
                *torchrun_command(
                    nnodes=nodes,
                    node_rank=i,
                    nproc_per_node=nproc_per_node,
                    master_addr=master_addr,
                    master_port=port,
                    args=args,
                    rank_prefix=rank_prefixes[i] if rank_prefixes else None,
                ),
            ],
            env=env if gpus is None else {**env, "CUDA_VISIBLE_DEVICES": gpus[i]},
            start_new_session=True,
            stderr=subprocess.PIPE,
        )
        for i in range(nodes)
    ]
    pumps = [pump_filtered(agent.stderr, sys.stderr.fileno()) for agent in agents]
    try:
        code = _wait_all(agents)
        for pump in pumps:
            pump.join(timeout=5)
        return code
    except KeyboardInterrupt:
        _terminate(agents)
        raise


def agent_gpus(nodes: int, nproc_per_node: int, *, announce: bool = True) -> list[str] | None:
    """``CUDA_VISIBLE_DEVICES`` per emulated node: its own GPUs when the visible ones suffice
    for one per rank, else none at all (all ranks on the CPU with gloo: NCCL refuses two ranks
    on one GPU), said in one line; None when this machine has no GPU (nothing to divide)."""
    from hetlm.train.devices import gpu_slices, visible_gpu_ids

    visible = visible_gpu_ids()
    if not visible:
        return None
    slices = gpu_slices(visible, nodes, nproc_per_node)
    if slices is not None:
        return slices
    ranks = nodes * nproc_per_node
    if announce:
        print(
            f"hetlm: {ranks} ranks on this machine, {len(visible)} visible GPU"
            f"{'s' if len(visible) > 1 else ''}: NCCL needs one GPU per rank, so the ranks "
            f"train on the CPU with gloo (use --local-nodes {len(visible) // nproc_per_node}"
            " or fewer to train on the GPUs)",
            file=sys.stderr,
            flush=True,
        )
    return [""] * nodes


def _wait_all(agents: list[subprocess.Popen]) -> int:
    """Wait for every agent; if one fails, stop the others instead of letting them hang."""
    codes: dict[int, int] = {}
    while len(codes) < len(agents):
        for i, agent in enumerate(agents):
            if i not in codes and agent.poll() is not None:
                codes[i] = agent.returncode
                if agent.returncode != 0:
                    time.sleep(2.0)  # let the peers report their own error first
                    _terminate([a for j, a in enumerate(agents) if j not in codes])
        time.sleep(0.2)
    return max(codes.values(), key=abs)


def _terminate(agents: list[subprocess.Popen]) -> None:
    for agent in agents:
        if agent.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(agent.pid, signal.SIGTERM)
    deadline = time.time() + 10
    for agent in agents:
        try:
            agent.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            os.killpg(agent.pid, signal.SIGKILL)
            agent.wait()
