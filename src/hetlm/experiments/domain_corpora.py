"""The finance and general corpora of the domain-adaptation experiment, without leaks.

Only chABSA reports and Economy Watchers texts that :mod:`hetlm.evaluate.tasks` puts in its
**train** split are used (the same functions decide), never dev or test; a fixed fraction of the
units (chABSA report, EWS distinct text, Aozora work) is held out by a hash of the unit as the
LM evaluation sets (masked or causal, as the models are).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
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

# the held-out rule: the eval's salted hash under task names of its own, so it is independent
# of the eval's train/dev/test split (and of everything else)
HELDOUT_TASK = "domain-heldout"
HELDOUT_CORPORA = ("finance-chabsa-heldout", "finance-ews-heldout", "general-heldout")


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
    finance_train: list[Document]  # chABSA train reports + EWS train texts, not held out
    finance_heldout: dict[str, list[Document]]  # "chabsa", "ews": the finance LM eval set
    notes: list[str] = field(default_factory=list)

    def parts(self) -> dict[str, list[Document]]:
        return {
            "general_train": self.general_train,
            "finance_train": self.finance_train,
            "general-heldout": self.general_heldout,
            "finance-chabsa-heldout": self.finance_heldout["chabsa"],
            "finance-ews-heldout": self.finance_heldout["ews"],
        }


def is_heldout(source: str, key: str, fraction: float) -> bool:
    """Whether a unit of ``source`` is in the experiment's held-out LM set (hash of the key)."""
    return split_score(f"{HELDOUT_TASK}/{source}", key) < fraction


def _split_heldout(
    units: list[tuple[str, Document]], source: str, fraction: float
) -> tuple[list[Document], list[Document]]:
    """(train, held-out) by the hash rule; at least one unit on each side when there are two."""
    heldout = {key for key, _ in units if is_heldout(source, key, fraction)}
    if len(units) >= 2 and not heldout:
        heldout = {
            min((key for key, _ in units), key=lambda k: split_score(f"{HELDOUT_TASK}/{source}", k))
        }
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
    chabsa = [
        (doc.id, Document(f"chabsa/{doc.id}", doc.text))
        for doc in read_chabsa(paths.chabsa_path())
        if split_of("chabsa", doc.id) == "train"
    ]
    ews = [
        (e.group, Document(f"ews/{e.id}", e.text))
        for e in load_ews(paths.ews_path()).splits["train"]
    ]
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
        raise HetlmError(
            f"{path}: the general corpus needs at least two documents with a "
            "'text' field (one is held out)"
        )
    return units


def assemble_corpora(
    paths: DataPaths,
    general_path: Path,
    *,
    heldout_fraction: float = 0.1,
    general_heldout_fraction: float = 0.05,
    max_chars: int | None = None,
) -> Corpora:
    """General and finance corpora, each split into training and held-out parts by unit."""
    finance = finance_train_units(paths)
    fin_train: list[Document] = []
    fin_heldout: dict[str, list[Document]] = {}
    for source in ("chabsa", "ews"):
        train, held = _split_heldout(finance[source], source, heldout_fraction)
        fin_train += _cap(train, max_chars and max_chars // 2)
        fin_heldout[source] = _cap(held, max_chars and max_chars // 4)
    gen_train, gen_held = _split_heldout(
        read_general(general_path), "aozora", general_heldout_fraction
    )
    notes = [
        "finance text: chABSA reports and Economy Watchers texts in the evaluation's train "
        f"split only; {heldout_fraction:.0%} of those units held out (hash of the unit) "
        "for the finance LM evaluation"
    ]
    if max_chars is not None:
        notes.append(f"quick run: every part capped at about {max_chars:,} characters")
    return Corpora(
        _cap(gen_train, max_chars),
        _cap(gen_held, max_chars and max_chars // 4),
        fin_train,
        fin_heldout,
        notes,
    )


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
            text = text[: cut if cut > 0 else max_chars - used]
        out.append(Document(doc.id, text))
        used += len(text)
    return out


def evaluation_units(paths: DataPaths, splits: Iterable[str] = ("dev", "test")) -> dict[str, set]:
    """The chABSA report ids and EWS normalised texts the evaluation puts in ``splits``."""
    chosen = set(splits)
    chabsa = {
        doc.id for doc in read_chabsa(paths.chabsa_path()) if split_of("chabsa", doc.id) in chosen
    }
    ews_task = load_ews(paths.ews_path())
    ews = {e.text for split in chosen for e in ews_task.splits[split]}
    return {"chabsa": chabsa, "ews": ews}


def check_no_leak(corpora: Corpora, paths: DataPaths) -> dict[str, int]:
    """Raise if any finance text used here is a dev/test unit of the evaluation; count what the
    unit split cannot exclude (sentences of train reports that recur verbatim in test reports,
    e.g. boilerplate shared by companies)."""
    forbidden = evaluation_units(paths)
    finance = corpora.finance_train + [d for docs in corpora.finance_heldout.values() for d in docs]
    bad = [
        d.id
        for d in finance
        if d.id.startswith("chabsa/") and d.id.split("/", 1)[1] in forbidden["chabsa"]
    ]
    bad += [
        d.id
        for d in finance
        if d.id.startswith("ews/") and normalize_text(d.text) in forbidden["ews"]
    ]
    if bad:
        raise RuntimeError(f"finance corpus leaks evaluation dev/test units: {bad[:5]}")
    test_sentences = {
        normalize_text(s["sentence"])
        for doc in read_chabsa(paths.chabsa_path())
        if split_of("chabsa", doc.id) == "test"
        for s in doc.sentences
    }
    used = {
        normalize_text(line)
        for d in corpora.finance_train
        if d.id.startswith("chabsa/")
        for line in d.text.split("\n")
    }
    shared = {s for s in test_sentences & used if s}
    return {
        "finance_units_checked": len(finance),
        "chabsa_test_sentences": len(test_sentences),
        "chabsa_test_sentences_also_in_train_reports": len(shared),
    }


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
                    f.write(
                        json.dumps({"id": piece.id, "text": piece.text}, ensure_ascii=False) + "\n"
                    )
                    written += 1
        ids = sorted(d.id for d in docs)
        by_source: dict[str, int] = {}
        for d in docs:
            by_source[d.id.split("/", 1)[0]] = by_source.get(d.id.split("/", 1)[0], 0) + 1
        manifest["parts"][name] = {
            "file": str(path),
            "documents": len(docs),
            "records": written,
            "by_source": by_source,
            "characters": sum(len(d.text) for d in docs),
            "ids_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest(),
            **({"ids": ids} if len(ids) <= 300 else {}),
        }
    (out / "corpus.json").write_text(
        json.dumps(manifest, ensure_ascii=False, indent=1) + "\n", encoding="utf-8"
    )
    return manifest
