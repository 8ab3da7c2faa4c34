"""The whole ``hetlm eval`` run: every checkpoint on every task, into one table.

All inputs are checked before the first model is loaded (models, tokenizers, data files,
options), so a typo costs seconds, not the first hour of a run. The report is rewritten after
every result, so an interrupted run keeps what it finished.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hetlm.errors import HetlmError
from hetlm.evaluate.checkpoint import ModelSpec, check_positions, load_tokenizer
from hetlm.evaluate.finetune import FinetuneOptions, finetune_task
from hetlm.evaluate.heldout import Corpus, LMResult, PackedCorpus, evaluate_lm, load_packed_corpus
from hetlm.evaluate.linear_probe import probe_task
from hetlm.evaluate.metrics import majority_baseline
from hetlm.evaluate.report import Report, baseline_row, classification_row, lm_row, now
from hetlm.evaluate.tasks import (
    CLASSIFICATION_TASKS,
    SPLIT_BOUNDS,
    SPLIT_SALT,
    DataPaths,
    TaskData,
    heldout_texts,
    load_task,
    subsample,
)

LM_TASK = "mlm"  # held-out LM metrics: masked-LM loss for encoders, perplexity for decoders
ALL_TASKS = (LM_TASK, *CLASSIFICATION_TASKS)
BUILTIN_CORPORA = CLASSIFICATION_TASKS  # "chabsa"/"ews": that task's test-split texts

Log = Callable[[str], None]


@dataclass
class EvalConfig:
    """What to evaluate and how; ``as_dict`` goes into eval.json for reproducibility."""

    models: list[ModelSpec]
    tasks: list[str] = field(default_factory=lambda: list(ALL_TASKS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    finetune: FinetuneOptions = field(default_factory=FinetuneOptions)
    data: DataPaths = field(default_factory=DataPaths)
    mlm_corpora: list[str] = field(default_factory=lambda: list(BUILTIN_CORPORA))
    mlm_text_field: str = "text"
    mlm_seq_len: int = 128
    mlm_max_sequences: int | None = None
    lm_batch_size: int = 16

    def as_dict(self) -> dict[str, object]:
        data = {k: str(v) if v is not None else None for k, v in asdict(self.data).items()}
        return {
            "models": [asdict(m) for m in self.models],
            "tasks": self.tasks,
            "seeds": self.seeds,
            "finetune": asdict(self.finetune),
            "data": data,
            "mlm_corpora": self.mlm_corpora,
            "mlm_text_field": self.mlm_text_field,
            "mlm_seq_len": self.mlm_seq_len,
            "mlm_max_sequences": self.mlm_max_sequences,
            "split": {"salt": SPLIT_SALT, "bounds": dict(SPLIT_BOUNDS)},
        }


def parse_tasks(text: str) -> list[str]:
    """``chabsa,ews,mlm`` -> a list in that order, checked."""
    tasks = [t.strip().lower() for t in text.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in ALL_TASKS]
    if unknown or not tasks:
        raise HetlmError(
            f"unknown task {unknown[0] if unknown else text!r}: choose from "
            f"{', '.join(ALL_TASKS)} (comma-separated)"
        )
    return list(dict.fromkeys(tasks))


def parse_seeds(text: str) -> list[int]:
    """``0,1,2`` -> [0, 1, 2]."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise HetlmError(f"--seeds must be comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise HetlmError(f"--seeds must name at least one seed, each once; got {text!r}")
    return seeds


# ---------------------------------------------------------------- loading inputs up front


def corpus_name(item: str) -> str:
    """The table name of an MLM corpus: ``chabsa-test`` for built-ins, ``NAME-validation`` for
    a packed dataset folder, else the file's stem."""
    if item in BUILTIN_CORPORA and not Path(item).exists():
        return f"{item}-test"
    if _is_packed_dataset(item):
        return f"{Path(item.rstrip('/')).name}-validation"
    return Path(item).stem


def _is_packed_dataset(item: str) -> bool:
    from hetlm.data.packed import META_FILE

    return (Path(item) / META_FILE).is_file()


def load_corpora(config: EvalConfig) -> dict[str, Corpus]:
    """Each held-out corpus: built-in test splits, text files, or packed datasets."""
    from hetlm.data.prepare.corpus import CorpusStats, iter_documents, require_documents

    corpora: dict[str, Corpus] = {}
    for item in config.mlm_corpora:
        name = corpus_name(item)
        if name in corpora:
            raise HetlmError(f"two --mlm-corpus values are both called {name!r}: rename a file")
        if item in BUILTIN_CORPORA and not Path(item).exists():
            corpora[name] = heldout_texts(item, config.data, "test")
            continue
        if _is_packed_dataset(item):
            corpora[name] = load_packed_corpus(item, config.mlm_max_sequences)
            continue
        stats = CorpusStats()
        corpora[name] = list(iter_documents([item], text_field=config.mlm_text_field, stats=stats))
        require_documents(stats, [item], config.mlm_text_field)
    return corpora


def load_inputs(config: EvalConfig) -> tuple[dict[str, TaskData], dict[str, Corpus]]:
    """Check every model and load every task and corpus, before any long work starts."""
    config.finetune.check()
    if config.mlm_seq_len < 8:
        raise HetlmError(f"--mlm-seq-len must be at least 8, got {config.mlm_seq_len}")
    if config.mlm_max_sequences is not None and config.mlm_max_sequences < 1:
        raise HetlmError(f"--mlm-max-sequences must be at least 1, got {config.mlm_max_sequences}")
    if config.lm_batch_size < 1:
        raise HetlmError(f"--lm-batch-size must be at least 1, got {config.lm_batch_size}")
    for spec in config.models:
        load_tokenizer(spec)  # missing folder, no tokenizer files, empty tokenizer
        if any(t in CLASSIFICATION_TASKS for t in config.tasks):
            check_positions(spec, config.finetune.max_length, "--max-length")
        if LM_TASK in config.tasks:
            check_positions(spec, config.mlm_seq_len, "--mlm-seq-len")
    tasks = {
        name: load_task(name, config.data) for name in config.tasks if name in CLASSIFICATION_TASKS
    }
    corpora = load_corpora(config) if LM_TASK in config.tasks else {}
    return tasks, corpora


# ---------------------------------------------------------------- the run


def run_eval(config: EvalConfig, output_dir: Path | None = None, log: Log = print) -> Report:
    """Evaluate every model on every task; write the report after each result."""
    from hetlm import __version__

    tasks, corpora = load_inputs(config)
    report = Report(config={"created": now(), "hetlm_version": __version__, **config.as_dict()})
    for name, task in tasks.items():
        report.data[name] = {
            "source": str(task.source),
            "counts": task.counts(),
            "notes": task.notes,
        }
        split = config.finetune.eval_split
        evaluated = subsample(task.splits[split], config.finetune.max_eval_examples, name)
        scores = majority_baseline(
            [e.label for e in task.splits["train"]], [e.label for e in evaluated]
        )
        report.rows.append(baseline_row(name, scores, len(evaluated), split))
    for name, corpus in corpora.items():
        report.data[f"corpus:{name}"] = (
            {
                "packed_dataset": corpus.path,
                "sequences": len(corpus.rows),
                "seq_len": corpus.seq_len,
            }
            if isinstance(corpus, PackedCorpus)
            else {"documents": len(corpus), "characters": sum(len(t) for t in corpus)}
        )
    _save(report, output_dir)
    for spec in config.models:
        log(f"model {spec.name} ({spec.path})")
        for task_name in config.tasks:
            if task_name == LM_TASK:
                for result in evaluate_lm(
                    spec,
                    corpora,
                    seq_len=config.mlm_seq_len,
                    batch_size=config.lm_batch_size,
                    max_sequences=config.mlm_max_sequences,
                    device=config.finetune.device,
                ):
                    report.rows.append(lm_row(spec.name, result))
                    report.lm.append({"model": spec.name, **result.as_dict()})
                    log(f"  {spec.name} / {report.rows[-1].task}: " + _lm_line(result))
            else:
                score = probe_task if config.finetune.linear_probe else finetune_task
                result = score(spec, tasks[task_name], config.seeds, config.finetune, log=log)
                report.finetune.append(result)
                report.rows.append(classification_row(result))
            _save(report, output_dir)
    return report


def _lm_line(result: LMResult) -> str:
    if result.skipped:
        return result.skipped
    text = f"loss {result.loss:.4f}, accuracy {100 * result.accuracy:.2f}%"
    if result.perplexity is not None:
        text += f", perplexity {result.perplexity:.2f}"
    return text + f" ({result.predicted_tokens:,} tokens)"


def _save(report: Report, output_dir: Path | None) -> None:
    if output_dir is not None:
        report.write(output_dir)


def summarize(report: Report) -> str:
    """The table as printed at the end of the run."""
    from hetlm.evaluate.report import markdown_table

    return markdown_table(report.sorted_rows())
