"""Read back an offline W&B run: the records of its ``run-<id>.wandb`` transaction log.

wandb 0.2x+ writes this file from its Go core and no longer ships the Python reader
(``wandb.sdk.internal.datastore``) that tests used to use. The format is stable and small: a
7-byte header (``:W&B``, magic 0xBEE1, version 0), then LevelDB's log format (32 KiB blocks;
each chunk a 7-byte header of CRC-32C, length, type FULL/FIRST/MIDDLE/LAST), each record a
``wandb.proto.wandb_internal_pb2.Record``: wandb's own schema parses the content.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

BLOCK = 32768
CHUNK_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list[Any]:
    """Every record of a ``.wandb`` file, as ``wandb_internal_pb2.Record`` messages."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), (ident, magic, version)
    payloads: list[bytes] = []
    pending = b""
    pos = 7
    while pos + CHUNK_HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < CHUNK_HEADER:  # the block's tail is padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + CHUNK_HEADER])
        chunk = data[pos + CHUNK_HEADER : pos + CHUNK_HEADER + length]
        pos += CHUNK_HEADER + length
        if kind == 0:  # zeros: nothing written past here
            break
        if kind == FULL:
            payloads.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            payloads.append(pending + chunk)
            pending = b""
        else:
            raise ValueError(f"{path}: unknown chunk type {kind} at byte {pos}")
    records = []
    for payload in payloads:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


def history(records: list[Any]) -> list[dict[str, Any]]:
    """The logged rows (``run.log``), each as {key: value}."""
    rows = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item
                }
            )
    return rows


def run_info(records: list[Any]) -> dict[str, Any]:
    """The run's id, display name, project and config (as the run record has them)."""
    for record in records:
        if record.WhichOneof("record_type") == "run":
            run = record.run
            config = {item.key: json.loads(item.value_json) for item in run.config.update}
            return {
                "id": run.run_id,
                "name": run.display_name,
                "project": run.project,
                "config": config,
            }
    raise AssertionError("no run record")


def find_run_file(wandb_dir: Path) -> Path:
    """The one ``run-<id>.wandb`` of the offline run under ``wandb_dir``."""
    found = sorted(Path(wandb_dir).glob("wandb/offline-run-*/run-*.wandb"))
    assert len(found) == 1, found
    return found[0]
