"""``hetlm pretrain CONFIG.yaml``: under torchrun on each node, or ``--local-nodes N`` here."""

from __future__ import annotations

import argparse

from hetlm.commands.run_options import (
    add_run_arguments,
    apply_run_options,
    check_engine_settings,
    fix_resume_argument,
    launch_local,
    membership_lines,
    print_result,
    steps_line,
    tokens_line,
)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "pretrain",
        help="pretraining (masked LM, ELECTRA, causal LM) from scratch or continued, "
        "with per-rank micro-batches",
        description="Run under torchrun on each node (torchrun ... -m hetlm.cli pretrain "
        "CONFIG.yaml), or on one machine with --local-nodes N.",
    )
    add_run_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hetlm.config import config_help, load_config, resolved_help
    from hetlm.errors import HetlmError

    fix_resume_argument(args)
    if args.help_config:
        print(config_help())
        if args.config:
            print("\n" + resolved_help(load_config(args.config)))
        return 0
    if not args.config:
        raise HetlmError("give a config file: hetlm pretrain CONFIG.yaml (see --help-config)")
    config = load_config(args.config)
    apply_run_options(args, config)
    if args.local_nodes:
        return launch_local("pretrain", args, config, lambda: precheck(config, args))
    from hetlm.train.pretrain import run_pretraining

    summary = run_pretraining(
        config,
        resume=args.resume,
        overwrite=args.overwrite,
        extend=args.extend,
        stop_at_step=args.stop_at_step,
    )
    print_result(summary, args, format_summary)
    return 0


def precheck(config, args: argparse.Namespace) -> None:
    """What every rank would refuse, reported once before any agent starts: a missing dataset,
    an engine that cannot run the requested ZeRO stage, options the engine would ignore."""
    from hetlm.data.packed import load_packed_dataset

    load_packed_dataset(config.data.dataset)
    check_engine_settings(config, args)


def format_summary(summary: dict) -> str:
    if "eval_perplexity" in summary:
        held_out = (
            f"held-out LM      loss {summary['eval_loss']:.3f}, perplexity "
            f"{summary['eval_perplexity']:.1f}, next-token accuracy "
            f"{summary['eval_accuracy']:.1%}"
        )
    else:
        held_out = (
            f"held-out MLM     loss {summary['eval_loss']:.3f}, accuracy "
            f"{summary['eval_accuracy']:.1%}"
        )
    return "\n".join(
        [
            steps_line(summary),
            f"train loss       {summary['loss_first']:.3f} -> {summary['loss_last']:.3f}"
            if summary["loss_first"] is not None
            else "train loss       (no steps run)",
            held_out,
            tokens_line(summary),
            *membership_lines(summary),
            f"model            {summary['model_dir']}",
        ]
    )
