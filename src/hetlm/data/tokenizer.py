"""Training a SentencePiece tokenizer and saving it as a plain ``transformers`` tokenizer.

Japanese has no spaces, so the tokenizer is SentencePiece (unigram or BPE) trained straight on
raw sentences: no morphological analyser is needed at training or inference time. The special
pieces are BERT's (``[PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4``) and are created *by
SentencePiece*, so the HF tokenizer adds no extra tokens and ids match the ``.model`` file.

A trained folder holds:

- ``sentencepiece.model``: the SentencePiece model itself (for tools that want it);
- ``tokenizer.json`` + ``tokenizer_config.json``: what ``AutoTokenizer.from_pretrained`` loads,
  as a fast tokenizer with a BERT post-processor (``[CLS] A [SEP]``, ``[CLS] A [SEP] B [SEP]``,
  token_type_ids 0/1) that returns ``token_type_ids``;
- ``hetlm_tokenizer.json``: how it was made (inputs, options, versions, date).
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

from hetlm.data.corpus import (
    CorpusStats,
    as_input_list,
    check_text_files,
    iter_documents,
    require_documents,
    resolve_inputs,
)
from hetlm.errors import HetlmError

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)  # their ids are 0..4, in this order
SPECIAL_NAMES = ("pad", "unk", "cls", "sep", "mask")
SPM_FILE = "sentencepiece.model"
RECORD_FILE = "hetlm_tokenizer.json"
MODEL_INPUT_NAMES = ["input_ids", "token_type_ids", "attention_mask"]
# Files that make a folder a tokenizer for AutoTokenizer (fast or slow formats).
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "spiece.model", "tokenizer.model",
                   "sentencepiece.bpe.model", "vocab.json")
MIN_VOCAB_SIZE = 16
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
                        yield line[i:i + _SPM_SENTENCE_CHARS]
        except Exception as exc:  # re-raised by train_tokenizer
            self.error = exc


def _check_options(vocab_size: int, model_type: str, character_coverage: float,
                   input_sentence_size: int, model_max_length: int) -> None:
    if model_type not in ("unigram", "bpe"):
        raise HetlmError(f"model_type must be 'unigram' or 'bpe', got {model_type!r}")
    if vocab_size < MIN_VOCAB_SIZE:
        raise HetlmError(f"vocab_size {vocab_size} is too small: use at least {MIN_VOCAB_SIZE} "
                         "(8000-32000 is usual for Japanese)")
    if not 0.98 <= character_coverage <= 1.0:
        raise HetlmError(f"character_coverage {character_coverage} is out of range: SentencePiece "
                         "accepts 0.98..1.0 (0.9995 is usual for Japanese)")
    if input_sentence_size < 1:
        raise HetlmError(f"input_sentence_size must be positive, got {input_sentence_size}")
    if model_max_length < 8:
        raise HetlmError(f"model_max_length must be at least 8, got {model_max_length}")


def _spm_trainer_options(vocab_size: int, model_type: str, character_coverage: float,
                         byte_fallback: bool, input_sentence_size: int,
                         normalize: bool) -> dict[str, Any]:
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
        pad_id=0, pad_piece=PAD,
        unk_id=1, unk_piece=UNK,
        bos_id=-1, eos_id=-1,
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
        raise HetlmError(f"SentencePiece training failed: {message} (for a small corpus lower "
                         "--vocab-size; with many rare characters lower --character-coverage "
                         "or use --byte-fallback)") from exc
    if feed.error is not None:
        raise feed.error
    return model.getvalue()


def train_tokenizer(inputs: Sequence[str | Path], output_dir: str | Path, *,
                    vocab_size: int = 8000, model_type: str = "unigram",
                    character_coverage: float = 0.9995, byte_fallback: bool = False,
                    input_sentence_size: int = 1_000_000, text_field: str = "text",
                    normalize: bool = True, seed: int = 0, model_max_length: int = 512,
                    stats: CorpusStats | None = None) -> Path:
    """Train a SentencePiece tokenizer on the corpus and save it as an AutoTokenizer folder.

    ``normalize`` applies NFKC both when reading the corpus and inside the tokenizer (the
    SentencePiece ``nmt_nfkc`` rule, which the fast tokenizer reproduces), so text at inference is
    normalised the same way as at training. Pass ``stats`` to get the corpus summary. Returns the
    output folder.
    """
    _check_options(vocab_size, model_type, character_coverage, input_sentence_size,
                   model_max_length)
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise HetlmError(f"tokenizer output {output_dir} is a file: choose a folder path")
    stats = stats if stats is not None else CorpusStats()
    files = resolve_inputs(inputs)
    check_text_files(files)  # input errors before the (slow) training starts
    feed = _SentenceFeed(iter_documents(files, text_field=text_field, normalize=normalize,
                                        stats=stats))
    options = _spm_trainer_options(vocab_size, model_type, character_coverage, byte_fallback,
                                   input_sentence_size, normalize)
    try:
        model_bytes = _train_spm(feed, options, seed)
    except HetlmError:
        require_documents(stats, inputs, text_field)  # the clearer error when the corpus is empty
        raise
    require_documents(stats, inputs, text_field)

    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / SPM_FILE).write_bytes(model_bytes)
    tokenizer = build_fast_tokenizer(model_bytes, model_max_length)
    save_fast_tokenizer(tokenizer, output_dir)
    record = _training_record(inputs, files, options, seed, text_field, normalize,
                              model_max_length, len(tokenizer), stats)
    (output_dir / RECORD_FILE).write_text(json.dumps(record, ensure_ascii=False, indent=2) + "\n",
                                          encoding="utf-8")
    return output_dir


def _training_record(inputs: Sequence[str | Path], files: list[Path], options: dict[str, Any],
                     seed: int, text_field: str, normalize: bool, model_max_length: int,
                     vocab_size: int, stats: CorpusStats) -> dict[str, Any]:
    import sentencepiece
    import tokenizers
    import transformers

    from hetlm import __version__

    return {
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "inputs": [str(i) for i in as_input_list(inputs)],
        "files": [str(f.resolve()) for f in files],
        "text_field": text_field,
        "normalize": normalize,
        "seed": seed,
        "model_max_length": model_max_length,
        "sentencepiece_options": {k: v for k, v in options.items() if k != "num_threads"},
        "vocab_size": vocab_size,
        "special_tokens": dict(zip(SPECIAL_NAMES, SPECIAL_TOKENS, strict=True)),
        "corpus": {**stats.as_dict(), "summary": stats.summary()},
        "versions": {"hetlm": __version__, "sentencepiece": sentencepiece.__version__,
                     "tokenizers": tokenizers.__version__,
                     "transformers": transformers.__version__},
    }


# ---------------------------------------------------------------- SentencePiece -> fast tokenizer


def build_fast_tokenizer(model_bytes: bytes, model_max_length: int = 512):
    """A ``PreTrainedTokenizerFast`` that encodes like the SentencePiece model, BERT-style.

    transformers' own SentencePiece conversion builds the backend (normaliser with the model's
    precompiled NFKC map, whitespace handling, unigram/BPE model, decoder); we add the BERT
    post-processor and declare the special tokens, which already exist as pieces 0..4.
    """
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

    proto = import_protobuf().ModelProto()
    proto.ParseFromString(model_bytes)
    pieces = [(p.piece, p.score) for p in proto.pieces]
    if [p for p, _ in pieces[:len(SPECIAL_TOKENS)]] != list(SPECIAL_TOKENS):
        raise HetlmError("the SentencePiece model does not start with [PAD] [UNK] [CLS] [SEP] "
                         "[MASK]: train it with `hetlm tokenizer train`")
    # BPE takes a piece->id dict, unigram a (piece, score) list. legacy=False: the "▁" prefix is
    # added at the start of the text only, not after every special token such as [MASK].
    vocab = {p: i for i, (p, _) in enumerate(pieces)} if proto.trainer_spec.model_type == 2 else pieces
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=False)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{CLS}:0 $A:0 {SEP}:0",
        pair=f"{CLS}:0 $A:0 {SEP}:0 $B:1 {SEP}:1",
        special_tokens=[(CLS, 2), (SEP, 3)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, unk_token=UNK, cls_token=CLS, sep_token=SEP,
        mask_token=MASK, model_max_length=model_max_length, model_input_names=MODEL_INPUT_NAMES,
    )


def save_fast_tokenizer(tokenizer: Any, output_dir: Path) -> None:
    """``save_pretrained``, then name the class ``PreTrainedTokenizerFast`` in the config.

    transformers 5 writes ``"tokenizer_class": "TokenizersBackend"``, a name transformers 4 does
    not know; ``PreTrainedTokenizerFast`` loads the same ``tokenizer.json`` in both.
    """
    tokenizer.save_pretrained(str(output_dir))
    config_path = output_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n",
                           encoding="utf-8")


# ---------------------------------------------------------------- loading


def load_tokenizer(path_or_name: str | Path, *,
                   required_tokens: Sequence[str] = SPECIAL_TOKENS) -> Any:
    """Load a fast tokenizer from a local folder or a hub name, refusing unusable ones.

    transformers 5 loads a folder without tokenizer files as an *empty* tokenizer without
    complaint (every token unknown), so a local folder must contain tokenizer files, and the
    result must have a real vocabulary with the BERT special tokens (``required_tokens``; pass
    ``()`` for tokenizers of other model families).
    """
    from transformers import AutoTokenizer

    where = Path(path_or_name).expanduser()
    if where.exists():
        _check_tokenizer_folder(where)
        path_or_name = where
    elif _looks_like_path(path_or_name):
        raise HetlmError(f"tokenizer folder {path_or_name} does not exist: check the path, or "
                         "train one with `hetlm tokenizer train`")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path_or_name))
    except Exception as exc:  # any load failure is a user-fixable input problem
        message = " ".join(str(exc).split())
        raise HetlmError(f"cannot load a tokenizer from {path_or_name}: {message} (train one "
                         "with `hetlm tokenizer train` or check the path/name)") from exc
    _check_vocabulary(tokenizer, path_or_name, required_tokens)
    return tokenizer


def _looks_like_path(path_or_name: str | Path) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else that does not exist is a bad path."""
    text = str(path_or_name)
    return (isinstance(path_or_name, Path) or text.startswith(("/", ".", "~"))
            or text.count("/") > 1 or os.sep in text and os.sep != "/")


def _check_tokenizer_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise HetlmError(f"tokenizer path {folder} is a file: pass the tokenizer folder")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise HetlmError(f"{folder} contains no tokenizer files ({', '.join(TOKENIZER_FILES)}): "
                         "train one with `hetlm tokenizer train` or pass the right folder")


def _check_vocabulary(tokenizer: Any, source: str | Path, required: Sequence[str]) -> None:
    vocab = tokenizer.get_vocab()
    if len(vocab) < MIN_VOCAB_SIZE:
        raise HetlmError(f"the tokenizer from {source} has only {len(vocab)} tokens: it is empty "
                         "or broken; retrain it with `hetlm tokenizer train`")
    missing = [t for t in required if t not in vocab]
    if missing:
        raise HetlmError(f"the tokenizer from {source} lacks the special tokens "
                         f"{' '.join(missing)}: use a tokenizer trained by `hetlm tokenizer train`")
    if not getattr(tokenizer, "is_fast", False):
        raise HetlmError(f"the tokenizer from {source} is not a fast (tokenizers-backed) one: "
                         "save it with tokenizer.json")


def special_token_ids(tokenizer: Any) -> dict[str, int]:
    """{"pad", "unk", "cls", "sep", "mask"} -> id, from the tokenizer's vocabulary."""
    vocab = tokenizer.get_vocab()
    return {name: int(vocab[token]) for name, token in zip(SPECIAL_NAMES, SPECIAL_TOKENS,
                                                             strict=True)}


def vocab_hash(tokenizer: Any) -> str:
    """A SHA-256 of the token->id map, to tell whether data and model share a vocabulary."""
    items = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    payload = json.dumps(items, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return "sha256:" + hashlib.sha256(payload).hexdigest()
