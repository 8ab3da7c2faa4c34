"""Command-line front: parses arguments and calls library functions.

Each sub-command lives in ``hetlm.commands.<name>`` and exposes ``register(subparsers)``, which
adds its parser and sets ``func``. Heavy imports (torch, transformers) happen inside the command
functions so ``hetlm --help`` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings

from hetlm import __version__, quiet
from hetlm.errors import HetlmError, HetlmWarning

COMMAND_MODULES = [
    "hetlm.commands.tokenizer",
    "hetlm.commands.prepare",
    "hetlm.commands.stage",
    "hetlm.commands.pretrain",
    "hetlm.commands.sft",
    "hetlm.commands.plan",
    "hetlm.commands.demo",
    "hetlm.commands.probe",
    "hetlm.commands.bench",
    "hetlm.commands.eval",
    "hetlm.commands.chat",
    "hetlm.commands.serve",
    "hetlm.commands.export",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hetlm",
        description="Train Japanese language models on mixed GPUs with per-rank micro-batches.",
    )
    parser.add_argument("--version", action="version", version=f"hetlm {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


_default_formatwarning = warnings.formatwarning


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """hetlm's own warnings as one line for the user; others as Python prints them."""
    if issubclass(category, HetlmWarning):
        return f"hetlm: warning: {message}\n"
    return _default_formatwarning(message, category, filename, lineno, line)


def main(argv: list[str] | None = None) -> int:
    # Library progress bars (dataset saving, weight loading) drown hetlm's own output.
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    quiet.install()  # third-party noise every command would print (hetlm/quiet.py)
    warnings.formatwarning = _format_warning
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except HetlmError as exc:
        rank = os.environ.get("RANK")
        where = (
            f" (rank {rank})"
            if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1"
            else ""
        )
        print(f"hetlm: error{where}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("hetlm: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
