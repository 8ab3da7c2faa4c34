"""Emulated nodes on one machine: ``hetlm pretrain --local-nodes N``.

Starts N ``torchrun`` agents on 127.0.0.1 (static rendezvous), exactly as N real nodes would be
started, so a user without a cluster sees the multi-node path work. GPUs are divided among the
emulated nodes (``CUDA_VISIBLE_DEVICES``) when there is one per rank (NCCL); otherwise every
rank trains on the CPU with gloo, said in one line (``agent_gpus``). Each agent
gets its share of the machine's cores (OMP_NUM_THREADS), since ranks on one machine that all
use every core slow each other down.

Elastic (``elastic=True``, ``hetlm pretrain --local-nodes N --elastic``): the agents form the
job with torch's c10d rendezvous (``--nnodes MIN:N``, node 0 hosts the rendezvous store), as an
elastic job across real nodes does; a node that dies (``ElasticLocalJob.kill_node``) leaves the
others to re-form without it, and one started again (``start_node``) joins them, each time from
the newest checkpoint with the global batch re-split (``hetlm.train.membership``).

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
from dataclasses import dataclass

from hetlm.launch.output import pump_filtered


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
    elastic: ElasticRendezvous | None = None,
) -> list[str]:
    """The agent's command line. ``rank_prefix`` runs each rank as ``PREFIX python -m hetlm.cli
    ...`` (torchrun ``--no-python``), e.g. to put the ranks, not the agent, in a cgroup.
    ``elastic``: the c10d rendezvous (``--nnodes MIN:MAX``) instead of the static one."""
    program = ["-m", "hetlm.cli", *args]
    if rank_prefix:
        program = ["--no-python", *rank_prefix, sys.executable, "-m", "hetlm.cli", *args]
    if elastic is not None:
        topology = elastic.arguments(master_addr, master_port, host=node_rank == 0)
    else:
        topology = [
            f"--nnodes={nnodes}",
            f"--node-rank={node_rank}",
            f"--master-addr={master_addr}",
            f"--master-port={master_port}",
        ]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *topology,
        f"--nproc-per-node={nproc_per_node}",
        f"--max-restarts={max_restarts}",
        *program,
    ]


@dataclass(frozen=True)
class ElasticRendezvous:
    """torchrun's c10d rendezvous for an elastic job of ``min_nodes`` to ``max_nodes`` nodes.

    The timeouts are short for emulated nodes on one machine: a dead node is dropped after
    ``keep_alive_interval`` x 3 s without a keep-alive, and a round closes ``last_call_timeout``
    s after enough nodes joined (a second node starting a little late still joins the first
    round)."""

    job_id: str
    min_nodes: int
    max_nodes: int
    last_call_timeout: int = 5
    keep_alive_interval: int = 1
    join_timeout: int = 120

    def arguments(self, addr: str, port: int, *, host: bool) -> list[str]:
        conf = (
            f"is_host={'true' if host else 'false'},last_call_timeout={self.last_call_timeout},"
            f"keep_alive_interval={self.keep_alive_interval},keep_alive_max_attempt=3,"
            f"join_timeout={self.join_timeout}"
        )
        return [
            f"--nnodes={self.min_nodes}:{self.max_nodes}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={addr}:{port}",
            f"--rdzv-id={self.job_id}",
            f"--rdzv-conf={conf}",
            "--monitor-interval=0.5",
        ]


# torch 2.13's c10d rendezvous shares one TCP store across rounds, and a node that joins a
# running job then waits for the new round's MASTER_ADDR, which the old rank 0 never writes
# again (observed: the grown round times out after 60 s); a store per round avoids it.
ELASTIC_AGENT_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


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
    node_names: list[str] | None = None,
) -> int:
    """Run ``hetlm <args>`` as ``nodes`` torchrun agents on this machine; returns the exit code.
    Node i's ranks see ``HETLM_NODE_NAME`` = ``node_names[i]`` (default ``node<i>``).

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
            node_names=node_names or [f"node{i}" for i in range(nodes)],
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
    node_names: list[str],
) -> int:
    port = free_port()
    env = {
        **agent_env(nodes * nproc_per_node, threads_per_rank),
        "HETLM_RESTART_COUNT": str(attempt),
    }
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
            env={
                **env,
                "HETLM_NODE_NAME": node_names[i],
                **({} if gpus is None else {"CUDA_VISIBLE_DEVICES": gpus[i]}),
            },
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


def agent_env(ranks: int, threads_per_rank: int | None) -> dict[str, str]:
    """The agents' environment: each rank gets its share of the machine's cores
    (``OMP_NUM_THREADS``), and unbuffered output so that lines arrive as they are printed."""
    threads = threads_per_rank or max(1, (os.cpu_count() or 1) // ranks)
    return dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")


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


class ElasticLocalJob:
    """N emulated nodes of one elastic job on this machine (c10d rendezvous), any of which can
    be killed (the node dies: its agent and ranks, at once) and started again (it re-joins).

    Node 0 hosts the rendezvous store, as the ``--rdzv-endpoint`` host does on a cluster: the
    job ends with it. The job is over when node 0's agent exits (its code is the job's)."""

    def __init__(
        self,
        args: list[str],
        *,
        nodes: int,
        min_nodes: int,
        nproc_per_node: int = 1,
        max_restarts: int = 3,
        node_names: list[str] | None = None,
        threads_per_rank: int | None = None,
        stderr=None,
    ) -> None:
        if not 1 <= min_nodes <= nodes:
            raise ValueError(f"min_nodes {min_nodes} must be within 1..{nodes}")
        self.args, self.nodes, self.nproc_per_node = args, nodes, nproc_per_node
        self.max_restarts = max_restarts
        self.node_names = node_names or [f"node{i}" for i in range(nodes)]
        self.port = free_port()
        self.rendezvous = ElasticRendezvous(
            f"hetlm-{os.getpid()}-{self.port}", min_nodes=min_nodes, max_nodes=nodes
        )
        self.env = {**agent_env(nodes * nproc_per_node, threads_per_rank), **ELASTIC_AGENT_ENV}
        self.env.pop("HETLM_RESTART_COUNT", None)
        self.gpus = agent_gpus(nodes, nproc_per_node)
        self.stderr = stderr if stderr is not None else sys.stderr.fileno()
        self.agents: dict[int, subprocess.Popen] = {}
        self._pumps: list = []

    def start(self) -> None:
        """Start every node (node 0 first: it hosts the rendezvous store)."""
        self.start_node(0)
        time.sleep(1.0)
        for i in range(1, self.nodes):
            self.start_node(i)

    def start_node(self, i: int) -> None:
        """Start node ``i``'s agent (again): it joins the running job at its next round."""
        command = torchrun_command(
            nnodes=self.nodes,
            node_rank=i,
            nproc_per_node=self.nproc_per_node,
            master_addr="127.0.0.1",
            master_port=self.port,
            args=self.args,
            max_restarts=self.max_restarts,
            elastic=self.rendezvous,
        )
        agent = subprocess.Popen(
            command,
            env={
                **self.env,
                "HETLM_NODE_NAME": self.node_names[i],
                **({} if self.gpus is None else {"CUDA_VISIBLE_DEVICES": self.gpus[i]}),
            },
            start_new_session=True,
            stderr=subprocess.PIPE,
        )
        self.agents[i] = agent
        self._pumps.append(pump_filtered(agent.stderr, self.stderr))

    def kill_node(self, i: int) -> None:
        """Node ``i`` dies: SIGKILL to its agent and every rank it started (torchrun starts each
        rank in a session of its own, so the agent's process group is not enough)."""
        agent = self.agents[i]
        for pid in [agent.pid, *_descendants(agent.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        agent.wait()

    def alive(self, i: int) -> bool:
        return i in self.agents and self.agents[i].poll() is None

    def wait(self, timeout: float | None = None) -> int:
        """Wait for node 0's agent (the job); then stop the others. Returns its exit code."""
        deadline = None if timeout is None else time.time() + timeout
        try:
            while self.agents[0].poll() is None:
                if deadline is not None and time.time() > deadline:
                    raise TimeoutError(f"the elastic job did not finish within {timeout} s")
                time.sleep(0.2)
        finally:
            others = [a for i, a in self.agents.items() if i != 0]
            for agent in others:  # they finish with node 0; a straggler is stopped
                with contextlib.suppress(subprocess.TimeoutExpired):
                    agent.wait(timeout=15)
            _terminate(list(self.agents.values()))
            for pump in self._pumps:
                pump.join(timeout=5)
        return int(self.agents[0].returncode)


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc: each process's parent)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def run_local_elastic(
    args: list[str],
    *,
    nodes: int,
    min_nodes: int,
    nproc_per_node: int = 1,
    max_restarts: int = 3,
    node_names: list[str] | None = None,
) -> int:
    """``hetlm <args>`` as an elastic job of ``nodes`` emulated nodes; returns its exit code."""
    job = ElasticLocalJob(
        args,
        nodes=nodes,
        min_nodes=min_nodes,
        nproc_per_node=nproc_per_node,
        max_restarts=max_restarts,
        node_names=node_names,
    )
    job.start()
    pids = ", ".join(f"{name}: {job.agents[i].pid}" for i, name in enumerate(job.node_names))
    print(
        f"hetlm: elastic job of {nodes} emulated nodes (at least {min_nodes}); agent pids "
        f"{pids}: a node whose agent dies leaves the others to continue from the newest "
        "checkpoint (node 0 hosts the rendezvous: the job ends with it)",
        file=sys.stderr,
        flush=True,
    )
    try:
        return job.wait()
    except KeyboardInterrupt:
        _terminate(list(job.agents.values()))
        raise
