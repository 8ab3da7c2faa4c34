"""Run a pretraining config on N gloo ranks in subprocesses (torch.multiprocessing.spawn).

Used by the multi-rank tests. A short process-group timeout makes a hang fail fast. The worker
can swap in another ``train_step`` (the negative check of split invariance) and run a ``setup``
function first (by dotted name, e.g. to inject a fault on one rank).
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _load(dotted: str):
    import importlib

    module_name, name = dotted.rsplit(".", 1)
    return getattr(importlib.import_module(module_name), name)


def _worker(
    rank: int,
    world: int,
    port: int,
    config: dict,
    kwargs: dict,
    step_fn: str | None,
    setup: str | None = None,
):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK="0",
        GROUP_RANK=str(rank),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    from hetlm.config import parse_config
    from hetlm.train import pretrain, trainer

    if step_fn:
        trainer.train_step = _load(step_fn)
    if setup:
        _load(setup)()
    pretrain.run_pretraining(parse_config(config), **kwargs)
    # Skip interpreter teardown: a gloo/TCPStore thread destroyed at exit has, rarely, aborted
    # a finished rank ("terminate called without an active exception") on a loaded machine.
    # Everything the tests read is written and closed by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(
    config: dict,
    world: int,
    step_fn: str | None = None,
    setup: str | None = None,
    timeout_s: float = 60,
    **kwargs,
) -> None:
    """Run ``config`` on ``world`` ranks; raises if any rank fails."""
    config = {**config, "train": {**config["train"], "dist_timeout_s": timeout_s}}
    mp.spawn(
        _worker, args=(world, _free_port(), config, kwargs, step_fn, setup), nprocs=world, join=True
    )


def run_single(config: dict, step_fn: str | None = None, **kwargs) -> dict:
    from hetlm.config import parse_config
    from hetlm.train import pretrain, trainer

    original = trainer.train_step
    if step_fn:
        import importlib

        module_name, name = step_fn.rsplit(".", 1)
        trainer.train_step = getattr(importlib.import_module(module_name), name)
    try:
        return pretrain.run_pretraining(parse_config(config), **kwargs)
    finally:
        trainer.train_step = original


def final_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(output_dir) / "model" / "model.safetensors"))


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
