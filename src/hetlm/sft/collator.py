"""SFT micro-batches, length grouping, and the summed next-token loss.

The training step divides the loss by the number of response tokens in the *whole global
batch* (docs/DESIGN.md, token-exact loss), so a micro-batch carries ``num_targets`` and the loss
helper returns a *sum*. A per-micro-batch mean would weight an example by how many response
tokens its micro-batch-mates have, which changes with the split across ranks.

Nothing here is random: an example's tokens and labels depend only on the example, so the
per-sample purity the pretraining collators get from seeded streams holds trivially.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from hetlm.models.causal_lm import target_index
from hetlm.sft.masking import IGNORE_INDEX, TokenizedExample


@dataclass
class SFTBatch:
    """A right-padded micro-batch, in the micro-batch interface of the loop
    (``hetlm.data.microbatch.MicroBatch``)."""

    input_ids: torch.Tensor  # [batch, seq] long
    attention_mask: torch.Tensor  # [batch, seq] long, 0 on padding
    labels: torch.Tensor  # [batch, seq] long, IGNORE_INDEX on prompt and padding
    num_targets: int  # response tokens the summed loss covers
    num_tokens: int  # real (non-padding) tokens, as in every MicroBatch
    indices: list[int]  # data set indices of the examples, in order
    target_index: torch.Tensor | None = None  # models.causal_lm.target_index, built on the CPU

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def counts(self) -> tuple[int, ...]:
        """Targets per loss term (``train/objectives.py``): the response tokens."""
        return (self.num_targets,)

    @property
    def padded_tokens(self) -> int:
        """Tokens processed, padding included."""
        return int(self.input_ids.numel())

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """The keyword arguments of ``SparseCausalLM.forward``."""
        inputs = {
            "input_ids": self.input_ids,
            "labels": self.labels,
            "attention_mask": self.attention_mask,
        }
        if self.target_index is not None:
            inputs["target_index"] = self.target_index
        return inputs

    def to(self, device: torch.device | str) -> SFTBatch:
        return SFTBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.labels.to(device),
            self.num_targets,
            self.num_tokens,
            self.indices,
            None if self.target_index is None else self.target_index.to(device),
        )


class SFTCollator:
    """Pads tokenized examples to the longest in the micro-batch (optionally a multiple of N).

    Padding goes on the right, where causal attention never lets a real token see it.
    """

    def __init__(self, pad_id: int, *, pad_to_multiple_of: int | None = None) -> None:
        self.pad_id = pad_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: Sequence[TokenizedExample]) -> SFTBatch:
        if not examples:
            raise ValueError("cannot collate an empty micro-batch")
        width = max(len(e) for e in examples)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
        for row, example in enumerate(examples):
            n = len(example)
            input_ids[row, :n] = torch.tensor(example.input_ids, dtype=torch.long)
            labels[row, :n] = torch.tensor(example.labels, dtype=torch.long)
            attention_mask[row, :n] = 1
        return SFTBatch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            labels=labels,
            # Shifted, like the loss: a label at position 0 would never be predicted.
            num_targets=int((labels[:, 1:] != IGNORE_INDEX).sum()),
            num_tokens=int(attention_mask.sum()),
            indices=[e.index for e in examples],
            target_index=target_index(labels),
        )


def order_by_length(
    indices: Sequence[int] | np.ndarray, lengths: Sequence[int] | np.ndarray
) -> np.ndarray:
    """The global batch's indices, longest first (ties by index), to cut into micro-batches.

    Rank r's contiguous slice of this order, cut into micro-batches, then holds examples of
    similar length, so little is padded. It is a pure function of the indices and the data set
    lengths (``lengths[i]`` for data set index i): every rank computes the same order without
    communication, and since each step still sees the same set of examples, split invariance
    holds (the summed loss does not depend on which micro-batch an example is in).
    """
    idx = np.asarray(indices, dtype=np.int64)
    lens = np.asarray(lengths, dtype=np.int64)[idx]
    return idx[np.lexsort((idx, -lens))]


def padded_tokens(
    micro_batches: Sequence[Sequence[int]], lengths: Sequence[int] | np.ndarray
) -> int:
    """Tokens processed (padding included) by micro-batches of data set indices."""
    lens = np.asarray(lengths, dtype=np.int64)
    return int(
        sum(len(mb) * lens[np.asarray(mb, dtype=np.int64)].max() for mb in micro_batches if len(mb))
    )


def summed_next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy *summed* over the target tokens, logits at t predicting labels at t+1.

    Only the target positions are gathered and upcast to float32, so a long prompt costs no
    float32 copy of its vocabulary logits. Divide by the global ``num_targets`` of the step.
    """
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
    selected = logits[:, :-1][mask].float()
    return F.cross_entropy(selected, shift_labels[mask], reduction="sum")
