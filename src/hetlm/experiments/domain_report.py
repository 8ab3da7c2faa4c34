"""The domain-adaptation experiment's results: tables (Markdown), JSON and a plot."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hetlm.experiments.domain_corpora import HELDOUT_CORPORA
from hetlm.models.presets import model_name

if TYPE_CHECKING:
    from hetlm.evaluate.report import Report
    from hetlm.experiments.domain import DomainSettings

RUNS = ("a", "b", "c")
RUN_NAMES = {"a": "a-general", "b": "b-mixed", "c": "c-continued"}
REPORT_STEM = "domain_adaptation"


def _combine(lm: dict[str, dict[str, Any]], corpora: Iterable[str]) -> dict[str, float | None]:
    """Token-weighted loss and accuracy over several corpora (exact: both are per-token means)."""
    items = [lm[c] for c in corpora if c in lm and lm[c].get("loss") is not None]
    n = sum(i["predicted_tokens"] for i in items)
    if not n:
        return {"loss": None, "accuracy": None, "tokens": 0}
    return {
        "loss": sum(i["loss"] * i["predicted_tokens"] for i in items) / n,
        "accuracy": sum(i["accuracy"] * i["predicted_tokens"] for i in items) / n,
        "tokens": n,
    }


def collect_results(
    settings: DomainSettings,
    report: Report,
    summaries: dict[str, dict[str, Any]],
    prepared: dict[str, Any],
    manifest: dict[str, Any],
    init_check: dict[str, Any],
    timings: dict[str, float],
    models: dict[str, Path],
    probe_report: Report | None = None,
) -> dict[str, Any]:
    """One row per run (a, b, c) with its budget, held-out LM and task scores."""
    name_to_run = {RUN_NAMES[r]: r for r in RUNS}
    lm: dict[str, dict[str, dict[str, Any]]] = {r: {} for r in RUNS}
    for item in report.lm:
        lm[name_to_run[item["model"]]][item["corpus"]] = item
    tasks, baselines = task_scores(report, name_to_run)
    probe = task_scores(probe_report, name_to_run)[0] if probe_report is not None else None
    budgets = settings.budgets()
    tokens_per_step = settings.batch_size * settings.seq_len
    rows = []
    for run in RUNS:
        s = summaries[run]
        finance = _combine(lm[run], ("finance-chabsa-heldout", "finance-ews-heldout"))
        rows.append(
            {
                "run": run,
                "name": RUN_NAMES[run],
                **budgets[run],
                "tokens_seen": budgets[run]["total_steps"] * tokens_per_step,
                "lr": s["lr"],
                "warmup_steps": s["warmup_steps"],
                "init_from": s["init_from"],
                "model_dir": str(models[run]),
                "pretrain_seconds": round(s["seconds"], 1),
                "train_loss_first": s["loss_first"],
                "train_loss_last": s["loss_last"],
                "finance_mlm": finance,
                "general_mlm": _combine(lm[run], ("general-heldout",)),
                "mlm": lm[run],
                "tasks": tasks[run],
                "probe": probe[run] if probe is not None else {},
            }
        )
    return {
        "settings": settings.as_dict(),
        "budgets_note": budget_note(settings),
        "rows": rows,
        "separation": separation(rows),
        "baselines": baselines,
        "datasets": prepared,
        "corpus": {
            k: {kk: vv for kk, vv in v.items() if kk != "ids"} for k, v in manifest["parts"].items()
        },
        "leak_check": manifest["leak_check"],
        "corpus_notes": manifest["notes"],
        "init_check": init_check,
        "timings_s": timings,
        "machine": machine_info(),
        "eval_report": str(Path(settings.workdir) / "eval" / "eval.json"),
    }


PAIRS = (("b", "a"), ("c", "a"), ("c", "b"))
PROTOCOLS = (("fine-tuned", "tasks"), ("linear probe", "probe"))
TASK_METRICS = (
    ("chabsa", "accuracy"),
    ("chabsa", "macro_f1"),
    ("ews", "accuracy"),
    ("ews", "macro_f1"),
)


def separation(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each pair of runs on each task metric: the difference of the seed means, and whether it
    is beyond the seeds' spread.

    "Beyond the spread" is the strict reading: every seed of one run scores above every seed of
    the other (the ranges do not overlap). With 3 seeds that is what a reader can check by eye
    in the per-seed values, and it is stricter than a difference of twice the standard error
    whenever the spread is wide.
    """
    by_run = {row["run"]: row for row in rows}
    out = []
    for protocol, key in PROTOCOLS:
        for task, metric in TASK_METRICS:
            for x, y in PAIRS:
                xs = by_run[x].get(key, {}).get(task, {}).get("per_seed", {}).get(metric) or []
                ys = by_run[y].get(key, {}).get(task, {}).get("per_seed", {}).get(metric) or []
                if xs and ys:
                    out.append(_compare(protocol, task, metric, f"({x}) - ({y})", xs, ys))
    return out


def _compare(
    protocol: str, task: str, metric: str, pair: str, xs: list[float], ys: list[float]
) -> dict[str, Any]:
    diff = sum(xs) / len(xs) - sum(ys) / len(ys)
    apart = min(xs) > max(ys) or max(xs) < min(ys)
    return {
        "protocol": protocol,
        "task": task,
        "metric": metric,
        "pair": pair,
        "difference": diff,
        "range_x": [min(xs), max(xs)],
        "range_y": [min(ys), max(ys)],
        "beyond_spread": apart and len(xs) > 1 and len(ys) > 1,
    }


def separation_table(results: dict[str, Any]) -> list[tuple[str, ...]]:
    names = {"chabsa": "chABSA", "ews": "EWS"}
    cells = [
        (
            "protocol",
            "task",
            "metric",
            "pair",
            "difference (points)",
            "seed ranges",
            "beyond the spread",
        )
    ]
    for item in results.get("separation", []):
        lo_x, hi_x = item["range_x"]
        lo_y, hi_y = item["range_y"]
        cells.append(
            (
                item.get("protocol", "fine-tuned"),
                names.get(item["task"], item["task"]),
                item["metric"].replace("_", "-"),
                item["pair"],
                f"{100 * item['difference']:+.1f}",
                f"{100 * lo_x:.1f}-{100 * hi_x:.1f} vs {100 * lo_y:.1f}-{100 * hi_y:.1f}",
                "**yes**" if item["beyond_spread"] else "no",
            )
        )
    return cells


def lm_words(settings: dict[str, Any]) -> dict[str, str]:
    """How the report names the held-out LM metric: masked tokens (BERT) or next tokens."""
    if settings.get("model_type", "bert") == "llama":
        return {"short": "LM", "unit": "next token", "tokens": "predicted tokens"}
    return {"short": "MLM", "unit": "masked token", "tokens": "masked tokens"}


def task_scores(
    report: Report, name_to_run: dict[str, str]
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Per run and task: the seed means and stds and the per-seed values; and the baselines."""
    per_seed = {
        (name_to_run[t.model], t.task): {
            "accuracy": [r.accuracy for r in t.runs],
            "macro_f1": [r.macro_f1 for r in t.runs],
        }
        for t in report.finetune
    }
    tasks: dict[str, dict[str, dict[str, Any]]] = {r: {} for r in RUNS}
    baselines: dict[str, dict[str, Any]] = {}
    for row in report.rows:
        if row.kind == "classification":
            tasks[name_to_run[row.model]][row.task] = {
                "accuracy": row.accuracy,
                "accuracy_std": row.accuracy_std,
                "macro_f1": row.macro_f1,
                "macro_f1_std": row.macro_f1_std,
                "n": row.n,
                "seeds": row.seeds,
                "per_seed": per_seed.get((name_to_run[row.model], row.task), {}),
                "note": row.note,
            }
        elif row.kind == "baseline":
            baselines[row.task] = {"accuracy": row.accuracy, "macro_f1": row.macro_f1, "n": row.n}
    return tasks, baselines


def budget_note(settings: DomainSettings) -> str:
    n, m, b, s = settings.steps, settings.continue_steps, settings.batch_size, settings.seq_len
    return (
        f"one optimizer step = {b} sequences x {s} tokens. (a) {n} steps on general text; "
        f"(b) {n + m} steps from scratch on general + finance; (c) (a)'s {n} steps, then "
        f"{m} on finance: (b) and (c) both {n + m} steps ({(n + m) * b * s:,} tokens), (a) "
        f"{n}."
    )


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
    return [
        _pct(task["accuracy"], task.get("accuracy_std")),
        _pct(task["macro_f1"], task.get("macro_f1_std")),
    ]


def main_header(lm: str) -> tuple[str, ...]:
    return (
        "run",
        "pretraining",
        "optimizer steps",
        f"finance {lm} loss",
        f"finance {lm} acc %",
        f"general {lm} loss",
        "chABSA acc %",
        "chABSA macro-F1 %",
        "EWS acc %",
        "EWS macro-F1 %",
    )


def main_table(results: dict[str, Any]) -> list[tuple[str, ...]]:
    """The summary table: one row per run, then the majority-class floor."""
    labels = {"a": "general only", "b": "general + finance, from scratch", "c": "(a), then finance"}
    cells = [main_header(lm_words(results["settings"])["short"])]
    for row in results["rows"]:
        cells.append(
            (
                f"({row['run']}) {row['name']}",
                labels[row["run"]],
                row["budget"],
                _num(row["finance_mlm"]["loss"]),
                _pct(row["finance_mlm"]["accuracy"]),
                _num(row["general_mlm"]["loss"]),
                *_task_cells(row["tasks"].get("chabsa")),
                *_task_cells(row["tasks"].get("ews")),
            )
        )
    base = results["baselines"]
    if base:
        cells.append(
            (
                "majority class",
                "",
                "",
                "",
                "",
                "",
                *_task_cells(base.get("chabsa")),
                *_task_cells(base.get("ews")),
            )
        )
    return cells


def probe_table(results: dict[str, Any]) -> list[tuple[str, ...]]:
    """The linear probe's scores: one row per run, then the majority-class floor."""
    cells = [("run", "chABSA acc %", "chABSA macro-F1 %", "EWS acc %", "EWS macro-F1 %")]
    for row in results["rows"]:
        cells.append(
            (
                f"({row['run']}) {row['name']}",
                *_task_cells(row.get("probe", {}).get("chabsa")),
                *_task_cells(row.get("probe", {}).get("ews")),
            )
        )
    base = results["baselines"]
    if base:
        cells.append(
            ("majority class", *_task_cells(base.get("chabsa")), *_task_cells(base.get("ews")))
        )
    return cells


def mlm_table(results: dict[str, Any]) -> list[tuple[str, ...]]:
    cells = [("run", *(f"{c} loss / acc %" for c in HELDOUT_CORPORA))]
    for row in results["rows"]:
        cells.append(
            (
                f"({row['run']}) {row['name']}",
                *(
                    f"{_num(row['mlm'].get(c, {}).get('loss'))} / "
                    f"{_pct(row['mlm'].get(c, {}).get('accuracy'))}"
                    for c in HELDOUT_CORPORA
                ),
            )
        )
    first = results["rows"][0]["mlm"]
    cells.append(
        (
            lm_words(results["settings"])["tokens"],
            *(f"{first.get(c, {}).get('predicted_tokens', 0):,}" for c in HELDOUT_CORPORA),
        )
    )
    return cells


def render(cells: list[tuple[str, ...]]) -> str:
    widths = [max(len(line[i]) for line in cells) for i in range(len(cells[0]))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |"
        for line in cells
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    t = results["timings_s"]
    corpus = results["corpus"]
    leak = results["leak_check"]
    init = results["init_check"]
    rows = {r["run"]: r for r in results["rows"]}
    words = lm_words(s)
    lm = words["short"]
    ft = (
        f"{s['epochs']} epoch(s), lr {s['finetune_lr']:g}, max length {s['max_length']}, "
        f"train subsample {s['max_train_examples'] or 'all'}, evaluated on "
        f"{'all' if s['max_eval_examples'] is None else s['max_eval_examples']} test examples, "
        f"seeds {','.join(map(str, s['seeds']))}"
    )
    lines = [
        "# Domain adaptation: general vs mixed vs continued pretraining",
        "",
        render(main_table(results)),
        "",
        f"Budgets: {results['budgets_note']} Learning rate: (a), (b) {rows['a']['lr']:g} with "
        f"{rows['a']['warmup_steps']} / {rows['b']['warmup_steps']} warm-up steps, linear decay; "
        f"(c) {rows['c']['lr']:g} with {rows['c']['warmup_steps']} warm-up steps "
        "(the continuation defaults) unless set.",
        "",
        f"Finance {lm}: loss (nats per {words['unit']}) and top-1 accuracy on finance documents "
        "held out from pretraining (chABSA reports and Economy Watchers texts, token-weighted "
        f"over the two); general {lm}: held-out Aozora works. Same tokenizer for all runs, "
        f"hence the same {words['tokens']}. Tasks: accuracy and macro-F1 on the evaluation's "
        f"test split, mean ± sample std over fine-tuning seeds ({ft}).",
        "",
        *probe_section(results),
        "## Which differences are beyond the seeds' spread",
        "",
        "Difference of the seed means; beyond the spread when every seed of one run scores "
        "above every seed of the other.",
        "",
        render(separation_table(results)),
        "",
        f"## Held-out {lm} per corpus",
        "",
        render(mlm_table(results)),
        "",
        "## Setup",
        "",
        f"- model: {model_name(s.get('model_type', 'bert'), s['preset'])}, sequences of {s['seq_len']} tokens, batch "
        f"{s['batch_size']}, precision {s['precision']}, single process; SentencePiece Unigram "
        f"tokenizer ({s['vocab_size']:,} pieces) trained on general + finance training text.",
        "- corpora (documents / characters): "
        + "; ".join(
            f"{name} {part['documents']:,} / {part['characters']:,}"
            for name, part in corpus.items()
        )
        + ".",
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
        f"{results['eval_report']}.",
        "",
    ]
    return "\n".join(lines)


def probe_section(results: dict[str, Any]) -> list[str]:
    """The linear probe's table and what it is, when the experiment ran one."""
    if not any(row.get("probe") for row in results["rows"]):
        return []
    s = results["settings"]
    return [
        "## Linear probe: the frozen models",
        "",
        "A linear classifier trains on each frozen model's features (`hetlm eval "
        "--linear-probe`: the mean of the last hidden states for an encoder, the last text "
        "token's for a decoder, standardised; lr "
        f"{s['probe_lr']:g}, {s['probe_epochs']} epochs, the same examples and seeds); the "
        "pretrained model stays as pretraining left it, so this scores what pretraining put "
        "into its representations, which full fine-tuning can relearn from the task's own "
        "examples.",
        "",
        render(probe_table(results)),
        "",
    ]


def plot(results: dict[str, Any], out_png: Path) -> Path:
    """Three panels: pretraining loss curves, held-out LM loss, task macro-F1 / accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    colors = {"a": "tab:blue", "b": "tab:orange", "c": "tab:green"}
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    ax = axes[0]
    offset = {"a": 0, "b": 0, "c": rows[0]["steps"]}
    for row in rows:
        curve = results.get("loss_curves", {}).get(row["run"]) or []
        if curve:
            steps, losses = zip(*curve, strict=True)
            ax.plot(
                [x + offset[row["run"]] for x in steps],
                losses,
                lw=1,
                color=colors[row["run"]],
                label=f"({row['run']}) {row['name']}",
            )
    ax.set_xlabel("optimizer step ((c) continues after (a))")
    lm = lm_words(results["settings"])
    ax.set_ylabel(f"train {lm['short']} loss")
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
    ax.set_ylabel(f"held-out {lm['short']} loss (nats / {lm['unit']})")
    ax.set_title(f"held-out {lm['short']} (lower is better)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)

    task_panel(axes[2], results, "tasks", "fine-tuned tasks (test split)")
    task_panel(axes[3], results, "probe", "linear probe, frozen models (test split)")
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def task_panel(ax: Any, results: dict[str, Any], key: str, title: str) -> None:
    """Accuracy and macro-F1 per task, a bar per run with its seeds' std, majority dashed."""
    colors = {"a": "tab:blue", "b": "tab:orange", "c": "tab:green"}
    width = 0.26
    metrics = list(TASK_METRICS)
    for i, row in enumerate(results["rows"]):
        scores = row.get(key) or {}
        values = [100 * (scores.get(t, {}).get(m) or 0.0) for t, m in metrics]
        errors = [100 * (scores.get(t, {}).get(f"{m}_std") or 0.0) for t, m in metrics]
        xs = [j + (i - 1) * width for j in range(len(metrics))]
        ax.bar(
            xs,
            values,
            width,
            yerr=errors,
            capsize=2,
            color=colors[row["run"]],
            label=f"({row['run']})",
        )
    for j, (t, m) in enumerate(metrics):
        base = results["baselines"].get(t, {}).get(m)
        if base is not None:
            ax.hlines(100 * base, j - 0.45, j + 0.45, colors="gray", linestyles="dashed", lw=1)
    ax.set_xticks(range(len(metrics)))
    ax.set_xticklabels([f"{t}\n{m.replace('_', '-')}" for t, m in metrics], fontsize=8)
    ax.set_ylabel("% (mean ± std over seeds; dashed: majority class)")
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)


def write_report(results: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """``domain_adaptation.md``, ``.json`` and ``.png`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {ext: out_dir / f"{REPORT_STEM}.{ext}" for ext in ("md", "json", "png")}
    paths["md"].write_text(markdown(results), encoding="utf-8")
    paths["json"].write_text(
        json.dumps(results, ensure_ascii=False, indent=1) + "\n", encoding="utf-8"
    )
    plot(results, paths["png"])
    return paths
