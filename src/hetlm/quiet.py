"""Third-party messages that every command would print and that tell a hetlm user nothing.

- DeepSpeed's "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable
  to detect it." appears whenever DeepSpeed is installed and any ``save_pretrained`` runs
  (``accelerate``'s ``extract_model_from_parallel`` imports ``deepspeed`` to recognise its
  engine), on a CPU machine even when no command uses DeepSpeed. It is a logging record of the
  ``DeepSpeed`` logger; a filter on that logger (which DeepSpeed's own set-up keeps: it sets the
  level and adds a handler, never clears filters) drops exactly this record.

- transformers' "Loading weights" progress bar, drawn each time a saved model is loaded (the
  demo's last step, chat, serve, eval, export): ``no_loading_bars()``, called by those commands
  (it imports transformers, so it is not part of ``install``). Download bars are
  huggingface_hub's and stay.

``install()`` is called once by the CLI before any command runs; it imports nothing heavy.
"""

from __future__ import annotations

import logging

# (logger name, text of the record) pairs to drop
DROPPED = (("DeepSpeed", "Setting accelerator to CPU"),)


class _DropRecords(logging.Filter):
    def __init__(self, texts: tuple[str, ...]) -> None:
        super().__init__()
        self.texts = texts

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in self.texts)


def install() -> None:
    """Attach the filters (idempotent)."""
    by_logger: dict[str, list[str]] = {}
    for name, text in DROPPED:
        by_logger.setdefault(name, []).append(text)
    for name, texts in by_logger.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropRecords) for f in logger.filters):
            logger.addFilter(_DropRecords(tuple(texts)))


def no_loading_bars() -> None:
    """Turn off transformers' own progress bars (weight loading) for this process."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
