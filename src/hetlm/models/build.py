"""Build the model a config names: from a preset with a seeded initialisation, or from a
pretrained checkpoint (``model.init_from``: a local directory or a hub name)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from hetlm.errors import HetlmError
from hetlm.models.presets import DECODER_TYPES, model_config

if TYPE_CHECKING:
    from hetlm.config import ModelSection


def auto_class(model_type: str):
    """The ``transformers`` Auto class a model type trains as (MLM head or causal-LM head)."""
    import transformers

    if model_type in DECODER_TYPES:
        return transformers.AutoModelForCausalLM
    return transformers.AutoModelForMaskedLM


def build_model(
    section: ModelSection,
    *,
    vocab_size: int,
    pad_token_id: int,
    max_position_embeddings: int,
    seed: int,
    special_ids: dict[str, int] | None = None,
) -> nn.Module:
    """A fresh model of ``section.type`` (``*ForMaskedLM`` or ``*ForCausalLM``) from its preset;
    the same seed gives the same weights on every rank."""
    config = model_config(
        section.type,
        section.preset,
        vocab_size=vocab_size,
        pad_token_id=pad_token_id,
        max_position_embeddings=max_position_embeddings,
        dropout=section.dropout,
        overrides=section.overrides,
        special_ids=special_ids,
    )
    if section.type == "electra":
        from hetlm.models.electra import build_electra_pair

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return build_electra_pair(config, section.generator_fraction)
    return from_config_seeded(config, seed)


def from_config_seeded(config, seed: int) -> nn.Module:
    """``Auto*.from_config`` (MLM or causal-LM head, by the config's type) with the weights a
    pure function of ``seed``: every rank builds the same model; the global RNG is untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return auto_class(config.model_type).from_config(config)


def load_pretrained(section: ModelSection) -> nn.Module:
    """The checkpoint ``section.init_from`` (local folder or hub name), in fp32, with the head
    its type trains (a missing head, e.g. from a plain ``BertModel`` checkpoint, is initialised
    and reported by ``transformers``)."""
    import transformers

    from hetlm.models.source import resolve_model_source

    source = resolve_model_source(section.init_from, "model.init_from")
    local = Path(source)
    if section.type == "electra":
        from hetlm.models.electra import load_electra_pair

        return load_electra_pair(source, _dropout_kwargs(section))
    if local.exists() and not (local / "config.json").is_file():
        raise HetlmError(
            f"model.init_from {source} has no config.json: point it at a folder "
            "written by save_pretrained (e.g. a run's model/ folder)"
        )
    try:
        config = transformers.AutoConfig.from_pretrained(source)
    except OSError as exc:
        raise HetlmError(
            f"cannot load model.init_from {source!r}: "
            f"{str(exc).splitlines()[0]}; give a local folder or a hub name "
            "(and check the network or HF_HUB_OFFLINE)"
        ) from None
    if config.model_type != section.type:
        raise HetlmError(
            f"model.init_from {source} is a {config.model_type!r} model but "
            f"model.type is {section.type!r}: set model.type: {config.model_type}"
        )
    return auto_class(section.type).from_pretrained(
        source, dtype=torch.float32, **_dropout_kwargs(section)
    )


def _dropout_kwargs(section: ModelSection) -> dict[str, Any]:
    """Config fields a checkpoint is loaded with: the overrides, and model.dropout if set."""
    kwargs: dict[str, Any] = dict(section.overrides)
    if section.dropout is not None:
        if section.type in DECODER_TYPES:
            kwargs.update(attention_dropout=section.dropout)
        else:
            kwargs.update(
                hidden_dropout_prob=section.dropout, attention_probs_dropout_prob=section.dropout
            )
    return kwargs


def tokenizer_source(section: ModelSection) -> str:
    """Where the tokenizer of ``model.init_from`` lives (an ELECTRA output keeps one per part;
    the discriminator's is the one its embeddings were trained with)."""
    source = str(section.init_from)
    if section.type == "electra" and (Path(source) / "discriminator").is_dir():
        return str(Path(source) / "discriminator")
    return source


def freeze(model: nn.Module, *, embeddings: bool, first_layers: int) -> int:
    """Stop training the input embeddings and/or the first ``first_layers`` transformer layers
    (continued pretraining keeps general knowledge there); returns the parameters frozen.
    A model of several parts (ELECTRA) freezes the first layers of each part."""
    frozen: dict[int, int] = {}
    if embeddings:
        for param in model.get_input_embeddings().parameters():
            frozen[id(param)] = param.numel()
    if first_layers:
        parts = [getattr(model, p) for p in getattr(model, "artifact_subdirs", ())] or [model]
        for part in parts:
            layers = first_layer_stack(part)
            if first_layers > len(layers):
                raise HetlmError(
                    f"model.freeze_layers is {first_layers} but the model has "
                    f"{len(layers)} layers: give at most {len(layers)}"
                )
            for layer in layers[:first_layers]:
                frozen.update((id(p), p.numel()) for p in layer.parameters())
    for param in model.parameters():
        if id(param) in frozen:
            param.requires_grad_(False)
    return sum(frozen.values())


def first_layer_stack(model: nn.Module) -> list[nn.Module]:
    """The blocks of the model's first stack of transformer layers, input side first (unlike
    ``engines.fsdp.transformer_layers``, every stack's blocks, which FSDP shards one by one)."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module):
            return list(module)
    return []
