"""ZeRO-0 (DDP) and ZeRO-1 (DDP + torch's ZeroRedundancyOptimizer).

DDP all-reduces (averages) gradients on the last micro-step only (``no_sync`` before it), in
buckets of ``train.bucket_cap_mb`` (torch's default 25 MB when unset). ``train.grad_compression``
registers torch's ``fp16_compress_hook`` / ``bf16_compress_hook``: gradients are divided by the
world size, cast to 16 bits for the all-reduce and cast back, halving the traffic at the cost of
16-bit rounding of every gradient (split invariance then holds to ~1e-3, not ~1e-5).

ZeRO-1 keeps DDP for the gradients and partitions the AdamW states: each rank updates the
parameters it owns and broadcasts them. Its ``overlap_with_ddp`` is not used (gloo refuses it).
Checkpoints consolidate the partitions on rank 0 (``consolidate_state_dict(to=0)``), so the
saved state is the same full, name-keyed state as DDP's and loads on any number of ranks.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from hetlm.errors import HetlmError
from hetlm.train.distributed import DistContext
from hetlm.train.engine import Engine, EngineOptions
from hetlm.train.optim import adamw_implementation, param_groups
from hetlm.train.precision import Precision


def _bf16_compress_hook_any_backend(state, bucket):
    """torch's bf16 compression for backends other than NCCL (gloo all-reduces bf16 fine).

    DDP refuses torch's ``bf16_compress_hook`` by its name unless CUDA + NCCL are present; this
    calls the same implementation (``default_hooks._compress_hook``) under another name.
    """
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    return default_hooks._compress_hook(torch.bfloat16, state, bucket)


def compression_hook(kind: str, device: torch.device):
    """The DDP communication hook for ``train.grad_compression`` (None for ``none``)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    if kind == "none":
        return None
    if kind == "fp16":
        return default_hooks.fp16_compress_hook
    if kind == "bf16":
        return (
            default_hooks.bf16_compress_hook
            if device.type == "cuda"
            else _bf16_compress_hook_any_backend
        )
    raise HetlmError(f"train.grad_compression must be none, fp16 or bf16, not {kind!r}")


class DDPEngine(Engine):
    """ZeRO-0: every rank holds everything; gradients averaged by DDP on the last micro-step."""

    name = "ddp"

    def __init__(
        self, module: nn.Module, ctx: DistContext, precision: Precision, options: EngineOptions
    ) -> None:
        super().__init__(module, ctx, precision, options)
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        kwargs: dict[str, Any] = {}
        if options.bucket_cap_mb is not None:
            if options.bucket_cap_mb <= 0:
                raise HetlmError(f"train.bucket_cap_mb must be > 0, not {options.bucket_cap_mb}")
            kwargs["bucket_cap_mb"] = options.bucket_cap_mb
        # DDP broadcasts rank 0's parameters at construction: every rank starts identical.
        self.module = DistributedDataParallel(self.module, device_ids=device_ids, **kwargs)
        hook = compression_hook(options.grad_compression, ctx.device)
        if hook is not None:
            self.module.register_comm_hook(state=None, hook=hook)
        self.loss_scale_world = ctx.world_size

    def sync_gradients(self, is_last_micro_step: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if is_last_micro_step else self.module.no_sync()

    @property
    def unwrapped(self) -> nn.Module:
        return self.module.module


class ZeRO1Engine(DDPEngine):
    """ZeRO-1: DDP gradients + AdamW states partitioned by ``ZeroRedundancyOptimizer``."""

    name = "zero1"

    def build_optimizer(
        self, *, lr: float, weight_decay: float, betas: tuple[float, float], eps: float
    ) -> torch.optim.Optimizer:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        self.optimizer = ZeroRedundancyOptimizer(
            param_groups(self.unwrapped, weight_decay),
            optimizer_class=torch.optim.AdamW,
            lr=lr,
            betas=betas,
            eps=eps,
            **adamw_implementation(self.ctx.device),
        )
        return self.optimizer

    def optimizer_state_dict(self) -> dict[str, Any] | None:
        self.optimizer.consolidate_state_dict(to=0)  # a collective: every rank calls it
        return super().optimizer_state_dict()

    # load_optimizer_state_dict: the base's; ZeroRedundancyOptimizer.load_state_dict takes the
    # full (consolidated) state and keeps this rank's partition.
