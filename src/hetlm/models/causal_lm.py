"""Next-token objective with vocabulary logits only where a label is predicted.

The stock ``*ForCausalLM`` forward projects every position onto the vocabulary and averages the
loss over its own micro-batch. Here the decoder's hidden states at the target positions alone go
through the output head (all positions in pretraining; only the response in instruction tuning,
where this saves most of the head's cost), and the loss is *summed*: the training step divides
by the number of targets of the whole global batch (token-exact loss, split invariance).

The wrapped model is the ordinary ``*ForCausalLM`` (or the PEFT model around one), so what is
saved is what ``AutoModelForCausalLM`` / ``peft`` load.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


def decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(the decoder stack, the output projection) of a ``*ForCausalLM``, through PEFT too."""
    if hasattr(model, "get_base_model"):  # a PeftModel: LoRA layers are injected in place
        model = model.get_base_model()
    decoder = getattr(model, model.base_model_prefix)
    return decoder, model.get_output_embeddings()


def target_index(labels: torch.Tensor) -> torch.Tensor:
    """Flat positions ``b * seq + t`` of the hidden states that predict a label (``labels[b,
    t + 1]`` is not ``IGNORE_INDEX``), in row-major order.

    The collators compute it on the CPU with the batch, so that the model gathers the predicting
    positions with ``index_select``: a boolean-mask index on the GPU would have to wait for the
    GPU (a device-to-host sync) to learn how many there are, every micro-step."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep.reshape(-1).nonzero().squeeze(1)


def predicting(
    hidden: torch.Tensor, labels: torch.Tensor, index: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden states that predict, their target tokens): [targets, hidden] and [targets]."""
    if index is None:
        index = target_index(labels)
    return (
        hidden.reshape(-1, hidden.shape[-1]).index_select(0, index),
        labels.reshape(-1).index_select(0, index + 1),
    )


class SparseCausalLM(nn.Module):
    """Wraps a ``*ForCausalLM``; forward gives (summed loss, correct top-1 predictions).

    ``labels`` are aligned with ``input_ids`` (``labels[t]`` is the token at t); position t's
    hidden state predicts ``labels[t + 1]``; ``IGNORE_INDEX`` marks what is not predicted.
    """

    loss_terms = ("clm",)
    loss_weights = (1.0,)

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        target_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        decoder, head = decoder_and_head(self.model)
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        states, wanted = predicting(hidden, labels, target_index)
        logits = head(states).float()  # [targets, vocab]
        loss_sum = F.cross_entropy(logits, wanted, reduction="sum")
        with torch.no_grad():
            correct = (logits.argmax(-1) == wanted).sum()
        return loss_sum, correct
