"""ZeRO-2/3 with FSDP2 (``torch.distributed.fsdp.fully_shard``).

Each transformer layer and then the root (embeddings, MLM head) become one FSDP group: their
parameters, gradients and AdamW states are sharded over the ranks (DTensors). Before a group
runs forward it all-gathers its parameters; ``reshard_after_forward`` is False at stage 2 (the
gathered parameters stay until the backward, so only gradients and optimizer states are
partitioned in between) and True at stage 3 (freed after forward, gathered again in backward).
Gradients are reduce-scattered (averaged) on the last micro-step only
(``set_requires_gradient_sync``); earlier micro-steps accumulate unsharded gradients locally.

Because every forward all-gathers, every rank must run the same number of forwards: in training
(``BatchSplit``: the same number of micro-steps everywhere) and in evaluation (the loop pads).

Checkpoints gather the full model and optimizer state to rank 0 on the CPU
(``torch.distributed.checkpoint.state_dict`` with ``full_state_dict=True, cpu_offload=True``):
the model is a plain ``save_pretrained`` folder and the optimizer state has the canonical layout
of ``hetlm.train.engine``, so a run resumes on any number of ranks or with another torch engine.
Loading gives every rank the full state and each keeps its shard.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from hetlm.train.distributed import DistContext
from hetlm.train.engine import Engine, EngineOptions
from hetlm.train.precision import Precision

_FULL = {"full_state_dict": True, "cpu_offload": True}


def transformer_layers(model: nn.Module) -> list[nn.Module]:
    """The blocks of every ``nn.ModuleList`` (BERT's ``encoder.layer``; a decoder's ``layers``)."""
    return [
        block for module in model.modules() if isinstance(module, nn.ModuleList) for block in module
    ]


def tied_groups(model: nn.Module) -> list[list[str]]:
    """Names that share one parameter, first name first (the MLM decoder and word embeddings)."""
    names: dict[int, list[str]] = defaultdict(list)
    for name, param in model.named_parameters(remove_duplicate=False):
        names[id(param)].append(name)
    return [group for group in names.values() if len(group) > 1]


class FSDP2Engine(Engine):
    name = "fsdp2"

    def __init__(
        self, module: nn.Module, ctx: DistContext, precision: Precision, options: EngineOptions
    ) -> None:
        super().__init__(module, ctx, precision, options)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        self._ties = tied_groups(self.module.model)
        mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
        reshard = options.zero_stage == 3
        for layer in transformer_layers(self.module.model):
            fully_shard(layer, mesh=mesh, reshard_after_forward=reshard)
        # The root group holds the rest; the tied word embeddings / decoder stay in one group.
        fully_shard(self.module, mesh=mesh, reshard_after_forward=reshard)
        self.loss_scale_world = ctx.world_size  # reduce-scatter averages over the ranks

    @contextlib.contextmanager
    def sync_gradients(self, is_last_micro_step: bool) -> Iterator[None]:
        self.module.set_requires_gradient_sync(is_last_micro_step)
        yield

    def clip(self, max_norm: float | None) -> float:
        """The global norm from the shards (clip_grad_norm_ all-reduces DTensor norms)."""
        params = [p for p in self.module.parameters() if p.grad is not None]
        # max_norm inf: the clip coefficient clamps to 1.0, a no-op multiplication.
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm or float("inf"))
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[nn.Module]:
        """Forward through the FSDP root (it all-gathers); reshard afterwards, since a no-grad
        forward at stage 2 leaves the gathered parameters in place."""
        from torch.distributed.fsdp import FSDPModule

        self.module.eval()
        try:
            with torch.no_grad():
                yield self.module
        finally:
            self.module.train()
            for module in self.module.modules():
                if isinstance(module, FSDPModule):
                    module.reshard()

    def model_state_dict(self) -> dict[str, torch.Tensor] | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.module, options=StateDictOptions(**_FULL))
        if not self.ctx.is_main:
            return None
        state = {name.removeprefix("model."): tensor for name, tensor in full.items()}
        for first, *aliases in self._ties:  # gathered copies of a tied weight: one tensor again
            for alias in aliases:
                state[alias] = state[first]
        return state

    def optimizer_state_dict(self) -> dict[str, Any] | None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        full = get_optimizer_state_dict(
            self.module, self.optimizer, options=StateDictOptions(**_FULL)
        )
        return full if self.ctx.is_main else None

    def load_optimizer_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        set_optimizer_state_dict(
            self.module,
            self.optimizer,
            self._named(state),
            options=StateDictOptions(full_state_dict=True),
        )
