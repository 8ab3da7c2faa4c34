"""Node-local staging: copy a prepared dataset from a shared filesystem to local disk, verified.

Training reads random rows of a memory-mapped dataset; over NFS every page fault is a network
round trip, and N nodes multiply the load on one server. ``hetlm stage SRC DST`` copies the
dataset once per node:

- every file is read once, hashed while it is copied, and compared with ``hetlm_manifest.json``
  (sizes and sha256, written by ``hetlm prepare``; computed from the source when a dataset has
  none), then fsynced;
- the copy is built in ``.DST.staging`` beside ``DST`` and renamed into place only when complete,
  so ``DST`` is either absent, the old copy, or a verified new one;
- a stopped copy resumes: files already in the staging folder with the right size and hash are
  kept;
- an up-to-date ``DST`` (same manifest, same sizes) is left alone.

:func:`resolve_dataset_path` is what training calls: the local copy when it exists and matches
the shared dataset's manifest, else the shared path (with the reason).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hetlm.data.packed import MANIFEST_FILE, META_FILE, sha256_file, write_json_atomic
from hetlm.errors import HetlmError

_BLOCK = 1 << 20


@dataclass
class StageSummary:
    """What ``stage_dataset`` did."""

    source: Path
    destination: Path
    files: int
    bytes: int
    copied_bytes: int
    reused_files: int
    up_to_date: bool
    seconds: float

    def summary(self) -> str:
        if self.up_to_date:
            return (
                f"{self.destination} is already an up-to-date copy of {self.source} "
                f"({self.files} files, {self.bytes / 2**20:,.1f} MiB); nothing copied."
            )
        rate = self.copied_bytes / 2**20 / max(self.seconds, 1e-9)
        reused = (
            f", {self.reused_files} file(s) reused from a stopped copy" if self.reused_files else ""
        )
        return (
            f"Staged {self.source} -> {self.destination}: {self.files} files, "
            f"{self.bytes / 2**20:,.1f} MiB, {self.copied_bytes / 2**20:,.1f} MiB copied at "
            f"{rate:,.0f} MiB/s{reused}; sizes and sha256 verified."
        )


def dataset_manifest(folder: Path) -> dict[str, Any]:
    """The dataset's manifest: ``hetlm_manifest.json``, or computed when it has none."""
    path = folder / MANIFEST_FILE
    if path.is_file():
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise HetlmError(f"{path} is unreadable ({exc}): re-create the dataset") from exc
    files = {}
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = file.relative_to(folder).as_posix()
        files[rel] = {"bytes": file.stat().st_size, "sha256": sha256_file(file)}
    return {"format": "hetlm-manifest-v1", "files": files}


def _copy_hashed(src: Path, dst: Path) -> str:
    """Copy in 1 MiB blocks, hashing what was read; fsync; return the sha256 of the data."""
    digest = hashlib.sha256()
    dst.parent.mkdir(parents=True, exist_ok=True)
    with src.open("rb") as fin, dst.open("wb") as fout:
        while data := fin.read(_BLOCK):
            digest.update(data)
            fout.write(data)
        fout.flush()
        os.fsync(fout.fileno())
    return digest.hexdigest()


def sizes_match(folder: Path, manifest: dict[str, Any]) -> str | None:
    """None when every manifest file exists in ``folder`` with its size, else what is wrong."""
    for rel, entry in manifest["files"].items():
        path = folder / rel
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != entry["bytes"]:
            return f"{rel} has {path.stat().st_size} bytes, not {entry['bytes']}"
    return None


def stage_dataset(
    source: str | Path,
    destination: str | Path,
    *,
    verify_existing: bool = False,
    progress: Callable[[str], None] | None = None,
) -> StageSummary:
    """Copy the prepared dataset ``source`` to ``destination`` with verification (see module)."""
    import time

    started = time.perf_counter()
    source, destination = Path(source), Path(destination)
    if not (source / META_FILE).is_file():
        raise HetlmError(
            f"{source} is not a hetlm dataset (no {META_FILE}): stage the --output "
            "folder of `hetlm prepare`"
        )
    manifest = dataset_manifest(source)
    total = sum(e["bytes"] for e in manifest["files"].values())
    if destination.exists():
        if not destination.is_dir():
            raise HetlmError(f"{destination} is a file: choose a folder for the local copy")
        if any(destination.iterdir()) and not (destination / META_FILE).is_file():
            raise HetlmError(f"refusing to replace {destination}: it is not a hetlm dataset")
        if _is_current_copy(destination, manifest, verify_existing):
            return StageSummary(
                source,
                destination,
                len(manifest["files"]),
                total,
                0,
                0,
                True,
                time.perf_counter() - started,
            )
    staging = destination.parent / f".{destination.name}.staging"
    staging.mkdir(parents=True, exist_ok=True)
    copied = reused = 0
    for rel, entry in manifest["files"].items():
        src, dst = source / rel, staging / rel
        if (
            dst.is_file()
            and dst.stat().st_size == entry["bytes"]
            and sha256_file(dst) == entry["sha256"]
        ):
            reused += 1
            continue
        if not src.is_file():
            raise HetlmError(
                f"{source} lacks {rel}, which its manifest lists: the dataset is "
                "incomplete; re-create it with `hetlm prepare`"
            )
        digest = _copy_hashed(src, dst)
        if digest != entry["sha256"] or dst.stat().st_size != entry["bytes"]:
            dst.unlink(missing_ok=True)
            raise HetlmError(
                f"{src} does not match its manifest (sha256 {digest[:12]}..., "
                f"expected {entry['sha256'][:12]}...): the source changed or is "
                "damaged; check it, then stage again"
            )
        copied += entry["bytes"]
        if progress:
            progress(f"copied {rel} ({entry['bytes'] / 2**20:,.1f} MiB)")
    write_json_atomic(staging / MANIFEST_FILE, manifest)
    _fsync_dir(staging)
    if destination.exists():
        old = destination.parent / f".{destination.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        destination.rename(old)
        staging.rename(destination)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(destination)
    _fsync_dir(destination.parent)
    return StageSummary(
        source,
        destination,
        len(manifest["files"]),
        total,
        copied,
        reused,
        False,
        time.perf_counter() - started,
    )


def _is_current_copy(folder: Path, manifest: dict[str, Any], full: bool) -> bool:
    local = folder / MANIFEST_FILE
    if not local.is_file():
        return False
    try:
        if json.loads(local.read_text(encoding="utf-8"))["files"] != manifest["files"]:
            return False
    except (ValueError, KeyError):
        return False
    if sizes_match(folder, manifest) is not None:
        return False
    return not full or all(
        sha256_file(folder / rel) == e["sha256"] for rel, e in manifest["files"].items()
    )


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def local_copy_problem(shared_path: str | Path, local_copy: str | Path) -> str | None:
    """Why ``local_copy`` cannot stand in for ``shared_path`` (None when it can).

    Cheap on purpose (it runs at every training start): the local manifest must equal the shared
    one and every file must have its listed size. The sha256 of every byte was checked when the
    copy was made; ``stage_dataset(..., verify_existing=True)`` re-checks it.
    """
    shared, local = Path(shared_path), Path(local_copy)
    if not local.is_dir():
        return f"{local} does not exist (run `hetlm stage {shared} {local}`)"
    local_manifest = local / MANIFEST_FILE
    if not local_manifest.is_file():
        return f"{local} has no {MANIFEST_FILE}: it was not made by `hetlm stage`"
    try:
        have = json.loads(local_manifest.read_text(encoding="utf-8"))
    except ValueError:
        return f"{local_manifest} is unreadable"
    if shared.is_dir():
        want = dataset_manifest(shared) if (shared / MANIFEST_FILE).is_file() else None
        if want is not None and want.get("files") != have.get("files"):
            return f"{local} is a copy of another version of {shared} (manifests differ)"
    return sizes_match(local, have)


def resolve_dataset_path(
    shared_path: str | Path,
    local_copy: str | Path | None,
    *,
    report: Callable[[str], None] | None = None,
) -> Path:
    """The folder training should read: ``local_copy`` when it is a current, complete copy of
    ``shared_path``, else ``shared_path`` (``report`` receives the reason)."""
    if local_copy is None:
        return Path(shared_path)
    problem = local_copy_problem(shared_path, local_copy)
    if problem is None:
        return Path(local_copy)
    if report is not None:
        report(f"reading {shared_path}, not the local copy: {problem}")
    return Path(shared_path)
