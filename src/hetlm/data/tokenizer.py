"""Training a tokenizer and saving it as a plain ``transformers`` tokenizer.

Three kinds (``tokenizer_type``):

- ``sentencepiece`` (default): Japanese has no spaces, so SentencePiece (unigram or BPE) is
  trained straight on raw sentences: no morphological analyser is needed at training or
  inference time, and the result is a fast tokenizer;
- ``mecab`` / ``sudachi``: words from a morphological analyser, then WordPiece, saved as
  transformers' ``BertJapaneseTokenizer`` (see :mod:`hetlm.data.wordpiece`). Its ``##`` pieces
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
import hashlib
import io
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from hetlm.data.cleaning import CleaningOptions, CleaningStats, DocumentCleaner
from hetlm.data.corpus import (
    CorpusStats,
    as_input_list,
    check_text_files,
    require_documents,
    resolve_inputs,
)
from hetlm.data.sources import HFSource, iter_corpus
from hetlm.errors import HetlmError

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)  # their ids are 0..4, in this order
SPECIAL_NAMES = ("pad", "unk", "cls", "sep", "mask")
SPM_FILE = "sentencepiece.model"
RECORD_FILE = "hetlm_tokenizer.json"
MODEL_INPUT_NAMES = ["input_ids", "token_type_ids", "attention_mask"]
# Files that make a folder a tokenizer for AutoTokenizer (fast or slow formats).
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "spiece.model",
    "tokenizer.model",
    "sentencepiece.bpe.model",
    "vocab.json",
)
MIN_VOCAB_SIZE = 16
TOKENIZER_TYPES = ("sentencepiece", "mecab", "sudachi")
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
        from hetlm.data.segmenters import SegmenterSpec
        from hetlm.data.wordpiece import train_wordpiece

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

    :mod:`hetlm.data.spm_backend` builds the backend (normaliser with the model's precompiled NFKC
    map, whitespace handling, unigram/BPE model, decoder) from ``tokenizers`` primitives, the same
    in every transformers 5.x; we add the BERT post-processor and declare the special tokens,
    which already exist as pieces 0..4.
    """
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    from hetlm.data.spm_backend import parse_model_proto, spm_backend

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


def save_tokenizer(tokenizer: Any, output_dir: Path) -> None:
    """Save any hetlm tokenizer (fast or ``BertJapaneseTokenizer``) so AutoTokenizer loads it."""
    save_fast_tokenizer(tokenizer, output_dir)


def save_fast_tokenizer(tokenizer: Any, output_dir: Path) -> None:
    """``save_pretrained``, then name the class ``PreTrainedTokenizerFast`` in the config.

    transformers 5 writes ``"tokenizer_class": "TokenizersBackend"``, a name transformers 4 does
    not know; ``PreTrainedTokenizerFast`` loads the same ``tokenizer.json`` in both. A slow
    tokenizer (``BertJapaneseTokenizer``) is saved as it is: its class name is already right.
    """
    output_dir = Path(output_dir)
    tokenizer.save_pretrained(str(output_dir))
    if not getattr(tokenizer, "is_fast", False):
        return
    config_path = output_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(
        json.dumps(config, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
    )


# ---------------------------------------------------------------- loading


def load_tokenizer(
    path_or_name: str | Path, *, required_tokens: Sequence[str] = SPECIAL_TOKENS
) -> Any:
    """Load a tokenizer from a local folder or a hub name, refusing unusable ones.

    Fast (``tokenizer.json``) tokenizers and the MeCab/Sudachi ``BertJapaneseTokenizer`` both
    load; a missing analyser is reported with the package to install.

    transformers 5 loads a folder without tokenizer files as an *empty* tokenizer without
    complaint (every token unknown), so a local folder must contain tokenizer files, and the
    result must have a real vocabulary with the BERT special tokens (``required_tokens``; pass
    ``()`` for tokenizers of other model families).
    """
    from transformers import AutoTokenizer

    from hetlm.models.source import resolve_model_source

    # a local-looking name that does not exist fails here, at once (never tried on the hub)
    where = Path(resolve_model_source(path_or_name, "tokenizer")).expanduser()
    if where.exists():
        _check_tokenizer_folder(where)
        path_or_name = where
    _check_analyser_installed(where if where.exists() else None)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path_or_name))
    except Exception as exc:  # any load failure is a user-fixable input problem
        message = " ".join(str(exc).split())
        raise HetlmError(
            f"cannot load a tokenizer from {path_or_name}: {message} (train one "
            "with `hetlm tokenizer train` or check the path/name)"
        ) from exc
    _check_vocabulary(tokenizer, path_or_name, required_tokens)
    return tokenizer


def _check_analyser_installed(folder: Path | None) -> None:
    """A MeCab/Sudachi tokenizer folder needs its analyser: say which package, not a traceback."""
    if folder is None or not (folder / "tokenizer_config.json").is_file():
        return
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except ValueError:
        return
    kind = config.get("word_tokenizer_type")
    if config.get("tokenizer_class") != "BertJapaneseTokenizer" or kind not in ("mecab", "sudachi"):
        return
    from hetlm.data.segmenters import MECAB_DICS, SegmenterSpec, require_analyser

    if kind == "mecab":
        dic = (config.get("mecab_kwargs") or {}).get("mecab_dic", "unidic_lite")
        names = {v: k for k, v in MECAB_DICS.items()}
        spec = SegmenterSpec("mecab", mecab_dic=names.get(dic, "unidic-lite"))
    else:
        kwargs = config.get("sudachi_kwargs") or {}
        spec = SegmenterSpec("sudachi", sudachi_dict=kwargs.get("sudachi_dict_type", "core"))
    try:
        require_analyser(spec)
    except HetlmError as exc:
        raise HetlmError(f"the tokenizer in {folder} uses {exc}") from exc


def _check_tokenizer_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise HetlmError(f"tokenizer path {folder} is a file: pass the tokenizer folder")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise HetlmError(
            f"{folder} contains no tokenizer files ({', '.join(TOKENIZER_FILES)}): "
            "train one with `hetlm tokenizer train` or pass the right folder"
        )


def _check_vocabulary(tokenizer: Any, source: str | Path, required: Sequence[str]) -> None:
    vocab = tokenizer.get_vocab()
    if len(vocab) < MIN_VOCAB_SIZE:
        raise HetlmError(
            f"the tokenizer from {source} has only {len(vocab)} tokens: it is empty "
            "or broken; retrain it with `hetlm tokenizer train`"
        )
    missing = [t for t in required if t not in vocab]
    if missing:
        raise HetlmError(
            f"the tokenizer from {source} lacks the special tokens "
            f"{' '.join(missing)}: use a tokenizer trained by `hetlm tokenizer train`"
        )
    if not getattr(tokenizer, "is_fast", False) and not is_word_piece_japanese(tokenizer):
        raise HetlmError(
            f"the tokenizer from {source} is neither a fast (tokenizers-backed) "
            "one nor a MeCab/Sudachi BertJapaneseTokenizer: save it with "
            "tokenizer.json"
        )


def is_word_piece_japanese(tokenizer: Any) -> bool:
    """Whether this is a word-segmenting ``BertJapaneseTokenizer`` with WordPiece sub-words."""
    return (
        type(tokenizer).__name__ == "BertJapaneseTokenizer"
        and getattr(tokenizer, "subword_tokenizer_type", None) == "wordpiece"
    )


def tokenizer_kind(tokenizer: Any) -> str:
    """``sentencepiece``, ``mecab``, ``sudachi`` (BertJapaneseTokenizer) or ``other``."""
    if is_word_piece_japanese(tokenizer):
        return str(getattr(tokenizer, "word_tokenizer_type", "other"))
    if getattr(tokenizer, "is_fast", False):
        model = json.loads(tokenizer.backend_tokenizer.to_str()).get("model", {})
        if model.get("type") in ("Unigram", "BPE"):
            return "sentencepiece"
    return "other"


def continuation_token_ids(tokenizer: Any) -> list[int] | None:
    """Ids of WordPiece continuation pieces (``##...``), or None when there are no word pieces.

    Whole-word masking needs them: a word is a piece without the prefix followed by its
    continuation pieces. SentencePiece tokenizers of Japanese mark no word boundaries (there
    are no spaces), so they have none.
    """
    prefix = None
    if is_word_piece_japanese(tokenizer):
        prefix = "##"
    elif getattr(tokenizer, "is_fast", False):
        model = json.loads(tokenizer.backend_tokenizer.to_str()).get("model", {})
        if model.get("type") == "WordPiece":
            prefix = model.get("continuing_subword_prefix", "##")
    if prefix is None:
        return None
    return sorted(
        int(i)
        for t, i in tokenizer.get_vocab().items()
        if t.startswith(prefix) and len(t) > len(prefix)
    )


def special_token_ids(tokenizer: Any) -> dict[str, int]:
    """The special tokens a dataset records, name -> id.

    A BERT-style (hetlm) tokenizer: ``pad unk cls sep mask``, from the vocabulary. Any other one
    (a causal LM's, LLaMA-style: ``<s>``, ``</s>``, often no pad): the ``pad unk bos eos cls sep
    mask`` tokens it declares, with ``pad`` falling back to ``unk``, then ``eos`` (packed rows
    hold no padding: the id marks what is never a target).
    """
    vocab = tokenizer.get_vocab()
    if all(token in vocab for token in SPECIAL_TOKENS):
        return {
            name: int(vocab[token])
            for name, token in zip(SPECIAL_NAMES, SPECIAL_TOKENS, strict=True)
        }
    ids: dict[str, int] = {}
    for name in ("pad", "unk", "bos", "eos", "cls", "sep", "mask"):
        value = getattr(tokenizer, f"{name}_token_id", None)
        if isinstance(value, int):
            ids[name] = value
    if "pad" not in ids:
        fallback = ids.get("unk", ids.get("eos"))
        if fallback is None:
            raise HetlmError(
                "the tokenizer declares no pad, unk or eos token: save it with "
                "eos_token set (e.g. tokenizer.eos_token = '</s>')"
            )
        ids["pad"] = fallback
    return ids


def boundary_ids(special: dict[str, int]) -> tuple[int, int]:
    """(first, last) token of every packed row: ``[CLS] ... [SEP]`` for BERT-style tokenizers,
    ``<s> ... </s>`` (BOS ... EOS) for causal-LM ones; documents are joined by the last."""
    end = special.get("sep", special.get("eos"))
    if end is None:
        raise HetlmError(
            "the tokenizer has neither [SEP] nor an EOS token to separate "
            "documents: use a tokenizer with one of them (set eos_token)"
        )
    return special.get("cls", special.get("bos", end)), end


def vocab_hash(tokenizer: Any) -> str:
    """A SHA-256 of the token->id map, to tell whether data and model share a vocabulary."""
    items = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    payload = json.dumps(items, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return "sha256:" + hashlib.sha256(payload).hexdigest()
