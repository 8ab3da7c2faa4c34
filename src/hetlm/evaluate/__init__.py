"""Evaluation: held-out language-model metrics and financial classification tasks.

Everything here is deterministic by construction, so two checkpoints evaluated on different days
(or by different people) land in one comparable table:

- :mod:`hetlm.evaluate.tasks`: the shipped chABSA and Economy Watchers data, split by a fixed
  hash (never by the fine-tuning seed) into train/dev/test;
- :mod:`hetlm.evaluate.heldout`: masked-LM loss/accuracy (fixed masks) or causal-LM perplexity
  of a checkpoint on a held-out corpus;
- :mod:`hetlm.evaluate.finetune`: a small plain-PyTorch fine-tuning loop for sequence
  classification, run over several seeds;
- :mod:`hetlm.evaluate.linear_probe`: the same tasks as a linear classifier on frozen features
  (``--linear-probe``); :mod:`hetlm.evaluate.recipes`: the defaults of both;
- :mod:`hetlm.evaluate.suite`: the whole ``hetlm eval`` run; :mod:`hetlm.evaluate.report`
  writes its table as text, Markdown and JSON.

See docs/EVAL.md.
"""
