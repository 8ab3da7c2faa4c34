"""The data-parallel engines hetlm knows: one table for the planner and the training run.

Each engine's ZeRO stages and what the loop may do with it are properties here, so the loop asks
``engine_info(name).holds_full_model`` instead of comparing engine names, and the planner and
the run cannot disagree on which engine runs which stage.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineInfo:
    name: str
    stages: tuple[int, ...]  # the ZeRO stages it runs, its default first
    #: every rank holds the whole model in its forward: a rank's forward time is its own
    #: (online rebalancing can measure it) and a rollback can reload weights in-process. FSDP
    #: and DeepSpeed gather weights inside the forward, in lockstep with the other ranks.
    holds_full_model: bool
    #: its checkpoints resume on another number of ranks (elastic membership, a new split);
    #: DeepSpeed's per-rank files need the same world size.
    resumes_on_any_world_size: bool
    what: str


ENGINES: dict[str, EngineInfo] = {
    info.name: info
    for info in (
        EngineInfo("ddp", (0,), True, True, "torch DistributedDataParallel"),
        EngineInfo("zero1", (1,), True, True, "DDP + torch's ZeroRedundancyOptimizer"),
        EngineInfo("fsdp2", (2, 3), False, True, "torch FSDP2 (fully_shard)"),
        EngineInfo("deepspeed", (0, 1, 2, 3), False, False, "DeepSpeed ZeRO"),
    )
}
#: one process, no data parallelism: what the run uses when there is one rank
SINGLE = EngineInfo("single", (0,), True, True, "one process")
ENGINE_NAMES = tuple(ENGINES)
#: the ZeRO stages each engine runs (DeepSpeed runs them all, but only when asked for)
ENGINE_STAGES = {name: info.stages for name, info in ENGINES.items()}
#: the engine a ZeRO stage gets when only the stage is asked for (DeepSpeed only on request)
ENGINE_FOR_STAGE = ("ddp", "zero1", "fsdp2", "fsdp2")


def engine_info(name: str) -> EngineInfo:
    """The table's row for ``name`` (``single`` included); KeyError for an unknown name."""
    return SINGLE if name == SINGLE.name else ENGINES[name]


def engines_that(predicate, *, with_single: bool = True) -> list[str]:
    """Names (``single`` first, unless ``with_single`` is False: a config cannot choose it) of
    the engines for which ``predicate(info)`` holds."""
    rows = (SINGLE, *ENGINES.values()) if with_single else tuple(ENGINES.values())
    return [i.name for i in rows if predicate(i)]
