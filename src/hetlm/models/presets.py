"""Model presets: named shapes per model type, built from config, never downloaded.

Encoders (BERT, RoBERTa, DeBERTaV2, ELECTRA) share one table: tiny (tests), mini (2 layers of
128: Google's BERT-Tiny, Turc et al. 2019, the largest shape that learns within minutes on a CPU),
small, base, large (the BERT paper's base/large). LLaMA-family decoders have their own, from tiny to the 7B and 13B shapes
(LLaMA-2 7B: 4096 hidden, 32 layers, 32 heads, 11008 MLP; 13B: 5120, 40, 40, 13824).
"""

from __future__ import annotations

from typing import Any

from hetlm.errors import HetlmError

# hidden, layers, heads, intermediate. "tiny" exists for tests; base/large are the BERT paper's.
ENCODER_PRESETS: dict[str, dict[str, int]] = {
    "tiny": {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
    },
    "mini": {
        "hidden_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 512,
    },
    "small": {
        "hidden_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "intermediate_size": 1024,
    },
    "base": {
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
    },
    "large": {
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "intermediate_size": 4096,
    },
}

# LLaMA shapes: 1b is TinyLlama-1.1B's (grouped-query attention, 4 KV heads), 7b and 13b are
# LLaMA-2's.
DECODER_PRESETS: dict[str, dict[str, int]] = {
    "tiny": {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "intermediate_size": 64,
    },
    "mini": {  # the encoder's mini with LLaMA's MLP ratio (8/3 x hidden, rounded)
        "hidden_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "intermediate_size": 344,
    },
    "small": {
        "hidden_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "intermediate_size": 688,
    },
    "base": {
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "num_key_value_heads": 12,
        "intermediate_size": 2048,
    },
    "1b": {
        "hidden_size": 2048,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "intermediate_size": 5632,
    },
    "7b": {
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "intermediate_size": 11008,
    },
    "13b": {
        "hidden_size": 5120,
        "num_hidden_layers": 40,
        "num_attention_heads": 40,
        "num_key_value_heads": 40,
        "intermediate_size": 13824,
    },
}

ENCODER_TYPES = ("bert", "roberta", "deberta-v2", "electra")
DECODER_TYPES = ("llama",)
MODEL_TYPES = ENCODER_TYPES + DECODER_TYPES


FAMILY_NAMES = {
    "bert": "BERT",
    "roberta": "RoBERTa",
    "deberta-v2": "DeBERTa-v2",
    "electra": "ELECTRA",
    "llama": "LLaMA",
}


def model_name(model_type: str, preset: str) -> str:
    """How reports name a model, e.g. BERT-small or LLaMA-mini."""
    return f"{FAMILY_NAMES.get(model_type, model_type)}-{preset}"


def presets_for(model_type: str) -> dict[str, dict[str, int]]:
    return DECODER_PRESETS if model_type in DECODER_TYPES else ENCODER_PRESETS


def encoder_preset(name: str, model_type: str = "bert") -> dict[str, Any]:
    table = presets_for(model_type)
    try:
        return dict(table[name])
    except KeyError:
        raise HetlmError(
            f"unknown {model_type} preset {name!r}: choose one of {', '.join(table)}"
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
    return model_config(
        "bert",
        preset,
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=pad_token_id,
        dropout=dropout,
        overrides=overrides,
    )


def model_config(
    model_type: str,
    preset: str,
    *,
    vocab_size: int,
    max_position_embeddings: int,
    pad_token_id: int,
    dropout: float | None = None,
    overrides: dict[str, Any] | None = None,
    special_ids: dict[str, int] | None = None,
):
    """The ``transformers`` config of ``model_type`` in the shape of ``preset``.

    ``max_position_embeddings`` is the longest sequence trained on; RoBERTa adds its two
    reserved positions (its position ids start after the padding index).
    """
    import transformers

    kwargs: dict[str, Any] = encoder_preset(preset, model_type)
    kwargs.update(vocab_size=vocab_size, pad_token_id=pad_token_id)
    special = special_ids or {}
    if model_type in DECODER_TYPES:
        kwargs.update(
            max_position_embeddings=max_position_embeddings,
            tie_word_embeddings=False,
            bos_token_id=special.get("cls", special.get("bos")),
            eos_token_id=special.get("sep", special.get("eos")),
        )
        if dropout is not None:
            kwargs.update(attention_dropout=dropout)
        kwargs.update(overrides or {})
        return transformers.LlamaConfig(**kwargs)
    if dropout is not None:
        kwargs.update(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    kwargs.update(max_position_embeddings=max_position_embeddings)
    if model_type == "bert":
        cls = transformers.BertConfig
    elif model_type == "roberta":
        # no token types; positions start at pad_token_id + 1
        kwargs.update(
            type_vocab_size=1,
            max_position_embeddings=max_position_embeddings + pad_token_id + 1,
            bos_token_id=special.get("cls", 0),
            eos_token_id=special.get("sep", 2),
        )
        cls = transformers.RobertaConfig
    elif model_type == "deberta-v2":
        # DeBERTa-v3's attention: relative positions only (disentangled c2p + p2c, log buckets)
        kwargs.update(
            type_vocab_size=0,
            relative_attention=True,
            position_biased_input=False,
            pos_att_type=["p2c", "c2p"],
            max_relative_positions=-1,
            position_buckets=min(256, max_position_embeddings),
            norm_rel_ebd="layer_norm",
            share_att_key=True,
            legacy=True,
        )
        cls = transformers.DebertaV2Config
    elif model_type == "electra":
        kwargs.update(embedding_size=kwargs["hidden_size"])
        cls = transformers.ElectraConfig
    else:
        raise HetlmError(
            f"unknown model type {model_type!r}: choose one of {', '.join(MODEL_TYPES)}"
        )
    kwargs.update(overrides or {})
    return cls(**kwargs)
