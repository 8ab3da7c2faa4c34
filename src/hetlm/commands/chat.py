"""``hetlm chat``: talk to a trained model in the browser (gradio) or the terminal (``--cli``)."""

from __future__ import annotations

import argparse


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by ``hetlm chat`` and ``hetlm serve``: which model, how to load it."""
    parser.add_argument(
        "--model",
        required=True,
        metavar="DIR|NAME",
        help="causal LM: a folder (save_pretrained, with its tokenizer) or a hub "
        "name (resolved like from_pretrained: the HF_HOME cache first, "
        "offline with HF_HUB_OFFLINE=1)",
    )
    parser.add_argument(
        "--adapter",
        metavar="DIR",
        help="LoRA adapter folder (peft save_pretrained) to apply on --model",
    )
    quant = parser.add_mutually_exclusive_group()
    quant.add_argument(
        "--load-in-8bit",
        action="store_true",
        help="quantize the weights to 8 bits (needs hetlm[quant])",
    )
    quant.add_argument(
        "--load-in-4bit",
        action="store_true",
        help="quantize the weights to 4 bits (needs hetlm[quant])",
    )
    parser.add_argument(
        "--template",
        metavar="NAME|FILE",
        help="prompt template: auto, chat, ja-alpaca, ja-chat or a JSON file "
        "(default: the one recorded at training, else auto)",
    )
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.7,
        help="sampling temperature, 0 for greedy (default 0.7)",
    )
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling (default 0.9)")
    parser.add_argument(
        "--max-new-tokens", type=int, default=256, help="longest reply in tokens (default 256)"
    )
    parser.add_argument(
        "--max-batch",
        type=int,
        default=8,
        help="most requests generated together in one batch (default 8; 1: one at a time)",
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=64,
        help="most requests waiting for a batch; more are refused (serve: HTTP 503) (default 64)",
    )
    parser.add_argument(
        "--batch-wait-ms",
        type=float,
        default=10.0,
        help="how long the first waiting request waits for others to join its "
        "batch (default 10 ms)",
    )


def add_listen_arguments(parser: argparse.ArgumentParser, port: int) -> None:
    """--host (this machine only by default) and --port, for ``hetlm chat`` and ``hetlm serve``."""
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only)",
    )
    parser.add_argument("--port", type=int, default=port)


def load_engine(args: argparse.Namespace):
    """The ChatEngine and default GenerationSettings the options describe."""
    from hetlm.quiet import no_loading_bars

    no_loading_bars()
    from transformers.utils import logging as hf_logging

    from hetlm.serve.generation import GenerationSettings, load_chat_model

    hf_logging.disable_progress_bar()  # weight-loading bars would mix with the chat
    settings = GenerationSettings(args.temperature, args.top_p, args.max_new_tokens)
    engine = load_chat_model(
        args.model,
        args.adapter,
        load_in_8bit=args.load_in_8bit,
        load_in_4bit=args.load_in_4bit,
        template=args.template,
        device=args.device,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        batch_wait=args.batch_wait_ms / 1000,
    )
    return engine, settings


def register(subparsers) -> None:
    """Add ``hetlm chat``."""
    parser = subparsers.add_parser(
        "chat",
        help="chat with a trained model (web UI, or --cli in the terminal)",
        description="Chat with a causal LM (optionally with a LoRA adapter) in a local gradio "
        "web page that streams the replies, or in the terminal with --cli. The "
        "conversation is formatted with the prompt template used in training.",
    )
    add_model_arguments(parser)
    add_listen_arguments(parser, port=7860)
    parser.add_argument(
        "--share", action="store_true", help="also make a public gradio share link (off by default)"
    )
    parser.add_argument(
        "--cli",
        action="store_true",
        help="chat in the terminal: one line per message, /exit to quit",
    )
    parser.add_argument("--system", help="system prompt (default: the template's own)")
    parser.set_defaults(func=run_chat)


def run_chat(args: argparse.Namespace) -> int:
    engine, settings = load_engine(args)
    try:
        if args.cli:
            from hetlm.serve.terminal import run_terminal_chat

            run_terminal_chat(engine, settings, system=args.system)
            return 0
        from hetlm.serve.chat_ui import launch_chat_ui

        print(
            f"hetlm chat: {engine.name} (template {engine.template.name}) on "
            f"http://{args.host}:{args.port}/ (Ctrl-C to stop)",
            flush=True,
        )
        launch_chat_ui(engine, host=args.host, port=args.port, share=args.share, defaults=settings)
        return 0
    finally:
        engine.close()
