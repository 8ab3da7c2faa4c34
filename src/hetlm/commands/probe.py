"""``hetlm probe``: measure the largest micro-batch and the samples/s of this node's devices.

Run it on each node (or inside each emulated node's cgroup) with the model, sequence length and
precision of the planned run; point the cluster file's ``samples_per_s`` at the file it writes.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from hetlm.commands.model_args import add_model_arguments, model_spec
from hetlm.errors import HetlmError


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "probe",
        help="measure the largest micro-batch and samples/s on this node's devices",
        description="Find the largest micro-batch of the masked-LM training step that fits each "
        "device (CUDA: out-of-memory search; CPU: peak anonymous memory of a worker process "
        "against the memory limit) and time a few steps at that size; write a probe file for the cluster file's "
        "samples_per_s.",
    )
    add_model_arguments(parser, default_preset="small")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sample (default 128)")
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=32000,
        help="vocabulary size for presets (default 32000): use your tokenizer's",
    )
    parser.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "fp16", "bf16"],
        help="auto: bf16 on CPUs and GPUs that have it, else fp16",
    )
    parser.add_argument(
        "--device",
        default="auto",
        help="auto (every visible GPU, else the CPU), cpu, cuda, or cuda:0,cuda:1",
    )
    parser.add_argument(
        "--memory-gib",
        type=float,
        default=None,
        help="memory limit to search against; CPU default: the cgroup's memory "
        "limit if set, else 0.9 x RAM; CUDA default: the whole device (a smaller "
        "value emulates a smaller GPU)",
    )
    parser.add_argument(
        "--reserve-gib",
        type=float,
        default=None,
        help="memory to keep free beyond the probe step's peak, for what a "
        "training rank holds beyond it (default: 10%% of the memory limit, the "
        "headroom hetlm plan keeps too)",
    )
    parser.add_argument(
        "--max-batch", type=int, default=1024, help="largest micro-batch to try (default 1024)"
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=3,
        help="timed steps at the chosen micro-batch (default 3; median is used)",
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (default: OMP_NUM_THREADS, else the usable CPUs)",
    )
    parser.add_argument(
        "--no-ddp",
        action="store_true",
        help="measure the bare model instead of one-rank DDP (no gradient buckets)",
    )
    parser.add_argument(
        "--output", default="probe.yaml", help="probe file to write (default probe.yaml)"
    )
    parser.add_argument("--quiet", action="store_true", help="print only the result table")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hetlm.probe.probe import run_probe

    if args.seq_len < 1 or args.max_batch < 1 or args.steps < 1 or args.warmup < 0:
        raise HetlmError("--seq-len, --max-batch and --steps must be positive, --warmup >= 0")
    if args.memory_gib is not None and args.memory_gib <= 0:
        raise HetlmError("--memory-gib must be positive")
    if args.reserve_gib is not None and (
        args.reserve_gib < 0 or (args.memory_gib and args.reserve_gib >= args.memory_gib)
    ):
        raise HetlmError("--reserve-gib must be >= 0 and below --memory-gib")

    def progress(message: str) -> None:
        if not args.quiet:
            print(message, file=sys.stderr, flush=True)

    result = run_probe(
        model_spec(args, "small"),
        args.seq_len,
        vocab_size=args.vocab_size,
        precision=args.precision,
        device=args.device,
        memory_gib=args.memory_gib,
        reserve_gib=args.reserve_gib,
        max_batch=args.max_batch,
        warmup=args.warmup,
        steps=args.steps,
        threads=args.threads,
        ddp=not args.no_ddp,
        progress=progress,
    )
    path = result.save(args.output)
    print(result.format_table())
    for device in result.devices:
        if device.note:
            print(f"{device.device}: {device.note}")
    print(
        f"probe file written to {path}: in the cluster file, give this node `samples_per_s: {path}`"
    )
    return 0
