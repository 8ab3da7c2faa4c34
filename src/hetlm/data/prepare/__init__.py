"""Offline preparation: raw corpus -> cleaned documents -> tokenizer -> packed dataset on disk.

``hetlm tokenizer`` and ``hetlm prepare`` run this; training never does. What training reads of
its output lives one level up: :mod:`hetlm.data.packed` (the dataset's files and loader),
:mod:`hetlm.data.tokenizer` (loading a tokenizer).
"""
