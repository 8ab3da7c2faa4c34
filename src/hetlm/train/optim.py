"""AdamW without weight decay on biases and LayerNorm, and the learning-rate schedules.

The schedules are transformers' (``get_scheduler``) by name and by shape, so a config means what a
``TrainingArguments`` user expects: a linear warm-up from 0, then ``linear`` decay to 0,
``cosine`` decay to 0, ``cosine_with_min_lr`` decay to ``min_lr_rate`` x the peak (LLaMA: 10%),
or ``constant_with_warmup``.
"""

from __future__ import annotations

import math

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


def build_optimizer(model: nn.Module, *, lr: float, weight_decay: float,
                    betas: tuple[float, float], eps: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps)


SCHEDULES = ("linear", "cosine", "cosine_with_min_lr", "constant_with_warmup")


def lr_factor(kind: str, step: int, warmup_steps: int, total_steps: int,
              min_lr_rate: float = 0.0) -> float:
    """The learning rate of optimizer step ``step`` (0-based) as a share of the peak."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant_with_warmup":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    if kind not in ("cosine", "cosine_with_min_lr"):
        raise ValueError(f"unknown lr_scheduler_type {kind!r}: choose one of {SCHEDULES}")
    floor = min_lr_rate if kind == "cosine_with_min_lr" else 0.0
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_schedule(optimizer: torch.optim.Optimizer, kind: str, warmup_steps: int,
                total_steps: int, min_lr_rate: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` over :func:`lr_factor` (its state is the step count: resumes exactly)."""
    lr_factor(kind, warmup_steps, warmup_steps, total_steps, min_lr_rate)  # check the name now
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(kind, step, warmup_steps, total_steps, min_lr_rate))


def linear_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then linear decay to 0 (BERT)."""
    return lr_schedule(optimizer, "linear", warmup_steps, total_steps)
