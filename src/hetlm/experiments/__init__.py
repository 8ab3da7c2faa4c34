"""Experiments built from hetlm's parts: each one a function that writes its own report.

``domain``: general vs mixed vs continued pretraining, scored on financial text and tasks
(``hetlm demo domain``).
"""
