"""A run's checkpoint: the stateful parts it is handed, saved and restored by one object.

The loop does not assemble state dicts. It hands ``RunCheckpoint`` its parts once: the engine
(model and optimizer, gathered to rank 0 or written per rank by DeepSpeed), the tensor-valued
parts (lr scheduler, precision / grad scaler, every rank's RNG) that go to ``<name>.pt``, and
the JSON-valued parts (the sampler's position) that go into ``trainer_state.json`` beside the
run's own record (step, split, run plan, fingerprint). ``save`` writes them all through the
``CheckpointManager`` (staging folder, manifest, atomic rename, pruning) and ``load`` gives each
part its state back, so a new stateful part (the rebalancer, say) is one more entry, not one
more line in a save and a load function.

Every rank calls ``save`` and ``load``: the RNG and the engine's state are collectives, taken in
the same order on every rank, and file errors reach every rank (``collective_io``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from hetlm.errors import HetlmError
from hetlm.train import distributed as D
from hetlm.train.checkpoint import CheckpointManager
from hetlm.train.collective import collective_io
from hetlm.train.engine import Engine


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


class RankRNG:
    """Every rank's CPU (and CUDA) generator state. Saving gathers all of them (a collective);
    loading gives a rank its own stream back when the checkpoint has as many ranks (each
    rank's dropout continues exactly). On another number of ranks the streams seeded at
    start-up stay: a rank's stream belongs to its position, which no longer exists."""

    def __init__(self, ctx: D.DistContext) -> None:
        self.ctx = ctx

    def state_dict(self) -> list[dict[str, Any]]:
        mine = {
            "cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        }
        return D.all_gather_object(self.ctx, mine)

    def load_state_dict(self, states: list[dict[str, Any]]) -> None:
        if len(states) != self.ctx.world_size:
            return
        own = states[self.ctx.rank]
        torch.set_rng_state(own["cpu"])
        if torch.cuda.is_available() and own.get("cuda") is not None:
            torch.cuda.set_rng_state(own["cuda"])


def check_engine_compatible(
    saved: dict[str, Any], engine: Engine, world_size: int, path: Path
) -> None:
    """Torch engines share one checkpoint format; DeepSpeed's needs DeepSpeed, same ranks."""
    saved_format = saved.get("checkpoint_format", "full")
    if saved_format != engine.checkpoint_format:
        raise HetlmError(
            f"cannot resume from {path}: it was written by engine {saved.get('engine')} "
            f"({saved_format} optimizer state) and this run uses {engine.name}: set "
            f"train.engine: {saved.get('engine')} to resume, or start a new output_dir"
        )
    if saved_format == "deepspeed" and saved.get("world_size") != world_size:
        raise HetlmError(
            f"cannot resume from {path}: DeepSpeed checkpoints resume on the same number of "
            f"ranks ({saved.get('world_size')}, now {world_size}): launch that many ranks, or "
            "train with a torch engine (ddp, zero1, fsdp2), whose checkpoints resume anywhere"
        )


class RunCheckpoint:
    """Saves and restores one run's state; see the module docstring."""

    def __init__(
        self,
        manager: CheckpointManager,
        ctx: D.DistContext,
        engine: Engine,
        *,
        model: Callable[[], nn.Module],
        parts: dict[str, Stateful],
        json_parts: dict[str, Stateful],
    ) -> None:
        """``model``: the unwrapped model whose class and config ``save_pretrained`` writes (the
        weights come from the engine); ``parts`` -> ``<name>.pt``; ``json_parts`` -> keys of
        ``trainer_state.json``."""
        self.manager, self.ctx, self.engine = manager, ctx, engine
        self.model, self.parts, self.json_parts = model, parts, json_parts

    def save(self, step: int, record: dict[str, Any]) -> Path:
        """Write checkpoint ``step`` with ``record`` (the run's own fields) in its
        ``trainer_state.json``; returns its folder. Every rank calls it."""
        ctx, engine = self.ctx, self.engine
        states = {name: part.state_dict() for name, part in self.parts.items()}
        model_state = engine.model_state_dict()
        optimizer_state = engine.optimizer_state_dict()
        staging = collective_io(
            ctx,
            lambda: self.manager.prepare(step) if ctx.is_main else self.manager.staging_dir(step),
        )
        collective_io(ctx, lambda: engine.save_sharded(staging))
        if optimizer_state is not None:
            states["optimizer"] = optimizer_state
        trainer_state = {
            **record,
            **{name: part.state_dict() for name, part in self.json_parts.items()},
            "engine": engine.name,
            "zero_stage": engine.zero_stage,
            "checkpoint_format": engine.checkpoint_format,
        }
        collective_io(
            ctx,
            lambda: (
                ctx.is_main
                and self.manager.commit(
                    step,
                    model=self.model(),
                    model_state=model_state,
                    states=states,
                    trainer_state=trainer_state,
                )
            ),
        )
        return self.manager.step_dir(step)

    def load(self, path: Path) -> dict[str, Any]:
        """Give every part its state from the checkpoint ``path`` (the model's weights are
        loaded before the engine wraps the model: ``load_model_weights``); returns the
        checkpoint's ``trainer_state.json`` for the run's own fields."""
        states = CheckpointManager.load_states(path)
        trainer = states["trainer_state"]
        check_engine_compatible(trainer, self.engine, self.ctx.world_size, path)
        if "optimizer" in states:
            self.engine.load_optimizer_state_dict(states["optimizer"])
        self.engine.load_sharded(path)
        for name, part in self.parts.items():
            part.load_state_dict(states[name])
        for name, part in self.json_parts.items():
            part.load_state_dict(trainer[name])
        return trainer
