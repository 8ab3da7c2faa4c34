"""Loading and inspecting tokenizers: what training, evaluation and serving need of them.

A hetlm tokenizer is a plain ``transformers`` tokenizer folder (``AutoTokenizer`` loads it):
a fast SentencePiece tokenizer with a BERT post-processor, or a MeCab/Sudachi
``BertJapaneseTokenizer`` whose ``##`` pieces allow whole-word masking. Training one (``hetlm
tokenizer train``) is offline preparation: :mod:`hetlm.data.prepare.tokenizer_training`.

The special pieces are BERT's (``[PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4``); a tokenizer of
another model family (LLaMA-style ``<s>``/``</s>``) is read through the special tokens it
declares (:func:`special_token_ids`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hetlm.errors import HetlmError

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)  # their ids are 0..4, in this order
SPECIAL_NAMES = ("pad", "unk", "cls", "sep", "mask")
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
