"""AdamW without weight decay on biases and LayerNorm, and the learning-rate schedules.

The schedules are transformers' (``get_scheduler``) by name and by shape, so a config means what a
``TrainingArguments`` user expects: a linear warm-up from 0, then ``linear`` decay to 0,
``cosine`` decay to 0, ``cosine_with_min_lr`` decay to ``min_lr_rate`` x the peak (LLaMA: 10%),
or ``constant_with_warmup``. A :class:`Schedule` is stored in every checkpoint, and extending a
finished run (``--extend``) replaces it from the step it resumes at, so the lr never jumps by
accident.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices and embeddings; never biases or normalisation weights (BERT recipe)."""
    no_decay_ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.LayerNorm | nn.GroupNorm) or "Norm" in type(module).__name__:
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    decay, no_decay, seen = [], [], set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        (no_decay if id(param) in no_decay_ids or name.endswith("bias") else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def adamw_implementation(device: torch.device) -> dict[str, bool]:
    """AdamW's kernel choice: ``fused`` on CUDA (one kernel for all parameters instead of a few
    per tensor: the step's optimizer time drops several-fold on a GPU, with the same update up
    to rounding), torch's default (foreach) elsewhere, where fused is no faster."""
    return {"fused": True} if device.type == "cuda" else {}


def build_optimizer(
    model: nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float], eps: float
) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps)


SCHEDULES = ("linear", "cosine", "cosine_with_min_lr", "constant_with_warmup")


@dataclass(frozen=True)
class Schedule:
    """The lr factor of a step: from ``start``, a linear warm-up over ``warmup`` steps to
    ``peak``, then ``kind``'s decay to ``end`` (to 0; ``cosine_with_min_lr`` to ``min_lr_rate``
    x ``peak``; none for ``constant_with_warmup``). A fresh run is ``(kind, warmup,
    max_steps)``; ``continued`` decays from the current factor over more steps, ``restarted``
    warms up again (``--extend continue`` / ``restart``). Stored in every checkpoint
    (``trainer_state.json``) so a later resume keeps it."""

    warmup: int
    end: int
    start: int = 0
    peak: float = 1.0
    kind: str = "linear"
    min_lr_rate: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"unknown lr_scheduler_type {self.kind!r}: choose one of {SCHEDULES}")

    def factor(self, step: int) -> float:
        into = step - self.start
        if self.warmup and into < self.warmup:
            return self.peak * (into + 1) / self.warmup
        if self.kind == "constant_with_warmup":
            return self.peak
        decay = max(1, self.end - self.start - self.warmup)
        if self.kind == "linear":  # transformers' get_linear_schedule_with_warmup
            return self.peak * max(0.0, (self.end - step) / decay)
        progress = min(1.0, (into - self.warmup) / decay)
        floor = self.min_lr_rate if self.kind == "cosine_with_min_lr" else 0.0
        return self.peak * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))

    def continued(self, step: int, end: int, current: float) -> Schedule:
        """Decay from ``current`` (the factor at ``step``) to ``end``, in the same shape."""
        return Schedule(
            warmup=0,
            end=end,
            start=step,
            peak=current,
            kind=self.kind,
            min_lr_rate=self.min_lr_rate,
        )

    def restarted(self, step: int, end: int, warmup: int) -> Schedule:
        """A new warm-up (to the base lr) and decay, from ``step`` to ``end``."""
        return Schedule(
            warmup=warmup,
            end=end,
            start=step,
            peak=1.0,
            kind=self.kind,
            min_lr_rate=self.min_lr_rate,
        )

    def as_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


#: The name checkpoints of hetlm before ``lr_scheduler_type`` knew (linear only).
LinearSchedule = Schedule


def lr_factor(
    kind: str, step: int, warmup_steps: int, total_steps: int, min_lr_rate: float = 0.0
) -> float:
    """The learning rate of optimizer step ``step`` (0-based) as a share of the peak."""
    return Schedule(warmup_steps, total_steps, kind=kind, min_lr_rate=min_lr_rate).factor(step)


def scheduler_for(
    optimizer: torch.optim.Optimizer, schedule: Callable[[], Schedule]
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR that asks ``schedule()`` for the current schedule at every step (it may be
    replaced after a resume); its state_dict holds no schedule (the trainer state does)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule().factor(step))


def lr_schedule(
    optimizer: torch.optim.Optimizer,
    kind: str,
    warmup_steps: int,
    total_steps: int,
    min_lr_rate: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A fixed schedule's ``LambdaLR`` (its state is the step count: resumes exactly)."""
    schedule = Schedule(warmup_steps, total_steps, kind=kind, min_lr_rate=min_lr_rate)
    return scheduler_for(optimizer, lambda: schedule)


def linear_schedule(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then linear decay to 0 (BERT)."""
    return lr_schedule(optimizer, "linear", warmup_steps, total_steps)
