"""``hetlm serve``: an OpenAI-compatible chat completions API for a trained model."""

from __future__ import annotations

import argparse

from hetlm.commands.chat import add_listen_arguments, add_model_arguments, load_engine


def register(subparsers) -> None:
    """Add ``hetlm serve``."""
    parser = subparsers.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve a causal LM (a folder or a hub name, optionally with a LoRA "
        "adapter) as GET /health, GET /v1/models, POST /v1/chat/completions and "
        "POST /v1/completions (streaming or not), so the official openai client and "
        "tools built on it can use it. Concurrent requests are generated together "
        "in batches of up to --max-batch; up to --max-queue more wait, beyond that "
        "a request gets HTTP 503. --temperature, --top-p and --max-new-tokens are "
        "the defaults for requests that omit them.",
    )
    add_model_arguments(parser)
    add_listen_arguments(parser, port=8000)
    parser.add_argument(
        "--model-name",
        metavar="NAME",
        help="model id clients send (default: the adapter or model folder name)",
    )
    parser.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from hetlm.serve.openai_api import serve_forever

    engine, settings = load_engine(args)
    name = args.model_name or engine.name
    print(
        f"hetlm serve: model '{name}' (template {engine.template.name}) at "
        f"http://{args.host}:{args.port}/v1 (batches of up to {args.max_batch}, "
        f"{args.max_queue} more may wait)",
        flush=True,
    )
    try:
        serve_forever(engine, host=args.host, port=args.port, model_name=name, defaults=settings)
    finally:
        engine.close()
    return 0
