"""``hetlm bench net``: all-reduce bandwidth between the ranks of a job, as nccl-tests reports it.

The planner predicts communication time from one number per link (``network.inter_node_gbps``);
this measures what the job's ranks actually get, over the same backend the training uses (NCCL on
GPUs, gloo on CPUs). Definitions are those of nccl-tests (``doc/PERFORMANCE.md``):

* ``algbw = size / time`` -- bytes of the buffer all-reduced per second;
* ``busbw = algbw * 2 (n - 1) / n`` -- for a ring all-reduce each rank sends and receives
  ``2 (n - 1) / n`` times the buffer, so busbw is comparable with the link's bandwidth whatever
  the number of ranks (and is 0 for one rank).

``time`` is the mean over the timed iterations of one all-reduce, the slowest rank's (max over
ranks), after warm-up. GB/s are 10^9 bytes per second; sizes are binary (1M = 2^20 bytes).
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hetlm.errors import HetlmError

_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}
#: Time to spend on the timed iterations of one size; large sizes run fewer (at least min_iters).
TARGET_S_PER_SIZE = 1.0


def parse_size(text: str) -> int:
    """``"4M"`` -> 4194304; accepts K/M/G with an optional ``B`` / ``iB``, or plain bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)(?:I?B)?\s*", text.upper())
    if not match:
        raise HetlmError(
            f"size {text!r}: write a number of bytes with an optional K, M or G "
            "suffix (binary: 1M = 2^20 bytes), e.g. 1M or 256M"
        )
    value = float(match.group(1)) * _UNITS[match.group(2)]
    if value < 4:
        raise HetlmError(f"size {text!r} is below one float32 element (4 bytes)")
    return int(value)


def format_size(size: int) -> str:
    for unit, scale in (("G", 2**30), ("M", 2**20), ("K", 2**10)):
        if size >= scale and size % scale == 0:
            return f"{size // scale}{unit}"
    return f"{size}B"


def message_sizes(min_size: int, max_size: int, factor: int = 2) -> list[int]:
    """Sizes from ``min_size`` to ``max_size``, times ``factor`` each (nccl-tests ``-f``)."""
    if min_size > max_size:
        raise HetlmError(
            f"--min-size {format_size(min_size)} is above --max-size {format_size(max_size)}"
        )
    if factor < 2:
        raise HetlmError("--factor must be at least 2")
    sizes = []
    size = min_size
    while size <= max_size:
        sizes.append(size)
        size *= factor
    return sizes


def bus_factor(world_size: int) -> float:
    """Bytes a ring all-reduce moves per rank per byte of buffer: 2 (n - 1) / n."""
    return 2.0 * (world_size - 1) / world_size


@dataclass
class Row:
    size_bytes: int
    count: int  # float32 elements
    iters: int
    time_s: float
    algbw_gbps: float  # GB/s, 10^9 bytes
    busbw_gbps: float


def measure_allreduce(
    sizes: list[int], iters: int, warmup: int, min_iters: int = 3, device: Any = None
) -> list[Row]:
    """Time in-place float32 SUM all-reduces of each size; call on every rank of the group."""
    import torch
    import torch.distributed as dist

    world = dist.get_world_size()
    device = device or torch.device("cpu")
    cuda = device.type == "cuda"
    rows = []
    for size in sizes:
        count = size // 4
        buffer = torch.ones(count, dtype=torch.float32, device=device)
        started = time.perf_counter()
        for _ in range(max(1, warmup)):
            dist.all_reduce(buffer)
        if cuda:
            torch.cuda.synchronize(device)
        # Every rank must run the same number of collectives: agree on it from the slowest
        # rank's warm-up time.
        per_iter = torch.tensor(
            [(time.perf_counter() - started) / max(1, warmup)], dtype=torch.float64, device=device
        )
        dist.all_reduce(per_iter, op=dist.ReduceOp.MAX)
        n = max(min_iters, min(iters, math.ceil(TARGET_S_PER_SIZE / max(float(per_iter), 1e-6))))
        dist.barrier()
        started = time.perf_counter()
        for _ in range(n):
            dist.all_reduce(buffer)
        if cuda:
            torch.cuda.synchronize(device)
        elapsed = torch.tensor(
            [(time.perf_counter() - started) / n], dtype=torch.float64, device=device
        )
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        seconds = float(elapsed)
        algbw = count * 4 / seconds / 1e9
        rows.append(Row(count * 4, count, n, seconds, algbw, algbw * bus_factor(world)))
        del buffer
    return rows


def format_markdown(rows: list[Row], meta: dict[str, Any]) -> str:
    lines = [
        f"# all-reduce bandwidth ({meta['backend']}, {meta['world_size']} ranks on "
        f"{meta['nodes']} node{'s' if meta['nodes'] != 1 else ''})",
        "",
        f"float32 SUM, in place; time = mean of the timed iterations, slowest rank; "
        f"algbw = size / time, busbw = algbw x 2(n-1)/n = algbw x "
        f"{bus_factor(meta['world_size']):.3g} (nccl-tests definitions; GB/s = 1e9 B/s).",
        f"hosts: {', '.join(meta['hosts'])}; torch {meta['torch']}; {meta['created']}",
        "",
        "| size | count (float32) | iters | time (us) | algbw (GB/s) | busbw (GB/s) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {format_size(r.size_bytes)} | {r.count:,} | {r.iters} | "
            f"{r.time_s * 1e6:,.1f} | {r.algbw_gbps:.3f} | {r.busbw_gbps:.3f} |"
        )
    if rows:
        peak = max(r.busbw_gbps for r in rows)
        lines += [
            "",
            f"peak busbw {peak:.3f} GB/s = {peak * 8:.2f} Gbit/s "
            "(compare with the cluster file's network.inter_node_gbps)",
        ]
    return "\n".join(lines) + "\n"


def run_rank(
    *,
    min_size: int,
    max_size: int,
    factor: int,
    iters: int,
    warmup: int,
    backend: str,
    output: str | None,
    timeout_s: float = 600.0,
) -> int:
    """The per-rank body under torchrun: measure, and on rank 0 print and write the results."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise HetlmError(
            "hetlm bench net runs under torchrun on every node (torchrun ... -m "
            "hetlm.cli bench net), or on this machine with --local-nodes N"
        )
    import datetime

    import torch
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise HetlmError("--backend nccl needs CUDA GPUs; use gloo on CPUs")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads and threads.isdigit():
        torch.set_num_threads(int(threads))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        sizes = message_sizes(min_size, max_size, factor)
        hosts = [None] * dist.get_world_size()
        dist.all_gather_object(hosts, socket.gethostname())
        rows = measure_allreduce(sizes, iters, warmup, device=device)
        if dist.get_rank() == 0:
            meta = {
                "backend": backend,
                "world_size": dist.get_world_size(),
                "nodes": int(os.environ.get("GROUP_WORLD_SIZE", "0")) or len(set(hosts)),
                "hosts": sorted(set(hosts)),
                "torch": str(torch.__version__),
                "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            }
            markdown = format_markdown(rows, meta)
            print(markdown, end="", flush=True)
            if output:
                write_results(output, rows, meta, markdown)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


def write_results(output: str, rows: list[Row], meta: dict[str, Any], markdown: str) -> None:
    prefix = Path(output)
    if prefix.suffix in (".md", ".json"):
        prefix = prefix.with_suffix("")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix.with_suffix(".md").write_text(markdown, encoding="utf-8")
    data = {**meta, "bus_factor": bus_factor(meta["world_size"]), "rows": [asdict(r) for r in rows]}
    prefix.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    print(f"written {prefix.with_suffix('.md')} and {prefix.with_suffix('.json')}", flush=True)
