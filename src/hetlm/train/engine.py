"""Data-parallel engines: how gradients of the ranks are combined.

The loop sees one small interface: ``module`` (what forward is called on), ``sync_gradients``
(a context entered for each micro-step; only the last one communicates), ``clip`` and
``unwrapped`` (the plain model, for saving). One class per engine; ``build_engine`` picks it.

``loss_scale_world`` is the world size when the engine *averages* gradients over ranks (DDP):
the loop multiplies each micro-batch's summed loss by it, so the result is the token-exact
gradient of the global batch.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from hetlm.errors import HetlmError
from hetlm.train.distributed import DistContext


class SingleProcessEngine:
    """One process: no communication at all."""

    name = "single"

    def __init__(self, module: nn.Module, ctx: DistContext) -> None:
        self.module = module.to(ctx.device)
        self.loss_scale_world = 1

    def sync_gradients(self, is_last_micro_step: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def clip(self, max_norm: float | None) -> torch.Tensor:
        params = [p for p in self.module.parameters() if p.grad is not None]
        if not max_norm:
            return torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    @property
    def unwrapped(self) -> nn.Module:
        return self.module


class DDPEngine(SingleProcessEngine):
    """ZeRO-0: DDP all-reduces (averages) gradients on the last micro-step only (no_sync)."""

    name = "ddp"

    def __init__(self, module: nn.Module, ctx: DistContext) -> None:
        module = module.to(ctx.device)
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        # DDP broadcasts rank 0's parameters at construction: every rank starts identical.
        self.module = DistributedDataParallel(module, device_ids=device_ids)
        self.loss_scale_world = ctx.world_size

    def sync_gradients(self, is_last_micro_step: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if is_last_micro_step else self.module.no_sync()

    @property
    def unwrapped(self) -> nn.Module:
        return self.module.module


ENGINES = {"ddp": DDPEngine}


def build_engine(name: str, module: nn.Module, ctx: DistContext) -> SingleProcessEngine:
    if not ctx.enabled:
        return SingleProcessEngine(module, ctx)
    try:
        return ENGINES[name](module, ctx)
    except KeyError:
        raise HetlmError(f"unknown engine {name!r}: choose one of {', '.join(ENGINES)}") from None
