"""``hetlm demo``: the whole path on the shipped corpus, on this machine, in minutes.

``hetlm demo`` alone is the pretraining demo below; ``hetlm demo <name>`` runs one of the other
demos, each a module ``hetlm.commands.demo_<name>`` with ``register_demo(subparsers)`` (listed
in ``OTHER_DEMOS``).

Tokenizer → packed dataset → small BERT pretrained on two emulated nodes with different
micro-batch sizes (8 and 4) → held-out MLM metrics and a fill-mask example through the saved
model, loaded by plain ``transformers``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

DEFAULT_CORPUS = "general_aozora/aozora_soseki_akutagawa.jsonl"
OTHER_DEMOS: list[str] = ["domain", "sft"]  # "domain" -> hetlm.commands.demo_domain
FILL_MASK_EXAMPLES = ["吾輩は[MASK]である。", "彼は東京の[MASK]に住んでいた。"]


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="the end-to-end demo on the shipped Japanese corpus")
    p.add_argument("--workdir", default="runs/demo", help="where everything is written")
    p.add_argument("--corpus", default=None, help=f"default: data/{DEFAULT_CORPUS}")
    p.add_argument("--steps", type=int, default=500, help="optimizer steps")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--preset", default="small", help="model preset (tiny|small|base|large)")
    p.add_argument("--micro-batches", default="8,4", help="micro-batch of each emulated node")
    p.add_argument("--precision", default="auto", help="auto|fp32|bf16")
    p.set_defaults(func=run)
    if OTHER_DEMOS:
        import importlib

        demos = p.add_subparsers(dest="demo", metavar="{" + ",".join(OTHER_DEMOS) + "}",
                                 help="another demo (default: the pretraining demo)")
        for name in OTHER_DEMOS:
            importlib.import_module(f"hetlm.commands.demo_{name}").register_demo(demos)


def find_data_dir() -> Path:
    """The project's data/ folder: next to the checkout (editable install) or the cwd."""
    from hetlm.errors import HetlmError

    for base in (Path.cwd(), *Path(__file__).resolve().parents):
        if (base / "data" / DEFAULT_CORPUS).is_file():
            return base / "data"
    raise HetlmError("cannot find the shipped corpus data/" + DEFAULT_CORPUS + ": run the demo "
                     "from the hetlm checkout or pass --corpus")


def run(args: argparse.Namespace) -> int:
    from hetlm.commands.pretrain import format_summary
    from hetlm.data.packing import prepare_dataset
    from hetlm.data.tokenizer import train_tokenizer

    work = Path(args.workdir)
    corpus = Path(args.corpus) if args.corpus else find_data_dir() / DEFAULT_CORPUS
    micro = [int(m) for m in args.micro_batches.split(",")]
    timings: dict[str, float] = {}

    print(f"[1/4] tokenizer: SentencePiece Unigram, vocab {args.vocab_size}, on {corpus}")
    started = time.perf_counter()
    tokenizer_dir = train_tokenizer([corpus], work / "tokenizer", vocab_size=args.vocab_size)
    timings["tokenizer"] = time.perf_counter() - started

    print(f"[2/4] packing into {args.seq_len}-token sequences")
    started = time.perf_counter()
    summary = prepare_dataset([corpus], tokenizer_dir, work / "data", seq_len=args.seq_len,
                              validation_fraction=0.05, overwrite=True)
    print(summary.summary())
    timings["prepare"] = time.perf_counter() - started

    config = {
        "run": {"output_dir": str(work / "run"), "seed": 0},
        "data": {"dataset": str(work / "data")},
        "model": {"type": "bert", "preset": args.preset},
        "train": {"global_batch": sum(micro), "micro_batch": {"per_node": micro},
                  "max_steps": args.steps, "learning_rate": 1e-3,
                  "warmup_steps": max(1, args.steps // 10), "precision": args.precision,
                  "save_steps": max(1, args.steps // 2), "eval_steps": max(1, args.steps // 4),
                  "max_eval_samples": 256, "logging_steps": 10},
    }
    config_path = work / "pretrain.yaml"
    print(f"[3/4] pretraining BERT-{args.preset} on {len(micro)} emulated nodes, micro-batches "
          f"{micro} (config: {config_path})")
    started = time.perf_counter()
    run_summary = run_demo_step("pretrain", config, config_path, nodes=len(micro),
                                what="pretraining")
    timings["pretrain"] = time.perf_counter() - started

    print("[4/4] fill-mask through the saved model (plain transformers pipeline)")
    examples = fill_mask_examples(run_summary["model_dir"])
    print()
    print("=" * 72)
    print(format_summary(run_summary))
    for text, predictions in examples:
        print(f"fill-mask        {text} -> " + ", ".join(f"{t} ({s:.2f})" for t, s in predictions))
    print("time             " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    print(f"metrics          {work / 'run' / 'metrics.jsonl'} (plot: {work / 'run' / 'loss.png'}; "
          f"tensorboard --logdir {work / 'run' / 'tensorboard'})")
    print("=" * 72)
    return 0


def run_demo_step(command: str, config: dict, config_path: Path, *, nodes: int,
                  what: str) -> dict:
    """Write ``config`` to ``config_path``, empty its ``run.output_dir``, run ``hetlm <command>``
    on ``nodes`` emulated nodes and return the run's ``summary.json``."""
    import shutil

    import yaml

    from hetlm.errors import HetlmError
    from hetlm.launch import run_local_nodes

    config_path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    output_dir = Path(config["run"]["output_dir"])
    shutil.rmtree(output_dir, ignore_errors=True)
    code = run_local_nodes([command, str(config_path), "--quiet"], nodes=nodes)
    if code != 0:
        raise HetlmError(f"{what} failed (exit code {code}); see the messages above")
    return json.loads((output_dir / "summary.json").read_text())


def fill_mask_examples(model_dir: str) -> list[tuple[str, list[tuple[str, float]]]]:
    from transformers import pipeline
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    fill = pipeline("fill-mask", model=model_dir, tokenizer=model_dir, device="cpu")
    out = []
    for text in FILL_MASK_EXAMPLES:
        predictions = fill(text, top_k=5)
        out.append((text, [(p["token_str"], float(p["score"])) for p in predictions]))
    return out
