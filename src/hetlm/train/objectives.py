"""Objectives: what each model type learns from, behind the one interface the loop uses.

The loop (``train/pretrain.py: train_step``) knows nothing of masking or shifting. It needs:

- a **micro-batch** with ``model_inputs()`` (the keyword arguments of the module's forward),
  ``counts`` (per loss term, the targets it holds: masked tokens, predicted next tokens, response
  tokens, ...), ``num_tokens`` and ``len()``: ``MLMBatch``, ``CLMBatch`` here, ``SFTBatch``;
- an **objective module** wrapping the Hugging Face model as ``.model``, whose forward returns
  (summed loss, correct predictions): 0-d tensors for one loss term, ``[k]`` tensors for k, with
  ``loss_terms`` (names) and ``loss_weights``: ``SparseMaskedLM``, ``SparseCausalLM``.

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
from hetlm.models.causal_lm import IGNORE_INDEX, SparseCausalLM
from hetlm.models.masked_lm import SparseMaskedLM


def special_ids(meta: dict[str, Any]) -> dict[str, int]:
    ids = meta.get("special_token_ids")
    if not ids or "pad" not in ids:
        raise HetlmError("the dataset's hetlm_dataset.json has no special token ids: re-run "
                         "`hetlm prepare`")
    return {name: int(value) for name, value in ids.items()}


def loss_weights(module: nn.Module) -> tuple[float, ...]:
    return tuple(getattr(module, "loss_weights", (1.0,)))


def loss_terms(module: nn.Module) -> tuple[str, ...]:
    return tuple(getattr(module, "loss_terms", ("loss",)))


class PackedMLMData:
    """A packed split plus its MLM collator: indices in, ``MLMBatch`` out."""

    def __init__(self, split_dataset, meta: dict[str, Any], mlm_probability: float, seed: int,
                 whole_word: bool | None = None):
        self.rows = split_dataset.with_format("numpy")
        self.seq_len = int(meta["seq_len"])
        special = special_ids(meta)
        if "mask" not in special:
            raise HetlmError("the dataset's tokenizer has no mask token: masked-LM training "
                             "needs one (train the tokenizer with hetlm, or add [MASK])")
        continuation = continuation_mask(meta)
        if whole_word and continuation is None:
            raise HetlmError("data.whole_word_masking needs a word-segmenting tokenizer (MeCab or "
                             "Sudachi + WordPiece); this dataset's tokenizer marks no words")
        use_whole_word = (continuation is not None) if whole_word is None else whole_word
        self.collator = MLMCollator(
            seq_len=self.seq_len, vocab_size=int(meta["vocab_size"]), mask_id=special["mask"],
            special_ids=[special[k] for k in ("pad", "cls", "sep", "unk", "mask") if k in special],
            mlm_probability=mlm_probability, seed=seed, whole_word=use_whole_word,
            continuation=continuation if use_whole_word else None)

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, indices: np.ndarray, epoch: int) -> MLMBatch:
        rows = np.asarray(self.rows[indices.tolist()]["input_ids"])
        return self.collator(rows, indices, epoch)


@dataclass
class CLMBatch:
    """Packed causal-LM micro-batch: every non-padding token after the first is a target."""

    input_ids: torch.Tensor   # [batch, seq]
    labels: torch.Tensor      # [batch, seq], IGNORE_INDEX on padding
    num_targets: int
    num_tokens: int

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def counts(self) -> tuple[int, ...]:
        return (self.num_targets,)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "labels": self.labels}


class PackedCLMData:
    """A packed split read as next-token prediction (nothing random: split invariance and
    resume hold trivially)."""

    def __init__(self, split_dataset, meta: dict[str, Any]):
        self.rows = split_dataset.with_format("numpy")
        self.seq_len = int(meta["seq_len"])
        self.pad_id = special_ids(meta)["pad"]

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, indices: np.ndarray, epoch: int) -> CLMBatch:
        ids = torch.from_numpy(np.asarray(self.rows[indices.tolist()]["input_ids"],
                                          dtype=np.int64))
        labels = ids.masked_fill(ids == self.pad_id, IGNORE_INDEX)
        return CLMBatch(ids, labels, num_targets=int((labels[:, 1:] != IGNORE_INDEX).sum()),
                        num_tokens=int(ids.numel()))


def build_data(config: PretrainConfig, split_dataset, meta: dict[str, Any]):
    """The training or evaluation data of ``config.model.type`` over one packed split."""
    if config.model.causal:
        return PackedCLMData(split_dataset, meta)
    return PackedMLMData(split_dataset, meta, config.train.mlm_probability, config.run.seed,
                         config.data.whole_word_masking)


def objective_module(config: PretrainConfig, model: nn.Module) -> nn.Module:
    """The objective module that trains ``model`` (see the module docstring)."""
    if config.model.causal:
        return SparseCausalLM(model)
    return SparseMaskedLM(model)
