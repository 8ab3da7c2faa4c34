"""Training a tokenizer and saving it as a plain ``transformers`` tokenizer.

Three kinds (``tokenizer_type``):

- ``sentencepiece`` (default): Japanese has no spaces, so SentencePiece (unigram or BPE) is
  trained straight on raw sentences: no morphological analyser is needed at training or
  inference time, and the result is a fast tokenizer;
- ``mecab`` / ``sudachi``: words from a morphological analyser, then WordPiece, saved as
  transformers' ``BertJapaneseTokenizer`` (see :mod:`hetlm.data.prepare.wordpiece`). Its ``##`` pieces
  allow whole-word masking.

For SentencePiece the special
pieces are BERT's (``[PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4``) and are created *by
SentencePiece*, so the HF tokenizer adds no extra tokens and ids match the ``.model`` file.

A trained folder holds:

- ``sentencepiece.model``: the SentencePiece model itself (for tools that want it);
- ``tokenizer.json`` + ``tokenizer_config.json``: what ``AutoTokenizer.from_pretrained`` loads,
  as a fast tokenizer with a BERT post-processor (``[CLS] A [SEP]``, ``[CLS] A [SEP] B [SEP]``,
  token_type_ids 0/1) that returns ``token_type_ids``;
- ``hetlm_tokenizer.json``: how it was made (inputs, options, versions, date).

A MeCab/Sudachi folder holds ``vocab.txt`` + ``tokenizer_config.json`` (with ``mecab_kwargs`` /
``sudachi_kwargs``) and the same ``hetlm_tokenizer.json``.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from hetlm.data.prepare.cleaning import CleaningOptions, CleaningStats, DocumentCleaner
from hetlm.data.prepare.corpus import (
    CorpusStats,
    as_input_list,
    check_text_files,
    iter_corpus,
    require_documents,
    resolve_inputs,
)
from hetlm.data.prepare.sources import HFSource
from hetlm.data.tokenizer import (
    CLS,
    MASK,
    MIN_VOCAB_SIZE,
    PAD,
    SEP,
    SPECIAL_NAMES,
    SPECIAL_TOKENS,
    UNK,
    save_fast_tokenizer,
)
from hetlm.errors import HetlmError

TOKENIZER_TYPES = ("sentencepiece", "mecab", "sudachi")
MODEL_INPUT_NAMES = ["input_ids", "token_type_ids", "attention_mask"]
RECORD_FILE = "hetlm_tokenizer.json"
SPM_FILE = "sentencepiece.model"
# SentencePiece skips training sentences over max_sentence_length (4192 bytes); pieces of at most
# 1000 characters (<= 4000 bytes of UTF-8) are never skipped.
_SPM_SENTENCE_CHARS = 1000


# ---------------------------------------------------------------- training


class _SentenceFeed:
    """The corpus as SentencePiece training sentences (non-empty lines, cut to a safe length).

    SentencePiece runs the iterator inside C++; an exception raised there would be reported as an
    opaque training failure, so a corpus error is kept here and re-raised afterwards.
    """

    def __init__(self, documents: Iterator[str]):
        self.documents = documents
        self.error: BaseException | None = None

    def __iter__(self) -> Iterator[str]:
        try:
            for document in self.documents:
                for line in document.split("\n"):
                    line = line.strip()
                    for i in range(0, len(line), _SPM_SENTENCE_CHARS):
                        yield line[i : i + _SPM_SENTENCE_CHARS]
        except Exception as exc:  # re-raised by train_tokenizer
            self.error = exc


def _check_options(
    vocab_size: int,
    model_type: str,
    character_coverage: float,
    input_sentence_size: int,
    model_max_length: int,
) -> None:
    if model_type not in ("unigram", "bpe"):
        raise HetlmError(f"model_type must be 'unigram' or 'bpe', got {model_type!r}")
    if vocab_size < MIN_VOCAB_SIZE:
        raise HetlmError(
            f"vocab_size {vocab_size} is too small: use at least {MIN_VOCAB_SIZE} "
            "(8000-32000 is usual for Japanese)"
        )
    if not 0.98 <= character_coverage <= 1.0:
        raise HetlmError(
            f"character_coverage {character_coverage} is out of range: SentencePiece "
            "accepts 0.98..1.0 (0.9995 is usual for Japanese)"
        )
    if input_sentence_size < 1:
        raise HetlmError(f"input_sentence_size must be positive, got {input_sentence_size}")
    if model_max_length < 8:
        raise HetlmError(f"model_max_length must be at least 8, got {model_max_length}")


def _spm_trainer_options(
    vocab_size: int,
    model_type: str,
    character_coverage: float,
    byte_fallback: bool,
    input_sentence_size: int,
    normalize: bool,
) -> dict[str, Any]:
    """SentencePieceTrainer options: BERT special pieces at ids 0..4, bounded sampling."""
    return dict(
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        byte_fallback=byte_fallback,
        # Reservoir sampling of input_sentence_size sentences keeps memory bounded.
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        normalization_rule_name="nmt_nfkc" if normalize else "identity",
        pad_id=0,
        pad_piece=PAD,
        unk_id=1,
        unk_piece=UNK,
        bos_id=-1,
        eos_id=-1,
        control_symbols=[CLS, SEP, MASK],  # ids 2, 3, 4: the next free ids after pad and unk
        num_threads=_cpu_count(),
        minloglevel=1,  # warnings and errors only: the INFO log is thousands of lines
    )


def _cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _train_spm(feed: _SentenceFeed, options: dict[str, Any], seed: int) -> bytes:
    """Train SentencePiece in memory and return the serialised model."""
    import sentencepiece as spm

    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(feed), model_writer=model, **options)
    except RuntimeError as exc:
        if feed.error is not None:
            raise feed.error from exc
        message = " ".join(str(exc).split())
        raise HetlmError(
            f"SentencePiece training failed: {message} (for a small corpus lower "
            "--vocab-size; with many rare characters lower --character-coverage "
            "or use --byte-fallback)"
        ) from exc
    if feed.error is not None:
        raise feed.error
    return model.getvalue()


def train_tokenizer(
    inputs: Sequence[str | Path],
    output_dir: str | Path,
    *,
    vocab_size: int = 8000,
    model_type: str = "unigram",
    character_coverage: float = 0.9995,
    byte_fallback: bool = False,
    input_sentence_size: int = 1_000_000,
    text_field: str = "text",
    normalize: bool = True,
    seed: int = 0,
    model_max_length: int = 512,
    stats: CorpusStats | None = None,
    tokenizer_type: str = "sentencepiece",
    mecab_dic: str = "unidic-lite",
    sudachi_mode: str = "A",
    sudachi_dict: str = "core",
    cleaning: CleaningOptions | None = None,
    cleaning_stats: CleaningStats | None = None,
    hf: HFSource | None = None,
    workers: int | None = None,
    strict: bool = False,
) -> Path:
    """Train a tokenizer on the corpus and save it as an AutoTokenizer folder.

    ``tokenizer_type`` is ``sentencepiece`` (``model_type`` unigram or bpe), ``mecab``
    (``mecab_dic``: unidic-lite, ipadic or unidic) or ``sudachi`` (``sudachi_mode`` A/B/C).
    ``normalize`` applies NFKC both when reading the corpus and inside the tokenizer (the
    SentencePiece ``nmt_nfkc`` rule, which the fast tokenizer reproduces; the analysers'
    ``normalize_text``), so text at inference is normalised the same way as at training.
    ``input_sentence_size`` lines are sampled for training whatever the corpus size. The corpus
    is cleaned as ``hetlm prepare`` cleans it (``cleaning``; ``CleaningOptions.off()`` for none).
    Pass ``stats`` / ``cleaning_stats`` to get the summaries. Returns the output folder.
    """
    if tokenizer_type not in TOKENIZER_TYPES:
        raise HetlmError(
            f"tokenizer type must be one of {', '.join(TOKENIZER_TYPES)}, got {tokenizer_type!r}"
        )
    _check_options(
        vocab_size, model_type, character_coverage, input_sentence_size, model_max_length
    )
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise HetlmError(f"tokenizer output {output_dir} is a file: choose a folder path")
    stats = stats if stats is not None else CorpusStats()
    cleaner = DocumentCleaner(cleaning, cleaning_stats)
    files = resolve_inputs(inputs) if inputs or hf is None else []
    check_text_files(files)  # input errors before the (slow) training starts
    documents = cleaner.filter(
        iter_corpus(
            files, hf, text_field=text_field, normalize=normalize, stats=stats, strict=strict
        )
    )
    label = [*as_input_list(inputs), *([hf.label()] if hf else [])]
    if tokenizer_type == "sentencepiece":
        tokenizer, options = _train_sentencepiece(
            documents,
            output_dir,
            stats,
            cleaner,
            label,
            text_field,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            byte_fallback=byte_fallback,
            input_sentence_size=input_sentence_size,
            normalize=normalize,
            seed=seed,
            model_max_length=model_max_length,
        )
    else:
        from hetlm.data.prepare.wordpiece import train_wordpiece
        from hetlm.data.segmenters import SegmenterSpec

        spec = SegmenterSpec(tokenizer_type, mecab_dic, sudachi_mode, sudachi_dict, normalize)
        tokenizer, options = train_wordpiece(
            documents,
            output_dir,
            spec=spec,
            vocab_size=vocab_size,
            input_sentence_size=input_sentence_size,
            character_coverage=character_coverage,
            seed=seed,
            workers=workers or _cpu_count(),
            model_max_length=model_max_length,
            special_tokens=SPECIAL_TOKENS,
            model_input_names=MODEL_INPUT_NAMES,
        )
        _require_cleaned_documents(stats, cleaner, label, text_field)
    record = _training_record(
        label,
        files,
        options,
        seed,
        text_field,
        normalize,
        model_max_length,
        len(tokenizer),
        stats,
        tokenizer_type,
        cleaner,
        hf,
    )
    (output_dir / RECORD_FILE).write_text(
        json.dumps(record, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
    )
    return output_dir


def _require_cleaned_documents(
    stats: CorpusStats, cleaner: DocumentCleaner, label: Sequence[str | Path], text_field: str
) -> None:
    """:func:`require_documents`, plus the case where cleaning removed every document."""
    require_documents(stats, label, text_field)
    if cleaner.stats.kept == 0:
        raise HetlmError(
            f"cleaning removed every document of {', '.join(map(str, label))} "
            f"({cleaner.stats.summary(cleaner.options)}); lower --min-doc-chars "
            "or switch cleaning steps off"
        )


def _train_sentencepiece(
    documents: Iterator[str],
    output_dir: Path,
    stats: CorpusStats,
    cleaner: DocumentCleaner,
    label: Sequence[str | Path],
    text_field: str,
    *,
    vocab_size: int,
    model_type: str,
    character_coverage: float,
    byte_fallback: bool,
    input_sentence_size: int,
    normalize: bool,
    seed: int,
    model_max_length: int,
) -> tuple[Any, dict[str, Any]]:
    feed = _SentenceFeed(documents)
    options = _spm_trainer_options(
        vocab_size, model_type, character_coverage, byte_fallback, input_sentence_size, normalize
    )
    try:
        model_bytes = _train_spm(feed, options, seed)
    except HetlmError:
        # the clearer error when the corpus is empty
        _require_cleaned_documents(stats, cleaner, label, text_field)
        raise
    _require_cleaned_documents(stats, cleaner, label, text_field)

    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / SPM_FILE).write_bytes(model_bytes)
    tokenizer = build_fast_tokenizer(model_bytes, model_max_length)
    save_fast_tokenizer(tokenizer, output_dir)
    return tokenizer, {
        "sentencepiece_options": {k: v for k, v in options.items() if k != "num_threads"}
    }


def _training_record(
    inputs: Sequence[str | Path],
    files: list[Path],
    options: dict[str, Any],
    seed: int,
    text_field: str,
    normalize: bool,
    model_max_length: int,
    vocab_size: int,
    stats: CorpusStats,
    tokenizer_type: str,
    cleaner: DocumentCleaner,
    hf: HFSource | None,
) -> dict[str, Any]:
    import sentencepiece
    import tokenizers
    import transformers

    from hetlm import __version__

    return {
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "type": tokenizer_type,
        "inputs": [str(i) for i in inputs],
        "files": [str(f.resolve()) for f in files],
        "hf_dataset": hf.as_dict() if hf else None,
        "text_field": text_field,
        "normalize": normalize,
        "seed": seed,
        "model_max_length": model_max_length,
        **options,
        "vocab_size": vocab_size,
        "special_tokens": dict(zip(SPECIAL_NAMES, SPECIAL_TOKENS, strict=True)),
        "corpus": {**stats.as_dict(), "summary": stats.summary()},
        "cleaning": {
            "options": cleaner.options.as_dict(),
            **cleaner.stats.as_dict(),
            "summary": cleaner.stats.summary(cleaner.options),
        },
        "versions": {
            "hetlm": __version__,
            "sentencepiece": sentencepiece.__version__,
            "tokenizers": tokenizers.__version__,
            "transformers": transformers.__version__,
        },
    }


# ---------------------------------------------------------------- SentencePiece -> fast tokenizer


def build_fast_tokenizer(model_bytes: bytes, model_max_length: int = 512):
    """A ``PreTrainedTokenizerFast`` that encodes like the SentencePiece model, BERT-style.

    :mod:`hetlm.data.prepare.spm_backend` builds the backend (normaliser with the model's precompiled NFKC
    map, whitespace handling, unigram/BPE model, decoder) from ``tokenizers`` primitives, the same
    in every transformers 5.x; we add the BERT post-processor and declare the special tokens,
    which already exist as pieces 0..4.
    """
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    from hetlm.data.prepare.spm_backend import parse_model_proto, spm_backend

    proto = parse_model_proto(model_bytes)
    pieces = [p.piece for p in proto.pieces[: len(SPECIAL_TOKENS)]]
    if pieces != list(SPECIAL_TOKENS):
        raise HetlmError(
            "the SentencePiece model does not start with [PAD] [UNK] [CLS] [SEP] "
            "[MASK]: train it with `hetlm tokenizer train`"
        )
    backend = spm_backend(proto)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{CLS}:0 $A:0 {SEP}:0",
        pair=f"{CLS}:0 $A:0 {SEP}:0 $B:1 {SEP}:1",
        special_tokens=[(CLS, 2), (SEP, 3)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        unk_token=UNK,
        cls_token=CLS,
        sep_token=SEP,
        mask_token=MASK,
        model_max_length=model_max_length,
        model_input_names=MODEL_INPUT_NAMES,
    )
