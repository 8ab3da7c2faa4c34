"""AdamW without weight decay on biases and LayerNorm, and a linear warm-up/decay schedule."""

from __future__ import annotations

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
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def adamw_implementation(device: torch.device) -> dict[str, bool]:
    """AdamW's kernel choice: ``fused`` on CUDA (one kernel for all parameters instead of a few
    per tensor: the step's optimizer time drops several-fold on a GPU, with the same update up
    to rounding), torch's default (foreach) elsewhere, where fused is no faster."""
    return {"fused": True} if device.type == "cuda" else {}


def build_optimizer(model: nn.Module, *, lr: float, weight_decay: float,
                    betas: tuple[float, float], eps: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps)


@dataclass(frozen=True)
class LinearSchedule:
    """The lr factor of a step: from ``start``, a linear warm-up over ``warmup`` steps to
    ``peak``, then a linear decay to 0 at ``end``. A fresh run is ``(warmup, max_steps)``;
    extending a run (``--extend``) replaces it from the step it resumes at, so the lr never
    jumps by accident: ``continued`` decays from the current factor, ``restarted`` warms up
    again. Stored in every checkpoint (``trainer_state.json``) so a later resume keeps it."""

    warmup: int
    end: int
    start: int = 0
    peak: float = 1.0

    def factor(self, step: int) -> float:
        into = step - self.start
        if self.warmup and into < self.warmup:
            return self.peak * (into + 1) / self.warmup
        return self.peak * max(0.0, (self.end - step) / max(1, self.end - self.start - self.warmup))

    def continued(self, step: int, end: int, current: float) -> LinearSchedule:
        """Decay from ``current`` (the factor at ``step``) to 0 at ``end``."""
        return LinearSchedule(warmup=0, end=end, start=step, peak=current)

    def restarted(self, step: int, end: int, warmup: int) -> LinearSchedule:
        """A new warm-up (to the base lr) and decay, from ``step`` to ``end``."""
        return LinearSchedule(warmup=warmup, end=end, start=step, peak=1.0)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def scheduler_for(optimizer: torch.optim.Optimizer, schedule: Callable[[], LinearSchedule]
                  ) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR that asks ``schedule()`` for the current schedule at every step (it may be
    replaced after a resume); its state_dict holds no schedule (the trainer state does)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule().factor(step))


def linear_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    schedule = LinearSchedule(warmup_steps, total_steps)
    return scheduler_for(optimizer, lambda: schedule)
