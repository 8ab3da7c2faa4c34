"""The domain-adaptation experiment: what finance text in pretraining buys on finance.

Three BERT encoders share one tokenizer and are scored by the same evaluation:

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

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hetlm.errors import HetlmError
from hetlm.evaluate.tasks import (
    DataPaths,
    load_ews,
    normalize_text,
    read_chabsa,
    read_jsonl,
    split_of,
    split_score,
)

Log = Callable[[str], None]

GENERAL_FILE = "general_aozora/aozora_soseki_akutagawa.jsonl"
# the held-out rule: the eval's salted hash under task names of its own, so it is independent
# of the eval's train/dev/test split (and of everything else)
HELDOUT_TASK = "domain-heldout"
RUNS = ("a", "b", "c")
RUN_NAMES = {"a": "a-general", "b": "b-mixed", "c": "c-continued"}
HELDOUT_CORPORA = ("finance-chabsa-heldout", "finance-ews-heldout", "general-heldout")
REPORT_STEM = "domain_adaptation"


# ---------------------------------------------------------------- settings


@dataclass
class DomainSettings:
    """Every knob of the experiment; ``as_dict`` goes into the JSON report."""

    workdir: Path
    preset: str = "small"
    steps: int = 600                 # N: (a); (b) gets N + M; (c) = (a) + M
    continue_steps: int = 300        # M
    batch_size: int = 16
    seq_len: int = 128
    vocab_size: int = 8000
    lr: float = 1e-3                 # from scratch, (a) and (b)
    warmup_fraction: float = 0.1     # from scratch
    continue_lr: float | None = None  # None: the config's continuation default
    precision: str = "auto"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    epochs: int = 2
    max_length: int = 128
    finetune_lr: float = 5e-5
    max_train_examples: int | None = 1000
    max_eval_examples: int | None = None
    mlm_max_sequences: int | None = 200
    heldout_fraction: float = 0.1    # of the finance train-split units
    general_heldout_fraction: float = 0.05
    max_corpus_chars: int | None = None  # cap each corpus part (quick runs)
    threads: int | None = None
    data_dir: Path | None = None
    general_corpus: Path | None = None

    def check(self) -> None:
        for name in ("steps", "continue_steps", "batch_size", "vocab_size", "epochs"):
            if getattr(self, name) < 1:
                raise HetlmError(f"--{name.replace('_', '-')} must be at least 1, got "
                                 f"{getattr(self, name)}")
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
            raise HetlmError(f"the corpus cap must be at least 1000 characters, got "
                             f"{self.max_corpus_chars}")

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
            "a": {"data": "general", "init": "scratch", "steps": n, "total_steps": n,
                  "budget": f"{n}"},
            "b": {"data": "general + finance (mixed)", "init": "scratch", "steps": n + m,
                  "total_steps": n + m, "budget": f"{n + m}"},
            "c": {"data": "finance", "init": "(a)", "steps": m, "total_steps": n + m,
                  "budget": f"{n} (a) + {m}"},
        }

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        return {k: str(v) if isinstance(v, Path) else v for k, v in out.items()}


def _data_dir() -> Path:
    from hetlm.evaluate.tasks import find_data_dir

    return find_data_dir()


# ---------------------------------------------------------------- the corpora, without leaks


@dataclass(frozen=True)
class Document:
    """One unit of text: ``id`` is ``source/key`` (``aozora/...``, ``chabsa/E0...``,
    ``ews/...``)."""

    id: str
    text: str


@dataclass
class Corpora:
    """The training and held-out parts, each a list of documents."""

    general_train: list[Document]
    general_heldout: list[Document]
    finance_train: list[Document]          # chABSA train reports + EWS train texts, not held out
    finance_heldout: dict[str, list[Document]]  # "chabsa", "ews": the finance MLM eval set
    notes: list[str] = field(default_factory=list)

    def parts(self) -> dict[str, list[Document]]:
        return {"general_train": self.general_train, "finance_train": self.finance_train,
                "general-heldout": self.general_heldout,
                "finance-chabsa-heldout": self.finance_heldout["chabsa"],
                "finance-ews-heldout": self.finance_heldout["ews"]}


def is_heldout(source: str, key: str, fraction: float) -> bool:
    """Whether a unit of ``source`` is in the experiment's held-out MLM set (hash of the key)."""
    return split_score(f"{HELDOUT_TASK}/{source}", key) < fraction


def _split_heldout(units: list[tuple[str, Document]], source: str,
                   fraction: float) -> tuple[list[Document], list[Document]]:
    """(train, held-out) by the hash rule; at least one unit on each side when there are two."""
    heldout = {key for key, _ in units if is_heldout(source, key, fraction)}
    if len(units) >= 2 and not heldout:
        heldout = {min((key for key, _ in units),
                       key=lambda k: split_score(f"{HELDOUT_TASK}/{source}", k))}
    if len(units) >= 2 and len(heldout) == len(units):
        heldout.discard(max(heldout, key=lambda k: split_score(f"{HELDOUT_TASK}/{source}", k)))
    train = [doc for key, doc in units if key not in heldout]
    held = [doc for key, doc in units if key in heldout]
    return train, held


def finance_train_units(paths: DataPaths) -> dict[str, list[tuple[str, Document]]]:
    """The finance text the evaluation puts in its **train** split, as (unit key, document).

    chABSA: whole reports whose id :func:`split_of` sends to train (the document text as the
    eval defines it, sentences joined by newlines; no labels). EWS: the deduplicated texts of
    ``load_ews(...).splits["train"]`` (the comment only; the label is not text).
    """
    chabsa = [(doc.id, Document(f"chabsa/{doc.id}", doc.text))
              for doc in read_chabsa(paths.chabsa_path()) if split_of("chabsa", doc.id) == "train"]
    ews = [(e.group, Document(f"ews/{e.id}", e.text))
           for e in load_ews(paths.ews_path()).splits["train"]]
    return {"chabsa": chabsa, "ews": ews}


def read_general(path: Path) -> list[tuple[str, Document]]:
    """The general corpus (JSON Lines with ``text``; ``id`` when present) as (key, document)."""
    units = []
    for number, record in read_jsonl(path, "general corpus"):
        text = record.get("text")
        if not isinstance(text, str) or not text.strip():
            continue
        key = str(record.get("id", f"line-{number}"))
        units.append((key, Document(f"aozora/{key}", text)))
    if len(units) < 2:
        raise HetlmError(f"{path}: the general corpus needs at least two documents with a "
                         "'text' field (one is held out)")
    return units


def assemble_corpora(paths: DataPaths, general_path: Path, *, heldout_fraction: float = 0.1,
                     general_heldout_fraction: float = 0.05,
                     max_chars: int | None = None) -> Corpora:
    """General and finance corpora, each split into training and held-out parts by unit."""
    finance = finance_train_units(paths)
    fin_train: list[Document] = []
    fin_heldout: dict[str, list[Document]] = {}
    for source in ("chabsa", "ews"):
        train, held = _split_heldout(finance[source], source, heldout_fraction)
        fin_train += _cap(train, max_chars and max_chars // 2)
        fin_heldout[source] = _cap(held, max_chars and max_chars // 4)
    gen_train, gen_held = _split_heldout(read_general(general_path), "aozora",
                                         general_heldout_fraction)
    notes = ["finance text: chABSA reports and Economy Watchers texts in the evaluation's train "
             f"split only; {heldout_fraction:.0%} of those units held out (hash of the unit) "
             "for the finance MLM evaluation"]
    if max_chars is not None:
        notes.append(f"quick run: every part capped at about {max_chars:,} characters")
    return Corpora(_cap(gen_train, max_chars), _cap(gen_held, max_chars and max_chars // 4),
                   fin_train, fin_heldout, notes)


def _cap(docs: list[Document], max_chars: int | None) -> list[Document]:
    """The first documents up to ``max_chars`` characters (the last one cut at a line end)."""
    if max_chars is None:
        return docs
    out, used = [], 0
    for doc in docs:
        if used >= max_chars:
            break
        text = doc.text
        if used + len(text) > max_chars:
            cut = text.rfind("\n", 0, max_chars - used)
            text = text[:cut if cut > 0 else max_chars - used]
        out.append(Document(doc.id, text))
        used += len(text)
    return out


def evaluation_units(paths: DataPaths, splits: Iterable[str] = ("dev", "test")) -> dict[str, set]:
    """The chABSA report ids and EWS normalised texts the evaluation puts in ``splits``."""
    chosen = set(splits)
    chabsa = {doc.id for doc in read_chabsa(paths.chabsa_path())
              if split_of("chabsa", doc.id) in chosen}
    ews_task = load_ews(paths.ews_path())
    ews = {e.text for split in chosen for e in ews_task.splits[split]}
    return {"chabsa": chabsa, "ews": ews}


def check_no_leak(corpora: Corpora, paths: DataPaths) -> dict[str, int]:
    """Raise if any finance text used here is a dev/test unit of the evaluation; count what the
    unit split cannot exclude (sentences of train reports that recur verbatim in test reports,
    e.g. boilerplate shared by companies)."""
    forbidden = evaluation_units(paths)
    finance = corpora.finance_train + [d for docs in corpora.finance_heldout.values() for d in docs]
    bad = [d.id for d in finance if d.id.startswith("chabsa/")
           and d.id.split("/", 1)[1] in forbidden["chabsa"]]
    bad += [d.id for d in finance if d.id.startswith("ews/")
            and normalize_text(d.text) in forbidden["ews"]]
    if bad:
        raise RuntimeError(f"finance corpus leaks evaluation dev/test units: {bad[:5]}")
    test_sentences = {normalize_text(s["sentence"]) for doc in read_chabsa(paths.chabsa_path())
                      if split_of("chabsa", doc.id) == "test" for s in doc.sentences}
    used = {normalize_text(line) for d in corpora.finance_train if d.id.startswith("chabsa/")
            for line in d.text.split("\n")}
    shared = {s for s in test_sentences & used if s}
    return {"finance_units_checked": len(finance), "chabsa_test_sentences": len(test_sentences),
            "chabsa_test_sentences_also_in_train_reports": len(shared)}


TRAINING_PARTS = ("general_train", "finance_train")
PIECE_CHARS = 2000


def pieces(doc: Document, max_chars: int = PIECE_CHARS) -> list[Document]:
    """A document cut at line ends into pieces of at most about ``max_chars`` characters.

    Training files hold pieces, not whole works: `hetlm prepare` draws its (run-time monitor)
    validation split by document, and a whole novel in it would take a large share of a small
    corpus out of training. Held-out files keep whole documents.
    """
    if len(doc.text) <= max_chars:
        return [doc]
    out, current, size = [], [], 0
    for line in doc.text.split("\n"):
        if current and size + len(line) > max_chars:
            out.append("\n".join(current))
            current, size = [], 0
        current.append(line)
        size += len(line) + 1
    if current:
        out.append("\n".join(current))
    return [Document(f"{doc.id}#{k}", text) for k, text in enumerate(out) if text.strip()]


def write_corpora(corpora: Corpora, out: Path) -> dict[str, Any]:
    """The parts as JSON Lines (``{"id", "text"}``) and ``corpus.json`` (counts, id digests).

    Training parts are written as :func:`pieces` of their documents."""
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {"notes": corpora.notes, "parts": {}}
    for name, docs in corpora.parts().items():
        path = out / f"{name}.jsonl"
        written = 0
        with path.open("w", encoding="utf-8") as f:
            for doc in docs:
                for piece in pieces(doc) if name in TRAINING_PARTS else [doc]:
                    f.write(json.dumps({"id": piece.id, "text": piece.text},
                                       ensure_ascii=False) + "\n")
                    written += 1
        ids = sorted(d.id for d in docs)
        by_source: dict[str, int] = {}
        for d in docs:
            by_source[d.id.split("/", 1)[0]] = by_source.get(d.id.split("/", 1)[0], 0) + 1
        manifest["parts"][name] = {
            "file": str(path), "documents": len(docs), "records": written,
            "by_source": by_source,
            "characters": sum(len(d.text) for d in docs),
            "ids_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest(),
            **({"ids": ids} if len(ids) <= 300 else {})}
    (out / "corpus.json").write_text(json.dumps(manifest, ensure_ascii=False, indent=1) + "\n",
                                     encoding="utf-8")
    return manifest


# ---------------------------------------------------------------- the three runs


def pretrain_config(settings: DomainSettings, run: str, dataset: Path, output_dir: Path,
                    init_from: Path | None = None) -> dict[str, Any]:
    """The ``hetlm pretrain`` config of one run (single process, one micro-batch per step)."""
    budget = settings.budgets()[run]
    steps = budget["steps"]
    train: dict[str, Any] = {
        "global_batch": settings.batch_size, "micro_batch": settings.batch_size,
        "max_steps": steps, "precision": settings.precision, "checkpoint_every": 0,
        "keep_last": 1, "eval_every": 0, "eval_samples": 128,
        "log_every": max(1, steps // 20)}
    if init_from is None:
        train["lr"] = settings.lr
        train["warmup_steps"] = max(1, round(settings.warmup_fraction * steps))
    elif settings.continue_lr is not None:
        train["lr"] = settings.continue_lr
    model: dict[str, Any] = {"type": "bert", "preset": settings.preset}
    if init_from is not None:
        model["init_from"] = str(init_from)
    return {"run": {"output_dir": str(output_dir), "seed": 0},
            "data": {"dataset": str(dataset)}, "model": model, "train": train}


def run_one(config_dict: dict[str, Any], config_path: Path) -> dict[str, Any]:
    """Write the config, run it in this process, return the run summary (+ config values)."""
    import yaml

    from hetlm.config import parse_config
    from hetlm.train.pretrain import run_pretraining

    config_path.write_text(yaml.safe_dump(config_dict, sort_keys=False, allow_unicode=True),
                           encoding="utf-8")
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

    return [(int(r["step"]), float(r["loss"])) for r in read_metrics(metrics_path)
            if r.get("event") is None and "loss" in r]


# ---------------------------------------------------------------- the whole experiment


def run_experiment(settings: DomainSettings, log: Log = print) -> dict[str, Any]:
    """Corpora → tokenizer → three datasets → runs (a), (b), (c) → evaluation → report."""
    import torch

    from hetlm.data.packing import prepare_dataset
    from hetlm.data.tokenizer import train_tokenizer
    from hetlm.evaluate.checkpoint import ModelSpec
    from hetlm.evaluate.finetune import FinetuneOptions
    from hetlm.evaluate.suite import ALL_TASKS, EvalConfig, run_eval

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

    log("[1/6] corpora: general (Aozora) and finance (evaluation train splits only), "
        "held-out parts by document")
    t0 = time.perf_counter()
    corpora = assemble_corpora(settings.paths, settings.general_path(),
                               heldout_fraction=settings.heldout_fraction,
                               general_heldout_fraction=settings.general_heldout_fraction,
                               max_chars=settings.max_corpus_chars)
    leak = check_no_leak(corpora, settings.paths)
    manifest = write_corpora(corpora, work / "corpus")
    manifest["leak_check"] = leak
    (work / "corpus" / "corpus.json").write_text(
        json.dumps(manifest, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    for name, part in manifest["parts"].items():
        log(f"      {name}: {part['documents']:,} documents, {part['characters']:,} characters")
    log(f"      no evaluation dev/test unit used ({leak['finance_units_checked']:,} finance units "
        "checked)")
    phase("corpora", t0)
    corpus = {name: Path(part["file"]) for name, part in manifest["parts"].items()}

    log(f"[2/6] tokenizer: SentencePiece Unigram, vocab {settings.vocab_size}, on general + "
        "finance training text")
    t0 = time.perf_counter()
    tokenizer_dir = train_tokenizer([corpus["general_train"], corpus["finance_train"]],
                                    work / "tokenizer", vocab_size=settings.vocab_size)
    phase("tokenizer", t0)

    log(f"[3/6] packing general, finance and mixed datasets ({settings.seq_len}-token rows)")
    t0 = time.perf_counter()
    inputs = {"general": [corpus["general_train"]], "finance": [corpus["finance_train"]],
              "mixed": [corpus["general_train"], corpus["finance_train"]]}
    datasets: dict[str, Path] = {}
    prepared: dict[str, Any] = {}
    for name, files in inputs.items():
        datasets[name] = work / "data" / name
        summary = prepare_dataset(files, tokenizer_dir, datasets[name], seq_len=settings.seq_len,
                                  validation_fraction=0.01, overwrite=True)
        prepared[name] = {"train_sequences": summary.train.sequences,
                          "train_tokens": summary.train.tokens,
                          "validation_sequences": summary.validation.sequences}
        log(f"      {name}: {summary.train.sequences:,} train rows "
            f"({summary.train.tokens:,} tokens), {summary.validation.sequences:,} validation rows "
            "(run-time monitor only)")
    phase("prepare", t0)

    runs_dir = work / "runs"
    runs_dir.mkdir(exist_ok=True)
    summaries: dict[str, dict[str, Any]] = {}
    budgets = settings.budgets()
    plan = {"a": ("general", None), "b": ("mixed", None), "c": ("finance", "a")}
    for index, run in enumerate(RUNS):
        data_name, parent = plan[run]
        init = Path(summaries[parent]["model_dir"]) if parent else None
        log(f"[4/6] pretraining ({run}) {RUN_NAMES[run]}: BERT-{settings.preset}, "
            f"{budgets[run]['steps']} steps x {settings.batch_size} on {data_name}"
            + (f", from {init}" if init else ", from scratch") + f" ({index + 1}/3)")
        t0 = time.perf_counter()
        config = pretrain_config(settings, run, datasets[data_name], runs_dir / RUN_NAMES[run],
                                 init_from=init)
        summaries[run] = run_one(config, runs_dir / f"{RUN_NAMES[run]}.yaml")
        summaries[run]["dataset"] = data_name
        phase(f"pretrain_{run}", t0)
        s = summaries[run]
        log(f"      loss {s['loss_first']:.3f} -> {s['loss_last']:.3f}, run-time held-out "
            f"{s['eval_loss']:.3f} ({timings[f'pretrain_{run}']:.0f} s)")
    models = {run: Path(summaries[run]["model_dir"]) for run in RUNS}
    init_check = {"c_init_from": summaries["c"]["init_from"], "a_model_dir": str(models["a"]),
                  "rel_distance_c_from_a": weight_distance(models["a"], models["c"]),
                  "rel_distance_b_from_a": weight_distance(models["a"], models["b"])}
    log(f"      (c) started from (a): ||c - a|| / ||a|| = "
        f"{init_check['rel_distance_c_from_a']:.3f} (b, trained from scratch: "
        f"{init_check['rel_distance_b_from_a']:.3f})")

    log(f"[5/6] evaluation (hetlm eval): held-out MLM, chABSA and EWS fine-tuning, seeds "
        f"{','.join(map(str, settings.seeds))}")
    t0 = time.perf_counter()
    options = FinetuneOptions(epochs=settings.epochs, lr=settings.finetune_lr,
                              max_length=settings.max_length,
                              max_train_examples=settings.max_train_examples,
                              max_eval_examples=settings.max_eval_examples)
    eval_config = EvalConfig(
        models=[ModelSpec(RUN_NAMES[run], str(models[run])) for run in RUNS],
        tasks=list(ALL_TASKS), seeds=list(settings.seeds), finetune=options,
        data=settings.paths, mlm_corpora=[str(corpus[name]) for name in HELDOUT_CORPORA],
        mlm_seq_len=settings.seq_len, mlm_max_sequences=settings.mlm_max_sequences)
    report = run_eval(eval_config, output_dir=work / "eval", log=lambda line: log("      " + line))
    phase("eval", t0)
    timings["total"] = round(time.perf_counter() - started_all, 1)

    results = collect_results(settings, report, summaries, prepared, manifest, init_check,
                              timings, models)
    results["loss_curves"] = {run: _loss_curve(Path(summaries[run]["output_dir"]) /
                                               "metrics.jsonl") for run in RUNS}
    log("[6/6] report")
    write_report(results, work)
    return results


# ---------------------------------------------------------------- results


def _combine(lm: dict[str, dict[str, Any]], corpora: Iterable[str]) -> dict[str, float | None]:
    """Token-weighted loss and accuracy over several corpora (exact: both are per-token means)."""
    items = [lm[c] for c in corpora if c in lm and lm[c].get("loss") is not None]
    n = sum(i["predicted_tokens"] for i in items)
    if not n:
        return {"loss": None, "accuracy": None, "tokens": 0}
    return {"loss": sum(i["loss"] * i["predicted_tokens"] for i in items) / n,
            "accuracy": sum(i["accuracy"] * i["predicted_tokens"] for i in items) / n,
            "tokens": n}


def collect_results(settings: DomainSettings, report, summaries: dict[str, dict[str, Any]],
                    prepared: dict[str, Any], manifest: dict[str, Any],
                    init_check: dict[str, Any], timings: dict[str, float],
                    models: dict[str, Path]) -> dict[str, Any]:
    """One row per run (a, b, c) with its budget, held-out MLM and task scores."""
    name_to_run = {RUN_NAMES[r]: r for r in RUNS}
    lm: dict[str, dict[str, dict[str, Any]]] = {r: {} for r in RUNS}
    for item in report.lm:
        lm[name_to_run[item["model"]]][item["corpus"]] = item
    tasks: dict[str, dict[str, dict[str, Any]]] = {r: {} for r in RUNS}
    baselines: dict[str, dict[str, Any]] = {}
    for row in report.rows:
        if row.kind == "classification":
            tasks[name_to_run[row.model]][row.task] = {
                "accuracy": row.accuracy, "accuracy_std": row.accuracy_std,
                "macro_f1": row.macro_f1, "macro_f1_std": row.macro_f1_std, "n": row.n,
                "seeds": row.seeds, "note": row.note}
        elif row.kind == "baseline":
            baselines[row.task] = {"accuracy": row.accuracy, "macro_f1": row.macro_f1, "n": row.n}
    budgets = settings.budgets()
    tokens_per_step = settings.batch_size * settings.seq_len
    rows = []
    for run in RUNS:
        s = summaries[run]
        finance = _combine(lm[run], ("finance-chabsa-heldout", "finance-ews-heldout"))
        rows.append({
            "run": run, "name": RUN_NAMES[run], **budgets[run],
            "tokens_seen": budgets[run]["total_steps"] * tokens_per_step,
            "lr": s["lr"], "warmup_steps": s["warmup_steps"], "init_from": s["init_from"],
            "model_dir": str(models[run]), "pretrain_seconds": round(s["seconds"], 1),
            "train_loss_first": s["loss_first"], "train_loss_last": s["loss_last"],
            "finance_mlm": finance, "general_mlm": _combine(lm[run], ("general-heldout",)),
            "mlm": lm[run], "tasks": tasks[run]})
    return {"settings": settings.as_dict(), "budgets_note": budget_note(settings),
            "rows": rows, "baselines": baselines, "datasets": prepared,
            "corpus": {k: {kk: vv for kk, vv in v.items() if kk != "ids"}
                       for k, v in manifest["parts"].items()},
            "leak_check": manifest["leak_check"], "corpus_notes": manifest["notes"],
            "init_check": init_check, "timings_s": timings, "machine": machine_info(),
            "eval_report": str(Path(settings.workdir) / "eval" / "eval.json")}


def budget_note(settings: DomainSettings) -> str:
    n, m, b, s = settings.steps, settings.continue_steps, settings.batch_size, settings.seq_len
    return (f"one optimizer step = {b} sequences x {s} tokens. (a) {n} steps on general text; "
            f"(b) {n + m} steps from scratch on general + finance; (c) (a)'s {n} steps, then "
            f"{m} on finance: (b) and (c) both {n + m} steps ({(n + m) * b * s:,} tokens), (a) "
            f"{n}.")


def machine_info() -> dict[str, Any]:
    import platform

    info: dict[str, Any] = {"cpus": os.cpu_count(), "platform": platform.platform()}
    with contextlib.suppress(OSError):
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return info


def _pct(value: float | None, std: float | None = None) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}" + (f" ± {100 * std:.1f}" if std is not None else "")


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _task_cells(task: dict[str, Any] | None) -> list[str]:
    if not task:
        return ["-", "-"]
    return [_pct(task["accuracy"], task.get("accuracy_std")),
            _pct(task["macro_f1"], task.get("macro_f1_std"))]


MAIN_HEADER = ("run", "pretraining", "optimizer steps", "finance MLM loss", "finance MLM acc %",
               "general MLM loss", "chABSA acc %", "chABSA macro-F1 %", "EWS acc %",
               "EWS macro-F1 %")


def main_table(results: dict[str, Any]) -> list[tuple[str, ...]]:
    """The summary table: one row per run, then the majority-class floor."""
    labels = {"a": "general only", "b": "general + finance, from scratch",
              "c": "(a), then finance"}
    cells = [MAIN_HEADER]
    for row in results["rows"]:
        cells.append((f"({row['run']}) {row['name']}", labels[row["run"]], row["budget"],
                      _num(row["finance_mlm"]["loss"]), _pct(row["finance_mlm"]["accuracy"]),
                      _num(row["general_mlm"]["loss"]),
                      *_task_cells(row["tasks"].get("chabsa")),
                      *_task_cells(row["tasks"].get("ews"))))
    base = results["baselines"]
    if base:
        cells.append(("majority class", "", "", "", "", "",
                      *_task_cells(base.get("chabsa")), *_task_cells(base.get("ews"))))
    return cells


def mlm_table(results: dict[str, Any]) -> list[tuple[str, ...]]:
    cells = [("run", *(f"{c} loss / acc %" for c in HELDOUT_CORPORA))]
    for row in results["rows"]:
        cells.append((f"({row['run']}) {row['name']}",
                      *(f"{_num(row['mlm'].get(c, {}).get('loss'))} / "
                        f"{_pct(row['mlm'].get(c, {}).get('accuracy'))}" for c in HELDOUT_CORPORA)))
    first = results["rows"][0]["mlm"]
    cells.append(("masked tokens", *(f"{first.get(c, {}).get('predicted_tokens', 0):,}"
                                     for c in HELDOUT_CORPORA)))
    return cells


def render(cells: list[tuple[str, ...]]) -> str:
    widths = [max(len(line[i]) for line in cells) for i in range(len(cells[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |"
             for line in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    t = results["timings_s"]
    corpus = results["corpus"]
    leak = results["leak_check"]
    init = results["init_check"]
    rows = {r["run"]: r for r in results["rows"]}
    ft = (f"{s['epochs']} epoch(s), lr {s['finetune_lr']:g}, max length {s['max_length']}, "
          f"train subsample {s['max_train_examples'] or 'all'}, evaluated on "
          f"{'all' if s['max_eval_examples'] is None else s['max_eval_examples']} test examples, "
          f"seeds {','.join(map(str, s['seeds']))}")
    lines = [
        "# Domain adaptation: general vs mixed vs continued pretraining", "",
        render(main_table(results)), "",
        f"Budgets: {results['budgets_note']} Learning rate: (a), (b) {rows['a']['lr']:g} with "
        f"{rows['a']['warmup_steps']} / {rows['b']['warmup_steps']} warm-up steps, linear decay; "
        f"(c) {rows['c']['lr']:g} with {rows['c']['warmup_steps']} warm-up steps "
        "(the continuation defaults) unless set.", "",
        "Finance MLM: masked-token loss (nats) and top-1 accuracy on finance documents held out "
        "from pretraining (chABSA reports and Economy Watchers texts, token-weighted over the "
        "two); general MLM: held-out Aozora works. Same tokenizer for all runs, hence the same "
        "masked positions. Tasks: accuracy and macro-F1 on the evaluation's test split, mean ± "
        f"sample std over fine-tuning seeds ({ft}).", "",
        "## Held-out MLM per corpus", "", render(mlm_table(results)), "",
        "## Setup", "",
        f"- model: BERT-{s['preset']}, sequences of {s['seq_len']} tokens, batch "
        f"{s['batch_size']}, precision {s['precision']}, single process; SentencePiece Unigram "
        f"tokenizer ({s['vocab_size']:,} pieces) trained on general + finance training text.",
        "- corpora (documents / characters): " + "; ".join(
            f"{name} {part['documents']:,} / {part['characters']:,}"
            for name, part in corpus.items()) + ".",
        "- " + "; ".join(results["corpus_notes"]) + f". Leak check: none of the "
        f"{leak['finance_units_checked']:,} finance units is an evaluation dev/test unit; "
        f"{leak['chabsa_test_sentences_also_in_train_reports']} of the "
        f"{leak['chabsa_test_sentences']:,} chABSA test sentences also occur verbatim in a "
        "train report (boilerplate across companies; the split is by report, as the "
        "evaluation's).",
        f"- (c) started from (a) (`model.init_from` = {init['c_init_from']}): relative weight "
        f"distance ||c - a|| / ||a|| = {init['rel_distance_c_from_a']:.3f}, against "
        f"{init['rel_distance_b_from_a']:.3f} for (b), which shares (a)'s random "
        "initialisation but not its training.",
        "- time: " + ", ".join(f"{k} {v:.0f} s" for k, v in t.items()) + f"; machine: "
        f"{results['machine'].get('cpus')} CPUs, load average "
        f"{results['machine'].get('load_average')} at the end.",
        f"- the full `hetlm eval` report (per-seed results, confusion matrices): "
        f"{results['eval_report']}.", ""]
    return "\n".join(lines)


def plot(results: dict[str, Any], out_png: Path) -> Path:
    """Three panels: pretraining loss curves, held-out MLM loss, task macro-F1 / accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    colors = {"a": "tab:blue", "b": "tab:orange", "c": "tab:green"}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    offset = {"a": 0, "b": 0, "c": rows[0]["steps"]}
    for row in rows:
        curve = results.get("loss_curves", {}).get(row["run"]) or []
        if curve:
            steps, losses = zip(*curve, strict=True)
            ax.plot([x + offset[row["run"]] for x in steps], losses, lw=1,
                    color=colors[row["run"]], label=f"({row['run']}) {row['name']}")
    ax.set_xlabel("optimizer step ((c) continues after (a))")
    ax.set_ylabel("train MLM loss")
    ax.set_title("pretraining")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)

    ax = axes[1]
    width = 0.26
    for i, row in enumerate(rows):
        values = [row["mlm"].get(c, {}).get("loss") or 0.0 for c in HELDOUT_CORPORA]
        xs = [j + (i - 1) * width for j in range(len(HELDOUT_CORPORA))]
        ax.bar(xs, values, width, color=colors[row["run"]], label=f"({row['run']})")
        for x, v in zip(xs, values, strict=True):
            ax.text(x, v, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
    shown = [row["mlm"].get(c, {}).get("loss") for row in rows for c in HELDOUT_CORPORA]
    shown = [v for v in shown if v]
    if shown:  # the differences are small next to the losses: do not start the axis at 0
        spread = max(shown) - min(shown)
        ax.set_ylim(min(shown) - max(0.5, spread), max(shown) + 0.25 * max(0.5, spread))
    ax.set_xticks(range(len(HELDOUT_CORPORA)))
    ax.set_xticklabels([c.replace("-heldout", "") for c in HELDOUT_CORPORA], fontsize=8)
    ax.set_ylabel("held-out MLM loss (nats / masked token)")
    ax.set_title("held-out MLM (lower is better)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)

    ax = axes[2]
    metrics = [("chabsa", "accuracy"), ("chabsa", "macro_f1"), ("ews", "accuracy"),
               ("ews", "macro_f1")]
    for i, row in enumerate(rows):
        values = [100 * (row["tasks"].get(t, {}).get(m) or 0.0) for t, m in metrics]
        errors = [100 * (row["tasks"].get(t, {}).get(f"{m}_std") or 0.0) for t, m in metrics]
        xs = [j + (i - 1) * width for j in range(len(metrics))]
        ax.bar(xs, values, width, yerr=errors, capsize=2, color=colors[row["run"]],
               label=f"({row['run']})")
    for j, (t, m) in enumerate(metrics):
        base = results["baselines"].get(t, {}).get(m)
        if base is not None:
            ax.hlines(100 * base, j - 0.45, j + 0.45, colors="gray", linestyles="dashed", lw=1)
    ax.set_xticks(range(len(metrics)))
    ax.set_xticklabels([f"{t}\n{m.replace('_', '-')}" for t, m in metrics], fontsize=8)
    ax.set_ylabel("% (mean ± std over seeds; dashed: majority class)")
    ax.set_title("fine-tuned tasks (test split)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def write_report(results: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """``domain_adaptation.md``, ``.json`` and ``.png`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {ext: out_dir / f"{REPORT_STEM}.{ext}" for ext in ("md", "json", "png")}
    paths["md"].write_text(markdown(results), encoding="utf-8")
    paths["json"].write_text(json.dumps(results, ensure_ascii=False, indent=1) + "\n",
                             encoding="utf-8")
    plot(results, paths["png"])
    return paths
