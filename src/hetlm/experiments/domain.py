"""The domain-adaptation experiment: what finance text in pretraining buys on finance.

Three models (LLaMA-mini causal LMs by default, or BERT encoders) share one tokenizer and are
scored by the same evaluation:

- **(a) general**: ``steps`` optimizer steps on the general corpus (Aozora Bunko) only;
- **(b) mixed**: ``steps + continue_steps`` steps from scratch on general + finance text;
- **(c) continued**: (a)'s model (``model.init_from``) trained ``continue_steps`` more steps on
  finance text, with the continuation defaults of the config (lower lr, short warm-up) unless
  ``continue_lr`` is given.

(b) and (c) have the same budget (the same number of optimizer steps of the same batch); (a) is
(c)'s starting point, i.e. the general model before any finance text.

The finance corpus is built from the shipped evaluation data without leaking it: only chABSA
reports and Economy Watchers texts that :mod:`hetlm.evaluate.tasks` puts in its **train** split
(the same functions decide), never dev or test. Of those, a fixed ``heldout_fraction`` of the
units (chABSA report, EWS distinct text) is held out by a hash of the unit as the finance MLM
evaluation set, and a fraction of the general works likewise as the general MLM evaluation
set, so forgetting is visible too. The tokenizer is trained on the training parts only.

Everything is written under ``workdir``: ``corpus/`` (the JSON Lines files and
``corpus.json``), ``tokenizer/``, ``data/{general,finance,mixed}``, ``runs/{a,b,c}-*``,
``eval/`` (``hetlm eval``'s own report) and the experiment's report
``domain_adaptation.{md,json,png}``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from hetlm.errors import HetlmError
from hetlm.evaluate.recipes import FINETUNE_LR, PROBE_EPOCHS, PROBE_LR
from hetlm.evaluate.tasks import (
    DataPaths,
)
from hetlm.experiments.domain_corpora import (
    HELDOUT_CORPORA,
    assemble_corpora,
    check_no_leak,
    write_corpora,
)
from hetlm.experiments.domain_report import (
    RUN_NAMES,
    RUNS,
    collect_results,
    write_report,
)
from hetlm.models.presets import encoder_preset, model_name

Log = Callable[[str], None]

GENERAL_FILE = "general_aozora/aozora_soseki_akutagawa.jsonl"
MODEL_TYPES = ("bert", "deberta-v2", "llama")


# ---------------------------------------------------------------- settings


@dataclass
class DomainSettings:
    """Every knob of the experiment; ``as_dict`` goes into the JSON report."""

    workdir: Path
    model_type: str = "bert"  # or "llama": a causal LM, scored by next-token loss
    preset: str = "small"
    steps: int = 600  # N: (a); (b) gets N + M; (c) = (a) + M
    continue_steps: int = 300  # M
    batch_size: int = 16
    seq_len: int = 128
    vocab_size: int = 8000
    lr: float = 1e-3  # from scratch, (a) and (b)
    warmup_fraction: float = 0.1  # from scratch
    continue_lr: float | None = None  # None: the config's continuation default
    precision: str = "auto"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    epochs: int = 2
    max_length: int = 128
    finetune_lr: float = FINETUNE_LR
    probe: bool = True  # also a linear probe (a linear classifier on the frozen features)
    probe_lr: float = PROBE_LR
    probe_epochs: int = PROBE_EPOCHS
    max_train_examples: int | None = 1000
    max_eval_examples: int | None = None
    mlm_max_sequences: int | None = 200
    heldout_fraction: float = 0.1  # of the finance train-split units
    general_heldout_fraction: float = 0.05
    max_corpus_chars: int | None = None  # cap each corpus part (quick runs)
    threads: int | None = None
    data_dir: Path | None = None
    general_corpus: Path | None = None

    def check(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise HetlmError(
                f"--model must be one of {', '.join(MODEL_TYPES)}, got {self.model_type!r}"
            )
        encoder_preset(self.preset, self.model_type)  # one line for an unknown preset
        for name in (
            "steps",
            "continue_steps",
            "batch_size",
            "vocab_size",
            "epochs",
            "probe_epochs",
        ):
            if getattr(self, name) < 1:
                raise HetlmError(
                    f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}"
                )
        if self.seq_len < 16:
            raise HetlmError(f"--seq-len must be at least 16, got {self.seq_len}")
        for name in ("heldout_fraction", "general_heldout_fraction"):
            if not 0 < getattr(self, name) < 1:
                raise HetlmError(f"{name} must be between 0 and 1, got {getattr(self, name)}")
        if not self.seeds:
            raise HetlmError("--seeds must name at least one seed")
        if self.threads is not None and self.threads < 1:
            raise HetlmError(f"--threads must be at least 1, got {self.threads}")
        if self.max_corpus_chars is not None and self.max_corpus_chars < 1000:
            raise HetlmError(
                f"the corpus cap must be at least 1000 characters, got {self.max_corpus_chars}"
            )

    @property
    def paths(self) -> DataPaths:
        return DataPaths(data_dir=self.data_dir)

    def general_path(self) -> Path:
        if self.general_corpus is not None:
            return self.general_corpus
        base = self.data_dir if self.data_dir is not None else _data_dir()
        return base / GENERAL_FILE

    def budgets(self) -> dict[str, dict[str, Any]]:
        """Optimizer steps per run, as the table states them."""
        n, m = self.steps, self.continue_steps
        return {
            "a": {
                "data": "general",
                "init": "scratch",
                "steps": n,
                "total_steps": n,
                "budget": f"{n}",
            },
            "b": {
                "data": "general + finance (mixed)",
                "init": "scratch",
                "steps": n + m,
                "total_steps": n + m,
                "budget": f"{n + m}",
            },
            "c": {
                "data": "finance",
                "init": "(a)",
                "steps": m,
                "total_steps": n + m,
                "budget": f"{n} (a) + {m}",
            },
        }

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        return {k: str(v) if isinstance(v, Path) else v for k, v in out.items()}


def _data_dir() -> Path:
    from hetlm.evaluate.tasks import find_data_dir

    return find_data_dir()


# ---------------------------------------------------------------- the three runs


def pretrain_config(
    settings: DomainSettings,
    run: str,
    dataset: Path,
    output_dir: Path,
    init_from: Path | None = None,
) -> dict[str, Any]:
    """The ``hetlm pretrain`` config of one run (single process, one micro-batch per step)."""
    budget = settings.budgets()[run]
    steps = budget["steps"]
    train: dict[str, Any] = {
        "global_batch": settings.batch_size,
        "micro_batch": settings.batch_size,
        "max_steps": steps,
        "precision": settings.precision,
        "save_steps": 0,
        "save_total_limit": 1,
        "eval_steps": 0,
        "max_eval_samples": 128,
        "logging_steps": max(1, steps // 20),
    }
    if init_from is None:
        train["learning_rate"] = settings.lr
        train["warmup_steps"] = max(1, round(settings.warmup_fraction * steps))
    elif settings.continue_lr is not None:
        train["learning_rate"] = settings.continue_lr
    model: dict[str, Any] = {"type": settings.model_type, "preset": settings.preset}
    if init_from is not None:
        model["init_from"] = str(init_from)
    return {
        "run": {"output_dir": str(output_dir), "seed": 0},
        "data": {"dataset": str(dataset)},
        "model": model,
        "train": train,
    }


def run_one(config_dict: dict[str, Any], config_path: Path) -> dict[str, Any]:
    """Write the config, run it in this process, return the run summary (+ config values)."""
    import yaml

    from hetlm.config import parse_config
    from hetlm.train.pretrain import run_pretraining

    config_path.write_text(
        yaml.safe_dump(config_dict, sort_keys=False, allow_unicode=True), encoding="utf-8"
    )
    config = parse_config(config_dict, source=str(config_path))
    output = Path(config.run.output_dir)
    if output.exists():
        shutil.rmtree(output)
    started = time.perf_counter()
    summary = run_pretraining(config)
    summary["seconds"] = time.perf_counter() - started
    summary["lr"] = config.learning_rate
    summary["warmup_steps"] = config.warmup
    summary["init_from"] = config.model.init_from
    summary["config"] = str(config_path)
    return summary


def weight_distance(model_a: Path, model_b: Path) -> float:
    """Relative L2 distance ||b - a|| / ||a|| over the parameters both checkpoints hold."""
    from safetensors.torch import load_file

    a, b = (load_file(str(Path(m) / "model.safetensors")) for m in (model_a, model_b))
    num = den = 0.0
    for name, tensor in a.items():
        other = b.get(name)
        if other is None or other.shape != tensor.shape:
            continue
        num += float((other.double() - tensor.double()).pow(2).sum())
        den += float(tensor.double().pow(2).sum())
    return math.sqrt(num / den) if den else float("nan")


def _loss_curve(metrics_path: Path) -> list[tuple[int, float]]:
    from hetlm.train.metrics import read_metrics

    return [
        (int(r["step"]), float(r["loss"]))
        for r in read_metrics(metrics_path)
        if r.get("event") is None and "loss" in r
    ]


# ---------------------------------------------------------------- the whole experiment


def run_experiment(settings: DomainSettings, log: Log = print) -> dict[str, Any]:
    """Corpora → tokenizer → three datasets → runs (a), (b), (c) → evaluation → report."""
    import torch

    from hetlm.data.prepare.pipeline import prepare_dataset
    from hetlm.data.prepare.tokenizer_training import train_tokenizer
    from hetlm.evaluate.checkpoint import ModelSpec, resolve_device
    from hetlm.evaluate.finetune import FinetuneOptions
    from hetlm.evaluate.suite import ALL_TASKS, EvalConfig, run_eval
    from hetlm.evaluate.tasks import CLASSIFICATION_TASKS

    settings.check()
    work = Path(settings.workdir)
    work.mkdir(parents=True, exist_ok=True)
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
        os.environ["OMP_NUM_THREADS"] = str(settings.threads)  # read by run_pretraining
    timings: dict[str, float] = {}
    started_all = time.perf_counter()

    def phase(name: str, started: float) -> None:
        timings[name] = round(time.perf_counter() - started, 1)

    log(
        "[1/6] corpora: general (Aozora) and finance (evaluation train splits only), "
        "held-out parts by document"
    )
    t0 = time.perf_counter()
    corpora = assemble_corpora(
        settings.paths,
        settings.general_path(),
        heldout_fraction=settings.heldout_fraction,
        general_heldout_fraction=settings.general_heldout_fraction,
        max_chars=settings.max_corpus_chars,
    )
    leak = check_no_leak(corpora, settings.paths)
    manifest = write_corpora(corpora, work / "corpus")
    manifest["leak_check"] = leak
    (work / "corpus" / "corpus.json").write_text(
        json.dumps(manifest, ensure_ascii=False, indent=1) + "\n", encoding="utf-8"
    )
    for name, part in manifest["parts"].items():
        log(f"      {name}: {part['documents']:,} documents, {part['characters']:,} characters")
    log(
        f"      no evaluation dev/test unit used ({leak['finance_units_checked']:,} finance units "
        "checked)"
    )
    phase("corpora", t0)
    corpus = {name: Path(part["file"]) for name, part in manifest["parts"].items()}

    log(
        f"[2/6] tokenizer: SentencePiece Unigram, vocab {settings.vocab_size}, on general + "
        "finance training text"
    )
    t0 = time.perf_counter()
    tokenizer_dir = train_tokenizer(
        [corpus["general_train"], corpus["finance_train"]],
        work / "tokenizer",
        vocab_size=settings.vocab_size,
    )
    phase("tokenizer", t0)

    log(f"[3/6] packing general, finance and mixed datasets ({settings.seq_len}-token rows)")
    t0 = time.perf_counter()
    inputs = {
        "general": [corpus["general_train"]],
        "finance": [corpus["finance_train"]],
        "mixed": [corpus["general_train"], corpus["finance_train"]],
    }
    datasets: dict[str, Path] = {}
    prepared: dict[str, Any] = {}
    for name, files in inputs.items():
        datasets[name] = work / "data" / name
        summary = prepare_dataset(
            files,
            tokenizer_dir,
            datasets[name],
            seq_len=settings.seq_len,
            validation_fraction=0.01,
            overwrite=True,
        )
        prepared[name] = {
            "train_sequences": summary.train.sequences,
            "train_tokens": summary.train.tokens,
            "validation_sequences": summary.validation.sequences,
        }
        log(
            f"      {name}: {summary.train.sequences:,} train rows "
            f"({summary.train.tokens:,} tokens), {summary.validation.sequences:,} validation rows "
            "(run-time monitor only)"
        )
    phase("prepare", t0)

    runs_dir = work / "runs"
    runs_dir.mkdir(exist_ok=True)
    summaries: dict[str, dict[str, Any]] = {}
    budgets = settings.budgets()
    plan = {"a": ("general", None), "b": ("mixed", None), "c": ("finance", "a")}
    for index, run in enumerate(RUNS):
        data_name, parent = plan[run]
        init = Path(summaries[parent]["model_dir"]) if parent else None
        log(
            f"[4/6] pretraining ({run}) {RUN_NAMES[run]}: {model_name(settings.model_type, settings.preset)}, "
            f"{budgets[run]['steps']} steps x {settings.batch_size} on {data_name}"
            + (f", from {init}" if init else ", from scratch")
            + f" ({index + 1}/3)"
        )
        t0 = time.perf_counter()
        config = pretrain_config(
            settings, run, datasets[data_name], runs_dir / RUN_NAMES[run], init_from=init
        )
        summaries[run] = run_one(config, runs_dir / f"{RUN_NAMES[run]}.yaml")
        summaries[run]["dataset"] = data_name
        phase(f"pretrain_{run}", t0)
        s = summaries[run]
        log(
            f"      loss {s['loss_first']:.3f} -> {s['loss_last']:.3f}, run-time held-out "
            f"{s['eval_loss']:.3f} ({timings[f'pretrain_{run}']:.0f} s)"
        )
    models = {run: Path(summaries[run]["model_dir"]) for run in RUNS}
    init_check = {
        "c_init_from": summaries["c"]["init_from"],
        "a_model_dir": str(models["a"]),
        "rel_distance_c_from_a": weight_distance(models["a"], models["c"]),
        "rel_distance_b_from_a": weight_distance(models["a"], models["b"]),
    }
    log(
        f"      (c) started from (a): ||c - a|| / ||a|| = "
        f"{init_check['rel_distance_c_from_a']:.3f} (b, trained from scratch: "
        f"{init_check['rel_distance_b_from_a']:.3f})"
    )

    log(
        f"[5/6] evaluation (hetlm eval): held-out MLM, chABSA and EWS fine-tuning, seeds "
        f"{','.join(map(str, settings.seeds))}"
    )
    t0 = time.perf_counter()
    options = FinetuneOptions(
        epochs=settings.epochs,
        lr=settings.finetune_lr,
        max_length=settings.max_length,
        max_train_examples=settings.max_train_examples,
        max_eval_examples=settings.max_eval_examples,
        device=resolve_device("auto"),  # the GPU when there is one, as pretraining does
    )
    eval_config = EvalConfig(
        models=[ModelSpec(RUN_NAMES[run], str(models[run])) for run in RUNS],
        tasks=list(ALL_TASKS),
        seeds=list(settings.seeds),
        finetune=options,
        data=settings.paths,
        mlm_corpora=[str(corpus[name]) for name in HELDOUT_CORPORA],
        mlm_seq_len=settings.seq_len,
        mlm_max_sequences=settings.mlm_max_sequences,
    )
    report = run_eval(eval_config, output_dir=work / "eval", log=lambda line: log("      " + line))
    phase("eval", t0)
    probe_report = None
    if settings.probe:
        log(
            f"[5/6] linear probe: the same tasks, a linear classifier on each frozen model's "
            f"features (lr {settings.probe_lr:g}, {settings.probe_epochs} epochs)"
        )
        t0 = time.perf_counter()
        probe_config = replace(
            eval_config,
            tasks=[t for t in ALL_TASKS if t in CLASSIFICATION_TASKS],
            finetune=replace(
                options, linear_probe=True, lr=settings.probe_lr, epochs=settings.probe_epochs
            ),
        )
        probe_report = run_eval(
            probe_config, output_dir=work / "eval-probe", log=lambda line: log("      " + line)
        )
        phase("probe", t0)
    timings["total"] = round(time.perf_counter() - started_all, 1)

    results = collect_results(
        settings, report, summaries, prepared, manifest, init_check, timings, models, probe_report
    )
    results["loss_curves"] = {
        run: _loss_curve(Path(summaries[run]["output_dir"]) / "metrics.jsonl") for run in RUNS
    }
    log("[6/6] report")
    write_report(results, work)
    return results
