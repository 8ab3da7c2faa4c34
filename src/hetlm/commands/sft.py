"""``hetlm sft CONFIG.yaml``: LoRA instruction tuning, under torchrun or ``--local-nodes N``."""

from __future__ import annotations

import argparse
import os
import time


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "sft", help="LoRA instruction tuning (response-only loss) with per-rank micro-batches",
        description="Run under torchrun on each node (torchrun ... -m hetlm.cli sft "
                    "CONFIG.yaml), or on one machine with --local-nodes N. Writes a peft "
                    "adapter to <run.output_dir>/adapter (docs/SFT.md).")
    p.add_argument("config", nargs="?", help="run configuration (YAML)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest complete checkpoint in run.output_dir")
    p.add_argument("--stop-at-step", type=int, default=None, metavar="N",
                   help="checkpoint and stop at step N; continue later with --resume")
    p.add_argument("--local-nodes", type=int, default=0, metavar="N",
                   help="emulate N nodes on this machine (N torchrun agents on 127.0.0.1, gloo)")
    p.add_argument("--nproc-per-node", type=int, default=1, metavar="K",
                   help="ranks per emulated node (with --local-nodes)")
    p.add_argument("--max-restarts", type=int, default=0, metavar="K",
                   help="(with --local-nodes) restart the whole job up to K times after a rank "
                        "fails; it resumes from the latest good checkpoint (docs/FAULTS.md)")
    p.add_argument("--plan", default=None, metavar="PLAN.yaml",
                   help="a plan from `hetlm plan` (overrides train.plan)")
    p.add_argument("--quiet", action="store_true", help="do not print the summary at the end")
    p.add_argument("--help-config", action="store_true", help="list every config key and exit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hetlm.errors import HetlmError
    from hetlm.sft.config import load_sft_config, sft_config_help

    if args.help_config:
        print(sft_config_help())
        return 0
    if not args.config:
        raise HetlmError("give a config file: hetlm sft CONFIG.yaml (see --help-config)")
    config = load_sft_config(args.config)
    if args.plan:
        config.train.plan = args.plan
    if args.local_nodes:
        return _launch_local(args, config)
    from hetlm.sft.train import run_sft

    summary = run_sft(config, resume=args.resume, stop_at_step=args.stop_at_step)
    if int(os.environ.get("RANK", "0")) == 0 and not args.quiet:
        if "stopped_at" in summary:
            print(f"stopped at step {summary['stopped_at']}; checkpoint "
                  f"{summary['last_checkpoint']}; continue with --resume")
        else:
            print(format_summary(summary))
    return 0


def _launch_local(args: argparse.Namespace, config) -> int:
    """Check what can be checked before starting N agents, then start them."""
    from hetlm.errors import HetlmError
    from hetlm.launch import run_local_nodes
    from hetlm.sft.train import check_quantization

    if args.local_nodes < 1 or args.nproc_per_node < 1:
        raise HetlmError("--local-nodes and --nproc-per-node must be >= 1")
    if args.max_restarts < 0:
        raise HetlmError("--max-restarts must be >= 0")
    nodes, per_node = args.local_nodes, args.nproc_per_node
    node_of_rank = [r // per_node for r in range(nodes * per_node)]
    config.batch_split(nodes * per_node, node_of_rank)  # topology errors before any launch
    check_quantization(config.model.quantization)
    forwarded = ["sft", args.config] + (["--resume"] if args.resume else [])
    forwarded += ["--quiet"] if args.quiet else []
    forwarded += ["--plan", args.plan] if args.plan else []
    if args.stop_at_step:
        forwarded += ["--stop-at-step", str(args.stop_at_step)]
    started = time.time()
    code = run_local_nodes(forwarded, nodes=nodes, nproc_per_node=per_node,
                           max_restarts=args.max_restarts)
    if code != 0:
        from hetlm.commands.pretrain import _report_heartbeats

        _report_heartbeats(config.run.output_dir, nodes * per_node, since=started)
    return code


def format_summary(summary: dict) -> str:
    per_rank = ", ".join(f"rank {i}: {t:,.0f}"
                         for i, t in enumerate(summary["tokens_per_s_per_rank"]))
    held_out = (f"loss {summary['eval_loss']:.3f}, perplexity {summary['eval_perplexity']:.1f}, "
                f"next-token accuracy {summary['eval_accuracy']:.1%} "
                f"({summary['eval_tokens']:,} response tokens)"
                if "eval_loss" in summary else "(no validation examples)")
    return "\n".join([
        f"steps            {summary['steps']} (global batch {summary['global_batch']}, "
        f"micro-batches per rank {summary['micro_batches']}, {summary['precision']})",
        f"examples         {summary['train_examples']:,} train, "
        f"{summary['validation_examples']:,} validation; "
        f"{summary['response_tokens']:,} response tokens",
        f"train loss       {summary['loss_first']:.3f} -> {summary['loss_last']:.3f} "
        "(response tokens only)"
        if summary["loss_first"] is not None else "train loss       (no steps run)",
        f"held-out         {held_out}",
        f"tokens/s         {summary['tokens_per_s']:,.0f} total ({per_rank})",
        f"adapter          {summary['adapter_dir']} (base {summary['base_model']})",
    ])
