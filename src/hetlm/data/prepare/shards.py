"""Chunks, shards and merging: how ``hetlm prepare`` scales out and resumes.

The packing rule (the one definition every run follows, single or sharded):

1. The cleaned document stream (files in order, then a ``datasets`` stream) is cut into
   **chunks**: a chunk closes after the document that brings it to ``chunk_chars`` characters.
   Chunk boundaries depend only on the corpus and the options, never on workers or shards.
2. Each chunk is packed on its own exactly as a whole corpus used to be: its documents go to
   train or validation by the seeded hash of their index in the stream, each split's documents
   are joined with ``[SEP]`` and cut into ``[CLS] ... [SEP]`` rows, and the partial last row of
   each split is dropped (so at most ``2 * (seq_len - 2)`` tokens per chunk are lost: 0.02% of
   a 4M-character chunk at seq_len 512). A chunk whose validation part gives no row borrows its
   lowest-scored training documents, as before.
3. The dataset is the chunks' rows in chunk order.

**Shard i of n** tokenizes the chunks c with ``c % n == i``. Every shard reads (and cleans and
hashes) the whole stream, which is cheap next to tokenizing, so that chunk boundaries and
duplicate removal are global; a single run is shard 0 of 1. Merging the n shard folders therefore
gives exactly the dataset a single run gives, and a merge moves or hard-links the chunks' Arrow
files into the ``save_to_disk`` layout instead of rewriting them.

**Resume**: a finished chunk is two Arrow files plus a marker (``cNNNNNN.json``, sizes and
sha256) renamed into place last. A rerun with the same options re-reads the stream and skips the
chunks that have markers; a run that was killed loses only its unfinished chunks.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hetlm.data.packed import MANIFEST_FILE, packed_features, sha256_file, write_json_atomic
from hetlm.errors import HetlmError

SHARD_FILE = "hetlm_shard.json"
SHARD_FORMAT = "hetlm-shard-v1"
CHUNKS = "chunks"
DEFAULT_CHUNK_CHARS = 4_000_000
BATCH_CHARS = 262_144  # at most this many characters per tokenization batch (bounds memory)
_SHARD_SPEC = re.compile(r"^(\d+)/(\d+)$")


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> (i, n), with 0 <= i < n."""
    match = _SHARD_SPEC.match(text.strip())
    if not match:
        raise HetlmError(f"--shard must look like i/n (e.g. 0/4), got {text!r}")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or not 0 <= index < count:
        raise HetlmError(f"--shard {text}: the index must be 0..n-1 and n at least 1")
    return index, count


# ---------------------------------------------------------------- cutting the stream


@dataclass
class ChunkPlan:
    """Running state of the chunk cut while the stream is read."""

    chunk_chars: int
    current: int = 0
    chars: int = 0

    def place(self, text: str) -> int:
        """The chunk of this document (the next document starts a new chunk when it is full)."""
        chunk = self.current
        self.chars += len(text)
        if self.chars >= self.chunk_chars:
            self.current += 1
            self.chars = 0
        return chunk

    @property
    def total(self) -> int:
        """Chunks in the stream read so far (valid once the stream is exhausted)."""
        return self.current + (1 if self.chars else 0)


def chunk_batches(
    stream: Iterable[tuple[int, str]], plan: ChunkPlan, wanted, batch_docs: int
) -> Iterator[tuple[tuple[int, list[int]], list[str]]]:
    """((chunk, document indices), texts) batches of the documents of wanted chunks.

    ``wanted(chunk)`` says whether this run tokenizes the chunk. Batches never cross a chunk
    boundary and hold at most ``batch_docs`` documents or about BATCH_CHARS characters.
    """
    batch_chunk = -1
    indices: list[int] = []
    texts: list[str] = []
    size = 0
    for index, text in stream:
        chunk = plan.place(text)
        if not wanted(chunk):
            continue
        if texts and (chunk != batch_chunk or len(texts) >= batch_docs or size >= BATCH_CHARS):
            yield (batch_chunk, indices), texts
            indices, texts, size = [], [], 0
        batch_chunk = chunk
        indices.append(index)
        texts.append(text)
        size += len(text)
    if texts:
        yield (batch_chunk, indices), texts


# ---------------------------------------------------------------- one chunk


@dataclass
class ChunkBuffer:
    """The tokenized documents of one chunk, until it is packed."""

    chunk: int
    indices: list[np.ndarray] = field(default_factory=list)
    flats: list[np.ndarray] = field(default_factory=list)
    lengths: list[np.ndarray] = field(default_factory=list)

    def add(self, indices: list[int], flat: np.ndarray, lengths: np.ndarray) -> None:
        self.indices.append(np.asarray(indices, dtype=np.int64))
        self.flats.append(flat)
        self.lengths.append(lengths)

    def documents(self) -> tuple[np.ndarray, list[np.ndarray]]:
        """(document indices, ids of each document)."""
        indices = np.concatenate(self.indices)
        lengths = np.concatenate(self.lengths)
        flat = np.concatenate(self.flats)
        self.indices, self.lengths, self.flats = [], [], []  # one copy of the ids, not two
        ends = np.cumsum(lengths)
        return indices, np.split(flat, ends[:-1]) if len(ends) else []


def chunk_name(chunk: int) -> str:
    return f"c{chunk:06d}"


def completed_chunks(chunks_dir: Path) -> dict[int, dict[str, Any]]:
    """Markers of the chunks finished in this folder (chunk -> marker)."""
    done = {}
    if chunks_dir.is_dir():
        for marker in sorted(chunks_dir.glob("c[0-9]*.json")):
            try:
                data = json.loads(marker.read_text(encoding="utf-8"))
            except ValueError:
                continue  # half-written markers cannot exist (atomic rename); be safe anyway
            if all(
                (chunks_dir / f["name"]).is_file()
                and (chunks_dir / f["name"]).stat().st_size == f["bytes"]
                for f in data["files"].values()
            ):
                done[int(data["chunk"])] = data
    return done


# ---------------------------------------------------------------- the shard state file


def read_shard_file(folder: Path) -> dict[str, Any] | None:
    path = folder / SHARD_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise HetlmError(f"{path} is unreadable ({exc}); delete {folder} and run again") from exc
    if data.get("format") != SHARD_FORMAT:
        raise HetlmError(f"{path} is not a hetlm shard state file")
    return data


def fingerprint_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The top-level keys whose values differ between two fingerprints."""
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


# ---------------------------------------------------------------- merging into a dataset


def link_or_copy(src: Path, dst: Path, move: bool) -> str:
    """Move, hard-link, or (across filesystems) copy ``src`` to ``dst``; say which."""
    if move:
        try:
            os.replace(src, dst)
            return "moved"
        except OSError:
            pass
    else:
        try:
            os.link(src, dst)
            return "linked"
        except OSError:
            pass
    shutil.copy2(src, dst)
    return "copied"


def write_split_layout(
    split_dir: Path, files: list[Path], seq_len: int, name: str, move: bool
) -> dict[str, int]:
    """A ``Dataset.save_to_disk`` folder made of existing Arrow files (no data rewritten).

    ``load_from_disk`` reads ``state.json``'s ``_data_files`` in order and memory-maps each file,
    so placing the chunk files under ``data-NNNNN-of-MMMMM.arrow`` names and writing the two small
    JSON files is all ``save_to_disk`` would have done, without copying the tokens.
    """
    from datasets import DatasetInfo

    split_dir.mkdir(parents=True)
    how: dict[str, int] = {}
    names = []
    digest = hashlib.sha256()
    for k, src in enumerate(files):
        digest.update(f"{src.name}:{src.stat().st_size}".encode())
        target = f"data-{k:05d}-of-{len(files):05d}.arrow"
        verb = link_or_copy(src, split_dir / target, move)
        how[verb] = how.get(verb, 0) + 1
        names.append({"filename": target})
    state = {
        "_data_files": names,
        "_fingerprint": digest.hexdigest()[:16],
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": name,
    }
    (split_dir / "state.json").write_text(
        json.dumps(state, indent=2, sort_keys=True), encoding="utf-8"
    )
    info = asdict(DatasetInfo(features=packed_features(seq_len)))
    (split_dir / "dataset_info.json").write_text(
        json.dumps({key: info[key] for key in sorted(info)}, indent=2), encoding="utf-8"
    )
    return how


def write_manifest(folder: Path, known: dict[str, tuple[int, str]]) -> dict[str, Any]:
    """``hetlm_manifest.json``: size and sha256 of every file, for staging and verification.

    ``known`` gives hashes already computed (the chunk files, hashed when written), so only the
    small JSON files are read again.
    """
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel == MANIFEST_FILE:
            continue
        size = path.stat().st_size
        if rel in known and known[rel][0] == size:
            files[rel] = {"bytes": size, "sha256": known[rel][1]}
        else:
            files[rel] = {"bytes": size, "sha256": sha256_file(path)}
    manifest = {"format": "hetlm-manifest-v1", "files": files}
    write_json_atomic(folder / MANIFEST_FILE, manifest)
    return manifest
