"""Online rebalancing: move samples from slow ranks to fast ones while training.

Split invariance makes the split of the global batch free: any split trains the same model. So
the loop can measure each rank's speed and re-split the *same* global batch every N steps, within
each rank's memory cap, without changing what is learnt. The sampler keeps its position (epoch,
step): the data order is unchanged, only which rank takes which samples of it.

Speed is measured as samples per second of *compute*: the time each rank spends inside its
objective's forward (``ComputeTimer``, timed after DDP's buffer broadcast and before its gradient
all-reduce, so a fast rank's waiting for a slow one is not counted), summed over the window. The
backward costs a fixed multiple of the forward on every rank of one model, so the ratio of two
ranks' forward speeds is the ratio of their speeds. The new shares are the planner's
(``allocate_shares``: proportional to speed, capped by memory, the same number of micro-steps on
every rank). A new split is taken only when it is expected to shorten the step by at least
``min_gain`` (hysteresis: measurement noise must not make the split flap), and every rank takes
it at the same step, since every rank decides from the same all-gathered measurements.

FSDP and DeepSpeed gather weights inside the forward, in lockstep with the other ranks, so their
forward times say nothing about a rank's own speed: rebalancing runs with ddp and zero1 (and one
process, where it has nothing to do).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from hetlm.cluster.engines import engines_that
from hetlm.cluster.planner import allocate_shares
from hetlm.errors import HetlmError
from hetlm.topology import BatchSplit

#: a rank's forward time is its own only where every rank holds the whole model
REBALANCE_ENGINES = tuple(engines_that(lambda info: info.holds_full_model))


def check_rebalance(every: int, engine: str, caps: list[int] | None, world_size: int) -> None:
    """One-line refusals for settings under which rebalancing cannot work."""
    if not every:
        return
    if engine not in REBALANCE_ENGINES:
        raise HetlmError(
            f"train.rebalance needs each rank's own compute time, which {engine} "
            "hides (it gathers weights inside the forward, in lockstep): use "
            "train.engine ddp or zero1, or set train.rebalance: 0"
        )
    if caps is None:
        raise HetlmError(
            "train.rebalance moves samples between ranks up to each rank's memory "
            "cap: give train.max_micro_batch (an int or one per rank), or train "
            "with a plan (train.plan), whose caps are used"
        )
    if len(caps) != world_size:
        raise HetlmError(
            f"train.max_micro_batch has {len(caps)} entries but {world_size} ranks "
            "were launched: give one per rank (or one int for all)"
        )


@dataclass(frozen=True)
class Rebalance:
    """A decision: the new split, the speeds it is based on, and the expected gain."""

    old: BatchSplit
    new: BatchSplit
    speeds: tuple[float, ...]  # samples per compute-second, per rank
    old_step_s: float  # predicted compute time of a step (slowest rank)
    new_step_s: float

    @property
    def expected_gain(self) -> float:
        return 1.0 - self.new_step_s / self.old_step_s if self.old_step_s > 0 else 0.0

    def event(self) -> dict:
        return {
            "old_shares": list(self.old.shares),
            "new_shares": list(self.new.shares),
            "old_micro_steps": self.old.micro_steps,
            "new_micro_steps": self.new.micro_steps,
            "speeds": [round(v, 3) for v in self.speeds],
            "expected_gain": round(self.expected_gain, 4),
            "old_step_s": self.old_step_s,
            "new_step_s": self.new_step_s,
        }


def predicted_step_s(split: BatchSplit, speeds: list[float] | tuple[float, ...]) -> float:
    """The slowest rank's compute time for one step of ``split`` at these speeds."""
    return max(share / speed for share, speed in zip(split.shares, speeds, strict=True))


class Rebalancer:
    """Collects (samples, compute seconds) per rank each step; every ``every`` steps proposes
    a new split (or None: not worth it, or nothing measured)."""

    def __init__(self, every: int, caps: list[int], min_gain: float = 0.05) -> None:
        self.every, self.caps, self.min_gain = every, list(caps), min_gain
        self._samples = [0.0] * len(caps)
        self._compute_s = [0.0] * len(caps)

    def observe(self, samples: list[float], compute_s: list[float]) -> None:
        for r, (n, t) in enumerate(zip(samples, compute_s, strict=True)):
            self._samples[r] += n
            self._compute_s[r] += t

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def propose(self, split: BatchSplit) -> Rebalance | None:
        """The window's verdict; the window starts anew either way."""
        samples, compute = self._samples, self._compute_s
        self._samples, self._compute_s = [0.0] * len(self.caps), [0.0] * len(self.caps)
        if any(t <= 0 for t in compute) or any(n <= 0 for n in samples):
            return None
        speeds = [n / t for n, t in zip(samples, compute, strict=True)]
        steps, shares = allocate_shares(split.global_batch, self.caps, speeds)
        new = BatchSplit(split.global_batch, steps, tuple(shares))
        decision = Rebalance(
            split,
            new,
            tuple(speeds),
            predicted_step_s(split, speeds),
            predicted_step_s(new, speeds),
        )
        if new == split or decision.expected_gain < self.min_gain:
            return None
        return decision


class ComputeTimer:
    """Seconds this rank spends inside ``module``'s training forwards, read once per step.

    On CUDA the interval is taken with CUDA events (no host sync inside the micro-steps; read
    after the step, when the step's work is done); on a CPU with ``perf_counter``."""

    def __init__(self, module: nn.Module, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._started: float | None = None
        self._event: torch.cuda.Event | None = None
        self._spans: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._cpu_s = 0.0
        self._handles = [
            module.register_forward_pre_hook(self._start),
            module.register_forward_hook(self._stop),
        ]

    def _start(self, module: nn.Module, _args) -> None:
        if not module.training:
            return
        if self.cuda:
            self._event = torch.cuda.Event(enable_timing=True)
            self._event.record()
        else:
            self._started = time.perf_counter()

    def _stop(self, module: nn.Module, _args, _output) -> None:
        if not module.training:
            return
        if self.cuda and self._event is not None:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._spans.append((self._event, end))
            self._event = None
        elif self._started is not None:
            self._cpu_s += time.perf_counter() - self._started
            self._started = None

    def take(self) -> float:
        """The seconds since the last call, and start counting anew."""
        if self.cuda:
            if self._spans:
                self._spans[-1][1].synchronize()
            total = sum(a.elapsed_time(b) for a, b in self._spans) / 1000.0
            self._spans = []
            return total
        total, self._cpu_s = self._cpu_s, 0.0
        return total

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
