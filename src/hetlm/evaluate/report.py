"""The results table: one row per (model, task), as Markdown (also printed) and JSON.

Classification rows carry accuracy and macro-F1 as mean ± sample standard deviation over the
seeds; language-model rows carry the held-out loss (nats per predicted token), accuracy and,
for decoders, perplexity. A "(majority class)" row per task shows what predicting the training
set's most frequent class scores, the floor any fine-tuned model must clear.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hetlm.evaluate.finetune import TaskResult
from hetlm.evaluate.heldout import LMResult
from hetlm.evaluate.metrics import mean_std

MAJORITY = "(majority class)"
MARKDOWN_FILE = "eval.md"
JSON_FILE = "eval.json"


@dataclass
class Row:
    """One line of the table; fields that do not apply to the row's kind stay ``None``."""

    model: str
    task: str
    kind: str  # "classification", "baseline", "mlm" or "clm"
    accuracy: float | None = None
    accuracy_std: float | None = None
    macro_f1: float | None = None
    macro_f1_std: float | None = None
    loss: float | None = None
    perplexity: float | None = None
    n: int = 0  # evaluated examples, or predicted tokens for LM rows
    seeds: list[int] = field(default_factory=list)
    note: str = ""


def classification_row(result: TaskResult) -> Row:
    acc, acc_std = mean_std([r.accuracy for r in result.runs])
    f1, f1_std = mean_std([r.macro_f1 for r in result.runs])
    return Row(
        result.model,
        result.task,
        "classification",
        accuracy=acc,
        accuracy_std=acc_std,
        macro_f1=f1,
        macro_f1_std=f1_std,
        n=result.eval_examples,
        seeds=[r.seed for r in result.runs],
        note=f"{result.eval_split}, {result.train_examples:,} train examples"
        + (", linear probe" if result.linear_probe else ""),
    )


def baseline_row(task: str, scores: dict[str, float], n: int, split: str) -> Row:
    return Row(
        MAJORITY,
        task,
        "baseline",
        accuracy=scores["accuracy"],
        macro_f1=scores["macro_f1"],
        n=n,
        note=split,
    )


def lm_row(model: str, result: LMResult) -> Row:
    if result.skipped:
        return Row(model, f"{result.kind}:{result.corpus}", result.kind, note=result.skipped)
    unit = "masked" if result.kind == "mlm" else "predicted"
    return Row(
        model,
        f"{result.kind}:{result.corpus}",
        result.kind,
        accuracy=result.accuracy,
        loss=result.loss,
        perplexity=result.perplexity,
        n=result.predicted_tokens,
        note=f"{unit} tokens in {result.sequences:,} x {result.seq_len}",
    )


# ---------------------------------------------------------------- rendering


def _percent(mean: float | None, std: float | None) -> str:
    if mean is None:
        return ""
    return f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if std is not None else "")


def _number(value: float | None, digits: int = 3) -> str:
    return "" if value is None else f"{value:,.{digits}f}"


HEADER = ("model", "task", "accuracy %", "macro-F1 %", "loss", "perplexity", "n", "seeds", "note")


def markdown_table(rows: list[Row]) -> str:
    """A GitHub-style table, padded so it also reads as plain text."""
    cells = [HEADER] + [
        (
            r.model,
            r.task,
            _percent(r.accuracy, r.accuracy_std),
            _percent(r.macro_f1, r.macro_f1_std),
            _number(r.loss),
            _number(r.perplexity, 2),
            f"{r.n:,}" if r.n else "",
            ",".join(map(str, r.seeds)),
            r.note,
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in cells) for i in range(len(HEADER))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |"
        for line in cells
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


@dataclass
class Report:
    """Everything ``hetlm eval`` found; written as Markdown and JSON after every result."""

    config: dict[str, Any]
    data: dict[str, Any] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)
    finetune: list[TaskResult] = field(default_factory=list)
    lm: list[dict[str, Any]] = field(default_factory=list)

    def sorted_rows(self) -> list[Row]:
        """Grouped by task (baseline first), then models in the order given."""
        task_order = list(dict.fromkeys(r.task for r in self.rows))
        return sorted(self.rows, key=lambda r: (task_order.index(r.task), r.kind != "baseline"))

    def markdown(self) -> str:
        created = self.config.get("created", "")
        lines = ["# hetlm eval", "", markdown_table(self.sorted_rows()), ""]
        lines += [
            "accuracy and macro-F1: mean ± sample std over the seeds, on the split named in "
            "the note; loss: nats per predicted token (masked tokens for MLM).",
            "",
        ]
        for task, info in self.data.items():
            for note in info.get("notes", []):
                lines.append(f"- {task}: {note}")
        lines += [
            "",
            f"Created {created} by hetlm {self.config.get('hetlm_version', '')}; "
            "the full configuration and per-seed results are in eval.json.",
            "",
        ]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "data": self.data,
            "rows": [asdict(r) for r in self.sorted_rows()],
            "finetune": [r.as_dict() for r in self.finetune],
            "lm": self.lm,
        }

    def write(self, output_dir: Path) -> tuple[Path, Path]:
        """Write eval.md and eval.json (each replaced atomically, so a reader never sees half)."""
        output_dir.mkdir(parents=True, exist_ok=True)
        md, js = output_dir / MARKDOWN_FILE, output_dir / JSON_FILE
        _replace(md, self.markdown())
        _replace(js, json.dumps(self.as_dict(), ensure_ascii=False, indent=2) + "\n")
        return md, js


def _replace(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    partial.replace(path)


def now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
