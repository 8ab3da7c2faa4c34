"""Word segmentation + WordPiece: a Japanese BERT tokenizer trained with ``tokenizers``.

The tokenizer is transformers' ``BertJapaneseTokenizer`` (as in the Tohoku BERT models): MeCab or
Sudachi cuts text into words, WordPiece cuts rare words into ``##`` pieces. Training:

1. stream the corpus (cleaned like ``hetlm prepare`` does) and keep a seeded reservoir sample of
   at most ``input_sentence_size`` lines, so memory is bounded whatever the corpus size;
2. segment the sample with the very analyser the saved tokenizer will use (in worker
   processes; see :mod:`hetlm.data.segmenters`);
3. train the vocabulary with ``tokenizers``' ``WordPieceTrainer`` on the space-joined words,
   its alphabet limited to the most frequent characters that cover ``character_coverage`` of the
   sample (rarer characters become ``[UNK]``, like SentencePiece's ``character_coverage``);
4. save ``vocab.txt`` + ``tokenizer_config.json`` through ``BertJapaneseTokenizer.save_pretrained``
   so that plain ``AutoTokenizer.from_pretrained(folder)`` loads it (a slow, Python tokenizer:
   no ``tokenizer.json`` exists for this class).

Special tokens are ``[PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4`` as for SentencePiece, and the
tokenizer returns ``token_type_ids``.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from hetlm.data.segmenters import SegmenterSpec, build_segmenter, require_analyser, segment
from hetlm.errors import HetlmError

CONTINUATION_PREFIX = "##"
MAX_INPUT_CHARS_PER_WORD = 100  # BertJapaneseTokenizer's WordpieceTokenizer default
_SENTENCE_CHARS = 1000
_SEGMENT_BATCH = 256


def sample_sentences(documents: Iterable[str], size: int, seed: int) -> tuple[list[str], int]:
    """A uniform random sample of at most ``size`` non-empty lines (reservoir sampling).

    Returns (sample in corpus order, number of lines seen). Memory is ``size`` lines however long
    the corpus is; the sample depends only on (corpus, size, seed).
    """
    rng = random.Random(seed)
    reservoir: list[tuple[int, str]] = []
    seen = 0
    for document in documents:
        for line in document.split("\n"):
            line = line.strip()
            for start in range(0, len(line), _SENTENCE_CHARS):
                piece = line[start : start + _SENTENCE_CHARS]
                if len(reservoir) < size:
                    reservoir.append((seen, piece))
                else:
                    slot = rng.randrange(seen + 1)
                    if slot < size:
                        reservoir[slot] = (seen, piece)
                seen += 1
    reservoir.sort()
    return [piece for _, piece in reservoir], seen


# ---------------------------------------------------------------- segmentation in workers

_SEGMENTER: tuple[SegmenterSpec, Any] | None = None


def _segment_batch(spec: SegmenterSpec, lines: list[str]) -> list[str]:
    """Segment in a worker, building the analyser on first use.

    Built inside the task, not in a ``Pool`` initializer: an initializer that fails (a missing
    dictionary) makes ``Pool`` restart workers forever instead of raising.
    """
    global _SEGMENTER
    if _SEGMENTER is None or _SEGMENTER[0] != spec:
        _SEGMENTER = (spec, build_segmenter(spec))
    segmenter = _SEGMENTER[1]
    return [" ".join(segment(segmenter, line)) for line in lines]


def segmented_lines(lines: Sequence[str], spec: SegmenterSpec, workers: int) -> Iterator[str]:
    """Each line as its words joined by spaces, in order, segmented by ``workers`` processes."""
    batches = [list(lines[i : i + _SEGMENT_BATCH]) for i in range(0, len(lines), _SEGMENT_BATCH)]
    if workers <= 1 or len(batches) <= 1:
        for batch in batches:
            yield from _segment_batch(spec, batch)
        return
    import functools
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    with context.Pool(workers) as pool:
        for result in pool.imap(functools.partial(_segment_batch, spec), batches):
            yield from result


# ---------------------------------------------------------------- vocabulary


def alphabet_size(
    lines: Iterable[str], coverage: float, vocab_size: int, specials: int
) -> tuple[int, float]:
    """How many of the most frequent characters cover ``coverage`` of the sample.

    Every character of the alphabet also gets a ``##`` form, so an alphabet of n characters
    takes about 2n entries. It is capped at a quarter of the vocabulary, so that at least half
    is left for words and longer pieces (at 8,000 that is 2,000 characters, about 99% of the
    characters of the shipped Aozora corpus). Returns (the count, the coverage reached).
    """
    counts: Counter[str] = Counter()
    batch: list[str] = []
    for line in lines:
        batch.append(line)
        if len(batch) >= 4096:
            counts.update("".join(batch))  # one C loop over a long string: fast
            batch = []
    counts.update("".join(batch))
    counts.pop(" ", None)
    total = sum(counts.values())
    if not total:
        return 0, 1.0
    cap = max(1, (vocab_size - specials) // 4)
    covered = 0
    chosen = 0
    for _, count in counts.most_common():
        if covered / total >= coverage or chosen >= cap:
            break
        covered += count
        chosen += 1
    return chosen, covered / total


def train_wordpiece_vocab(
    lines: Iterable[str],
    *,
    vocab_size: int,
    limit_alphabet: int,
    special_tokens: Sequence[str],
    min_frequency: int = 0,
) -> list[str]:
    """The WordPiece vocabulary (tokens in id order, specials first) of space-joined words."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(
        models.WordPiece(
            unk_token=special_tokens[1],
            continuing_subword_prefix=CONTINUATION_PREFIX,
            max_input_chars_per_word=MAX_INPUT_CHARS_PER_WORD,
        )
    )
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        show_progress=False,
        special_tokens=list(special_tokens),
        limit_alphabet=max(1, limit_alphabet),
        continuing_subword_prefix=CONTINUATION_PREFIX,
    )
    tokenizer.train_from_iterator(lines, trainer=trainer)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    tokens = [token for token, _ in vocab]
    if tokens[: len(special_tokens)] != list(special_tokens):
        raise HetlmError(
            "WordPiece training did not put the special tokens first; this is a "
            "bug in hetlm, please report it"
        )
    return tokens


def save_bert_japanese(
    tokens: Sequence[str],
    spec: SegmenterSpec,
    output_dir: Path,
    model_max_length: int,
    model_input_names: list[str],
) -> Any:
    """Write ``vocab.txt`` and save a ``BertJapaneseTokenizer`` over it; return the tokenizer."""
    from transformers import BertJapaneseTokenizer

    output_dir.mkdir(parents=True, exist_ok=True)
    vocab_file = output_dir / "vocab.txt"
    vocab_file.write_text("".join(f"{token}\n" for token in tokens), encoding="utf-8")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        tokenizer = BertJapaneseTokenizer(
            str(vocab_file),
            do_lower_case=False,
            subword_tokenizer_type="wordpiece",
            model_max_length=model_max_length,
            model_input_names=model_input_names,
            **spec.tokenizer_kwargs(),
        )
        tokenizer.save_pretrained(str(output_dir))
    return tokenizer


def train_wordpiece(
    documents: Iterable[str],
    output_dir: Path,
    *,
    spec: SegmenterSpec,
    vocab_size: int,
    input_sentence_size: int,
    character_coverage: float,
    seed: int,
    workers: int,
    model_max_length: int,
    special_tokens: Sequence[str],
    model_input_names: list[str],
) -> tuple[Any, dict[str, Any]]:
    """Sample, segment, train and save; return (tokenizer, what to record about training)."""
    versions = require_analyser(spec)  # before reading a large corpus
    sample, seen = sample_sentences(documents, input_sentence_size, seed)
    if not sample:
        return None, {}
    letters, reached = alphabet_size(sample, character_coverage, vocab_size, len(special_tokens))
    segmented = segmented_lines(sample, spec, workers)
    tokens = train_wordpiece_vocab(
        segmented, vocab_size=vocab_size, limit_alphabet=letters, special_tokens=special_tokens
    )
    tokenizer = save_bert_japanese(tokens, spec, output_dir, model_max_length, model_input_names)
    record = {
        "segmenter": {
            "word_tokenizer": spec.word_tokenizer,
            "description": spec.describe(),
            **(
                {"mecab_dic": spec.mecab_dic}
                if spec.word_tokenizer == "mecab"
                else {"sudachi_mode": spec.sudachi_mode, "sudachi_dict": spec.sudachi_dict}
            ),
            "versions": versions,
        },
        "wordpiece_options": {
            "vocab_size": vocab_size,
            "continuing_subword_prefix": CONTINUATION_PREFIX,
            "character_coverage": character_coverage,
            "alphabet": letters,
            "coverage_reached": round(reached, 6),
            "input_sentence_size": input_sentence_size,
            "sentences_seen": seen,
            "sentences_sampled": len(sample),
            "max_input_chars_per_word": MAX_INPUT_CHARS_PER_WORD,
        },
        "tokenizer_kwargs": json.loads(json.dumps(spec.tokenizer_kwargs())),
    }
    return tokenizer, record
