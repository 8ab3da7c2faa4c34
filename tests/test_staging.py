"""Node-local staging: verified, atomic, resumable copies; training picks the copy only when it
matches the shared dataset."""

from __future__ import annotations

import json
import shutil

import pytest
from _data_fixtures import aozora_slice, paragraph_corpus, trained_tokenizer  # noqa: F401

from hetlm.cli import main
from hetlm.data.packed import MANIFEST_FILE, load_packed_dataset, sha256_file
from hetlm.data.prepare.pipeline import prepare_dataset
from hetlm.data.staging import resolve_dataset_path, stage_dataset
from hetlm.errors import HetlmError


@pytest.fixture(scope="module")
def shared(tmp_path_factory, paragraph_corpus, trained_tokenizer):  # noqa: F811
    out = tmp_path_factory.mktemp("nfs") / "ds"
    prepare_dataset(
        [paragraph_corpus],
        trained_tokenizer,
        out,
        seq_len=32,
        validation_fraction=0.1,
        workers=1,
        chunk_chars=10000,
    )
    return out


def test_prepare_writes_a_manifest_of_every_file(shared):
    manifest = json.loads((shared / MANIFEST_FILE).read_text("utf-8"))["files"]
    on_disk = {p.relative_to(shared).as_posix() for p in shared.rglob("*") if p.is_file()}
    assert set(manifest) == on_disk - {MANIFEST_FILE}
    for rel, entry in manifest.items():
        assert entry["bytes"] == (shared / rel).stat().st_size
        assert entry["sha256"] == sha256_file(shared / rel)


def test_stage_copies_verifies_and_is_idempotent(tmp_path, shared):
    local = tmp_path / "local" / "ds"
    summary = stage_dataset(shared, local)
    assert not summary.up_to_date and summary.copied_bytes == summary.bytes > 0
    assert "sha256 verified" in summary.summary()
    original, _ = load_packed_dataset(shared)
    copy, _ = load_packed_dataset(local)
    assert copy["train"]["input_ids"] == original["train"]["input_ids"]
    again = stage_dataset(shared, local)
    assert again.up_to_date and again.copied_bytes == 0 and "nothing copied" in again.summary()
    assert sorted(p.name for p in local.parent.iterdir()) == ["ds"]  # no temporary folders


def test_a_stopped_copy_resumes_and_keeps_good_files(tmp_path, shared):
    local = tmp_path / "ds"
    staging = tmp_path / ".ds.staging"
    manifest = json.loads((shared / MANIFEST_FILE).read_text("utf-8"))["files"]
    arrows = [rel for rel in manifest if rel.endswith(".arrow")]
    (staging / "train").mkdir(parents=True)
    shutil.copy2(shared / arrows[0], staging / arrows[0])  # finished before the stop
    partial = (shared / arrows[1]).read_bytes()
    (staging / arrows[1]).parent.mkdir(parents=True, exist_ok=True)
    (staging / arrows[1]).write_bytes(partial[: len(partial) // 2])  # cut short by the stop
    summary = stage_dataset(shared, local)
    assert summary.reused_files == 1
    assert summary.copied_bytes == summary.bytes - manifest[arrows[0]]["bytes"]
    assert resolve_dataset_path(shared, local) == local
    assert not staging.exists()


def test_a_corrupt_source_is_refused_and_nothing_is_put_in_place(tmp_path, shared):
    source = tmp_path / "src"
    shutil.copytree(shared, source)
    manifest = json.loads((source / MANIFEST_FILE).read_text("utf-8"))["files"]
    victim = source / next(rel for rel in manifest if rel.endswith(".arrow"))
    data = bytearray(victim.read_bytes())
    data[-10] ^= 0xFF  # same size, different bytes
    victim.write_bytes(bytes(data))
    with pytest.raises(HetlmError, match="does not match its manifest"):
        stage_dataset(source, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()
    with pytest.raises(HetlmError, match="not a hetlm dataset"):
        stage_dataset(tmp_path, tmp_path / "dst2")


def test_resolve_dataset_path_uses_only_a_matching_copy(tmp_path, shared):
    local = tmp_path / "ds"
    reasons: list[str] = []
    assert resolve_dataset_path(shared, None) == shared
    assert resolve_dataset_path(shared, local, report=reasons.append) == shared
    assert "does not exist" in reasons[-1] and "hetlm stage" in reasons[-1]
    stage_dataset(shared, local)
    assert resolve_dataset_path(shared, local, report=reasons.append) == local
    # a truncated local file: back to the shared copy, with the reason
    arrow = next((local / "train").glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:-1])
    assert resolve_dataset_path(shared, local, report=reasons.append) == shared
    assert "bytes, not" in reasons[-1]
    # a copy of another version of the dataset
    stage_dataset(shared, local, verify_existing=True)  # repaired: sizes differed
    other = tmp_path / "other"
    shutil.copytree(shared, other)
    manifest = json.loads((other / MANIFEST_FILE).read_text("utf-8"))
    manifest["files"]["hetlm_dataset.json"]["sha256"] = "0" * 64
    (other / MANIFEST_FILE).write_text(json.dumps(manifest), encoding="utf-8")
    assert resolve_dataset_path(other, local, report=reasons.append) == other
    assert "another version" in reasons[-1]


def test_cli_stage(tmp_path, capsys, shared):
    assert main(["stage", str(shared), str(tmp_path / "copy"), "--quiet"]) == 0
    assert "Staged" in capsys.readouterr().out
    assert main(["stage", str(shared), str(tmp_path / "copy"), "--verify-existing"]) == 0
    assert "already an up-to-date copy" in capsys.readouterr().out
    code = main(["stage", str(tmp_path / "missing"), str(tmp_path / "x")])
    assert code == 2 and "not a hetlm dataset" in capsys.readouterr().err
