"""Objectives: what each model type learns from, behind the one interface the loop uses.

The loop (``train/pretrain.py: train_step``) knows nothing of masking or shifting. It needs:

- a **micro-batch** with ``model_inputs()`` (the keyword arguments of the module's forward),
  ``counts`` (per loss term, the targets it holds: masked tokens, predicted next tokens, response
  tokens, ...), ``num_tokens`` and ``len()``: ``MLMBatch``, ``CLMBatch`` here, ``SFTBatch``;
- an **objective module** wrapping the Hugging Face model as ``.model``, whose forward returns
  (summed loss, correct predictions): 0-d tensors for one loss term, ``[k]`` tensors for k, with
  ``loss_terms`` (names) and ``loss_weights``: ``SparseMaskedLM``, ``SparseCausalLM``,
  ``ElectraObjective`` (two terms: the generator's MLM over masked tokens, the discriminator's
  replaced-token detection over real tokens, weight 50).

The step's loss is ``sum_i weight_i * loss_sum_i / n_global_i`` where ``n_global_i`` is term i's
target count over the whole global batch (one all-reduce of the count vector): token-exact for
every objective, whatever the split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from hetlm.config import PretrainConfig
from hetlm.data.collators import MLMBatch, MLMCollator, continuation_mask
from hetlm.errors import HetlmError
from hetlm.models.causal_lm import IGNORE_INDEX, SparseCausalLM, target_index
from hetlm.models.electra import ElectraObjective, sample_seed
from hetlm.models.masked_lm import SparseMaskedLM


def special_ids(meta: dict[str, Any]) -> dict[str, int]:
    ids = meta.get("special_token_ids")
    if not ids or "pad" not in ids:
        raise HetlmError(
            "the dataset's hetlm_dataset.json has no special token ids: re-run `hetlm prepare`"
        )
    return {name: int(value) for name, value in ids.items()}


def loss_weights(module: nn.Module) -> tuple[float, ...]:
    return tuple(getattr(module, "loss_weights", (1.0,)))


def loss_terms(module: nn.Module) -> tuple[str, ...]:
    return tuple(getattr(module, "loss_terms", ("loss",)))


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
        return self.mlm.num_tokens

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
    num_tokens: int
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
            num_tokens=int(ids.numel()),
            target_index=target_index(labels),
        )


def build_data(config: PretrainConfig, split_dataset, meta: dict[str, Any]):
    """The training or evaluation data of ``config.model.type`` over one packed split."""
    if config.model.causal:
        return PackedCLMData(split_dataset, meta)
    if config.model.type == "electra":
        return PackedElectraData(
            split_dataset,
            meta,
            config.train.mlm_probability,
            config.run.seed,
            config.data.whole_word_masking,
        )
    return PackedMLMData(
        split_dataset,
        meta,
        config.train.mlm_probability,
        config.run.seed,
        config.data.whole_word_masking,
    )


def objective_module(config: PretrainConfig, model: nn.Module) -> nn.Module:
    """The objective module that trains ``model`` (see the module docstring)."""
    if config.model.causal:
        return SparseCausalLM(model)
    if config.model.type == "electra":
        return ElectraObjective(model, config.model.discriminator_weight)
    return SparseMaskedLM(model)
