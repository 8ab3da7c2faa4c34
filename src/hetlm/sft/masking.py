"""Tokenizing examples into ``input_ids`` + ``labels``: loss on the response tokens, exactly.

Each template segment is tokenized on its own (no special tokens added) and the ids are
concatenated, so which tokens belong to the response is known by construction; labels are the
ids on response tokens and -100 (ignored by the loss) on prompt tokens. ``train_on_prompt``
puts the loss on every token instead. Label 0 is always -100: nothing precedes the first token,
so it is never predicted, and ``num_targets`` then equals the tokens the shifted loss sees.

Truncation never shortens the response silently. An example longer than ``max_length`` loses
tokens from its *prompt* side (``left``: the oldest tokens, keeping a leading BOS; ``middle``:
the middle of the prompt, keeping its start, the system text and instruction, and its end, the
response header), and if the final response with its EOS does not fit beside
``min_prompt_tokens`` of prompt, the example is dropped. Both are counted in
:class:`TruncationStats`, whose summary the training command prints.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from hetlm.chat.prompt import adds_bos, encode_segments
from hetlm.chat.templates import ChatTemplate, PromptTemplate
from hetlm.errors import HetlmError
from hetlm.sft.data import Example

IGNORE_INDEX = -100
Truncation = Literal["left", "middle"]
MAX_DROPPED_EXAMPLES = 5


@dataclass(frozen=True)
class TokenizedExample:
    """One example ready for the collator."""

    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on prompt tokens (unless train_on_prompt) and at 0
    index: int  # the example's index in the data set (for per-sample purity)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_targets(self) -> int:
        """Tokens the loss is on (what the token-exact loss divides by)."""
        return sum(label != IGNORE_INDEX for label in self.labels)


@dataclass
class TruncationStats:
    """What tokenizing a data set did to fit ``max_length``: nothing here happens silently."""

    max_length: int = 0
    examples: int = 0
    kept: int = 0
    truncated: int = 0  # kept, with prompt tokens removed
    dropped: int = 0  # the final response (+ EOS) did not fit
    prompt_tokens_removed: int = 0
    earlier_response_tokens_removed: int = 0  # multi-turn: older assistant turns cut away
    target_tokens: int = 0  # response tokens kept (the loss's denominator)
    dropped_examples: list[str] = field(default_factory=list)

    def note_dropped(self, example: Example) -> None:
        self.dropped += 1
        if len(self.dropped_examples) < MAX_DROPPED_EXAMPLES:
            self.dropped_examples.append(example.source or f"example {example.index}")

    def summary(self) -> str:
        """Short lines for the training log: the counts, then which examples were dropped."""
        text = (
            f"SFT examples: {self.examples:,} read, {self.kept:,} kept, "
            f"{self.truncated:,} truncated on the prompt side "
            f"({self.prompt_tokens_removed:,} prompt tokens removed"
            + (
                f", {self.earlier_response_tokens_removed:,} tokens of earlier assistant "
                "turns removed"
                if self.earlier_response_tokens_removed
                else ""
            )
            + f"), {self.dropped:,} dropped because the response did not fit in "
            f"{self.max_length} tokens; {self.target_tokens:,} response tokens to train on"
        )
        if self.dropped_examples:
            text += f"\nSFT examples dropped: {', '.join(self.dropped_examples)}"
            text += ", ..." if self.dropped > len(self.dropped_examples) else ""
        return text


# ---------------------------------------------------------------- one example


def _truncate(
    ids: list[int],
    is_response: list[bool],
    cut_end: int,
    budget: int,
    truncation: Truncation,
    keep_first: bool,
) -> tuple[list[int], list[bool]]:
    """Keep ``budget`` of the tokens before ``cut_end`` (the final response starts there)."""
    head_ids, head_resp = ids[:cut_end], is_response[:cut_end]
    first = 1 if keep_first and budget > 0 else 0  # a leading BOS is always kept
    rest = budget - first
    front = rest // 2 if truncation == "middle" else 0
    keep = list(range(first + front)) + list(range(cut_end - (rest - front), cut_end))
    return (
        [head_ids[i] for i in keep] + ids[cut_end:],
        [head_resp[i] for i in keep] + is_response[cut_end:],
    )


class SFTTokenizer:
    """Examples into :class:`TokenizedExample`, with the truncation policy and its counts."""

    def __init__(
        self,
        tokenizer: Any,
        template: PromptTemplate,
        *,
        max_length: int,
        train_on_prompt: bool = False,
        truncation: Truncation = "left",
        min_prompt_tokens: int = 1,
    ) -> None:
        if max_length < 2:
            raise HetlmError(f"max_length must be at least 2, got {max_length}")
        if truncation not in ("left", "middle"):
            raise HetlmError(f"truncation must be 'left' or 'middle', got {truncation!r}")
        if not 1 <= min_prompt_tokens < max_length:
            raise HetlmError(
                f"min_prompt_tokens must be in [1, max_length), got {min_prompt_tokens}"
            )
        self.tokenizer = tokenizer
        self.template = template
        self.max_length = max_length
        self.train_on_prompt = train_on_prompt
        self.truncation: Truncation = truncation
        self.min_prompt_tokens = min_prompt_tokens
        self.bos = not isinstance(template, ChatTemplate) and adds_bos(tokenizer)
        self.stats = TruncationStats(max_length=max_length)

    def __call__(self, example: Example) -> TokenizedExample | None:
        """The tokenized example, or None if it was dropped (counted in ``self.stats``)."""
        stats = self.stats
        stats.examples += 1
        segments = self.template.segments(example.messages, example.context)
        ids, is_response = encode_segments(segments, self.tokenizer, bos=self.bos)
        # The final response: the trailing run of response tokens.
        start = len(ids)
        while start > 0 and is_response[start - 1]:
            start -= 1
        response_len = len(ids) - start
        if len(ids) > self.max_length:
            budget = self.max_length - response_len
            if budget < min(self.min_prompt_tokens, start) or budget < 1:
                stats.note_dropped(example)
                return None
            before = is_response[:start]
            ids, is_response = _truncate(
                ids, is_response, start, budget, self.truncation, keep_first=self.bos
            )
            kept = is_response[:budget]
            stats.truncated += 1
            removed_resp = sum(before) - sum(kept)
            stats.earlier_response_tokens_removed += removed_resp
            stats.prompt_tokens_removed += (start - budget) - removed_resp
        labels = [
            tok if (resp or self.train_on_prompt) else IGNORE_INDEX
            for tok, resp in zip(ids, is_response, strict=True)
        ]
        labels[0] = IGNORE_INDEX
        out = TokenizedExample(ids, labels, example.index)
        stats.kept += 1
        stats.target_tokens += out.num_targets
        return out

    def map(self, examples: Iterable[Example]) -> list[TokenizedExample]:
        """Tokenize many; dropped ones are left out (and counted)."""
        return [t for t in map(self, examples) if t is not None]


def tokenize_examples(
    examples: Iterable[Example],
    tokenizer: Any,
    template: PromptTemplate,
    *,
    max_length: int,
    train_on_prompt: bool = False,
    truncation: Truncation = "left",
    min_prompt_tokens: int = 1,
) -> tuple[list[TokenizedExample], TruncationStats]:
    """Tokenize a data set; returns the kept examples and what truncation did."""
    sft = SFTTokenizer(
        tokenizer,
        template,
        max_length=max_length,
        train_on_prompt=train_on_prompt,
        truncation=truncation,
        min_prompt_tokens=min_prompt_tokens,
    )
    return sft.map(examples), sft.stats
