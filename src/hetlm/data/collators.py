"""Collators: turn dataset indices into model inputs, with per-sample randomness.

Every random choice is a pure function of (seed, epoch, sample index), so a sample is masked the
same way whichever rank or micro-batch it lands in (split invariance) and however often the run
is resumed (exact resume).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

# A fixed "epoch" for evaluation masking, so held-out metrics compare across steps and runs.
EVAL_EPOCH = 2**31 - 1


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The random stream of one sample: Philox keyed by (seed, epoch, index)."""
    return np.random.Generator(
        np.random.Philox(key=[seed & 0xFFFFFFFFFFFFFFFF, ((epoch & 0xFFFFFF) << 40) | int(index)]))


@dataclass
class MLMBatch:
    """A packed MLM micro-batch with a fixed number of predicted slots per sequence.

    ``masked_positions`` has the same width for every batch (padded slots point at position 0
    with label -100), so tensor shapes never change: stable shapes keep the allocator from
    growing the peak memory step after step (see docs/DESIGN.md, performance notes).
    """

    input_ids: torch.Tensor          # [batch, seq] long
    masked_positions: torch.Tensor   # [batch, slots] long
    masked_labels: torch.Tensor      # [batch, slots] long, -100 where the slot is padding
    num_targets: int                 # real masked tokens in this micro-batch
    num_tokens: int                  # tokens processed (batch * seq)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


class MLMCollator:
    """BERT masking: choose round(p * candidates) positions; 80% [MASK], 10% random, 10% kept.

    The number of predictions per sequence is fixed by its candidates (as in the original BERT
    data pipeline), not drawn per token, which keeps every batch the same shape.
    """

    def __init__(self, *, seq_len: int, vocab_size: int, mask_id: int, special_ids: list[int],
                 mlm_probability: float = 0.15, seed: int = 0) -> None:
        self.seq_len = seq_len
        self.vocab_size = vocab_size
        self.mask_id = mask_id
        self.special_ids = np.array(sorted(set(special_ids)), dtype=np.int64)
        self.mlm_probability = mlm_probability
        self.seed = seed
        self.slots = max(1, math.ceil(seq_len * mlm_probability))
        # Random replacements never produce special tokens (they are the lowest ids).
        self.random_low = int(self.special_ids.max()) + 1 if len(self.special_ids) else 0

    def mask_one(self, ids: np.ndarray, epoch: int, index: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rng = sample_rng(self.seed, epoch, index)
        candidates = np.flatnonzero(~np.isin(ids, self.special_ids))
        count = min(self.slots, max(1, round(len(candidates) * self.mlm_probability)))
        count = min(count, len(candidates))
        chosen = np.sort(rng.choice(candidates, size=count, replace=False)) if count else candidates[:0]
        roll = rng.random(count)
        random_tokens = rng.integers(self.random_low, self.vocab_size, size=count)
        masked = ids.copy()
        labels = ids[chosen].copy()
        masked[chosen[roll < 0.8]] = self.mask_id
        swap = (roll >= 0.8) & (roll < 0.9)
        masked[chosen[swap]] = random_tokens[swap]
        return masked, chosen, labels

    def __call__(self, rows: np.ndarray, indices: np.ndarray, epoch: int) -> MLMBatch:
        batch = len(indices)
        input_ids = np.empty((batch, rows.shape[1]), dtype=np.int64)
        positions = np.zeros((batch, self.slots), dtype=np.int64)
        labels = np.full((batch, self.slots), -100, dtype=np.int64)
        for row, (ids, index) in enumerate(zip(rows, indices, strict=True)):
            masked, chosen, target = self.mask_one(ids.astype(np.int64), epoch, int(index))
            input_ids[row] = masked
            positions[row, :len(chosen)] = chosen
            labels[row, :len(chosen)] = target
        return MLMBatch(
            input_ids=torch.from_numpy(input_ids),
            masked_positions=torch.from_numpy(positions),
            masked_labels=torch.from_numpy(labels),
            num_targets=int((labels != -100).sum()),
            num_tokens=int(input_ids.size),
        )
