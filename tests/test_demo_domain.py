"""``hetlm demo domain``: the finance corpus leaks no evaluation unit, the quick run goes end
to end, and (c) really continues from (a)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from hetlm.cli import main
from hetlm.evaluate.tasks import DataPaths, load_task, normalize_text
from hetlm.experiments.domain import weight_distance
from hetlm.experiments.domain_corpora import (
    assemble_corpora,
    check_no_leak,
    is_heldout,
    pieces,
    write_corpora,
)
from hetlm.experiments.domain_report import RUN_NAMES, separation

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"
GENERAL = DATA / "general_aozora" / "aozora_soseki_akutagawa.jsonl"


def _unit_id(record_id: str) -> str:
    """``chabsa/E00001#3`` -> ``chabsa/E00001`` (training files hold pieces of documents)."""
    return record_id.split("#", 1)[0]


@pytest.fixture(scope="module")
def corpora():
    return assemble_corpora(DataPaths(data_dir=DATA), GENERAL)


def test_finance_corpus_uses_only_the_evaluation_train_split(corpora, tmp_path):
    paths = DataPaths(data_dir=DATA)
    chabsa, ews = load_task("chabsa", paths), load_task("ews", paths)
    chabsa_split = {split: {e.group for e in examples} for split, examples in chabsa.splits.items()}
    ews_split = {split: {e.text for e in examples} for split, examples in ews.splits.items()}
    assert chabsa_split["test"] and ews_split["test"]

    manifest = write_corpora(corpora, tmp_path)
    finance_files = ["finance_train", "finance-chabsa-heldout", "finance-ews-heldout"]
    used_reports, used_texts = set(), set()
    for name in finance_files:
        for line in Path(manifest["parts"][name]["file"]).read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            source, key = _unit_id(record["id"]).split("/", 1)
            if source == "chabsa":
                used_reports.add(key)
            else:
                assert source == "ews"
                used_texts.add(normalize_text(record["text"]))
    # no test (or dev) unit of either task is in any finance file; every one is a train unit
    assert used_reports and used_texts
    assert not used_reports & (chabsa_split["test"] | chabsa_split["dev"])
    assert not used_texts & (ews_split["test"] | ews_split["dev"])
    assert used_reports <= chabsa_split["train"]
    assert used_texts <= ews_split["train"]
    # no EWS test comment hides inside a training piece either
    finance_text = "\n".join(
        normalize_text(json.loads(line)["text"])
        for line in Path(manifest["parts"]["finance_train"]["file"])
        .read_text(encoding="utf-8")
        .splitlines()
    )
    assert not [t for t in ews_split["test"] if len(t) > 30 and t in finance_text]
    assert check_no_leak(corpora, paths)["finance_units_checked"] == len(
        corpora.finance_train
    ) + sum(len(v) for v in corpora.finance_heldout.values())


def test_heldout_parts_are_whole_documents_apart_from_training(corpora):
    train = {_unit_id(d.id) for d in corpora.finance_train}
    for source, docs in corpora.finance_heldout.items():
        assert docs, source
        held = {d.id for d in docs}
        assert not held & train
        assert all(
            is_heldout(source, d.id.split("/", 1)[1], 0.1) for d in docs if source == "chabsa"
        )
    general_train = {d.id for d in corpora.general_train}
    general_held = {d.id for d in corpora.general_heldout}
    assert general_held and not general_held & general_train
    # the rule is a pure function of the unit: assembling again gives the same parts
    again = assemble_corpora(DataPaths(data_dir=DATA), GENERAL)
    assert [d.id for d in again.finance_train] == [d.id for d in corpora.finance_train]


def test_pieces_cut_at_line_ends_and_keep_every_line():
    from hetlm.experiments.domain_corpora import Document

    doc = Document("aozora/x", "\n".join(f"{i:03d}" + "あ" * 50 for i in range(100)))
    parts = pieces(doc, max_chars=500)
    assert len(parts) > 5 and all(len(p.text) <= 560 for p in parts)
    assert "\n".join(p.text for p in parts) == doc.text
    assert [p.id for p in parts][:2] == ["aozora/x#0", "aozora/x#1"]
    assert pieces(Document("a/b", "short"), max_chars=500) == [Document("a/b", "short")]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("demo-domain")
    started = time.perf_counter()
    code = main(["demo", "domain", "--quick", "--workdir", str(work), "--threads", "1"])
    return work, code, time.perf_counter() - started


def test_quick_demo_runs_end_to_end(quick_run, capsys):
    work, code, seconds = quick_run
    assert code == 0
    assert seconds < 60
    md = (work / "domain_adaptation.md").read_text(encoding="utf-8")
    table = [line for line in md.splitlines() if line.startswith("| (")]
    assert [line.split("|")[1].strip()[:3] for line in table[:3]] == ["(a)", "(b)", "(c)"]
    results = json.loads((work / "domain_adaptation.json").read_text(encoding="utf-8"))
    rows = results["rows"]
    assert [r["run"] for r in rows] == ["a", "b", "c"]
    a, b, c = rows
    # the budgets: (b) and (c) the same number of optimizer steps, (a) is (c)'s first part
    assert b["total_steps"] == c["total_steps"] == a["steps"] + c["steps"]
    for row in rows:
        assert row["finance_mlm"]["loss"] > 0 and row["general_mlm"]["loss"] > 0
        assert set(row["tasks"]) == {"chabsa", "ews"}
        assert 0 <= row["tasks"]["chabsa"]["accuracy"] <= 1
    assert (work / "domain_adaptation.png").stat().st_size > 10_000
    assert (work / "eval" / "eval.json").is_file()


def test_continued_run_started_from_the_general_model(quick_run):
    work, code, _ = quick_run
    assert code == 0
    results = json.loads((work / "domain_adaptation.json").read_text(encoding="utf-8"))
    a, b, c = results["rows"]
    assert a["init_from"] is None and b["init_from"] is None
    assert Path(c["init_from"]).resolve() == Path(a["model_dir"]).resolve()
    config = (work / "runs" / f"{RUN_NAMES['c']}.yaml").read_text(encoding="utf-8")
    assert f"init_from: {a['model_dir']}" in config
    # (b) shares (a)'s seed-0 initialisation but trained on its own; (c) stayed near (a)'s
    # trained weights, so it did start from them
    from_a = weight_distance(Path(a["model_dir"]), Path(c["model_dir"]))
    b_from_a = weight_distance(Path(a["model_dir"]), Path(b["model_dir"]))
    assert 0 < from_a < 0.5 * b_from_a


def test_bad_settings_are_one_line_errors(tmp_path, capsys):
    code = main(["demo", "domain", "--quick", "--workdir", str(tmp_path), "--steps", "0"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--steps must be at least 1" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("model", ["bert", "deberta-v2"])
def test_quick_demo_with_encoders_scores_masked_tokens(model, tmp_path):
    """--model bert|deberta-v2: the reference work's encoders take the same path, scored by
    masked LM."""
    code = main(
        ["demo", "domain", "--quick", "--model", model, "--workdir", str(tmp_path), "--seeds", "0"]
    )
    assert code == 0
    results = json.loads((tmp_path / "domain_adaptation.json").read_text(encoding="utf-8"))
    assert results["settings"]["model_type"] == model
    assert all(item["kind"] == "mlm" for row in results["rows"] for item in row["mlm"].values())
    assert "finance MLM loss" in (tmp_path / "domain_adaptation.md").read_text(encoding="utf-8")


def _row(run: str, chabsa_accuracy: list[float]) -> dict:
    return {"run": run, "tasks": {"chabsa": {"per_seed": {"accuracy": chabsa_accuracy}}}}


def test_separation_is_beyond_the_spread_only_when_the_seed_ranges_do_not_overlap():
    rows = [_row("a", [0.60, 0.62, 0.61]), _row("b", [0.70, 0.66, 0.68]), _row("c", [0.61, 0.65])]
    found = {item["pair"]: item for item in separation(rows)}
    assert set(found) == {"(b) - (a)", "(c) - (a)", "(c) - (b)"}
    assert found["(b) - (a)"]["beyond_spread"] is True
    assert found["(b) - (a)"]["difference"] == pytest.approx(0.07)
    assert found["(c) - (a)"]["beyond_spread"] is False  # 0.61 is inside (a)'s range
    assert found["(c) - (b)"]["beyond_spread"] is True  # every seed of (c) below every (b)
    # one seed has no spread to compare against: never "beyond"
    single = separation([_row("a", [0.5]), _row("b", [0.9]), _row("c", [0.1])])
    assert not any(item["beyond_spread"] for item in single)


def test_bad_model_is_a_one_line_error(tmp_path, capsys):
    code = main(["demo", "domain", "--quick", "--workdir", str(tmp_path), "--preset", "huge"])
    assert code == 2
    err = capsys.readouterr().err
    assert "preset" in err and len(err.strip().splitlines()) == 1
