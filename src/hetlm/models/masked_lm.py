"""Masked-LM objective with vocabulary logits only at the masked positions.

The stock Hugging Face MLM head projects every position onto the vocabulary; only ~15% of them
have a label. Gathering the masked hidden states first and running the head on those alone made
a small BERT step 2.4x faster on CPU (docs/DESIGN.md). The wrapped model is the ordinary
``BertForMaskedLM``, so what is saved is what ``AutoModelForMaskedLM`` loads.

The forward returns the *summed* loss, never the mean: the training step divides by the number
of masked tokens in the whole global batch (token-exact loss, split invariance).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hetlm.errors import HetlmError

# model_type -> (encoder attribute, head attribute) of the *ForMaskedLM class
_PARTS = {
    "bert": ("bert", "cls"),
    "roberta": ("roberta", "lm_head"),
    "xlm-roberta": ("roberta", "lm_head"),
    "electra": ("electra", None),
}


def _encoder_and_head(model: nn.Module, any_type: bool = False):
    """The encoder and a callable hidden -> vocabulary logits, per model type; for another
    type, None with ``any_type`` (the model's own full forward is used), else an error."""
    model_type = model.config.model_type
    if model_type == "deberta-v2":
        if model.legacy:
            return model.deberta, model.cls
        # the non-legacy head is tied to the input embeddings and takes them as an argument
        return model.deberta, lambda h: model.lm_predictions(
            h, model.deberta.embeddings.word_embeddings
        )
    if model_type == "electra":  # ElectraForMaskedLM (the generator)
        return model.electra, lambda h: model.generator_lm_head(model.generator_predictions(h))
    if model_type not in _PARTS:
        if any_type:
            return None
        raise HetlmError(
            f"masked-LM training does not support model type {model_type!r}: use "
            f"one of {', '.join(sorted([*_PARTS, 'deberta-v2']))}"
        )
    encoder_name, head_name = _PARTS[model_type]
    return getattr(model, encoder_name), getattr(model, head_name)


class SparseMaskedLM(nn.Module):
    """Wraps a ``*ForMaskedLM`` model; forward gives (loss_sum, correct predictions).

    ``any_type``: a model type whose head this module cannot split off (a public checkpoint
    `hetlm eval` scores: DistilBERT, ModernBERT, ...) is scored through the model's own forward,
    every position projected, then the masked slots picked: the same numbers, slower. Training
    leaves it False and refuses such a type when the module is built, not at the first step.
    """

    loss_terms = ("mlm",)
    loss_weights = (1.0,)

    def __init__(self, model: nn.Module, any_type: bool = False) -> None:
        super().__init__()
        _encoder_and_head(model, any_type)
        self.model = model
        self.any_type = any_type

    def forward(
        self, input_ids: torch.Tensor, masked_positions: torch.Tensor, masked_labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return summed_mlm_loss(
            masked_logits(self.model, input_ids, masked_positions, any_type=self.any_type),
            masked_labels,
        )


def masked_logits(
    model: nn.Module,
    input_ids: torch.Tensor,
    masked_positions: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    any_type: bool = False,
) -> torch.Tensor:
    """float32 vocabulary logits of a ``*ForMaskedLM`` at the masked slots only:
    [batch, slots, vocab] (``any_type``: see :class:`SparseMaskedLM`)."""
    parts = _encoder_and_head(model, any_type)
    if parts is None:  # no head of its own to apply: project every position, then pick
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        index = masked_positions.unsqueeze(-1).expand(-1, -1, logits.shape[-1])
        return logits.gather(1, index).float()
    encoder, head = parts
    hidden = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    index = masked_positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    return head(hidden.gather(1, index)).float()  # [b, slots, vocab]


def summed_mlm_loss(
    logits: torch.Tensor, masked_labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy summed over the real slots, correct top-1 predictions); label -100 marks
    a padding slot."""
    flat_logits = logits.view(-1, logits.shape[-1])
    flat_labels = masked_labels.view(-1)
    loss_sum = F.cross_entropy(flat_logits, flat_labels, ignore_index=-100, reduction="sum")
    with torch.no_grad():
        correct = ((flat_logits.argmax(-1) == flat_labels) & (flat_labels != -100)).sum()
    return loss_sum, correct
