"""What a kind of training supplies to the trainer: data, model, objective, fingerprint, output.

``hetlm.train.trainer.Trainer`` runs the loop, evaluation, checkpoints, rollback, rebalancing
and metrics for any recipe; it knows nothing of masking, LoRA or adapters. A recipe
(``hetlm.train.pretrain.PretrainingRecipe`` for masked LM / ELECTRA / causal LM,
``hetlm.sft.train.InstructionTuningRecipe`` for LoRA instruction tuning) answers these calls, in
this order at start-up: ``load_data``, ``sampler``, ``build_model`` (then ``load_weights`` on a
resume), ``objective``, ``fingerprint``; and at the end ``save_final`` and ``summary``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from torch import nn

from hetlm.data.sampler import HeterogeneousBatchSampler
from hetlm.topology import BatchSplit

if TYPE_CHECKING:
    from hetlm.data.microbatch import MicroBatch
    from hetlm.train.trainer import Trainer


class Dataset(Protocol):
    """Training or held-out samples: ``batch(indices, epoch)`` is one micro-batch."""

    def __len__(self) -> int: ...

    def batch(self, indices: Any, epoch: int) -> MicroBatch: ...


@dataclass
class RunData:
    """A recipe's data: the training and held-out samples, and what the run records of them
    (``meta``: vocabulary hash, counts, the tokenizer's folder ...)."""

    train: Dataset
    validation: Dataset
    meta: dict[str, Any]


class Recipe(Protocol):
    #: the run's name on the progress bar and in messages ("pretrain", "sft")
    command: str
    #: held-out perplexity is reported (causal language models)
    perplexity: bool

    def load_data(self, run: Trainer) -> RunData: ...

    def sampler(
        self, data: RunData, split: BatchSplit, rank: int, seed: int
    ) -> HeterogeneousBatchSampler: ...

    def build_model(self, run: Trainer, data: RunData) -> nn.Module:
        """The model before the engine wraps it (the same weights on every rank)."""
        ...

    def load_weights(self, model: nn.Module, path: Path) -> None:
        """A checkpoint's weights into the freshly built model (resume, rollback)."""
        ...

    def objective(self, model: nn.Module) -> nn.Module:
        """The module whose forward returns (summed losses per term, correct counts)."""
        ...

    def fingerprint(self, data: RunData) -> dict[str, Any]:
        """What a resume must not change (compared with the checkpoint's)."""
        ...

    def has_validation(self, data: RunData) -> bool: ...

    def save_final(self, run: Trainer) -> Path:
        """The run's artifact (a ``save_pretrained`` model, an adapter); a collective."""
        ...

    def summary(self, run: Trainer, summary: dict[str, Any]) -> dict[str, Any]:
        """The end-of-run summary with the recipe's own fields added."""
        ...
