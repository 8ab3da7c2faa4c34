"""hetlm vs the Hugging Face Trainer (run_mlm recipe) on the same BERT, data, batch and steps.

Both train ``BertForMaskedLM`` of the same config on the same packed sequences (the shipped
Aozora corpus, SentencePiece vocab 8000, seq 128), global batch 16, the same optimizer settings
and number of steps, in fp32 and in bf16, on this machine. The runs alternate (Trainer, hetlm,
Trainer, hetlm, ...) in fresh subprocesses, so drift of the machine hits both alike and the peak
RSS of each is its own. Throughput is measured over the steps after a warm-up.

    python benchmarks/bench_vs_hf_trainer.py [--steps 40] [--repeats 2] [--preset small]

Writes benchmarks/results/hf_trainer_mlm.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data" / "general_aozora" / "aozora_soseki_akutagawa.jsonl"
RESULTS = ROOT / "benchmarks" / "results"
WARMUP_STEPS = 5
HPARAMS = {
    "lr": 5e-4,
    "warmup_steps": 5,
    "weight_decay": 0.01,
    "adam_eps": 1e-6,
    "max_grad_norm": 1.0,
}


def prepare(cache: Path, seq_len: int, vocab_size: int, corpus: Path = CORPUS) -> Path:
    """The tokenizer and the packed dataset, built once per cache folder (``corpus``: the
    shipped Aozora corpus, or a smaller file for quick checks)."""
    from hetlm.data.prepare.pipeline import prepare_dataset
    from hetlm.data.prepare.tokenizer_training import train_tokenizer

    data = cache / f"data-v{vocab_size}-s{seq_len}"
    if not (data / "hetlm_dataset.json").is_file():
        tokenizer = cache / f"tokenizer-v{vocab_size}"
        if not (tokenizer / "tokenizer.json").is_file():
            train_tokenizer([corpus], tokenizer, vocab_size=vocab_size)
        prepare_dataset([corpus], tokenizer, data, seq_len=seq_len, overwrite=True)
    return data


# ------------------------------------------------------------------ one run (in a subprocess)


def run_trainer(args: argparse.Namespace) -> dict:
    import torch
    from hf_reference import reference_arguments, step_clock
    from transformers import (
        AutoTokenizer,
        BertForMaskedLM,
        DataCollatorForLanguageModeling,
        Trainer,
    )

    from hetlm.data.packed import load_packed_dataset
    from hetlm.models.presets import bert_config

    dataset, meta = load_packed_dataset(args.data)
    tokenizer = AutoTokenizer.from_pretrained(meta["tokenizer_dir"])
    train = dataset["train"]
    config = bert_config(
        args.preset, vocab_size=meta["vocab_size"], pad_token_id=meta["special_token_ids"]["pad"]
    )
    torch.manual_seed(0)
    model = BertForMaskedLM(config)
    clock = step_clock()
    training_args = reference_arguments(
        output_dir=args.workdir,
        batch=args.batch,
        steps=args.steps,
        lr=HPARAMS["lr"],
        warmup_steps=HPARAMS["warmup_steps"],
        weight_decay=HPARAMS["weight_decay"],
        adam_eps=HPARAMS["adam_eps"],
        max_grad_norm=HPARAMS["max_grad_norm"],
        precision=args.precision,
        device=args.device,
    )
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train,
        data_collator=collator,
        callbacks=[clock],
    )
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    times = clock.step_times(skip=args.warmup - 1)
    return {"losses": losses, "step_times": times}


def run_hetlm(args: argparse.Namespace) -> dict:
    from hetlm.config import parse_config
    from hetlm.train.metrics import read_metrics
    from hetlm.train.pretrain import run_pretraining

    config = parse_config(
        {
            "run": {"output_dir": args.workdir, "seed": 0},
            "data": {"dataset": args.data},
            "model": {"type": "bert", "preset": args.preset},
            "train": {
                "global_batch": args.batch,
                "micro_batch": args.batch,
                "max_steps": args.steps,
                "learning_rate": HPARAMS["lr"],
                "warmup_steps": HPARAMS["warmup_steps"],
                "lr_scheduler_type": "linear",
                "weight_decay": HPARAMS["weight_decay"],
                "adam_beta1": 0.9,
                "adam_beta2": 0.999,
                "adam_epsilon": HPARAMS["adam_eps"],
                "max_grad_norm": HPARAMS["max_grad_norm"],
                "precision": args.precision,
                "max_eval_samples": 16,
                "logging_steps": 1000,
            },
        }
    )
    run_pretraining(config)
    steps = [r for r in read_metrics(Path(args.workdir) / "metrics.jsonl") if "event" not in r]
    return {
        "losses": [r["loss"] for r in steps],
        "step_times": [r["step_time_s"] for r in steps][args.warmup :],
    }


def child(args: argparse.Namespace) -> None:
    result = (run_trainer if args.system == "trainer" else run_hetlm)(args)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


# ------------------------------------------------------------------ the comparison


def one_run(system: str, precision: str, data: Path, args: argparse.Namespace, index: int) -> dict:
    workdir = Path(args.cache) / f"run-{system}-{precision}-{index}"
    if workdir.exists():
        import shutil

        shutil.rmtree(workdir)
    cmd = [
        sys.executable,
        __file__,
        "--child",
        system,
        "--precision",
        precision,
        "--data",
        str(data),
        "--workdir",
        str(workdir),
        "--steps",
        str(args.steps),
        "--batch",
        str(args.batch),
        "--preset",
        args.preset,
        "--device",
        args.device,
        "--warmup",
        str(args.warmup),
    ]
    env = dict(os.environ, HF_DATASETS_DISABLE_PROGRESS_BARS="1", TRANSFORMERS_VERBOSITY="error")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if out.returncode != 0 or line is None:
        raise SystemExit(f"{system} {precision} failed:\n{out.stderr[-4000:]}")
    result = json.loads(line[len("RESULT ") :])
    tokens_per_step = args.batch * args.seq_len
    result["tokens_per_s"] = tokens_per_step * len(result["step_times"]) / sum(result["step_times"])
    result["final_loss"] = statistics.mean(result["losses"][-5:])
    print(
        f"  {system:8s} {data.name} {precision}: {result['tokens_per_s']:8.0f} tok/s, peak RSS "
        f"{result['peak_rss_mib']:7.0f} MiB, loss (last 5) {result['final_loss']:.3f}",
        flush=True,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--preset", default="small")
    parser.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="where the Trainer runs (hetlm takes the GPU whenever there is one)",
    )
    parser.add_argument(
        "--warmup", type=int, default=WARMUP_STEPS, help="steps left out of the throughput"
    )
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument(
        "--vocab-sizes",
        default="8000,32000",
        help="32000 is the usual Japanese BERT vocabulary (e.g. 32768)",
    )
    parser.add_argument("--cache", default=str(ROOT / "runs" / "bench-hf-trainer"))
    parser.add_argument("--child", choices=["trainer", "hetlm"])
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--data")
    parser.add_argument("--workdir")
    args = parser.parse_args()
    if args.child:
        args.system = args.child
        child(args)
        return

    rows = []
    for vocab_size, precision in [
        (int(v), p) for v in args.vocab_sizes.split(",") for p in args.precisions.split(",")
    ]:
        data = prepare(Path(args.cache), args.seq_len, vocab_size)
        runs: dict[str, list[dict]] = {"trainer": [], "hetlm": []}
        for i in range(args.repeats):
            for system in ("trainer", "hetlm"):
                runs[system].append(one_run(system, precision, data, args, i))
        best = {s: max(r["tokens_per_s"] for r in rs) for s, rs in runs.items()}
        rows.append(
            {
                "vocab_size": vocab_size,
                "precision": precision,
                "trainer_tokens_per_s": best["trainer"],
                "hetlm_tokens_per_s": best["hetlm"],
                "speedup": best["hetlm"] / best["trainer"],
                "trainer_peak_rss_mib": max(r["peak_rss_mib"] for r in runs["trainer"]),
                "hetlm_peak_rss_mib": max(r["peak_rss_mib"] for r in runs["hetlm"]),
                "trainer_final_loss": statistics.mean(r["final_loss"] for r in runs["trainer"]),
                "hetlm_final_loss": statistics.mean(r["final_loss"] for r in runs["hetlm"]),
                "runs": runs,
            }
        )
    write_results(rows, args)


def write_results(rows: list[dict], args: argparse.Namespace) -> None:
    import torch
    import transformers

    RESULTS.mkdir(parents=True, exist_ok=True)
    setup = (
        f"BERT-{args.preset} (`hetlm.models.presets`), SentencePiece Unigram on the shipped "
        f"Aozora corpus, seq "
        f"{args.seq_len}, batch {args.batch}, {args.steps} steps (throughput over steps "
        f"{WARMUP_STEPS + 1}-{args.steps}, best of {args.repeats} alternating runs), "
        f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
        f"torch {torch.__version__}, transformers {transformers.__version__}"
    )
    lines = [
        "# hetlm vs Hugging Face Trainer (run_mlm recipe), masked-LM pretraining on CPU",
        "",
        setup,
        "",
        "| vocab | precision | Trainer tok/s | hetlm tok/s | speed-up | Trainer peak RSS MiB | "
        "hetlm peak RSS MiB | Trainer loss (last 5) | hetlm loss (last 5) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['vocab_size']:,} | {r['precision']} | {r['trainer_tokens_per_s']:,.0f} | "
            f"{r['hetlm_tokens_per_s']:,.0f} | {r['speedup']:.2f}x | "
            f"{r['trainer_peak_rss_mib']:,.0f} | {r['hetlm_peak_rss_mib']:,.0f} | "
            f"{r['trainer_final_loss']:.3f} | {r['hetlm_final_loss']:.3f} |"
        )
    lines += [
        "",
        "Reproduce: `make bench` (or `python benchmarks/bench_vs_hf_trainer.py`).",
        "Losses differ slightly by design: the Trainer's collator masks each token with "
        "probability 0.15, hetlm masks exactly round(0.15 x candidates) per sequence.",
    ]
    (RESULTS / "hf_trainer_mlm.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "hf_trainer_mlm.json").write_text(
        json.dumps({"setup": setup, "rows": rows}, indent=1)
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
