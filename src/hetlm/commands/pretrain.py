"""``hetlm pretrain CONFIG.yaml``: under torchrun on each node, or ``--local-nodes N`` here."""

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
        "pretrain",
        help="pretraining (masked LM, ELECTRA, causal LM) from scratch or continued, "
        "with per-rank micro-batches",
        description="Run under torchrun on each node (torchrun ... -m hetlm.cli pretrain "
        "CONFIG.yaml), or on one machine with --local-nodes N.",
    )
    add_run_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return run_training_command(PRETRAIN, args)


def config_help() -> str:
    from hetlm.config import config_help

    return config_help()


def load_config(path: str):
    from hetlm.config import load_config

    return load_config(path)


def precheck(config, args: argparse.Namespace) -> None:
    """What every rank would refuse, reported once before any agent starts: a missing dataset,
    an engine that cannot run the requested ZeRO stage, options the engine would ignore."""
    from hetlm.data.packed import load_packed_dataset

    load_packed_dataset(config.data.dataset)
    check_engine_settings(config, args)


def train(config, **options) -> dict:
    from hetlm.train.pretrain import run_pretraining

    return run_pretraining(config, **options)


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


PRETRAIN = TrainingCommand("pretrain", config_help, load_config, precheck, train, format_summary)
