"""The one held-out scorer: an objective module summed over micro-batches.

`hetlm pretrain`'s evaluation (``Pretraining.evaluate``, per rank, then all-reduced), `hetlm
eval`'s held-out LM metrics (:mod:`hetlm.evaluate.heldout`) and the learning check's scorer of
the HF Trainer's model all run this loop over the objective module that trains the model
(:func:`hetlm.train.objectives.objective_module`: ``SparseMaskedLM``, ``SparseCausalLM``,
``ElectraObjective``). So a number `hetlm eval` reports for a checkpoint is the number its
pretraining logged on the same rows and masks, not a second implementation that agrees with it
to a tolerance; and the vocabulary head runs on the predicted positions alone (~15% of them for
a masked LM), never on the whole sequence.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch
from torch import nn

from hetlm.data.microbatch import MicroBatch
from hetlm.train.objectives import loss_terms

LOSS, CORRECT, TARGETS = 0, 1, 2  # the rows of score_batches' totals


@torch.no_grad()
def score_batches(
    module: nn.Module,
    batches: Iterable[tuple[MicroBatch, bool]],
    device: torch.device | str,
    autocast: Callable[[], contextlib.AbstractContextManager[object]] = contextlib.nullcontext,
    terms: int | None = None,
) -> torch.Tensor:
    """float64 ``[3, terms]`` totals over ``batches``: per loss term of ``module``, the summed
    loss (``LOSS``), the correct predictions (``CORRECT``) and the targets (``TARGETS``, the
    batches' ``counts``).

    Each item is ``(micro-batch, counted)``: an uncounted batch is run and not added (a rank
    whose evaluation samples ran out still joins the collectives of a sharded engine's forward).
    ``autocast`` gives the context each forward runs in (the training precision's). ``terms``
    defaults to ``module``'s ``loss_terms`` (pass it when ``module`` is a wrapper that hides
    them, e.g. an engine's).
    """
    width = len(loss_terms(module)) if terms is None else terms
    totals = torch.zeros(3, width, dtype=torch.float64)
    for batch, counted in batches:
        inputs = {k: v.to(device) for k, v in batch.model_inputs().items()}
        with autocast():
            loss_sum, correct = module(**inputs)
        if counted:
            totals[LOSS] += torch.atleast_1d(loss_sum).double().cpu()
            totals[CORRECT] += torch.atleast_1d(correct).double().cpu()
            totals[TARGETS] += torch.tensor(batch.counts, dtype=torch.float64)
    return totals
