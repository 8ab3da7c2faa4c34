"""Template segments into token ids, the same way for training and for generation.

Each segment is tokenized on its own (no special tokens added) and the ids concatenated, so
which tokens belong to the response is known by construction (:mod:`hetlm.sft.masking` puts the
loss on them), and :func:`prompt_ids` gives a served model exactly the prompt tokens it was
trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hetlm.chat.messages import Message
from hetlm.chat.templates import ChatTemplate, PromptTemplate, Segment
from hetlm.errors import HetlmError


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts BOS first by itself (LLaMA-style), so text templates should."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def encode_segments(
    segments: Sequence[Segment], tokenizer: Any, *, bos: bool
) -> tuple[list[int], list[bool]]:
    """(ids, is_response) for the segments, each tokenized on its own."""
    ids: list[int] = [tokenizer.bos_token_id] if bos else []
    is_response = [False] * len(ids)
    eos = tokenizer.eos_token_id
    for segment in segments:
        # verbose=False: a long segment is not an error here (truncation comes later).
        piece = (
            tokenizer(segment.text, add_special_tokens=False, verbose=False)["input_ids"]
            if segment.text
            else []
        )
        if segment.eos:
            if eos is None:
                raise HetlmError(
                    "the tokenizer has no eos_token: set one (e.g. "
                    "tokenizer.eos_token = '</s>') so responses can end"
                )
            piece = [*piece, eos]
        ids.extend(piece)
        is_response.extend([segment.response] * len(piece))
    return ids, is_response


def prompt_ids(
    messages: Sequence[Message], tokenizer: Any, template: PromptTemplate, *, context: str = ""
) -> list[int]:
    """The ids a model continues to answer the last user turn: exactly as in training."""
    segments = template.segments(messages, context, generation=True)
    ids, _ = encode_segments(
        segments, tokenizer, bos=not isinstance(template, ChatTemplate) and adds_bos(tokenizer)
    )
    return ids
