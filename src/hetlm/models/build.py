"""Build the model a config names: from a preset, with a seeded initialisation."""

from __future__ import annotations

import torch

from hetlm.config import ModelSection
from hetlm.models.presets import bert_config


def build_masked_lm(section: ModelSection, *, vocab_size: int, pad_token_id: int,
                    max_position_embeddings: int, seed: int) -> torch.nn.Module:
    """A fresh ``BertForMaskedLM``; the same seed gives the same weights on every rank."""
    from transformers import BertForMaskedLM

    config = bert_config(section.preset, vocab_size=vocab_size, pad_token_id=pad_token_id,
                         max_position_embeddings=max_position_embeddings,
                         dropout=section.dropout, overrides=section.overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertForMaskedLM(config)
    return model
