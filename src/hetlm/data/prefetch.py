"""Prefetching: the next step's micro-batches are built while the current step computes.

On a GPU the loop must never wait for the CPU between steps: reading packed rows, masking and
collating take milliseconds that a fast GPU would spend idle. A single background thread builds
step t+1 (and pins its tensors, so the copy to the GPU can be ``non_blocking``) while step t runs.

Exact resume and split invariance are untouched: what a step gets is a pure function of the
sampler's position (``HeterogeneousBatchSampler.step_batch``), and the sampler's state advances
only when the loop takes a step, never when the thread builds one. A prefetched step whose
position no longer matches (after a resume or a rollback moved the sampler) is dropped and the
right one is built in place; so is one built under a split that a rebalance has replaced.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from hetlm.data.sampler import HeterogeneousBatchSampler, StepBatch
from hetlm.topology import BatchSplit


def pin_batch(batch: Any) -> Any:
    """The micro-batch with its tensors in pinned (page-locked) memory: a dataclass's tensor
    fields are replaced, anything else is returned as it is."""
    if not dataclasses.is_dataclass(batch) or isinstance(batch, type):
        return batch
    pinned = {
        f.name: getattr(batch, f.name).pin_memory()
        for f in dataclasses.fields(batch)
        if isinstance(getattr(batch, f.name), torch.Tensor)
    }
    return dataclasses.replace(batch, **pinned) if pinned else batch


class StepPrefetcher:
    """``next()`` gives (step batch, its micro-batches) for the sampler's next step, built one
    step ahead in a thread when ``enabled``; ``pin`` pins the tensors (for CUDA)."""

    def __init__(
        self,
        sampler: HeterogeneousBatchSampler,
        build: Callable[[StepBatch], list],
        *,
        enabled: bool = True,
        pin: bool = False,
    ) -> None:
        self.sampler = sampler
        self._build = build
        self._pin = pin
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="hetlm-prefetch") if enabled else None
        self._pending: tuple[tuple[int, int, BatchSplit], Future] | None = None

    def _make(self, position: tuple[int, int, BatchSplit]) -> tuple[StepBatch, list]:
        """The step at (epoch, step in epoch) under ``split`` (its rank's slice)."""
        batch = self.sampler.step_batch(*position)
        micro = self._build(batch)
        return batch, [pin_batch(mb) for mb in micro] if self._pin else micro

    def next(self) -> tuple[StepBatch, list]:
        position = (*self.sampler.position(), self.sampler.split)
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] == position:
            batch, micro = pending[1].result()
        else:
            if pending is not None:
                pending[1].cancel()
            batch, micro = self._make(position)
        self.sampler.advance(batch)
        if self._pool is not None:
            following = (*self.sampler.position(), self.sampler.split)
            self._pending = (following, self._pool.submit(self._make, following))
        return batch, micro

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._pending = None
