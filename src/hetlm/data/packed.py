"""A packed dataset on disk, as training reads it: its files, its schema, its loader.

``hetlm prepare`` (:mod:`hetlm.data.prepare`) writes the dataset; training, evaluation and
``hetlm stage`` only read it. What both sides must agree on lives here, so the readers need
nothing of the preparation code: the folder is a ``datasets.DatasetDict`` {"train",
"validation"} in the ``save_to_disk`` layout (Arrow, memory-mapped when loaded), one column
``input_ids`` of fixed-size int32 lists, plus ``hetlm_dataset.json`` describing it and
``hetlm_manifest.json`` (size and sha256 of every file, for ``hetlm stage``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from hetlm.errors import HetlmError

META_FILE = "hetlm_dataset.json"
FORMAT = "hetlm-packed-v1"
SPLITS = ("train", "validation")
MANIFEST_FILE = "hetlm_manifest.json"


def packed_features(seq_len: int):
    """The dataset schema: ``input_ids``, a fixed-length list of int32."""
    from datasets import Features, List, Value

    return Features({"input_ids": List(Value("int32"), length=seq_len)})


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    """The SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while data := f.read(block):
            digest.update(data)
    return digest.hexdigest()


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary name, fsync, rename: readers see the old or the new file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(json.dumps(data, ensure_ascii=False, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_packed_dataset(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """Load a dataset written by ``hetlm prepare``: (DatasetDict, metadata dict)."""
    path = Path(path)
    if not path.exists():
        raise HetlmError(f"dataset {path} does not exist: create it with `hetlm prepare`")
    meta_path = path / META_FILE
    if not path.is_dir() or not meta_path.is_file():
        raise HetlmError(
            f"{path} is not a hetlm dataset (no {META_FILE}): create it with `hetlm prepare`"
        )
    meta = _read_meta(meta_path)
    dataset = _load_splits(path)
    _check_matches_meta(dataset, meta, path)
    return dataset, meta


def _read_meta(meta_path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise HetlmError(
            f"{meta_path} is unreadable ({exc}): re-create the dataset with "
            "`hetlm prepare --overwrite`"
        ) from exc
    missing = [
        k
        for k in ("seq_len", "vocab_size", "special_token_ids")
        if not isinstance(meta, dict) or k not in meta
    ]
    if not isinstance(meta, dict) or missing:
        raise HetlmError(
            f"{meta_path} lacks {', '.join(missing) or 'its fields'}: re-create the "
            "dataset with `hetlm prepare --overwrite`"
        )
    return meta


def _load_splits(path: Path) -> Any:
    from datasets import DatasetDict, load_from_disk

    try:
        dataset = load_from_disk(str(path))
    except Exception as exc:  # datasets raises many types for damaged folders
        message = " ".join(str(exc).split())
        raise HetlmError(
            f"dataset {path} is corrupt or incomplete ({type(exc).__name__}: "
            f"{message}); re-create it with `hetlm prepare --overwrite`"
        ) from exc
    if not isinstance(dataset, DatasetDict) or set(dataset) != set(SPLITS):
        raise HetlmError(
            f"dataset {path} does not hold the splits {' and '.join(SPLITS)}: "
            "re-create it with `hetlm prepare --overwrite`"
        )
    return dataset


def _check_matches_meta(dataset: Any, meta: dict[str, Any], path: Path) -> None:
    expected = packed_features(int(meta["seq_len"]))
    for name in SPLITS:
        if dataset[name].features != expected:
            raise HetlmError(
                f"dataset {path}: the {name} split has features "
                f"{dataset[name].features}, not input_ids of length {meta['seq_len']}"
                f" as {META_FILE} says; re-create it with `hetlm prepare --overwrite`"
            )
        recorded = meta.get("num_sequences", {}).get(name)
        if recorded is not None and recorded != len(dataset[name]):
            raise HetlmError(
                f"dataset {path}: the {name} split has {len(dataset[name])} rows but "
                f"{META_FILE} says {recorded}; re-create it with "
                "`hetlm prepare --overwrite`"
            )
