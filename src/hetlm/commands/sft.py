"""``hetlm sft CONFIG.yaml``: LoRA instruction tuning, under torchrun or ``--local-nodes N``."""

from __future__ import annotations

import argparse

from hetlm.commands.run_options import (
    TrainingCommand,
    add_run_arguments,
    check_engine_settings,
    membership_lines,
    run_training_command,
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
    return run_training_command(SFT, args)


def config_help() -> str:
    from hetlm.sft.config import sft_config_help

    return sft_config_help()


def load_config(path: str):
    from hetlm.sft.config import load_sft_config

    return load_sft_config(path)


def precheck(config, args: argparse.Namespace) -> None:
    """As pretraining's: what every rank would refuse, before any agent starts (a quantized
    base without bitsandbytes or CUDA, a base model that cannot hold max_length, ...)."""
    from hetlm.sft.train import check_base_model, check_quantization

    check_quantization(config.model.quantization)
    check_base_model(config.model, config.data.max_length)
    check_engine_settings(config, args)


def train(config, **options) -> dict:
    from hetlm.sft.train import run_sft

    return run_sft(config, **options)


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


SFT = TrainingCommand("sft", config_help, load_config, precheck, train, format_summary)
