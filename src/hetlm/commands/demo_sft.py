"""``hetlm demo sft``: pretrain a small LLaMA, LoRA-tune it on dolly-ja, merge it, ask it.

Tokenizer (SentencePiece, trained by hetlm on the Aozora corpus plus the instruction texts, so
modern Japanese has pieces too) -> a small LLaMA built from config and pretrained by ``hetlm
pretrain`` on the Aozora corpus -> ``hetlm sft`` on the shipped databricks-dolly-ja sample, on
two emulated nodes with different micro-batches (response-only loss, ja-alpaca template) ->
``hetlm export --merge`` -> one answer through the merged model -> how to open the chat.

A few minutes on a laptop CPU: the model is small and briefly trained, so its answers are
Japanese-shaped rather than right. The point is the path, which is the one a real base model
(``model.init_from: your/llama``) takes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

DOLLY = "instruct_dolly_ja/databricks-dolly-15k-ja_v0_every3rd.jsonl"
PROMPT = "日本の首都はどこですか？"
FULL = {
    "preset": "small",
    "vocab_size": 8000,
    "seq_len": 128,
    "pretrain_steps": 200,
    "sft_steps": 60,
    "max_length": 256,
    "examples": None,
}
QUICK = {
    "preset": "tiny",
    "vocab_size": 4000,
    "seq_len": 64,
    "pretrain_steps": 10,
    "sft_steps": 4,
    "max_length": 128,
    "examples": 200,
}


def register_demo(subparsers) -> None:
    """Add ``hetlm demo sft``."""
    p = subparsers.add_parser(
        "sft",
        help="LoRA instruction tuning: pretrain a small LLaMA, tune it on dolly-ja, chat",
        description="Pretrain a small LLaMA on the shipped Aozora corpus, LoRA-tune it on the "
        "shipped databricks-dolly-ja sample on two emulated nodes with different "
        "micro-batches, merge the adapter and answer a prompt. See docs/SFT.md.",
    )
    p.add_argument("--workdir", default="runs/demo-sft", help="where everything is written")
    p.add_argument(
        "--quick",
        action="store_true",
        help="a tiny version in well under a minute: checks the path, not the result",
    )
    p.add_argument("--preset", default=None, help=f"llama preset (default {FULL['preset']})")
    p.add_argument(
        "--pretrain-steps",
        type=int,
        default=None,
        help=f"pretraining steps (default {FULL['pretrain_steps']})",
    )
    p.add_argument(
        "--sft-steps",
        type=int,
        default=None,
        help=f"instruction-tuning steps (default {FULL['sft_steps']})",
    )
    p.add_argument("--micro-batches", default="8,4", help="micro-batch of each emulated node")
    p.add_argument("--precision", default="auto", help="auto|fp32|bf16")
    p.add_argument("--prompt", default=PROMPT, help="the question asked at the end")
    p.set_defaults(func=run)


def _settings(args: argparse.Namespace) -> dict:
    settings = dict(QUICK if args.quick else FULL)
    for key in ("preset", "pretrain_steps", "sft_steps"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    return settings


def _write_instruction_texts(source: Path, target: Path, limit: int | None) -> Path:
    """The instruction rows (at most ``limit``), and their text as a corpus for the tokenizer."""
    rows = []
    with source.open(encoding="utf-8") as f:
        for line in f:
            rows.append(json.loads(line))
            if limit is not None and len(rows) >= limit:
                break
    target.mkdir(parents=True, exist_ok=True)
    (target / "instructions.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
    )
    texts = (
        "\n".join(str(r.get(k) or "") for k in ("instruction", "input", "output")) for r in rows
    )
    (target / "texts.jsonl").write_text(
        "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8"
    )
    return target


def run(args: argparse.Namespace) -> int:
    from hetlm.quiet import no_loading_bars

    no_loading_bars()
    from transformers.utils import logging as hf_logging

    from hetlm.commands.demo import DEFAULT_CORPUS, find_data_dir, run_demo_step
    from hetlm.commands.sft import format_summary
    from hetlm.data.prepare.pipeline import prepare_dataset
    from hetlm.data.prepare.tokenizer_training import train_tokenizer

    hf_logging.disable_progress_bar()
    s = _settings(args)
    work = Path(args.workdir)
    data_dir = find_data_dir()
    corpus = data_dir / DEFAULT_CORPUS
    micro = [int(m) for m in args.micro_batches.split(",")]
    timings: dict[str, float] = {}
    instructions = _write_instruction_texts(data_dir / DOLLY, work / "instructions", s["examples"])

    print(
        f"[1/6] tokenizer: SentencePiece Unigram, vocab {s['vocab_size']}, on {corpus.name} "
        "and the instruction texts"
    )
    started = time.perf_counter()
    tokenizer_dir = train_tokenizer(
        [corpus, instructions / "texts.jsonl"],
        work / "tokenizer",
        vocab_size=s["vocab_size"],
        input_sentence_size=20_000 if args.quick else 1_000_000,
    )
    timings["tokenizer"] = time.perf_counter() - started

    print(f"[2/6] packing {corpus.name} into {s['seq_len']}-token sequences")
    started = time.perf_counter()
    summary = prepare_dataset(
        [corpus],
        tokenizer_dir,
        work / "data",
        seq_len=s["seq_len"],
        validation_fraction=0.02,
        overwrite=True,
    )
    print(summary.summary())
    timings["prepare"] = time.perf_counter() - started

    pretrain = {
        "run": {"output_dir": str(work / "pretrain"), "seed": 0},
        "data": {"dataset": str(work / "data")},
        "model": {"type": "llama", "preset": s["preset"]},
        "train": {
            "global_batch": 16,
            "micro_batch": 16,
            "max_steps": s["pretrain_steps"],
            "learning_rate": 1e-3,
            "warmup_steps": max(1, s["pretrain_steps"] // 10),
            "precision": args.precision,
            "max_eval_samples": 64,
            "logging_steps": 25,
        },
    }
    pretrain_path = work / "pretrain.yaml"
    print(
        f"[3/6] pretraining LLaMA-{s['preset']} for {s['pretrain_steps']} steps "
        f"(hetlm pretrain {pretrain_path})"
    )
    started = time.perf_counter()
    base_summary = run_demo_step("pretrain", pretrain, pretrain_path, nodes=1, what="pretraining")
    print(
        f"      held-out next-token loss {base_summary['eval_loss']:.3f} "
        f"(perplexity {base_summary['eval_perplexity']:.0f})"
    )
    timings["pretrain"] = time.perf_counter() - started

    sft = {
        "run": {"output_dir": str(work / "sft"), "seed": 0},
        "model": {"init_from": base_summary["model_dir"]},
        "data": {
            "dataset": str(instructions / "instructions.jsonl"),
            "template": "ja-alpaca",
            "max_length": s["max_length"],
            "validation_fraction": 0.02,
        },
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05},
        "train": {
            "global_batch": sum(micro),
            "micro_batch": {"per_node": micro},
            "max_steps": s["sft_steps"],
            "learning_rate": 1e-3,
            "warmup_steps": max(1, s["sft_steps"] // 10),
            "precision": args.precision,
            "save_steps": max(1, s["sft_steps"] // 2),
            "max_eval_samples": 64,
            "logging_steps": 10,
        },
    }
    sft_path = work / "sft.yaml"
    print(
        f"[4/6] LoRA instruction tuning on dolly-ja, {len(micro)} emulated nodes with "
        f"micro-batches {micro} (hetlm sft {sft_path} --local-nodes {len(micro)})"
    )
    started = time.perf_counter()
    run_summary = run_demo_step("sft", sft, sft_path, nodes=len(micro), what="instruction tuning")
    timings["sft"] = time.perf_counter() - started

    print("[5/6] merging the adapter into the base (hetlm export --merge)")
    from hetlm.sft.export import merge_adapter

    merged = merge_adapter(
        base_summary["model_dir"], run_summary["adapter_dir"], work / "merged", overwrite=True
    )

    print(f"[6/6] asking the merged model: {args.prompt}")
    answer = ask(merged, args.prompt)
    print()
    print("=" * 72)
    print(format_summary(run_summary))
    print(f"merged model     {merged}")
    print(f"question         {args.prompt}")
    print(f"answer           {answer}")
    print(
        "                 (greedy, >= 8 tokens, no repeated bigrams: a model this small and "
        "briefly trained answers in Japanese-shaped fragments; the path is the point)"
    )
    print("time             " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    print(
        "chat             hetlm chat --model "
        + base_summary["model_dir"]
        + f" --adapter {run_summary['adapter_dir']}"
    )
    print(f"                 hetlm chat --model {merged} --cli   (terminal)")
    print("=" * 72)
    return 0


def ask(model_dir: str | Path, prompt: str, max_new_tokens: int = 48) -> str:
    """Greedy, through the chat engine's prompt (the training template, token for token); at
    least a few tokens, a repetition penalty and no repeated bigrams, since a model this small
    and briefly trained would otherwise stop at once or loop."""
    import torch

    from hetlm.chat.messages import Message
    from hetlm.serve.generation import load_chat_model

    engine = load_chat_model(model_dir, device="cpu")
    ids = torch.tensor([engine.encode([Message("user", prompt)])])
    with torch.no_grad():
        out = engine.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            min_new_tokens=8,
            repetition_penalty=1.3,
            no_repeat_ngram_size=2,
            eos_token_id=engine.eos_token_ids,
            pad_token_id=engine.pad_token_id,
        )
    text = engine.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    return " ".join(text.split()) or "(an empty reply)"
