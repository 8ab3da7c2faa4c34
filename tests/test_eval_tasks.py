"""Evaluation splits and metrics: disjoint, stable, deduplicated, independent of the seed."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from _eval_fixtures import CHABSA, EVAL_DATA, EWS

from hetlm.errors import HetlmError
from hetlm.evaluate.finetune import crop_around
from hetlm.evaluate.metrics import accuracy, macro_f1, majority_baseline, mean_std
from hetlm.evaluate.tasks import (
    CHABSA_FILE,
    DataPaths,
    export_splits,
    find_data_dir,
    load_chabsa,
    load_ews,
    normalize_text,
    read_chabsa,
    split_of,
    subsample,
)

# The shipped chABSA test reports under split rule v1: a changed rule must show up here.
CHABSA_TEST_DOCUMENTS = [
    "E00030",
    "E00273",
    "E00308",
    "E00693",
    "E00840",
    "E00909",
    "E00939",
    "E01156",
    "E01183",
    "E01624",
    "E01629",
    "E01719",
    "E01987",
    "E02105",
    "E02152",
    "E02289",
    "E02608",
    "E04136",
    "E04291",
    "E04360",
    "E05110",
    "E05714",
    "E27633",
]


@pytest.fixture(scope="module")
def shipped() -> DataPaths:
    return DataPaths(data_dir=find_data_dir())


def test_chabsa_splits_are_disjoint_by_document_and_complete(shipped):
    task = load_chabsa(shipped.chabsa_path())
    groups = {name: {e.group for e in examples} for name, examples in task.splits.items()}
    assert not groups["train"] & groups["test"]
    assert not groups["train"] & groups["dev"] and not groups["dev"] & groups["test"]
    assert sum(len(g) for g in groups.values()) == 230
    assert sum(len(v) for v in task.splits.values()) == 7723  # every opinion, once
    assert sorted(groups["test"]) == CHABSA_TEST_DOCUMENTS
    for e in task.splits["test"][:200]:
        start, end = e.span
        assert e.text[start:end] == e.text_pair  # the pair is (sentence, its target)


def test_splits_are_the_same_on_every_load(shipped):
    first, second = load_chabsa(shipped.chabsa_path()), load_chabsa(shipped.chabsa_path())
    for name in first.splits:
        assert [e.id for e in first.splits[name]] == [e.id for e in second.splits[name]]
    ews_a, ews_b = load_ews(shipped.ews_path()), load_ews(shipped.ews_path())
    assert [e.id for e in ews_a.splits["test"]] == [e.id for e in ews_b.splits["test"]]


def test_chabsa_split_does_not_depend_on_file_order(tmp_path):
    lines = CHABSA.read_text(encoding="utf-8").splitlines()
    reversed_file = tmp_path / "reversed.jsonl"
    reversed_file.write_text("\n".join(reversed(lines)) + "\n", encoding="utf-8")
    forward, backward = load_chabsa(CHABSA), load_chabsa(reversed_file)
    for name in forward.splits:
        assert sorted(e.id for e in forward.splits[name]) == sorted(
            e.id for e in backward.splits[name]
        )


def test_ews_has_no_text_in_two_splits_and_no_duplicates(shipped):
    task = load_ews(shipped.ews_path())
    texts = {
        name: [normalize_text(e.text) for e in examples] for name, examples in task.splits.items()
    }
    assert not set(texts["train"]) & set(texts["test"])
    assert not set(texts["train"]) & set(texts["dev"]) and not set(texts["dev"]) & set(
        texts["test"]
    )
    everything = [t for ts in texts.values() for t in ts]
    assert len(everything) == len(set(everything))  # deduplicated
    # the shipped file: 7,033 records, 6,988 distinct texts, 4 with disagreeing labels
    assert len(everything) == 6984
    assert "4 texts with disagreeing labels dropped" in task.notes[0]


def test_ews_fixture_repeats_are_merged_and_conflicts_dropped():
    task = load_ews(EWS)
    records = [json.loads(line) for line in EWS.read_text(encoding="utf-8").splitlines()]
    all_texts = [e.text for examples in task.splits.values() for e in examples]
    assert len(records) == 612 and len(all_texts) == 600
    assert "特に変化はみられない。" not in all_texts
    repeated = Counter(normalize_text(r["追加説明及び具体的状況の説明"]) for r in records)
    assert max(repeated.values()) == 2 and all(
        all_texts.count(t) == 1 for t in repeated if t in all_texts
    )


def test_split_rule_is_a_pure_function_of_task_and_key():
    assert split_of("chabsa", "E00030") == "test"
    assert split_of("chabsa", "E00030") == split_of("chabsa", "E00030")
    shares = Counter(split_of("ews", f"text {i}") for i in range(20000))
    assert 0.78 < shares["train"] / 20000 < 0.82 and 0.08 < shares["test"] / 20000 < 0.12


def test_subsample_is_fixed_and_keeps_order():
    task = load_chabsa(CHABSA)
    train = task.splits["train"]
    a, b = subsample(train, 50, "chabsa"), subsample(train, 50, "chabsa")
    assert [e.id for e in a] == [e.id for e in b] and len(a) == 50
    positions = [train.index(e) for e in a]
    assert positions == sorted(positions)
    assert subsample(train, None, "chabsa") == train


def test_export_writes_train_documents_without_test_ones(tmp_path):
    manifest = export_splits(DataPaths(data_dir=EVAL_DATA), tmp_path / "splits")
    train_ids = {
        json.loads(line)["id"]
        for line in (tmp_path / "splits" / "chabsa_train_documents.jsonl").read_text().splitlines()
    }
    test_ids = set(manifest["tasks"]["chabsa"]["document_ids"]["test"])
    assert train_ids and test_ids and not train_ids & test_ids
    documents = {d.id: d.text for d in read_chabsa(CHABSA)}
    line = (tmp_path / "splits" / "chabsa_test_documents.jsonl").read_text().splitlines()[0]
    record = json.loads(line)
    assert record["text"] == documents[record["id"]]
    assert (tmp_path / "splits" / "ews_test.jsonl").stat().st_size > 0


def test_crop_keeps_the_target_of_a_long_sentence():
    text = "あ" * 300 + "売上高" + "い" * 300
    cropped = crop_around(text, (300, 303), 50)
    assert len(cropped) == 50 and "売上高" in cropped
    assert crop_around("短い文", (0, 2), 50) == "短い文"
    assert crop_around(text, (0, 3), 50) == text[:50]


def test_metrics_match_hand_computed_values():
    gold = [0, 0, 1, 1, 2]
    predicted = [0, 1, 1, 1, 0]
    assert accuracy(gold, predicted) == pytest.approx(0.6)
    # F1 per class: 0 -> 2*1/(2+2)=0.5, 1 -> 2*2/(2+3)=0.8, 2 -> 0
    assert macro_f1(gold, predicted) == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert majority_baseline([1, 1, 0], [1, 0, 1, 2]) == {
        "accuracy": 0.5,
        "macro_f1": pytest.approx(2 / 9),
    }
    assert mean_std([0.5, 0.7]) == (pytest.approx(0.6), pytest.approx(0.1414213, rel=1e-5))
    assert mean_std([0.5]) == (0.5, None)


def test_bad_data_is_a_one_line_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"header": {"document_id": "E1"}, "sentences": []}\nnot json\n')
    with pytest.raises(HetlmError, match="bad.jsonl:2: not valid JSON"):
        load_chabsa(bad)
    with pytest.raises(HetlmError, match="not found"):
        load_ews(tmp_path / "missing.jsonl")
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"text": "a"}\n')
    with pytest.raises(HetlmError, match="追加説明及び具体的状況の説明"):
        load_ews(wrong)
    assert (find_data_dir() / CHABSA_FILE).is_file()
