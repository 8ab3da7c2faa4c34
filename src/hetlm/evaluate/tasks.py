"""The evaluation tasks built from the shipped financial data, with fixed splits.

Two classification tasks:

- ``chabsa``: target-level sentiment in annual securities reports (chABSA). One example per
  opinion: the sentence and the target expression as a sentence pair, label positive / negative
  / neutral. Split by *document* (one report = one company), so the boilerplate a report repeats
  from sentence to sentence never sits on both sides of the split.
- ``ews``: the Economy Watchers Survey 5-level judgment of current conditions (◎ ○ □ ▲ ×) from
  the free-text comment. Identical comments recur across months, so texts are *deduplicated
  before splitting*: one example per distinct (NFKC-normalised) text; the few texts whose
  records disagree on the label are dropped as ambiguous.

The split of a unit (document or text) is a pure function of its key: a salted BLAKE2 hash
mapped to [0, 1), train below 0.8, dev below 0.9, test above. It never depends on the
fine-tuning seed, on the other units, or on the order of the file, so the same data always
splits the same way, and a pretraining corpus can be filtered by the same rule
(:func:`export_splits`).
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hetlm.errors import HetlmError

SPLITS = ("train", "dev", "test")
SPLIT_BOUNDS = (("train", 0.8), ("dev", 0.9), ("test", 1.0))
# Changing the salt changes every split: bump it only with a new version of the benchmark.
SPLIT_SALT = "hetlm-eval-v1"

CHABSA_FILE = "finance_chabsa/chabsa_annotations.jsonl"
EWS_FILE = "finance_economy_watchers/ews_current_2024H2.jsonl"
CHABSA_LABELS = ("positive", "negative", "neutral")
EWS_LABELS = ("◎", "○", "□", "▲", "×")  # 良く, やや良く, 変わらない, やや悪く, 悪く
EWS_TEXT_FIELD = "追加説明及び具体的状況の説明"
EWS_LABEL_FIELD = "景気の現状判断"
CLASSIFICATION_TASKS = ("chabsa", "ews")


@dataclass(frozen=True)
class Example:
    """One classification example.

    ``group`` is the unit that was split (chABSA document id, EWS normalised text); ``span`` is
    the target's character offsets in ``text`` (chABSA), used to crop long sentences around it.
    """

    id: str
    text: str
    label: int
    group: str
    text_pair: str | None = None
    span: tuple[int, int] | None = None


@dataclass
class TaskData:
    """A task's labels and its train/dev/test examples, plus notes on what was dropped."""

    name: str
    labels: tuple[str, ...]
    splits: dict[str, list[Example]]
    source: Path
    notes: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, dict[str, int]]:
        """Examples per split and label, for reports."""
        return {
            split: {
                "examples": len(examples),
                "groups": len({e.group for e in examples}),
                **{
                    self.labels[k]: v for k, v in sorted(Counter(e.label for e in examples).items())
                },
            }
            for split, examples in self.splits.items()
        }


# ---------------------------------------------------------------- the split rule


def split_score(task: str, key: str) -> float:
    """A salted hash of (task, key), uniform in [0, 1)."""
    digest = hashlib.blake2b(f"{SPLIT_SALT}:{task}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def split_of(task: str, key: str) -> str:
    """The split ("train", "dev" or "test") of a unit: 80/10/10 by :func:`split_score`."""
    score = split_score(task, key)
    return next(name for name, bound in SPLIT_BOUNDS if score < bound)


def subsample(examples: Sequence[Example], limit: int | None, task: str) -> list[Example]:
    """At most ``limit`` examples, the same ones for every seed and model (hash of the id).

    Keeps the original order, so only the choice, not the data order, comes from the hash.
    """
    if limit is None or len(examples) <= limit:
        return list(examples)
    chosen = set(
        sorted(
            range(len(examples)), key=lambda i: split_score(f"{task}/subsample", examples[i].id)
        )[:limit]
    )
    return [e for i, e in enumerate(examples) if i in chosen]


def normalize_text(text: str) -> str:
    """NFKC and outer whitespace stripped: what texts are compared and deduplicated by."""
    return unicodedata.normalize("NFKC", text).strip()


# ---------------------------------------------------------------- reading JSON Lines


def read_jsonl(path: Path, what: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of each non-blank line; any bad line is a one-line error.

    Evaluation data must be exactly what was meant: unlike a pretraining corpus, a skipped
    record would silently change the test set.
    """
    if not path.is_file():
        raise HetlmError(
            f"{what} file {path} not found: pass --data-dir (the folder holding "
            f"{CHABSA_FILE} and {EWS_FILE}) or the file's own option"
        )
    try:
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as exc:
                    raise HetlmError(
                        f"{path}:{number}: not valid JSON ({exc}); the {what} file "
                        "must be JSON Lines, one object per line"
                    ) from exc
                if not isinstance(record, dict):
                    raise HetlmError(
                        f"{path}:{number}: expected a JSON object, got {type(record).__name__}"
                    )
                yield number, record
    except UnicodeDecodeError as exc:
        raise HetlmError(
            f"{path} is not UTF-8 text ({exc}): pass the {what} JSON Lines file"
        ) from exc
    except OSError as exc:
        raise HetlmError(f"cannot read {what} file {path}: {exc}") from exc


def _field(record: dict[str, Any], key: str, path: Path, number: int, kind: type = str) -> Any:
    value = record.get(key)
    if not isinstance(value, kind):
        raise HetlmError(
            f"{path}:{number}: field {key!r} is missing or not a "
            f"{kind.__name__}; is this the right file?"
        )
    return value


# ---------------------------------------------------------------- chABSA


@dataclass(frozen=True)
class ChabsaDocument:
    """One report: its id (EDINET code), company name and sentences with their opinions."""

    id: str
    name: str
    sentences: list[dict[str, Any]]

    @property
    def text(self) -> str:
        """The document text as SOURCE.md defines it: sentences joined by newlines."""
        return "\n".join(s["sentence"] for s in self.sentences)


def read_chabsa(path: Path) -> list[ChabsaDocument]:
    """The documents of a chABSA JSON Lines file, checked for the fields the task uses."""
    documents, seen = [], set()
    for number, record in read_jsonl(path, "chABSA"):
        header = _field(record, "header", path, number, dict)
        doc_id = _field(header, "document_id", path, number)
        if doc_id in seen:
            raise HetlmError(f"{path}:{number}: document {doc_id} appears twice")
        seen.add(doc_id)
        sentences = _field(record, "sentences", path, number, list)
        for sentence in sentences:
            if not isinstance(sentence, dict) or not isinstance(sentence.get("sentence"), str):
                raise HetlmError(f"{path}:{number}: a sentence of {doc_id} has no text")
            for opinion in sentence.get("opinions") or []:
                _check_opinion(opinion, sentence["sentence"], path, number)
        documents.append(ChabsaDocument(doc_id, str(header.get("document_name", "")), sentences))
    if not documents:
        raise HetlmError(f"{path} holds no chABSA documents")
    return documents


def _check_opinion(opinion: Any, sentence: str, path: Path, number: int) -> None:
    if not isinstance(opinion, dict) or opinion.get("polarity") not in CHABSA_LABELS:
        raise HetlmError(
            f"{path}:{number}: an opinion without a polarity in "
            f"{'/'.join(CHABSA_LABELS)}: {opinion!r}"[:300]
        )
    start, end = opinion.get("from"), opinion.get("to")
    if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end <= len(sentence)):
        raise HetlmError(
            f"{path}:{number}: opinion {opinion.get('target')!r} has bad offsets "
            f"from={start} to={end}"
        )


def load_chabsa(path: Path) -> TaskData:
    """chABSA as target-level sentiment pairs (sentence, target), split by document."""
    splits: dict[str, list[Example]] = {name: [] for name in SPLITS}
    for doc in read_chabsa(path):
        split = split_of("chabsa", doc.id)
        for s_index, sentence in enumerate(doc.sentences):
            text = sentence["sentence"]
            sentence_id = sentence.get("sentence_id", s_index)
            for o_index, opinion in enumerate(sentence.get("opinions") or []):
                start, end = opinion["from"], opinion["to"]
                splits[split].append(
                    Example(
                        id=f"{doc.id}/{sentence_id}/{o_index}",
                        text=text,
                        text_pair=text[start:end],
                        label=CHABSA_LABELS.index(opinion["polarity"]),
                        group=doc.id,
                        span=(start, end),
                    )
                )
    notes = [
        "target-level: one example per opinion, input (sentence, target); documents split "
        "80/10/10 by hash of the document id"
    ]
    return _checked(TaskData("chabsa", CHABSA_LABELS, splits, path, notes))


# ---------------------------------------------------------------- Economy Watchers


def load_ews(path: Path) -> TaskData:
    """EWS 5-level judgment from the comment; texts deduplicated, then split by text hash."""
    by_text: dict[str, list[tuple[str, int]]] = {}
    records = 0
    for number, record in read_jsonl(path, "Economy Watchers"):
        text = _field(record, EWS_TEXT_FIELD, path, number)
        mark = _field(record, EWS_LABEL_FIELD, path, number)
        if mark not in EWS_LABELS:
            raise HetlmError(
                f"{path}:{number}: {EWS_LABEL_FIELD} is {mark!r}, not one of {' '.join(EWS_LABELS)}"
            )
        records += 1
        key = normalize_text(text)
        if key:
            by_text.setdefault(key, []).append(
                (str(record.get("id", f"line-{number}")), EWS_LABELS.index(mark))
            )
    splits: dict[str, list[Example]] = {name: [] for name in SPLITS}
    conflicting = 0
    for key, items in by_text.items():
        if len({label for _, label in items}) > 1:
            conflicting += 1
            continue
        record_id, label = items[0]
        splits[split_of("ews", key)].append(Example(id=record_id, text=key, label=label, group=key))
    kept = sum(len(v) for v in splits.values())
    notes = [
        f"{records:,} records -> {len(by_text):,} distinct texts (NFKC, stripped); "
        f"{conflicting:,} texts with disagreeing labels dropped; {kept:,} examples; "
        "split 80/10/10 by hash of the text"
    ]
    return _checked(TaskData("ews", EWS_LABELS, splits, path, notes))


def _checked(task: TaskData) -> TaskData:
    empty = [name for name in ("train", "test") if not task.splits[name]]
    if empty:
        raise HetlmError(
            f"{task.source}: the {task.name} data gives no {' or '.join(empty)} "
            "examples; it is too small for an evaluation split"
        )
    return task


# ---------------------------------------------------------------- finding and exporting data


@dataclass(frozen=True)
class DataPaths:
    """Where the task files are; ``None`` means the file inside the repository's data/."""

    data_dir: Path | None = None
    chabsa: Path | None = None
    ews: Path | None = None

    def chabsa_path(self) -> Path:
        return self.chabsa or self._base() / CHABSA_FILE

    def ews_path(self) -> Path:
        return self.ews or self._base() / EWS_FILE

    def _base(self) -> Path:
        return self.data_dir if self.data_dir is not None else find_data_dir()


def find_data_dir() -> Path:
    """The repository's data/ folder: from the working directory or this installed package."""
    for base in (Path.cwd(), *Path(__file__).resolve().parents):
        if (base / "data" / CHABSA_FILE).is_file():
            return base / "data"
    raise HetlmError(
        f"cannot find data/{CHABSA_FILE}: run from the hetlm checkout or pass --data-dir"
    )


def load_task(name: str, paths: DataPaths) -> TaskData:
    """A classification task by name."""
    if name == "chabsa":
        return load_chabsa(paths.chabsa_path())
    if name == "ews":
        return load_ews(paths.ews_path())
    raise HetlmError(f"unknown task {name!r}: choose from {', '.join(CLASSIFICATION_TASKS)}")


def heldout_texts(name: str, paths: DataPaths, split: str = "test") -> list[str]:
    """Documents of a task's split as a held-out LM corpus (chABSA reports, EWS comments).

    The unit is the one that was split, so a model pretrained on the train split's texts has
    never seen any of these.
    """
    if name == "chabsa":
        return [
            doc.text
            for doc in read_chabsa(paths.chabsa_path())
            if split_of("chabsa", doc.id) == split
        ]
    if name == "ews":
        return [e.text for e in load_ews(paths.ews_path()).splits[split]]
    raise HetlmError(
        f"unknown built-in corpus {name!r}: choose from "
        f"{', '.join(CLASSIFICATION_TASKS)} or pass a file"
    )


def export_splits(paths: DataPaths, output_dir: Path) -> dict[str, Any]:
    """Write each task's splits as JSON Lines, for pretraining corpora that must exclude them.

    ``chabsa_{split}_documents.jsonl`` ({"id", "text"}: whole reports) feed `hetlm prepare`
    directly; ``ews_{split}.jsonl`` ({"id", "text", "label"}). ``splits.json`` lists counts and
    ids. Continued pretraining on finance text should use the train files only.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {"salt": SPLIT_SALT, "bounds": dict(SPLIT_BOUNDS), "tasks": {}}
    documents = read_chabsa(paths.chabsa_path())
    chabsa_ids: dict[str, list[str]] = {name: [] for name in SPLITS}
    for split in SPLITS:
        rows = [
            {"id": d.id, "text": d.text} for d in documents if split_of("chabsa", d.id) == split
        ]
        chabsa_ids[split] = [r["id"] for r in rows]
        _write_jsonl(output_dir / f"chabsa_{split}_documents.jsonl", rows)
    manifest["tasks"]["chabsa"] = {
        "source": str(paths.chabsa_path()),
        "unit": "document",
        "document_ids": chabsa_ids,
    }
    ews = load_ews(paths.ews_path())
    for split in SPLITS:
        _write_jsonl(
            output_dir / f"ews_{split}.jsonl",
            [{"id": e.id, "text": e.text, "label": EWS_LABELS[e.label]} for e in ews.splits[split]],
        )
    manifest["tasks"]["ews"] = {
        "source": str(paths.ews_path()),
        "unit": "distinct text",
        "counts": ews.counts(),
        "notes": ews.notes,
    }
    (output_dir / "splits.json").write_text(
        json.dumps(manifest, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
    )
    return manifest


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
