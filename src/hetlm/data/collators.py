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
# At this epoch every chosen position becomes [MASK] (no 10% kept / 10% random): with kept
# tokens among the targets, a model that only copies its input scores ~10% accuracy without
# using any context (seen: 13.6% held-out accuracy from copying alone, 3.9% at the [MASK]s).
EVAL_EPOCH = 2**31 - 1


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The random stream of one sample: Philox keyed by (seed, epoch, index)."""
    return np.random.Generator(
        np.random.Philox(key=[seed & 0xFFFFFFFFFFFFFFFF, ((epoch & 0xFFFFFF) << 40) | int(index)])
    )


@dataclass
class MLMBatch:
    """A packed MLM micro-batch with a fixed number of predicted slots per sequence.

    ``masked_positions`` has the same width for every batch (padded slots point at position 0
    with label -100), so tensor shapes never change: stable shapes keep the allocator from
    growing the peak memory step after step (see docs/DESIGN.md, performance notes).
    """

    input_ids: torch.Tensor  # [batch, seq] long
    masked_positions: torch.Tensor  # [batch, slots] long
    masked_labels: torch.Tensor  # [batch, slots] long, -100 where the slot is padding
    num_targets: int  # real masked tokens in this micro-batch
    num_tokens: int  # real (non-padding) tokens: hetlm.data.microbatch.MicroBatch

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def counts(self) -> tuple[int, ...]:
        """Targets per loss term (``train/objectives.py``): the masked tokens."""
        return (self.num_targets,)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """The keyword arguments of the objective module's forward."""
        return {
            "input_ids": self.input_ids,
            "masked_positions": self.masked_positions,
            "masked_labels": self.masked_labels,
        }


def continuation_mask(meta: dict, vocab_size: int | None = None) -> np.ndarray | None:
    """``continuation[token_id]``: True for WordPiece ``##`` pieces, from a dataset's metadata.

    None when the dataset's tokenizer marks no words (SentencePiece), so whole-word masking is
    unavailable. ``meta`` is ``hetlm_dataset.json`` (``continuation_token_ids``).
    """
    ids = meta.get("continuation_token_ids")
    if ids is None:
        return None
    size = int(vocab_size if vocab_size is not None else meta["vocab_size"])
    mask = np.zeros(size, dtype=bool)
    mask[np.asarray(ids, dtype=np.int64)] = True
    return mask


class MLMCollator:
    """BERT masking: choose round(p * candidates) positions; 80% [MASK], 10% random, 10% kept.

    The number of predictions per sequence is fixed by its candidates (as in the original BERT
    data pipeline), not drawn per token, which keeps every batch the same shape.

    ``whole_word=True`` (with ``continuation``, a boolean array over the vocabulary marking
    ``##`` pieces, see :func:`continuation_mask`) masks whole words: a word is a token that is not
    a continuation plus the continuation pieces right after it; words are taken in a random order
    until the count is reached, a word that would overshoot is skipped (as in Google's
    ``create_pretraining_data.py``), so the count never exceeds round(p * candidates) nor the
    slots; the 80/10/10 choice is made per word, so all pieces of a word are masked alike. A
    continuation piece right after a special token (a word cut by a sequence boundary) starts a
    word of its own.
    """

    def __init__(
        self,
        *,
        seq_len: int,
        vocab_size: int,
        mask_id: int,
        special_ids: list[int],
        mlm_probability: float = 0.15,
        seed: int = 0,
        whole_word: bool = False,
        continuation: np.ndarray | None = None,
        pad_id: int | None = None,
    ) -> None:
        """``pad_id``: positions holding it are not counted in ``num_tokens``; None: the rows
        hold no padding (packed rows of ``hetlm prepare``)."""
        self.seq_len = seq_len
        self.pad_id = pad_id
        self.vocab_size = vocab_size
        self.mask_id = mask_id
        self.special_ids = np.array(sorted(set(special_ids)), dtype=np.int64)
        self.mlm_probability = mlm_probability
        self.seed = seed
        self.slots = max(1, math.ceil(seq_len * mlm_probability))
        # Random replacements never produce special tokens (they are the lowest ids).
        self.random_low = int(self.special_ids.max()) + 1 if len(self.special_ids) else 0
        self.whole_word = whole_word
        if whole_word:
            if continuation is None:
                raise ValueError(
                    "whole_word masking needs the continuation array (which token "
                    "ids are ## pieces); the dataset's tokenizer has none"
                )
            continuation = np.asarray(continuation, dtype=bool)
            if continuation.shape != (vocab_size,):
                raise ValueError(
                    f"continuation must have one entry per token ({vocab_size}), "
                    f"got shape {continuation.shape}"
                )
        self.continuation = continuation

    def mask_one(
        self, ids: np.ndarray, epoch: int, index: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.whole_word:
            return self._mask_whole_words(ids, epoch, index)
        rng = sample_rng(self.seed, epoch, index)
        candidates = np.flatnonzero(~np.isin(ids, self.special_ids))
        count = min(self.slots, max(1, round(len(candidates) * self.mlm_probability)))
        count = min(count, len(candidates))
        chosen = (
            np.sort(rng.choice(candidates, size=count, replace=False)) if count else candidates[:0]
        )
        roll = rng.random(count)
        random_tokens = rng.integers(self.random_low, self.vocab_size, size=count)
        masked = ids.copy()
        labels = ids[chosen].copy()
        masked[chosen[roll < 0.8]] = self.mask_id
        swap = (roll >= 0.8) & (roll < 0.9)
        masked[chosen[swap]] = random_tokens[swap]
        return masked, chosen, labels

    def _mask_whole_words(
        self, ids: np.ndarray, epoch: int, index: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rng = sample_rng(self.seed, epoch, index)
        candidate = ~np.isin(ids, self.special_ids)
        follows_candidate = np.concatenate(([False], candidate[:-1]))
        starts = candidate & ~(self.continuation[ids] & follows_candidate)
        start_positions = np.flatnonzero(starts)
        candidates = int(candidate.sum())
        count = min(self.slots, max(1, round(candidates * self.mlm_probability)), candidates)
        if not count:
            return ids.copy(), start_positions[:0], ids[:0].copy()
        # word k covers positions [start_k, end_k): up to the next start or non-candidate
        word_of = np.cumsum(starts) - 1
        word_of[~candidate] = -1
        lengths = np.bincount(word_of[candidate], minlength=len(start_positions))
        order = rng.permutation(len(start_positions))
        chosen_words = _fill_words(lengths[order], count)
        words = np.sort(order[chosen_words])
        roll = rng.random(len(words))
        member = np.isin(word_of, words)
        chosen = np.flatnonzero(member)
        word_roll = roll[np.searchsorted(words, word_of[chosen])]
        random_tokens = rng.integers(self.random_low, self.vocab_size, size=len(chosen))
        masked = ids.copy()
        labels = ids[chosen].copy()
        masked[chosen[word_roll < 0.8]] = self.mask_id
        swap = (word_roll >= 0.8) & (word_roll < 0.9)
        masked[chosen[swap]] = random_tokens[swap]
        return masked, chosen, labels

    def __call__(self, rows: np.ndarray, indices: np.ndarray, epoch: int) -> MLMBatch:
        batch = len(indices)
        input_ids = np.empty((batch, rows.shape[1]), dtype=np.int64)
        positions = np.zeros((batch, self.slots), dtype=np.int64)
        labels = np.full((batch, self.slots), -100, dtype=np.int64)
        for row, (ids, index) in enumerate(zip(rows, indices, strict=True)):
            masked, chosen, target = self.mask_one(ids.astype(np.int64), epoch, int(index))
            if epoch == EVAL_EPOCH:  # held-out scoring: prediction from the context alone
                masked[chosen] = self.mask_id
            input_ids[row] = masked
            positions[row, : len(chosen)] = chosen
            labels[row, : len(chosen)] = target
        return MLMBatch(
            input_ids=torch.from_numpy(input_ids),
            masked_positions=torch.from_numpy(positions),
            masked_labels=torch.from_numpy(labels),
            num_targets=int((labels != -100).sum()),
            num_tokens=int(rows.size if self.pad_id is None else (rows != self.pad_id).sum()),
        )


def _fill_words(lengths: np.ndarray, count: int) -> np.ndarray:
    """Indices (into ``lengths``, in order) of the words taken: greedily, skipping a word that
    would overshoot ``count``, stopping when it is reached."""
    total = np.cumsum(lengths)
    prefix = int(np.searchsorted(total, count, side="right"))  # words that fit outright
    taken = list(range(prefix))
    budget = count - (int(total[prefix - 1]) if prefix else 0)
    for k in range(prefix, len(lengths)):
        if budget == 0:
            break
        if lengths[k] <= budget:
            taken.append(k)
            budget -= int(lengths[k])
    return np.asarray(taken, dtype=np.int64)
