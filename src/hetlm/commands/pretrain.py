"""``hetlm pretrain CONFIG.yaml``: under torchrun on each node, or ``--local-nodes N`` here."""

from __future__ import annotations

import argparse
import os
import time


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "pretrain", help="masked-LM pretraining with per-rank micro-batches",
        description="Run under torchrun on each node (torchrun ... -m hetlm.cli pretrain "
                    "CONFIG.yaml), or on one machine with --local-nodes N.")
    p.add_argument("config", nargs="?", help="run configuration (YAML)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest complete checkpoint in run.output_dir")
    p.add_argument("--stop-at-step", type=int, default=None, metavar="N",
                   help="checkpoint and stop at step N (e.g. before a Slurm time limit); "
                        "continue later with --resume")
    p.add_argument("--local-nodes", type=int, default=0, metavar="N",
                   help="emulate N nodes on this machine (N torchrun agents on 127.0.0.1, gloo)")
    p.add_argument("--nproc-per-node", type=int, default=1, metavar="K",
                   help="ranks per emulated node (with --local-nodes)")
    p.add_argument("--max-restarts", type=int, default=0, metavar="K",
                   help="(with --local-nodes) restart the whole job up to K times after a rank "
                        "fails; it resumes from the latest good checkpoint by itself (default 0: "
                        "a failure ends the run; see docs/FAULTS.md)")
    p.add_argument("--plan", default=None, metavar="PLAN.yaml",
                   help="a plan from `hetlm plan`: per-rank shares and precision (overrides "
                        "train.plan)")
    p.add_argument("--quiet", action="store_true", help="do not print the summary at the end")
    p.add_argument("--help-config", action="store_true", help="list every config key and exit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hetlm.config import config_help, load_config
    from hetlm.errors import HetlmError

    if args.help_config:
        print(config_help())
        return 0
    if not args.config:
        raise HetlmError("give a config file: hetlm pretrain CONFIG.yaml (see --help-config)")
    config = load_config(args.config)
    if args.plan:
        config.train.plan = args.plan
    if args.local_nodes:
        return _launch_local(args, config)
    from hetlm.train.pretrain import run_pretraining

    summary = run_pretraining(config, resume=args.resume, stop_at_step=args.stop_at_step)
    if int(os.environ.get("RANK", "0")) == 0 and not args.quiet:
        if "stopped_at" in summary:
            print(f"stopped at step {summary['stopped_at']}; checkpoint "
                  f"{summary['last_checkpoint']}; continue with --resume")
        else:
            print(format_summary(summary))
    return 0


def _launch_local(args: argparse.Namespace, config) -> int:
    """Check everything that can be checked before starting N agents, then start them."""
    from hetlm.data.packing import load_packed_dataset
    from hetlm.errors import HetlmError
    from hetlm.launch import run_local_nodes

    if args.local_nodes < 1 or args.nproc_per_node < 1:
        raise HetlmError("--local-nodes and --nproc-per-node must be >= 1")
    if args.max_restarts < 0:
        raise HetlmError("--max-restarts must be >= 0")
    nodes, per_node = args.local_nodes, args.nproc_per_node
    node_of_rank = [r // per_node for r in range(nodes * per_node)]
    config.batch_split(nodes * per_node, node_of_rank)  # topology errors before any launch
    load_packed_dataset(config.data.dataset)            # a missing dataset before any launch
    forwarded = ["pretrain", args.config] + (["--resume"] if args.resume else [])
    forwarded += ["--quiet"] if args.quiet else []
    forwarded += ["--plan", args.plan] if args.plan else []
    if args.stop_at_step:
        forwarded += ["--stop-at-step", str(args.stop_at_step)]
    started = time.time()
    code = run_local_nodes(forwarded, nodes=nodes, nproc_per_node=per_node,
                           max_restarts=args.max_restarts)
    if code != 0:
        _report_heartbeats(config.run.output_dir, nodes * per_node, since=started)
    return code


def _report_heartbeats(output_dir, world_size: int, since: float) -> None:
    """After a failed run, where each rank was last seen (when the ranks could not say it
    themselves, e.g. an NCCL watchdog ended them)."""
    import sys

    from hetlm.train.heartbeat import describe, read_all

    records = read_all(output_dir, world_size)
    if any(r is not None and r["time"] >= since for r in records):
        print("hetlm: last heartbeats: " + "; ".join(
            f"rank {r}: {describe(h)}" for r, h in enumerate(records)), file=sys.stderr)


def format_summary(summary: dict) -> str:
    per_rank = ", ".join(f"rank {i}: {t:,.0f}" for i, t in enumerate(summary["tokens_per_s_per_rank"]))
    return "\n".join([
        f"steps            {summary['steps']} (global batch {summary['global_batch']}, "
        f"micro-batches per rank {summary['micro_batches']}, {summary['precision']})",
        f"train loss       {summary['loss_first']:.3f} -> {summary['loss_last']:.3f}"
        if summary["loss_first"] is not None else "train loss       (no steps run)",
        f"held-out MLM     loss {summary['eval_loss']:.3f}, accuracy {summary['eval_accuracy']:.1%}",
        f"tokens/s         {summary['tokens_per_s']:,.0f} total ({per_rank})",
        f"model            {summary['model_dir']}",
    ])
