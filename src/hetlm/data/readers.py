"""Packed sequences into micro-batches: the training-time readers of a ``hetlm prepare`` split.

Each reader holds one split of a packed dataset (:mod:`hetlm.data.packed`) and answers
``batch(indices, epoch)`` with a micro-batch in the interface the loop uses
(:class:`hetlm.data.microbatch.MicroBatch`; :mod:`hetlm.train.objectives`): ``MLMBatch`` (BERT-style masking, :mod:`hetlm.data.collators`),
``ElectraBatch`` (the same masking plus the generator's per-sample seeds) or ``CLMBatch``
(next-token prediction). Which reader a run uses is chosen by ``train/objectives.py: build_data``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hetlm.data.collators import MLMBatch, MLMCollator, continuation_mask
from hetlm.errors import HetlmError
from hetlm.models.causal_lm import IGNORE_INDEX, target_index
from hetlm.models.electra import sample_seed


def special_ids(meta: dict[str, Any]) -> dict[str, int]:
    ids = meta.get("special_token_ids")
    if not ids or "pad" not in ids:
        raise HetlmError(
            "the dataset's hetlm_dataset.json has no special token ids: re-run `hetlm prepare`"
        )
    return {name: int(value) for name, value in ids.items()}


class PackedRows:
    """A packed split of ``hetlm prepare``: its sequences read by index."""

    def __init__(self, split_dataset, meta: dict[str, Any]):
        self.rows = split_dataset.with_format("numpy")
        self.seq_len = int(meta["seq_len"])
        self.pad_id = special_ids(meta)["pad"]

    def __len__(self) -> int:
        return len(self.rows)

    def rows_at(self, indices: np.ndarray) -> np.ndarray:
        """The token ids of the sequences ``indices``: [len(indices), seq_len]."""
        return np.asarray(self.rows[indices.tolist()]["input_ids"])


class PackedMLMData(PackedRows):
    """A packed split plus its MLM collator: indices in, ``MLMBatch`` out."""

    def __init__(
        self,
        split_dataset,
        meta: dict[str, Any],
        mlm_probability: float,
        seed: int,
        whole_word: bool | None = None,
    ):
        super().__init__(split_dataset, meta)
        special = special_ids(meta)
        if "mask" not in special:
            raise HetlmError(
                "the dataset's tokenizer has no mask token: masked-LM training "
                "needs one (train the tokenizer with hetlm, or add [MASK])"
            )
        continuation = continuation_mask(meta)
        if whole_word and continuation is None:
            raise HetlmError(
                "data.whole_word_masking needs a word-segmenting tokenizer (MeCab or "
                "Sudachi + WordPiece); this dataset's tokenizer marks no words"
            )
        use_whole_word = (continuation is not None) if whole_word is None else whole_word
        self.collator = MLMCollator(
            seq_len=self.seq_len,
            vocab_size=int(meta["vocab_size"]),
            mask_id=special["mask"],
            special_ids=[special[k] for k in ("pad", "cls", "sep", "unk", "mask") if k in special],
            mlm_probability=mlm_probability,
            seed=seed,
            whole_word=use_whole_word,
            continuation=continuation if use_whole_word else None,
            pad_id=self.pad_id,
        )

    def batch(self, indices: np.ndarray, epoch: int) -> MLMBatch:
        return self.collator(self.rows_at(indices), indices, epoch)


@dataclass
class ElectraBatch:
    """An MLM micro-batch plus what replaced-token detection needs: the per-sample sampling
    seeds of the generator and the real (non-padding) tokens the discriminator judges."""

    mlm: MLMBatch
    sample_seeds: torch.Tensor  # [batch] int64, sample_seed(seed, epoch, index)
    attention_mask: torch.Tensor  # [batch, seq] long, 0 on padding
    num_real: int

    def __len__(self) -> int:
        return len(self.mlm)

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens (``hetlm.data.microbatch.MicroBatch``)."""
        return self.num_real

    @property
    def counts(self) -> tuple[int, ...]:
        """(masked tokens: the generator's targets, real tokens: the discriminator's)."""
        return (self.mlm.num_targets, self.num_real)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {
            **self.mlm.model_inputs(),
            "sample_seeds": self.sample_seeds,
            "attention_mask": self.attention_mask,
        }


class PackedElectraData(PackedMLMData):
    """MLM masking as for BERT, plus the generator's per-sample sampling seeds."""

    def __init__(
        self,
        split_dataset,
        meta: dict[str, Any],
        mlm_probability: float,
        seed: int,
        whole_word: bool | None = None,
    ):
        super().__init__(split_dataset, meta, mlm_probability, seed, whole_word)
        self.seed = seed

    def batch(self, indices: np.ndarray, epoch: int) -> ElectraBatch:
        rows = self.rows_at(indices)
        mlm = self.collator(rows, indices, epoch)
        seeds = torch.tensor(
            [sample_seed(self.seed, epoch, int(i)) for i in indices], dtype=torch.int64
        )
        mask = torch.from_numpy((rows != self.pad_id).astype(np.int64))
        return ElectraBatch(mlm, seeds, mask, num_real=int(mask.sum()))


@dataclass
class CLMBatch:
    """Packed causal-LM micro-batch: every non-padding token after the first is a target."""

    input_ids: torch.Tensor  # [batch, seq]
    labels: torch.Tensor  # [batch, seq], IGNORE_INDEX on padding
    num_targets: int
    num_tokens: int  # real (non-padding) tokens: hetlm.data.microbatch.MicroBatch
    target_index: torch.Tensor | None = None  # models.causal_lm.target_index, built on the CPU

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def counts(self) -> tuple[int, ...]:
        return (self.num_targets,)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        inputs = {"input_ids": self.input_ids, "labels": self.labels}
        if self.target_index is not None:
            inputs["target_index"] = self.target_index
        return inputs


class PackedCLMData(PackedRows):
    """A packed split read as next-token prediction (nothing random: split invariance and
    resume hold trivially)."""

    def batch(self, indices: np.ndarray, epoch: int) -> CLMBatch:
        ids = torch.from_numpy(self.rows_at(indices).astype(np.int64))
        labels = ids.masked_fill(ids == self.pad_id, IGNORE_INDEX)
        return CLMBatch(
            ids,
            labels,
            num_targets=int((labels[:, 1:] != IGNORE_INDEX).sum()),
            num_tokens=int((ids != self.pad_id).sum()),
            target_index=target_index(labels),
        )
