"""Objectives: what each model type learns from, behind the one interface the loop uses.

The loop (``train/pretrain.py: train_step``) knows nothing of masking or shifting. It needs:

- a **micro-batch** (:class:`hetlm.data.microbatch.MicroBatch`) with ``model_inputs()`` (the
  keyword arguments of the module's forward), ``counts`` (per loss term, the targets it holds:
  masked tokens, predicted next tokens, response tokens, ...), ``num_tokens`` (real, non-padding
  tokens) and ``len()``: ``MLMBatch``, ``ElectraBatch``, ``CLMBatch`` (the
  packed-split readers of :mod:`hetlm.data.readers` make them), ``SFTBatch``;
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

from typing import Any

from torch import nn

from hetlm.config import PretrainConfig
from hetlm.data.readers import PackedCLMData, PackedElectraData, PackedMLMData
from hetlm.models.causal_lm import SparseCausalLM
from hetlm.models.electra import ElectraObjective
from hetlm.models.masked_lm import SparseMaskedLM


def loss_weights(module: nn.Module) -> tuple[float, ...]:
    return tuple(getattr(module, "loss_weights", (1.0,)))


def loss_terms(module: nn.Module) -> tuple[str, ...]:
    return tuple(getattr(module, "loss_terms", ("loss",)))


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
