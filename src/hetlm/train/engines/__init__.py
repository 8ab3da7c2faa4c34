"""The engine implementations, and ``build_engine``, which picks one for a run (the interface
and the one-process engine are ``hetlm.train.engine``)."""

from __future__ import annotations

from torch import nn

from hetlm.cluster.engines import ENGINE_NAMES
from hetlm.errors import HetlmError
from hetlm.train.distributed import DistContext
from hetlm.train.engine import Engine, EngineOptions, check_options
from hetlm.train.precision import Precision


def build_engine(
    module: nn.Module, ctx: DistContext, precision_name: str, options: EngineOptions
) -> Engine:
    """The engine for ``options`` (one process: no wrapper at all) and its ``Precision``."""
    check_options(options)
    if not ctx.enabled:
        return Engine(module, ctx, Precision(precision_name, ctx.device), options)
    if options.name in ("ddp", "zero1"):
        from hetlm.train.engines.ddp import DDPEngine, ZeRO1Engine

        cls = DDPEngine if options.name == "ddp" else ZeRO1Engine
        return cls(module, ctx, Precision(precision_name, ctx.device), options)
    if options.name == "fsdp2":
        from hetlm.train.engines.fsdp import FSDP2Engine

        return FSDP2Engine(module, ctx, Precision(precision_name, ctx.device), options)
    if options.name == "deepspeed":
        from hetlm.train.engines.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(
            module, ctx, Precision(precision_name, ctx.device, autocast=False), options
        )
    raise HetlmError(f"unknown engine {options.name!r}: choose one of {', '.join(ENGINE_NAMES)}")
