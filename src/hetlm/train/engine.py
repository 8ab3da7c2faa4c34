"""Data-parallel engines: how gradients, parameters and optimizer states are shared by the ranks.

The loop sees one small interface:

- ``module``: what forward is called on; ``sync_gradients(is_last)``: a context entered for
  each micro-step, only the last one communicates;
- ``backward(loss)`` and ``step(max_norm) -> (grad_norm, stepped)``: unscale (fp16), clip, step
  or skip on every rank together, zero the gradients (``Engine.step`` below is all of it for the
  torch engines; DeepSpeed does the same inside its own ``step``);
- ``loss_scale_world``: the world size when the engine *averages* gradients over ranks (all of
  them do): the loop multiplies each micro-batch's summed loss by it, so the result is the
  token-exact gradient of the global batch;
- ``unwrapped`` (the ``SparseMaskedLM``; sharded under FSDP), ``evaluating()`` (the module to run
  held-out batches on), and the checkpoint hooks ``model_state_dict`` / ``optimizer_state_dict``
  / ``load_optimizer_state_dict`` / ``save_sharded`` / ``load_sharded``.

Engines (``train.engine`` and ``train.zero_stage``, or the plan's choice): one process: no
wrapper; ``ddp`` (ZeRO-0) and ``zero1`` in ``engines/ddp.py``; ``fsdp2`` (ZeRO-2/3) in
``engines/fsdp.py``; ``deepspeed`` (ZeRO-0..3) in ``engines/deepspeed.py``.

Checkpoints of the torch engines hold the *full* optimizer state in one canonical layout: the
layout of ``torch.distributed.checkpoint.state_dict`` (states and param groups keyed by parameter
name), gathered to rank 0. So a run can resume on another number of ranks, or with another torch
engine, and every checkpoint's model is a plain ``save_pretrained`` folder.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hetlm.cluster.engines import ENGINE_FOR_STAGE, ENGINE_NAMES, ENGINE_STAGES
from hetlm.errors import HetlmError
from hetlm.train.distributed import DistContext
from hetlm.train.optim import adamw_implementation, param_groups
from hetlm.train.precision import Precision


@dataclass(frozen=True)
class EngineOptions:
    """What the engines read from the config (``train.*``)."""

    name: str = "ddp"
    zero_stage: int = 0
    bucket_cap_mb: float | None = None  # DDP gradient bucket size (ddp, zero1)
    grad_compression: str = "none"  # none | fp16 | bf16 (ddp, zero1)
    deepspeed_config: Path | None = None  # a user's DeepSpeed JSON (deepspeed)
    max_grad_norm: float | None = None  # DeepSpeed clips inside its step
    micro_steps: int = 1  # DeepSpeed's gradient_accumulation_steps
    micro_batch: int = 1  # DeepSpeed's train_micro_batch_size_per_gpu


def resolve_engine(
    engine: str,
    zero_stage: int | str,
    plan_engine: str | None = None,
    plan_stage: int | None = None,
) -> tuple[str, int]:
    """(engine, stage) from the config, where each ``auto`` takes the plan's value if any.

    Without a plan: ``auto``/``auto`` is DDP; an engine alone runs its smallest stage; a stage
    alone picks ddp / zero1 / fsdp2 (DeepSpeed only when asked for).
    """
    if engine == "auto" and plan_engine is not None:
        engine = plan_engine
    if zero_stage == "auto" and plan_stage is not None:
        zero_stage = plan_stage
    if engine != "auto" and engine not in ENGINE_STAGES:
        raise HetlmError(
            f"train.engine must be auto or one of {', '.join(ENGINE_NAMES)}, not {engine!r}"
        )
    if zero_stage == "auto":
        stage = 0 if engine == "auto" else ENGINE_STAGES[engine][0]
    else:
        stage = int(zero_stage)
        if stage not in (0, 1, 2, 3):
            raise HetlmError(f"train.zero_stage must be auto, 0, 1, 2 or 3, not {zero_stage!r}")
    if engine == "auto":
        engine = ENGINE_FOR_STAGE[stage]
    if stage not in ENGINE_STAGES[engine]:
        runs = "/".join(map(str, ENGINE_STAGES[engine]))
        from_plan = " (from the plan)" if plan_engine is not None else ""
        raise HetlmError(
            f"engine {engine} cannot run ZeRO stage {stage}{from_plan}: it runs stage {runs}; "
            f"set train.engine: {ENGINE_FOR_STAGE[stage]} or train.zero_stage: "
            f"{ENGINE_STAGES[engine][0]} (or auto)"
        )
    return engine, stage


# ---------------------------------------------------------------- canonical optimizer states


def param_names(model: nn.Module) -> dict[int, str]:
    """id(parameter) -> its first name (tied parameters appear once, as in named_parameters)."""
    return {id(p): name for name, p in model.named_parameters()}


def indexed_to_named(
    state: dict[str, Any], optimizer: torch.optim.Optimizer, names: dict[int, str]
) -> dict[str, Any]:
    """A plain ``optimizer.state_dict()`` (parameters numbered in group order) -> keyed by name."""
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    groups = [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]]
    return {"state": {order[i]: s for i, s in state["state"].items()}, "param_groups": groups}


def named_to_indexed(
    state: dict[str, Any], optimizer: torch.optim.Optimizer, names: dict[int, str]
) -> dict[str, Any]:
    """The inverse of ``indexed_to_named`` for this optimizer's parameter order."""
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    index = {name: i for i, name in enumerate(order)}
    saved = [name for g in state["param_groups"] for name in g["params"]]
    if sorted(saved) != sorted(order):
        missing = sorted(set(order) - set(saved))[:3]
        raise HetlmError(
            f"the checkpoint's optimizer state does not match the model (missing "
            f"{missing}): resume with the model config it was trained with"
        )
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]
    return {"state": {index[n]: s for n, s in state["state"].items()}, "param_groups": groups}


# ---------------------------------------------------------------- the engines


class Engine:
    """One process, no communication; the base the other engines override piece by piece."""

    name = "single"

    def __init__(
        self, module: nn.Module, ctx: DistContext, precision: Precision, options: EngineOptions
    ) -> None:
        self.ctx, self.precision, self.options = ctx, precision, options
        self.zero_stage = options.zero_stage if ctx.enabled else 0
        self.module: nn.Module = module.to(ctx.device)
        self.loss_scale_world = 1
        self.optimizer: torch.optim.Optimizer | None = None

    @property
    def unwrapped(self) -> nn.Module:
        return self.module

    # ---- the step

    def build_optimizer(
        self, *, lr: float, weight_decay: float, betas: tuple[float, float], eps: float
    ) -> torch.optim.Optimizer:
        """AdamW, no decay on biases and norms; created after wrapping (FSDP swaps parameters)."""
        self.optimizer = torch.optim.AdamW(
            param_groups(self.unwrapped, weight_decay),
            lr=lr,
            betas=betas,
            eps=eps,
            **adamw_implementation(self.ctx.device),
        )
        return self.optimizer

    def sync_gradients(self, is_last_micro_step: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.precision.backward(loss)

    def clip(self, max_norm: float | None) -> float:
        """Clip to ``max_norm`` (None/0: measure only); returns the global norm before clipping."""
        params = [p for p in self.module.parameters() if p.grad is not None]
        if not max_norm:
            return float(
                torch.linalg.vector_norm(
                    torch.stack([torch.linalg.vector_norm(p.grad) for p in params])
                )
            )
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def step(self, max_norm: float | None) -> tuple[float, bool]:
        """unscale (fp16) -> clip -> optimizer step, or skip it on every rank on fp16 overflow."""
        assert self.optimizer is not None, "build_optimizer first"
        self.precision.unscale(self.optimizer)
        grad_norm = self.clip(max_norm)
        stepped = self.precision.step(self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, stepped

    # ---- evaluation

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[nn.Module]:
        """eval mode, no gradients; yields what to call (every rank calls it equally often)."""
        model = self.unwrapped
        model.eval()
        try:
            with torch.no_grad():
                yield model
        finally:
            model.train()

    # ---- checkpoints (collectives: every rank calls them)

    def model_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The full weights, named as the Hugging Face model names them, on rank 0 (else None).

        Tied weights share one tensor, so ``save_pretrained`` stores them once."""
        return self.unwrapped.model.state_dict() if self.ctx.is_main else None

    def optimizer_state_dict(self) -> dict[str, Any] | None:
        """The full optimizer state, keyed by parameter name, on rank 0 (else None)."""
        assert self.optimizer is not None
        if not self.ctx.is_main:
            return None
        return indexed_to_named(
            self.optimizer.state_dict(), self.optimizer, param_names(self.unwrapped)
        )

    def load_optimizer_state_dict(self, state: dict[str, Any]) -> None:
        """Every rank loads the full state (from the shared checkpoint) and keeps its part."""
        assert self.optimizer is not None
        self.optimizer.load_state_dict(
            named_to_indexed(self._named(state), self.optimizer, param_names(self.unwrapped))
        )

    def _named(self, state: dict[str, Any]) -> dict[str, Any]:
        """Accept checkpoints of hetlm 0.1 too, whose optimizer state is numbered, not named."""
        if all(isinstance(i, int) for g in state["param_groups"] for i in g["params"]):
            return indexed_to_named(state, self.optimizer, param_names(self.unwrapped))
        return state

    def save_sharded(self, directory: Path) -> None:
        """Per-rank files beside the full states (DeepSpeed only); every rank calls it."""

    def load_sharded(self, directory: Path) -> None:
        """Read what ``save_sharded`` wrote (DeepSpeed only)."""

    @property
    def checkpoint_format(self) -> str:
        """What a checkpoint holds: torch engines share one format, DeepSpeed has its own."""
        return "full"


def check_options(options: EngineOptions) -> None:
    """Refuse settings the chosen engine would ignore, saying what to change."""
    if options.name not in ("ddp", "zero1"):
        for key, value in (
            ("grad_compression", options.grad_compression != "none"),
            ("bucket_cap_mb", options.bucket_cap_mb is not None),
        ):
            if value:
                raise HetlmError(
                    f"train.{key} applies to the ddp and zero1 engines only (DDP's "
                    f"gradient all-reduce): remove it for engine {options.name}"
                )
    if options.deepspeed_config is not None and options.name != "deepspeed":
        raise HetlmError(
            f"train.deepspeed_config is set but the engine is {options.name}: set "
            "train.engine: deepspeed or remove train.deepspeed_config"
        )
