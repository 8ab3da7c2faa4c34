"""The micro-batch interface of the training loop, and the units of its fields.

Every reader of a training objective hands the loop (``hetlm.train.pretrain``) micro-batches
with this interface: ``MLMBatch`` (:mod:`hetlm.data.collators`), ``ElectraBatch`` and
``CLMBatch`` (:mod:`hetlm.data.readers`), ``SFTBatch`` (:mod:`hetlm.sft.collator`). The loop
knows nothing else of them: what a model reads is ``model_inputs()``, what the token-exact loss
divides by is ``counts``, and the step record's throughput is ``len()`` (samples/s) and
``num_tokens`` (tokens/s).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class MicroBatch(Protocol):
    """One rank's micro-batch, as ``train_step`` and the step record read it."""

    @property
    def counts(self) -> tuple[int, ...]:
        """Per loss term of the objective, the targets this micro-batch holds (masked tokens,
        predicted next tokens, response tokens, real tokens the ELECTRA discriminator judges):
        the loss is summed over them and divided by their sum over the global batch."""
        ...

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) input tokens: the tokens of ``tokens_per_s`` in the metrics. A
        packed dataset (``hetlm prepare``) has no padding, so there it is batch x seq_len."""
        ...

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """The keyword arguments of the objective module's forward."""
        ...

    def __len__(self) -> int:
        """Sequences (samples) in the micro-batch: the samples of ``samples_per_s``."""
        ...
