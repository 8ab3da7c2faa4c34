"""Fault injection, a testing aid: inert unless the environment variable ``HETLM_FAULT`` is set.

``HETLM_FAULT`` holds one or more faults separated by ``;``, each ``KIND:key=value:...``:

    kill:rank=1:step=3               SIGKILL rank 1 as step 3 starts (its data already drawn)
    kill_checkpoint:step=4           SIGKILL rank 0 in the middle of writing checkpoint 4
                                     (model written, optimizer not yet, no manifest)
    stall:rank=1:step=3:seconds=20   rank 1 sleeps 20 s as step 3 starts (a hung rank)
    nan:step=3  /  inf:step=3        the training loss of step 3 becomes NaN / inf (on every
                                     rank, or ``rank=R`` only): under fp16 an inf gradient
    enospc:step=4                    writing checkpoint 4 fails with "No space left on device"
    slow:seconds=0.2                 every step (from ``step=N``, default 1) of every rank (or
                                     ``rank=R``) takes 0.2 s longer, in every attempt: paces a
                                     run so that an outside event (a node killed) lands mid-run

A fault (but ``slow``) fires once per process, and only in the first attempt of a job (``job_restart_count()`` 0;
``restart=K``: attempt K), so a restarted job runs clean.
``benchmarks/fault_injection.py`` and ``tests/test_faults.py`` use it; see ``docs/FAULTS.md``.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any

from hetlm.errors import HetlmError
from hetlm.train.distributed import job_restart_count

ENV = "HETLM_FAULT"
KINDS = ("kill", "kill_checkpoint", "stall", "nan", "inf", "enospc", "slow")


@dataclass
class Fault:
    kind: str
    step: int
    rank: int | None = None  # None: every rank (nan/inf), rank 0 (kill_checkpoint)
    seconds: float = 30.0
    restart: int = 0
    fired: bool = field(default=False, compare=False)

    def applies(self, step: int, rank: int) -> bool:
        return (
            not self.fired
            and step == self.step
            and job_restart_count() == self.restart
            and (self.rank is None or self.rank == rank)
        )


def parse(spec: str) -> list[Fault]:
    """``HETLM_FAULT``'s value -> faults; a malformed value is a one-line HetlmError."""
    faults = []
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        kind, *pairs = part.split(":")
        if kind not in KINDS:
            raise HetlmError(
                f"{ENV}: unknown fault {kind!r} in {part!r}: use one of {', '.join(KINDS)}"
            )
        values: dict[str, Any] = {}
        for pair in pairs:
            key, _, value = pair.partition("=")
            try:
                if key in ("step", "rank", "restart"):
                    values[key] = int(value)
                elif key == "seconds":
                    values[key] = float(value)
                else:
                    raise ValueError
            except ValueError:
                raise HetlmError(
                    f"{ENV}: bad setting {pair!r} in {part!r}: use step=N, rank=R, "
                    "seconds=S or restart=K"
                ) from None
        if kind == "slow":
            values.setdefault("step", 1)
        if "step" not in values:
            raise HetlmError(f"{ENV}: {part!r} needs step=N")
        if kind == "kill_checkpoint":
            values.setdefault("rank", 0)
        faults.append(Fault(kind, **values))
    return faults


_FAULTS: list[Fault] | None = None


def active() -> list[Fault]:
    """The faults of this process (parsed once); [] when ``HETLM_FAULT`` is unset."""
    global _FAULTS
    if _FAULTS is None:
        _FAULTS = parse(os.environ.get(ENV, ""))
    return _FAULTS


def reset() -> None:
    """Forget the parsed faults (tests that change ``HETLM_FAULT`` in-process)."""
    global _FAULTS
    _FAULTS = None


_state = {"step": 0, "rank": 0}


def _take(kind: str, step: int, rank: int) -> Fault | None:
    for fault in active():
        if fault.kind == kind and fault.applies(step, rank):
            fault.fired = True
            return fault
    return None


def _announce(what: str) -> None:
    print(f"hetlm: fault injection ({ENV}): {what}", flush=True)


def on_step(step: int, rank: int) -> None:
    """(the loop, as step ``step`` starts) kill or stall this rank if asked."""
    _state.update(step=step, rank=rank)
    if not active():
        return
    if _take("kill", step, rank):
        _announce(f"killing rank {rank} (pid {os.getpid()}) at step {step}")
        os.kill(os.getpid(), signal.SIGKILL)
    if fault := _take("stall", step, rank):
        _announce(f"rank {rank} stalls for {fault.seconds:g} s at step {step}")
        time.sleep(fault.seconds)
    for fault in active():
        if fault.kind == "slow" and step >= fault.step and fault.rank in (None, rank):
            time.sleep(fault.seconds)


def on_checkpoint_write(step: int, stage: str) -> None:
    """(rank 0, inside ``CheckpointManager.commit``) fail or die while writing checkpoint
    ``step``; ``stage`` is "model" (after the weights) or "begin"."""
    if not active():
        return
    rank = _state["rank"]
    if stage == "model" and _take("kill_checkpoint", step, rank):
        _announce(f"killing rank {rank} while it writes checkpoint {step}")
        os.kill(os.getpid(), signal.SIGKILL)
    if stage == "begin" and _take("enospc", step, rank):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def install(module) -> None:
    """Make the loss of the steps named by nan/inf faults non-finite: a forward hook on the
    objective module (its output is ``(loss_sum, ...)``), active in training mode only."""
    if not any(f.kind in ("nan", "inf") for f in active()):
        return

    def hook(mod, args, output):
        if not mod.training:
            return output
        step, rank = _state["step"], _state["rank"]
        fault = _take("nan", step, rank) or _take("inf", step, rank)
        if fault is None:
            return output
        _announce(f"the loss of step {step} on rank {rank} becomes {fault.kind}")
        loss_sum, *rest = output
        return (loss_sum * float(fault.kind), *rest)

    module.register_forward_hook(hook)
