"""How one global batch is split across ranks and micro-steps: the object the loop trusts.

A ``BatchSplit`` says, for a global batch of B samples, how many samples each rank takes (its
*share*) and how each share is cut into the same number of micro-steps on every rank. Ranks may
differ in micro-batch size but never in the number of micro-steps (ZeRO-3/FSDP all-gather on
every forward, so uneven counts hang). It is built and validated once, from a config or a plan,
and checked against the launched world size before any training starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hetlm.errors import HetlmError


@dataclass(frozen=True)
class BatchSplit:
    global_batch: int
    micro_steps: int
    shares: tuple[int, ...]  # samples of each global batch taken by rank r; sums to global_batch

    def __post_init__(self) -> None:
        if self.global_batch < 1:
            raise HetlmError(f"global_batch must be >= 1, got {self.global_batch}")
        if self.micro_steps < 1:
            raise HetlmError(f"micro_steps must be >= 1, got {self.micro_steps}")
        if not self.shares or any(s < 1 for s in self.shares):
            raise HetlmError(
                f"every rank needs at least one sample per step, got shares {list(self.shares)}"
            )
        if sum(self.shares) != self.global_batch:
            raise HetlmError(
                f"per-rank shares {list(self.shares)} sum to {sum(self.shares)}, not the global batch "
                f"{self.global_batch}: change the micro-batches or the global batch"
            )
        if any(s < self.micro_steps for s in self.shares):
            raise HetlmError(
                f"shares {list(self.shares)} are too small for {self.micro_steps} micro-steps: "
                "each rank needs at least one sample per micro-step"
            )

    @property
    def world_size(self) -> int:
        return len(self.shares)

    def offset(self, rank: int) -> int:
        """Position of ``rank``'s slice inside each global batch."""
        return sum(self.shares[:rank])

    def micro_batch_sizes(self, rank: int) -> list[int]:
        """Sizes of ``rank``'s micro-batches: its share cut into ``micro_steps`` near-equal parts."""
        share = self.shares[rank]
        base, extra = divmod(share, self.micro_steps)
        return [base + 1 if i < extra else base for i in range(self.micro_steps)]

    def max_micro_batch(self, rank: int) -> int:
        return max(self.micro_batch_sizes(rank))

    @classmethod
    def from_micro_batches(cls, global_batch: int, micro_batches: list[int]) -> BatchSplit:
        """Split B over ranks whose micro-batch sizes are given (e.g. 80 and 48).

        The number of micro-steps is derived: a = B / sum(micro_batches), which must be a whole
        number so that every rank runs exactly its micro-batch on every micro-step.
        """
        if not micro_batches or any(m < 1 for m in micro_batches):
            raise HetlmError(f"micro-batches must be positive integers, got {micro_batches}")
        per_step = sum(micro_batches)
        micro_steps = max(1, math.ceil(global_batch / per_step))
        if per_step * micro_steps != global_batch:
            lower = per_step * max(1, global_batch // per_step)
            raise HetlmError(
                f"micro-batches {micro_batches} (sum {per_step}) cannot make the global batch "
                f"{global_batch}: it must be a multiple of {per_step} (e.g. {lower} or "
                f"{lower + per_step}), or change the micro-batches"
            )
        return cls(global_batch, micro_steps, tuple(m * micro_steps for m in micro_batches))

    def check_world(self, world_size: int) -> None:
        if world_size != self.world_size:
            raise HetlmError(
                f"the batch split is for {self.world_size} ranks but {world_size} were launched: "
                "give one micro-batch per launched rank (check --nnodes/--nproc-per-node), or re-plan"
            )
