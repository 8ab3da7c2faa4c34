"""``hetlm bench net|io|data``: measure what the planner and a run assume.

``net`` (here, ``hetlm.bench.net``): all-reduce bandwidth between the ranks; ``io`` and ``data``
(``hetlm.bench.storage``): filesystem and data-loader rates.

``net`` runs under torchrun on each node (``torchrun ... -m hetlm.cli bench net``), or on this
machine with ``--local-nodes N`` (N torchrun agents on 127.0.0.1, as ``hetlm pretrain
--local-nodes``).
"""

from __future__ import annotations

import argparse
from typing import Any

from hetlm.errors import HetlmError


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="benchmarks of this cluster (net: all-reduce bandwidth; io, data)",
        description="Benchmarks of the machines a run will use.",
    )
    kinds = parser.add_subparsers(dest="bench", metavar="BENCHMARK")
    net = kinds.add_parser(
        "net",
        help="all-reduce algbw/busbw from --min-size to --max-size",
        description="All-reduce bandwidth between the ranks of a job (gloo on CPU, NCCL on "
        "GPUs), with the nccl-tests definitions: algbw = bytes / time, busbw = algbw x "
        "2(n-1)/n. Run under torchrun on every node, or here with --local-nodes N.",
    )
    net.add_argument("--min-size", default="1M", help="smallest message (default 1M = 2^20 B)")
    net.add_argument(
        "--max-size",
        default="64M",
        help="largest message (default 64M for a quick run; up to 1G or more)",
    )
    net.add_argument("--factor", type=int, default=2, help="size step factor (default 2)")
    net.add_argument(
        "--iters",
        type=int,
        default=20,
        help="timed iterations per size, at most (large sizes run fewer, >= 3, "
        "about 1 s each; default 20)",
    )
    net.add_argument("--warmup", type=int, default=2, help="untimed iterations per size")
    net.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "gloo", "nccl"],
        help="auto: NCCL with CUDA GPUs, else gloo",
    )
    net.add_argument(
        "--output",
        default="runs/bench/net",
        help="results prefix: writes PREFIX.md and PREFIX.json on rank 0 "
        "(default runs/bench/net); '' writes nothing",
    )
    net.add_argument(
        "--local-nodes",
        type=int,
        default=0,
        metavar="N",
        help="run N torchrun agents on this machine (emulated nodes)",
    )
    net.add_argument(
        "--nproc-per-node",
        type=int,
        default=1,
        metavar="K",
        help="ranks per emulated node (with --local-nodes)",
    )
    net.add_argument(
        "--timeout-s",
        type=float,
        default=300.0,
        help="process-group timeout: a hung peer ends the run (default 300)",
    )
    net.set_defaults(func=run_net)
    _register_storage(kinds)
    parser.set_defaults(func=lambda args: _no_kind(parser))


def _register_storage(kinds: Any) -> None:
    """``bench io`` and ``bench data`` live in ``hetlm.bench.storage`` (registered if present)."""
    try:
        from hetlm.bench import storage
    except ModuleNotFoundError as exc:
        if exc.name != "hetlm.bench.storage":
            raise
        return
    storage.register_io(kinds)
    storage.register_data(kinds)


def _no_kind(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def run_net(args: argparse.Namespace) -> int:
    from hetlm.bench.net import message_sizes, parse_size, run_rank

    min_size, max_size = parse_size(args.min_size), parse_size(args.max_size)
    message_sizes(min_size, max_size, args.factor)  # errors before anything starts
    if args.iters < 1 or args.warmup < 0:
        raise HetlmError("--iters must be >= 1 and --warmup >= 0")
    if args.local_nodes:
        return _launch_local(args)
    return run_rank(
        min_size=min_size,
        max_size=max_size,
        factor=args.factor,
        iters=args.iters,
        warmup=args.warmup,
        backend=args.backend,
        output=args.output or None,
        timeout_s=args.timeout_s,
    )


def _launch_local(args: argparse.Namespace) -> int:
    from hetlm.launch.local import run_local_nodes

    if args.local_nodes < 1 or args.nproc_per_node < 1:
        raise HetlmError("--local-nodes and --nproc-per-node must be >= 1")
    if args.local_nodes * args.nproc_per_node < 2:
        raise HetlmError("an all-reduce needs at least 2 ranks: use --local-nodes 2")
    forwarded = [
        "bench",
        "net",
        "--min-size",
        args.min_size,
        "--max-size",
        args.max_size,
        "--factor",
        str(args.factor),
        "--iters",
        str(args.iters),
        "--warmup",
        str(args.warmup),
        "--backend",
        args.backend,
        "--output",
        args.output,
        "--timeout-s",
        str(args.timeout_s),
    ]
    return run_local_nodes(forwarded, nodes=args.local_nodes, nproc_per_node=args.nproc_per_node)
