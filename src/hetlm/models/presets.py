"""Model presets: named shapes from tiny (tests) to large, built from config, never downloaded."""

from __future__ import annotations

from typing import Any

from hetlm.errors import HetlmError

# hidden, layers, heads, intermediate. "tiny" exists for tests; base/large are the BERT paper's.
ENCODER_PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64},
    "small": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 1024},
    "base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
    "large": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096},
}


def encoder_preset(name: str) -> dict[str, Any]:
    try:
        return dict(ENCODER_PRESETS[name])
    except KeyError:
        raise HetlmError(
            f"unknown model preset {name!r}: choose one of {', '.join(ENCODER_PRESETS)}"
        ) from None


def bert_config(
    preset: str,
    vocab_size: int,
    max_position_embeddings: int = 512,
    pad_token_id: int = 0,
    dropout: float | None = None,
    overrides: dict[str, Any] | None = None,
):
    """A ``transformers.BertConfig`` for a preset; ``dropout`` sets hidden and attention dropout."""
    from transformers import BertConfig

    kwargs: dict[str, Any] = encoder_preset(preset)
    kwargs.update(vocab_size=vocab_size, max_position_embeddings=max_position_embeddings,
                  pad_token_id=pad_token_id)
    if dropout is not None:
        kwargs.update(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    kwargs.update(overrides or {})
    return BertConfig(**kwargs)
