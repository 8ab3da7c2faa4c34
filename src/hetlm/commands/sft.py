"""``hetlm sft CONFIG.yaml``: LoRA instruction tuning, under torchrun or ``--local-nodes N``."""

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
        "sft",
        help="LoRA instruction tuning (response-only loss) with per-rank micro-batches",
        description="Run under torchrun on each node (torchrun ... -m hetlm.cli sft "
        "CONFIG.yaml), or on one machine with --local-nodes N. Writes a peft "
        "adapter to <run.output_dir>/adapter (docs/SFT.md).",
    )
    add_run_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hetlm.config import resolved_help
    from hetlm.errors import HetlmError
    from hetlm.sft.config import load_sft_config, sft_config_help

    fix_resume_argument(args)
    if args.help_config:
        print(sft_config_help())
        if args.config:
            print("\n" + resolved_help(load_sft_config(args.config)))
        return 0
    if not args.config:
        raise HetlmError("give a config file: hetlm sft CONFIG.yaml (see --help-config)")
    config = load_sft_config(args.config)
    apply_run_options(args, config)
    if args.local_nodes:
        from hetlm.sft.train import check_base_model, check_quantization

        def precheck() -> None:
            """As pretraining's: what every rank would refuse, before any agent starts."""
            check_quantization(config.model.quantization)
            check_base_model(config.model, config.data.max_length)
            check_engine_settings(config, args)

        return launch_local("sft", args, config, precheck)
    from hetlm.sft.train import run_sft

    summary = run_sft(
        config,
        resume=args.resume,
        overwrite=args.overwrite,
        extend=args.extend,
        stop_at_step=args.stop_at_step,
    )
    print_result(summary, args, format_summary)
    return 0


def format_summary(summary: dict) -> str:
    held_out = (
        f"loss {summary['eval_loss']:.3f}, perplexity {summary['eval_perplexity']:.1f}, "
        f"next-token accuracy {summary['eval_accuracy']:.1%} "
        f"({summary['eval_tokens']:,} response tokens)"
        if "eval_loss" in summary
        else "(no validation examples)"
    )
    return "\n".join(
        [
            steps_line(summary),
            f"examples         {summary['train_examples']:,} train, "
            f"{summary['validation_examples']:,} validation; "
            f"{summary['response_tokens']:,} response tokens",
            f"train loss       {summary['loss_first']:.3f} -> {summary['loss_last']:.3f} "
            "(response tokens only)"
            if summary["loss_first"] is not None
            else "train loss       (no steps run)",
            f"held-out         {held_out}",
            tokens_line(summary),
            *membership_lines(summary),
            f"adapter          {summary['adapter_dir']} (base {summary['base_model']})",
        ]
    )
