"""The defaults of the two ways ``hetlm eval`` scores a checkpoint on a task, in one place for
the command line, :class:`hetlm.evaluate.finetune.FinetuneOptions` and the domain experiment.

Fine-tuning trains the whole model, so it takes a small rate and few passes (BERT's paper:
2e-5 to 5e-5, 2-4 epochs). A linear probe trains one layer on fixed, standardised features:
a rate 40x higher and enough passes to bring that logistic regression near its optimum (the
probe of three small models, two tasks and 3 seeds takes under a minute on 2 CPU cores)."""

from __future__ import annotations

FINETUNE_LR = 5e-5
FINETUNE_EPOCHS = 3
PROBE_LR = 2e-3
PROBE_EPOCHS = 30
