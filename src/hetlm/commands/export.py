"""``hetlm export --merge``: fold a LoRA adapter into its base model for plain transformers."""

from __future__ import annotations

import argparse

from hetlm.errors import HetlmError


def register(subparsers) -> None:
    """Add ``hetlm export``."""
    parser = subparsers.add_parser(
        "export",
        help="merge a LoRA adapter into its base model",
        description="Merge a LoRA adapter into its base model (W + scale * B A) and save a "
        "plain transformers checkpoint (safetensors, tokenizer, prompt template) "
        "that AutoModelForCausalLM, hetlm chat and hetlm serve load without peft.",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="merge the adapter into the base weights (the only export for now)",
    )
    parser.add_argument("--base", required=True, metavar="DIR", help="base model folder")
    parser.add_argument("--adapter", required=True, metavar="DIR", help="LoRA adapter folder")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder to write")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    parser.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from hetlm.quiet import no_loading_bars

    no_loading_bars()
    if not args.merge:
        raise HetlmError("say what to export: --merge (merge the adapter into the base model)")
    from transformers.utils import logging as hf_logging

    from hetlm.sft.export import merge_adapter

    hf_logging.disable_progress_bar()
    output = merge_adapter(args.base, args.adapter, args.output, overwrite=args.overwrite)
    print(
        f"Merged {args.adapter} into {args.base}: {output} (load it with "
        "AutoModelForCausalLM.from_pretrained, hetlm chat/serve --model, or, for high "
        f"throughput, vllm serve {output}: config, safetensors, tokenizer and chat template "
        "are in place)"
    )
    return 0
