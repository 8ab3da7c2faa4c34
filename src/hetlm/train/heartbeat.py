"""Heartbeats: where each rank was last seen, so a hung collective can name who is missing.

Every rank keeps ``<output_dir>/heartbeat/rank-<r>.json`` up to date: the step, the phase of
the loop (``train``, ``metrics``, ``eval``, ``checkpoint``) and the collective it entered last
(``all_reduce``, ``all_gather``, ...), with a sequence number and the time. A write is one small
file replaced atomically (``os.replace``), at phase changes and at hetlm's own collectives: a
few per step. The engines' gradient all-reduces (inside DDP, FSDP) are not seen individually:
they happen in the ``train`` phase.

When a collective fails (gloo raises on ``train.dist_timeout_s``; a peer that died closes its
connections), the loop turns the error into one line naming the ranks whose heartbeat is behind
the most advanced one, with their last phase and step and how long ago that was. Every
``train.logging_steps`` steps rank 0 also copies all heartbeats into ``metrics.jsonl`` (an
``event: heartbeat`` record).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from hetlm.errors import HetlmError

DIRNAME = "heartbeat"


class Heartbeat:
    def __init__(self, output_dir: Path, rank: int) -> None:
        self.dir = Path(output_dir) / DIRNAME
        self.rank = rank
        self.path = self.dir / f"rank-{rank}.json"
        self.tmp = self.dir / f".rank-{rank}.json.tmp"
        self.seq = 0
        self.step = 0
        self.phase = "start"
        self.collective: str | None = None
        self.dir.mkdir(parents=True, exist_ok=True)
        self._write()

    def beat(self, phase: str, step: int | None = None) -> None:
        """Entering ``phase`` (of ``step``)."""
        self.phase, self.collective = phase, None
        if step is not None:
            self.step = step
        self._write()

    def enter(self, collective: str) -> None:
        """Entering a collective (called by ``hetlm.train.distributed``)."""
        self.collective = collective
        self._write()

    def _write(self) -> None:
        self.seq += 1
        record = {
            "rank": self.rank,
            "seq": self.seq,
            "step": self.step,
            "phase": self.phase,
            "collective": self.collective,
            "time": time.time(),
            "pid": os.getpid(),
        }
        try:
            self.tmp.write_text(json.dumps(record))
            os.replace(self.tmp, self.path)
        except OSError:  # a heartbeat must never stop training (a full disk is reported elsewhere)
            pass


_current: Heartbeat | None = None


def install(heartbeat: Heartbeat | None) -> None:
    global _current
    _current = heartbeat


def current() -> Heartbeat | None:
    return _current


def enter(collective: str) -> None:
    if _current is not None:
        _current.enter(collective)


def beat(phase: str, step: int | None = None) -> None:
    if _current is not None:
        _current.beat(phase, step)


def read_all(output_dir: Path, world_size: int) -> list[dict[str, Any] | None]:
    """Every rank's last heartbeat (None where there is none or it is unreadable)."""
    out: list[dict[str, Any] | None] = []
    for rank in range(world_size):
        try:
            out.append(json.loads((Path(output_dir) / DIRNAME / f"rank-{rank}.json").read_text()))
        except (OSError, ValueError):
            out.append(None)
    return out


def describe(record: dict[str, Any] | None, now: float | None = None) -> str:
    if record is None:
        return "never seen"
    where = f"{record['phase']} step {record['step']}"
    if record.get("collective"):
        where += f" ({record['collective']})"
    age = (now or time.time()) - float(record["time"])
    return f"{where}, {age:.1f} s ago"


def summary(output_dir: Path, world_size: int) -> list[dict[str, Any]]:
    """For the ``heartbeat`` metrics record: each rank's step, phase and age."""
    now = time.time()
    return [
        {
            "rank": r,
            "step": h["step"],
            "phase": h["phase"],
            "age_s": round(now - float(h["time"]), 3),
        }
        if h
        else {"rank": r, "step": None}
        for r, h in enumerate(read_all(output_dir, world_size))
    ]


def is_collective_failure(exc: BaseException) -> bool:
    """A collective that timed out or lost a peer (gloo, NCCL with blocking wait, the store)."""
    import torch.distributed as dist

    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        key in text
        for key in (
            "timed out",
            "timeout",
            "connection closed",
            "connection reset",
            "broken pipe",
            "gloo",
            "nccl",
        )
    )


def diagnose(
    exc: BaseException, output_dir: Path, rank: int, world_size: int, timeout_s: float
) -> HetlmError:
    """One line: which collective failed here, which ranks are behind and where they were."""
    records = read_all(output_dir, world_size)
    now = time.time()
    mine = records[rank]
    seen = [h["seq"] for h in records if h is not None]
    top = max(seen) if seen else 0
    behind = [r for r, h in enumerate(records) if h is None or h["seq"] < top]
    text = " ".join(str(exc).split())
    timed_out = "time" in text.lower()
    what = (
        f"a collective did not complete within train.dist_timeout_s={timeout_s:g} s"
        if timed_out
        else "a collective failed (a peer closed its connection)"
    )
    here = describe(mine, now) if mine else "?"
    if behind:
        who = "; ".join(f"rank {r}: last seen at {describe(records[r], now)}" for r in behind)
        verb = "did not arrive" if timed_out else "stopped or died"
        detail = f"ranks {behind} {verb} ({who})"
    else:
        others = "; ".join(
            f"rank {r}: {describe(h, now)}" for r, h in enumerate(records) if r != rank
        )
        detail = f"no rank is behind by its heartbeat ({others}): a peer may have died inside it"
    return HetlmError(
        f"{what} on rank {rank} (at {here}): {detail}; check those ranks' logs and nodes "
        f"(heartbeats in {Path(output_dir) / DIRNAME}), then resume with --resume "
        f"[{text[:160]}]"
    )
