"""Does it learn? hetlm and the HF Trainer train the same BERT on the same data past the plateau.

A masked LM first learns how frequent each token is and predicts that whatever the sentence (the
"token-frequency plateau": the demo once answered `、 。 の` for every sentence). This check
trains the same model (same config, same seeded initial weights) on the same packed data and
the same hyper-parameters with ``hetlm`` and with the Hugging Face Trainer (run_mlm recipe:
``DataCollatorForLanguageModeling``, AdamW, linear schedule with warm-up), and scores both on
the very same held-out positions (the first ``eval_samples`` validation sequences masked at
``EVAL_EPOCH``, as `hetlm pretrain` evaluates, by the same scorer: ``hetlm.train.scoring``),
every one of them replaced by [MASK]: with BERT's 10% kept tokens among the targets, a model
that merely copies its input scores ~3x the baseline without using any context (measured here
before the fix: 13.6% against 4.8%).

The goal, written into the table: held-out MLM accuracy at least 2x that of always predicting
the most frequent held-out target, for both; hetlm's final accuracy within noise of the
Trainer's (seed-to-seed spread, or twice the binomial standard error of the difference); and
the training wall time of each (evaluations excluded).

    python benchmarks/learning_check.py                # CPU, a small BERT (minutes a run)
    python benchmarks/learning_check.py --causal       # the same sizes as a causal LM (LLaMA)
    python benchmarks/learning_check.py --model deberta-v2  # a masked LM with relative positions
    python benchmarks/learning_check.py --device cuda  # one GPU, BERT-small, 4,000 steps
    python benchmarks/learning_check.py --dry-run      # a tiny run in seconds (CI)

Writes benchmarks/results/learning_check{,_cuda,_dry_run}.{md,json,png} (``--out`` elsewhere).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data" / "general_aozora" / "aozora_soseki_akutagawa.jsonl"
RESULTS = ROOT / "benchmarks" / "results"
GOAL_FACTOR = 2.0  # held-out accuracy / most-frequent-token accuracy


@dataclass(frozen=True)
class Setup:
    """Everything both systems share. The optimizer settings are written out here (not taken
    from hetlm's defaults), so the check does not move when a default does."""

    name: str
    vocab_size: int
    seq_len: int
    hidden: int
    layers: int
    heads: int
    batch: int
    steps: int
    lr: float
    warmup_ratio: float
    eval_every: int
    eval_samples: int
    dropout: float
    precision: str  # fp32 | bf16
    betas: tuple[float, float] = (0.9, 0.98)  # RoBERTa's
    adam_eps: float = 1e-6
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    mlm_probability: float = 0.15
    validation_fraction: float = 0.05
    corpus_docs: int | None = None  # the first works only, cut to corpus_chars (dry run)
    corpus_chars: int | None = None
    character_coverage: float = 0.9995  # SentencePiece's; lower for a small corpus
    model_type: str = "bert"  # "deberta-v2", or "llama" (--causal): a causal LM

    @property
    def causal(self) -> bool:
        return self.model_type == "llama"

    @property
    def warmup_steps(self) -> int:
        return max(1, round(self.warmup_ratio * self.steps))

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.seq_len


MODEL_SUFFIX = {"deberta-v2": "deberta", "llama": "llama"}


def base_setup_name(setup: Setup) -> str:
    """The SETUPS entry a setup came from (its name without the model suffix)."""
    for suffix in MODEL_SUFFIX.values():
        if setup.name.endswith(f"_{suffix}"):
            return setup.name.removesuffix(f"_{suffix}")
    return setup.name


SETUPS = {
    # Small enough for ~2-4 minutes a run on a shared 2-core CPU: a 4k SentencePiece vocabulary,
    # 64-token sequences, 2 layers of 128, lr 2e-3 with 5% warm-up. Measured (results/
    # learning_check.md): 2,000 steps do not leave the plateau at the [MASK] positions.
    "cpu": Setup(
        "cpu",
        vocab_size=4000,
        seq_len=64,
        hidden=128,
        layers=2,
        heads=2,
        batch=16,
        steps=2000,
        lr=2e-3,
        warmup_ratio=0.05,
        eval_every=100,
        eval_samples=512,
        dropout=0.0,
        precision="bf16",
    ),
    # BERT-small (hetlm's preset: 256 hidden, 4 layers) at the demo's vocabulary and length.
    "cuda": Setup(
        "cuda",
        vocab_size=8000,
        seq_len=128,
        hidden=256,
        layers=4,
        heads=4,
        batch=128,
        steps=4000,
        lr=1e-3,
        warmup_ratio=0.06,
        eval_every=250,
        eval_samples=2048,
        dropout=0.1,
        precision="bf16",
    ),
    # Seconds, for CI: the code path only (too short to leave the plateau).
    "dry_run": Setup(
        "dry_run",
        vocab_size=1500,
        seq_len=32,
        hidden=32,
        layers=2,
        heads=2,
        batch=8,
        steps=16,
        lr=2e-3,
        warmup_ratio=0.1,
        eval_every=8,
        eval_samples=32,
        dropout=0.0,
        precision="fp32",
        validation_fraction=0.2,
        corpus_docs=12,
        corpus_chars=15000,
        character_coverage=0.98,
    ),
}


# ------------------------------------------------------------------ data (shared by both)


def prepare(setup: Setup, cache: Path) -> Path:
    """Tokenizer + packed dataset for ``setup`` (cached by its data fields)."""
    from hetlm.data.prepare.pipeline import prepare_dataset
    from hetlm.data.prepare.tokenizer_training import train_tokenizer

    tag = f"v{setup.vocab_size}-s{setup.seq_len}-f{setup.validation_fraction}"
    if setup.corpus_docs:
        tag += f"-d{setup.corpus_docs}x{setup.corpus_chars}"
    data = cache / f"data-{tag}"
    if (data / "hetlm_dataset.json").is_file():
        return data
    corpus = CORPUS
    if setup.corpus_docs:
        corpus = cache / f"corpus-{tag}.jsonl"
        with CORPUS.open(encoding="utf-8") as src, corpus.open("w", encoding="utf-8") as out:
            for _, line in zip(range(setup.corpus_docs), src, strict=False):
                text = json.loads(line)["text"][: setup.corpus_chars]
                out.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    tokenizer = train_tokenizer(
        [corpus],
        cache / f"tokenizer-{tag}",
        vocab_size=setup.vocab_size,
        character_coverage=setup.character_coverage,
    )
    prepare_dataset(
        [corpus],
        tokenizer,
        data,
        seq_len=setup.seq_len,
        workers=1,
        validation_fraction=setup.validation_fraction,
        overwrite=True,
    )
    return data


def hetlm_config(setup: Setup, data: Path, workdir: Path, seed: int) -> dict:
    return {
        "run": {"output_dir": str(workdir), "seed": seed},
        "data": {"dataset": str(data)},
        "model": {
            "type": setup.model_type,
            "preset": "small",
            "dropout": setup.dropout,
            "overrides": shape_overrides(setup),
        },
        "train": {
            "global_batch": setup.batch,
            "micro_batch": setup.batch,
            "max_steps": setup.steps,
            "learning_rate": setup.lr,
            "warmup_steps": setup.warmup_steps,
            "lr_scheduler_type": "linear",
            "adam_beta1": setup.betas[0],
            "adam_beta2": setup.betas[1],
            "adam_epsilon": setup.adam_eps,
            "weight_decay": setup.weight_decay,
            "max_grad_norm": setup.max_grad_norm,
            "mlm_probability": setup.mlm_probability,
            "precision": setup.precision,
            "eval_steps": setup.eval_every,
            "max_eval_samples": setup.eval_samples,
            "per_device_eval_batch_size": 64,
            "logging_steps": 100,
        },
    }


def shape_overrides(setup: Setup) -> dict:
    """The model's shape; LLaMA's gated MLP at LLaMA's ratio (8/3, rounded as its presets)."""
    shape = {
        "hidden_size": setup.hidden,
        "num_hidden_layers": setup.layers,
        "num_attention_heads": setup.heads,
    }
    if setup.causal:
        return {
            **shape,
            "num_key_value_heads": setup.heads,
            "intermediate_size": round(2.6875 * setup.hidden),
        }
    return {**shape, "intermediate_size": 4 * setup.hidden}


def held_out(setup: Setup, data: Path, seed: int):
    """(validation rows scored, their collator, the frequency baseline): exactly the rows and
    masks of `hetlm pretrain`'s held-out evaluation with this seed."""
    from hetlm.config import parse_config
    from hetlm.evaluate.heldout import pretraining_heldout

    return pretraining_heldout(parse_config(hetlm_config(setup, data, data / "unused", seed)))


# ------------------------------------------------------------------ one run of one system


def run_hetlm(setup: Setup, data: Path, workdir: Path, seed: int, device: str) -> dict:
    from hetlm.config import parse_config
    from hetlm.train.metrics import read_metrics
    from hetlm.train.pretrain import run_pretraining
    from hetlm.train.trainer import Trainer

    clock = {"excluded_s": 0.0}

    class Timed(Trainer):
        """Training time as the Trainer's is measured: from the start of the loop to the end
        of the last step, evaluations and checkpoint writing excluded."""

        def run(self, stop_at_step=None):
            clock["begin"] = time.perf_counter()
            return super().run(stop_at_step)

        def evaluate(self):
            started = time.perf_counter()
            final = self.step == self.train_cfg.max_steps
            if final:  # the loop is over (it skips its evaluation at the last step)
                clock.setdefault("end", started)
            metrics = super().evaluate()
            if not final:
                clock["excluded_s"] += time.perf_counter() - started
            return metrics

        def save_checkpoint(self):
            started = time.perf_counter()
            super().save_checkpoint()
            clock["excluded_s"] += time.perf_counter() - started

    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # hetlm takes a GPU when it sees one
    run_pretraining(parse_config(hetlm_config(setup, data, workdir, seed)), trainer=Timed)
    records = read_metrics(workdir / "metrics.jsonl")
    evals = [r for r in records if r.get("event") == "eval"]
    return {
        "losses": [r["loss"] for r in records if "event" not in r],
        "train_time_s": clock["end"] - clock["begin"] - clock["excluded_s"],
        "eval": [
            {"step": r["step"], "loss": r["eval_loss"], "accuracy": r["eval_accuracy"]}
            for r in evals
        ],
    }


def run_trainer(setup: Setup, data: Path, workdir: Path, seed: int, device: str) -> dict:
    import torch
    from hf_reference import reference_arguments
    from transformers import (
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainerCallback,
    )

    from hetlm.config import parse_config
    from hetlm.data.packed import load_packed_dataset
    from hetlm.data.readers import special_ids
    from hetlm.evaluate.heldout import score_clm, score_mlm
    from hetlm.models.build import build_model

    config = parse_config(hetlm_config(setup, data, workdir, seed))
    dataset, meta = load_packed_dataset(data)
    special = special_ids(meta)
    # hetlm's own builder and seed: both systems start from the very same weights
    model = build_model(
        config.model,
        vocab_size=int(meta["vocab_size"]),
        pad_token_id=special["pad"],
        max_position_embeddings=max(512, setup.seq_len),
        seed=seed,
        special_ids=special,
    )
    tokenizer = AutoTokenizer.from_pretrained(meta["tokenizer_dir"])
    rows, collator, _ = held_out(setup, data, seed)
    evals: list[dict] = []
    clock = {"eval_s": 0.0}

    class HeldOut(TrainerCallback):
        def on_train_begin(self, *_a, **_k):
            clock["begin"] = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, **_k):
            step = state.global_step
            if step % setup.eval_every and step != setup.steps:
                return
            started = time.perf_counter()
            model.eval()
            with torch.autocast(
                model.device.type, dtype=torch.bfloat16, enabled=setup.precision == "bf16"
            ):
                loss_sum, correct, count = (
                    score_clm(model, rows, batch_size=64)
                    if setup.causal
                    else score_mlm(model, rows, collator, batch_size=64)
                )
            model.train()
            evals.append({"step": step, "loss": loss_sum / count, "accuracy": correct / count})
            clock["eval_s"] += time.perf_counter() - started
            clock["end"] = time.perf_counter()

    training_args = reference_arguments(
        output_dir=str(workdir),
        batch=setup.batch,
        steps=setup.steps,
        lr=setup.lr,
        warmup_steps=setup.warmup_steps,
        weight_decay=setup.weight_decay,
        adam_eps=setup.adam_eps,
        max_grad_norm=setup.max_grad_norm,
        precision=setup.precision,
        device=device,
        seed=seed,
        adam_beta1=setup.betas[0],
        adam_beta2=setup.betas[1],
        data_seed=seed,
        dataloader_drop_last=True,
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=dataset["train"],
        data_collator=DataCollatorForLanguageModeling(
            tokenizer, mlm=not setup.causal, mlm_probability=setup.mlm_probability
        ),
        callbacks=[HeldOut()],
    )
    trainer.train()
    return {
        "losses": [r["loss"] for r in trainer.state.log_history if "loss" in r],
        "train_time_s": clock["end"] - clock["begin"] - clock["eval_s"],
        "eval": evals,
    }


RUNNERS = {"hetlm": run_hetlm, "trainer": run_trainer}


def measured_run(
    system: str, setup: Setup, data: Path, workdir: Path, seed: int, device: str
) -> dict:
    started = time.perf_counter()
    result = RUNNERS[system](setup, data, workdir, seed, device)
    result["process_time_s"] = time.perf_counter() - started
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def child(args: argparse.Namespace) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    fields = json.loads(args.setup_json)
    setup = Setup(**{**fields, "betas": tuple(fields["betas"])})
    result = measured_run(
        args.child, setup, Path(args.data), Path(args.workdir), args.seed, args.device
    )
    print("RESULT " + json.dumps(result))


def one_run(system: str, setup: Setup, data: Path, seed: int, args: argparse.Namespace) -> dict:
    """One run in a fresh subprocess (its own threads, peak RSS and warm-up); the dry run stays
    in this process (seconds matter more there than isolation)."""
    workdir = Path(args.cache) / f"run-{setup.name}-{system}-seed{seed}"
    shutil.rmtree(workdir, ignore_errors=True)
    if args.dry_run:
        return report(system, seed, measured_run(system, setup, data, workdir, seed, "cpu"))
    cmd = [
        sys.executable,
        __file__,
        "--child",
        system,
        "--data",
        str(data),
        "--workdir",
        str(workdir),
        "--seed",
        str(seed),
        "--device",
        args.device,
        "--setup-json",
        json.dumps(asdict(setup)),
    ]
    env = dict(
        os.environ,
        HF_DATASETS_DISABLE_PROGRESS_BARS="1",
        TRANSFORMERS_VERBOSITY="error",
        PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    )
    if args.threads:
        cmd += ["--threads", str(args.threads)]
        env["OMP_NUM_THREADS"] = str(args.threads)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if out.returncode != 0 or line is None:
        raise SystemExit(f"{system} (seed {seed}) failed:\n{out.stderr[-4000:]}")
    return report(system, seed, json.loads(line[len("RESULT ") :]))


def report(system: str, seed: int, result: dict) -> dict:
    final = result["eval"][-1]
    print(
        f"  {system:8s} seed {seed}: held-out accuracy {final['accuracy']:.1%}, loss "
        f"{final['loss']:.3f}, training {result['train_time_s']:.0f}s",
        flush=True,
    )
    return result


# ------------------------------------------------------------------ the comparison


def summarize(setup: Setup, runs: dict[str, list[dict]], baselines: list[dict]) -> dict:
    """Final accuracies, the goal and the noise, per system and together."""
    baseline_acc = max(b["accuracy"] for b in baselines)
    targets = min(b["targets"] for b in baselines)
    out: dict = {
        "baseline_accuracy": baseline_acc,
        "goal_accuracy": GOAL_FACTOR * baseline_acc,
        "systems": {},
    }
    for system, rs in runs.items():
        finals = [r["eval"][-1]["accuracy"] for r in rs]
        reached = [
            next(
                (e["step"] for e in r["eval"] if e["accuracy"] >= GOAL_FACTOR * b["accuracy"]), None
            )
            for r, b in zip(rs, baselines, strict=True)
        ]
        times = [r["train_time_s"] for r in rs]
        seconds_to_goal = [
            None if s is None else t * s / setup.steps for s, t in zip(reached, times, strict=True)
        ]
        out["systems"][system] = {
            "final_accuracy": statistics.mean(finals),
            "final_accuracies": finals,
            "final_loss": statistics.mean(r["eval"][-1]["loss"] for r in rs),
            "seed_spread": max(finals) - min(finals),
            "train_time_s": statistics.mean(times),
            "process_time_s": statistics.mean(r["process_time_s"] for r in rs),
            "peak_rss_mib": max(r["peak_rss_mib"] for r in rs),
            "steps_to_goal": reached,
            "seconds_to_goal": seconds_to_goal,
            "goal_met": all(
                f >= GOAL_FACTOR * b["accuracy"] for f, b in zip(finals, baselines, strict=True)
            ),
        }
    h, t = out["systems"]["hetlm"], out["systems"]["trainer"]
    p = (h["final_accuracy"] + t["final_accuracy"]) / 2
    # the same positions score both: the binomial error of one accuracy, sqrt(2) for the difference
    se_diff = math.sqrt(2 * p * (1 - p) / targets)
    noise = max(h["seed_spread"], t["seed_spread"], 2 * se_diff)
    out.update(
        difference=h["final_accuracy"] - t["final_accuracy"],
        noise=noise,
        within_noise=abs(h["final_accuracy"] - t["final_accuracy"]) <= noise,
        both_leave_plateau=h["goal_met"] and t["goal_met"],
        speedup=t["train_time_s"] / h["train_time_s"],
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dry-run", action="store_true", help="a tiny run in seconds (CI)")
    parser.add_argument(
        "--causal",
        action="store_true",
        help="a LLaMA-shaped causal LM instead of BERT (same sizes): it leaves "
        "the plateau on a CPU in minutes, where the masked LM does not",
    )
    parser.add_argument(
        "--model",
        default="bert",
        choices=["bert", "deberta-v2"],
        help="the masked LM: bert (learned absolute positions) or deberta-v2 (relative "
        "positions: leaves the plateau on a CPU within minutes, where BERT does not)",
    )
    parser.add_argument("--seeds", default="0", help="comma-separated; several give the noise")
    parser.add_argument("--steps", type=int, help="override the setup's steps")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads per run (0: torch's default); on a CPU shared with "
        "other jobs, 1 avoids OpenMP threads waiting on each other",
    )
    parser.add_argument("--out", default=str(RESULTS), help="where the table and plot go")
    parser.add_argument("--cache", default=str(ROOT / "runs" / "learning-check"))
    parser.add_argument(
        "--render", metavar="JSON", help="only re-write the table and plot of an earlier run's JSON"
    )
    parser.add_argument("--child", choices=sorted(RUNNERS))
    parser.add_argument("--setup-json")
    parser.add_argument("--data")
    parser.add_argument("--workdir")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        fields = saved["setup"]
        setup = Setup(**{**fields, "betas": tuple(fields["betas"])})
        args.seeds = ",".join(map(str, saved["seeds"]))
        args.threads = args.threads or saved.get("threads", 0)
        write_results(
            setup,
            saved["seeds"],
            saved["baselines"],
            saved["runs"],
            saved["summary"],
            args,
            device=saved["device"],
        )
        return
    if args.device == "cuda" and args.dry_run:
        raise SystemExit("--dry-run is the tiny CPU run: drop --device cuda")
    setup = SETUPS["dry_run" if args.dry_run else args.device]
    model_type = "llama" if args.causal else args.model
    if model_type != "bert":
        suffix = MODEL_SUFFIX[model_type]
        setup = replace(setup, model_type=model_type, name=f"{setup.name}_{suffix}")
    if args.steps:
        setup = replace(setup, steps=args.steps, eval_every=min(setup.eval_every, args.steps))
    seeds = [int(s) for s in args.seeds.split(",")]
    Path(args.cache).mkdir(parents=True, exist_ok=True)
    data = prepare(setup, Path(args.cache))
    baselines = [held_out(setup, data, seed)[2].as_dict() for seed in seeds]
    print(
        f"most-frequent-token baseline: held-out accuracy {baselines[0]['accuracy']:.1%} "
        f"(loss of the token frequencies {baselines[0]['loss']:.3f}); goal "
        f"{GOAL_FACTOR:g}x = {GOAL_FACTOR * baselines[0]['accuracy']:.1%}",
        flush=True,
    )
    runs: dict[str, list[dict]] = {"trainer": [], "hetlm": []}
    for seed in seeds:  # alternating, so drift of a shared machine hits both alike
        for system in ("trainer", "hetlm"):
            runs[system].append(one_run(system, setup, data, seed, args))
    summary = summarize(setup, runs, baselines)
    write_results(setup, seeds, baselines, runs, summary, args)


# ------------------------------------------------------------------ table, JSON, plot


def write_results(
    setup: Setup,
    seeds: list[int],
    baselines: list[dict],
    runs: dict,
    summary: dict,
    args: argparse.Namespace,
    device: str | None = None,
) -> None:
    import torch
    import transformers

    from hetlm.models.presets import FAMILY_NAMES

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "learning_check" + ("" if setup.name == "cpu" else f"_{setup.name}")
    device = device or (
        torch.cuda.get_device_name(0)
        if args.device == "cuda"
        else f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
        f"{args.threads or torch.get_num_threads()} torch thread(s) per run"
    )
    tokens = setup.steps * setup.tokens_per_step
    text = [
        f"# Does it learn? hetlm vs the Hugging Face Trainer, "
        f"{'causal LM' if setup.causal else 'masked LM'} ({setup.name})",
        "",
        f"{FAMILY_NAMES[setup.model_type]}, {setup.layers} layers of {setup.hidden} ({setup.heads} heads), dropout "
        f"{setup.dropout:g}; SentencePiece Unigram vocabulary {setup.vocab_size:,} on the shipped "
        f"Aozora corpus{' (a slice)' if setup.corpus_docs else ''}, sequences of "
        f"{setup.seq_len}; batch {setup.batch}, {setup.steps:,} steps ({tokens / 1e6:.1f}M "
        f"tokens); AdamW lr {setup.lr:g}, betas {setup.betas}, eps {setup.adam_eps:g}, weight "
        f"decay {setup.weight_decay:g}, {setup.warmup_steps} warm-up steps "
        f"({setup.warmup_ratio:.0%}) then linear decay, clipping {setup.max_grad_norm:g}; "
        f"{setup.precision}; seeds {', '.join(map(str, seeds))}. Both start from the same "
        f"weights; both are scored on the same {baselines[0]['targets']:,} "
        f"{'next tokens' if setup.causal else 'positions, all shown as [MASK],'} of "
        f"{setup.eval_samples} held-out sequences (documents never trained on). {device}; torch "
        f"{torch.__version__}, transformers {transformers.__version__}.",
        "",
        "Most-frequent-token baseline (always predict the most frequent held-out target"
        + (
            "; each seed masks its own positions, the higher baseline is used"
            if len(seeds) > 1
            else ""
        )
        + f"): accuracy **{summary['baseline_accuracy']:.1%}**; the loss of a model "
        f"that learnt only the token frequencies: "
        f"{max(b['loss'] for b in baselines):.3f}. Goal: accuracy >= "
        f"{GOAL_FACTOR:g}x baseline = **{summary['goal_accuracy']:.1%}**.",
        "",
        "| system | held-out accuracy | x baseline | held-out loss | goal met | steps to goal | "
        "training time | process time | peak RSS MiB |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for system in ("hetlm", "trainer"):
        s = summary["systems"][system]
        reached = ", ".join("not reached" if x is None else f"{x:,}" for x in s["steps_to_goal"])
        name = "hetlm" if system == "hetlm" else "HF Trainer"
        text.append(
            f"| {name} | {s['final_accuracy']:.1%} | "
            f"{s['final_accuracy'] / summary['baseline_accuracy']:.2f}x | {s['final_loss']:.3f} "
            f"| {'yes' if s['goal_met'] else 'no'} | {reached} | {s['train_time_s']:.0f} s | "
            f"{s['process_time_s']:.0f} s | {s['peak_rss_mib']:,.0f} |"
        )
    verdict = "within" if summary["within_noise"] else "outside"
    text += [
        "",
        f"- Both leave the plateau: **{'yes' if summary['both_leave_plateau'] else 'no'}**.",
        f"- hetlm - Trainer final accuracy: {summary['difference']:+.2%}, {verdict} the noise "
        f"({summary['noise']:.2%}: the larger of the seeds' spread and twice the binomial "
        f"standard error of the difference on these positions).",
        f"- Training time (evaluations excluded): hetlm {summary['systems']['hetlm']['train_time_s']:.0f} s, "
        f"Trainer {summary['systems']['trainer']['train_time_s']:.0f} s "
        f"({summary['speedup']:.2f}x).",
        (
            "- hetlm computes the output layer only where there is a target (here every position "
            "but a row's first)."
            if setup.causal
            else "- Masking differs by design: the Trainer's collator masks each token with probability "
            f"{setup.mlm_probability}, hetlm masks exactly round({setup.mlm_probability} x tokens) "
            "per sequence; hetlm computes the output layer at the masked positions only."
        ),
        "",
        f"Plot: `{stem}.png`. Reproduce: `python benchmarks/learning_check.py"
        + (
            " --dry-run"
            if setup.name.startswith("dry_run")
            else " --device cuda"
            if setup.name.startswith("cuda")
            else ""
        )
        + (" --causal" if setup.causal else "")
        + (f" --model {setup.model_type}" if setup.model_type == "deberta-v2" else "")
        + (f" --steps {setup.steps}" if setup.steps != SETUPS[base_setup_name(setup)].steps else "")
        + (f" --seeds {args.seeds}" if len(seeds) > 1 else "")
        + (f" --threads {args.threads}" if args.threads else "")
        + "`.",
    ]
    (out / f"{stem}.md").write_text("\n".join(text) + "\n")
    (out / f"{stem}.json").write_text(
        json.dumps(
            {
                "setup": asdict(setup),
                "device": device,
                "seeds": seeds,
                "threads": args.threads,
                "baselines": baselines,
                "summary": summary,
                "runs": runs,
            },
            indent=1,
        )
    )
    plot(setup, runs, summary, out / f"{stem}.png")
    print("\n".join(text))


def plot(setup: Setup, runs: dict, summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"hetlm": "tab:blue", "trainer": "tab:orange"}
    names = {"hetlm": "hetlm", "trainer": "HF Trainer"}
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    window = max(1, setup.steps // 50)
    for system, rs in runs.items():
        for i, r in enumerate(rs):
            label = names[system] if i == 0 else None
            losses = r["losses"]
            smooth = [
                statistics.mean(losses[max(0, k - window + 1) : k + 1]) for k in range(len(losses))
            ]
            left.plot(
                [(k + 1) * setup.tokens_per_step / 1e6 for k in range(len(smooth))],
                smooth,
                color=colors[system],
                lw=1,
                label=label,
            )
            right.plot(
                [e["step"] * setup.tokens_per_step / 1e6 for e in r["eval"]],
                [e["accuracy"] for e in r["eval"]],
                "o-",
                ms=3,
                color=colors[system],
                label=label,
            )
    right.axhline(
        summary["baseline_accuracy"], color="gray", ls=":", label="most-frequent-token baseline"
    )
    right.axhline(
        summary["goal_accuracy"], color="gray", ls="--", label=f"goal ({GOAL_FACTOR:g}x baseline)"
    )
    kind = "next-token" if setup.causal else "MLM"
    left.set_title(f"training {kind} loss (moving mean over {window} steps)")
    left.set_ylabel("nats / target token")
    right.set_title(f"held-out {kind} accuracy (same targets)")
    right.set_ylabel("top-1 accuracy")
    for ax in (left, right):
        ax.set_xlabel("tokens seen (millions)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
