"""The heterogeneous batch sampler: the same global batches whatever the split.

Every epoch is one seeded permutation of the dataset indices, cut into global batches of B. At
step t each rank takes its own contiguous slice of global batch t (``BatchSplit.offset`` and
``shares``) and cuts it into the common number of micro-batches. Because the global batch does
not depend on the split, two runs with different per-rank micro-batch sizes see exactly the same
samples at every optimizer step (split invariance).

The epoch tail (N mod B samples) is *dropped*, explicitly: ``tail_size`` reports it, and a new
permutation at the next epoch gives those samples their chance. No wrap-around padding, so no
sample is used twice in an epoch.

The state is only (epoch, step): resuming computes the permutation and jumps to the batch, never
iterating over consumed data.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from hetlm.errors import HetlmError
from hetlm.topology import BatchSplit


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """A permutation that is a pure function of (seed, epoch): the same on every rank."""
    rng = np.random.Generator(np.random.Philox(key=[seed & 0xFFFFFFFFFFFFFFFF, epoch]))
    return rng.permutation(num_samples)


@dataclass
class StepBatch:
    """What one rank processes at one optimizer step."""

    epoch: int
    step_in_epoch: int
    micro_batches: list[np.ndarray]  # dataset indices, one array per micro-step


class HeterogeneousBatchSampler:
    """Yields, for one rank, its micro-batches of every global batch in order."""

    def __init__(
        self, num_samples: int, split: BatchSplit, rank: int, seed: int = 0, shuffle: bool = True
    ) -> None:
        if not 0 <= rank < split.world_size:
            raise HetlmError(f"rank {rank} is outside the batch split of {split.world_size} ranks")
        if num_samples < split.global_batch:
            raise HetlmError(
                f"the dataset has {num_samples} sequences, fewer than one global batch of "
                f"{split.global_batch}: prepare more data or lower global_batch"
            )
        self.num_samples = num_samples
        self.split = split
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.step_in_epoch = 0
        # (epoch, permutation): one reference, swapped whole, so that the prefetching thread
        # (hetlm.data.prefetch) and the loop never see one epoch's number with another's order
        self._cached: tuple[int, np.ndarray] | None = None

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.split.global_batch

    @property
    def tail_size(self) -> int:
        """Samples left out of each epoch (dropped, never padded by wrap-around)."""
        return self.num_samples % self.split.global_batch

    def _permutation(self, epoch: int) -> np.ndarray:
        cached = self._cached
        if cached is not None and cached[0] == epoch:
            return cached[1]
        perm = (
            epoch_permutation(self.num_samples, self.seed, epoch)
            if self.shuffle
            else np.arange(self.num_samples)
        )
        self._cached = (epoch, perm)
        return perm

    def global_batch(self, epoch: int, step_in_epoch: int) -> np.ndarray:
        """All B indices of one global batch, as every rank sees it."""
        b = self.split.global_batch
        return self._permutation(epoch)[step_in_epoch * b : (step_in_epoch + 1) * b]

    def local_micro_batches(
        self, epoch: int, step_in_epoch: int, split: BatchSplit | None = None
    ) -> list[np.ndarray]:
        split = split or self.split
        start = split.offset(self.rank)
        mine = self.global_batch(epoch, step_in_epoch)[start : start + split.shares[self.rank]]
        bounds = np.cumsum([0, *split.micro_batch_sizes(self.rank)])
        return [mine[bounds[i] : bounds[i + 1]] for i in range(split.micro_steps)]

    def position(self, steps_ahead: int = 0) -> tuple[int, int]:
        """(epoch, step in epoch) of the step ``steps_ahead`` after the next one; no change."""
        total = self.step_in_epoch + steps_ahead
        return (self.epoch + total // self.steps_per_epoch, total % self.steps_per_epoch)

    def step_batch(
        self, epoch: int, step_in_epoch: int, split: BatchSplit | None = None
    ) -> StepBatch:
        """This rank's micro-batches of one step (a pure function of the position and the
        split; ``split``: another than the sampler's, e.g. the one a prefetch was made for)."""
        return StepBatch(
            epoch, step_in_epoch, self.local_micro_batches(epoch, step_in_epoch, split)
        )

    def advance(self, batch: StepBatch) -> None:
        """Record that ``batch`` was consumed: the state moves to the step after it."""
        self.epoch, self.step_in_epoch = batch.epoch, batch.step_in_epoch + 1

    def next_step(self) -> StepBatch:
        """This rank's micro-batches for the next optimizer step; advances the state."""
        batch = self.step_batch(*self.position())
        self.advance(batch)
        return batch

    def __iter__(self) -> Iterator[StepBatch]:
        while True:
            yield self.next_step()

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "global_batch": self.split.global_batch,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Jump straight to the saved position (a new split with the same B is allowed)."""
        for key in ("num_samples", "global_batch", "seed"):
            if key in state and state[key] != getattr(self, key, None) and key != "global_batch":
                raise HetlmError(
                    f"cannot resume: the checkpoint's sampler has {key}={state[key]}, "
                    f"this run has {getattr(self, key)}; use the same data and seed"
                )
        if state.get("global_batch", self.split.global_batch) != self.split.global_batch:
            raise HetlmError(
                f"cannot resume: the checkpoint used global_batch={state['global_batch']}, this "
                f"run uses {self.split.global_batch}; keep the global batch (the split may change)"
            )
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])
