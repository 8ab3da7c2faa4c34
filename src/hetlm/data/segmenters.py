"""Japanese word segmenters (MeCab via fugashi, SudachiPy), exactly as transformers runs them.

A WordPiece vocabulary must be trained on the words the tokenizer will see at inference time, so
training segments text with the *same* classes that ``BertJapaneseTokenizer`` instantiates from
its saved ``mecab_kwargs`` / ``sudachi_kwargs`` (``transformers``' ``MecabTokenizer`` and
``SudachiTokenizer``): same dictionary, same NFKC normalisation, same split mode.

The analysers are optional (``pip install 'hetlm[ja]'``); asking for one that is not installed is
a :class:`HetlmError` naming the package to install.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from dataclasses import dataclass
from typing import Any

from hetlm.errors import HetlmError

WORD_TOKENIZERS = ("mecab", "sudachi")
MECAB_DICS = {"unidic-lite": "unidic_lite", "ipadic": "ipadic", "unidic": "unidic"}
SUDACHI_MODES = ("A", "B", "C")
SUDACHI_DICTS = {
    "core": "sudachidict_core",
    "small": "sudachidict_small",
    "full": "sudachidict_full",
}
# SudachiPy refuses inputs over 49,149 bytes; 4,096 characters are at most 16 KB of UTF-8.
MAX_SEGMENT_CHARS = 4096
_INSTALL = "pip install 'hetlm[ja]'"


@dataclass(frozen=True)
class SegmenterSpec:
    """Which analyser, dictionary and split mode; saved as ``BertJapaneseTokenizer`` kwargs."""

    word_tokenizer: str = "mecab"
    mecab_dic: str = "unidic-lite"
    sudachi_mode: str = "A"
    sudachi_dict: str = "core"
    normalize: bool = True

    def __post_init__(self) -> None:
        if self.word_tokenizer not in WORD_TOKENIZERS:
            raise HetlmError(
                f"word tokenizer must be one of {', '.join(WORD_TOKENIZERS)}, got "
                f"{self.word_tokenizer!r}"
            )
        if self.mecab_dic not in MECAB_DICS:
            raise HetlmError(
                f"--mecab-dic must be one of {', '.join(MECAB_DICS)}, got {self.mecab_dic!r}"
            )
        if self.sudachi_mode not in SUDACHI_MODES:
            raise HetlmError(f"--sudachi-mode must be A, B or C, got {self.sudachi_mode!r}")
        if self.sudachi_dict not in SUDACHI_DICTS:
            raise HetlmError(
                f"--sudachi-dict must be one of {', '.join(SUDACHI_DICTS)}, got "
                f"{self.sudachi_dict!r}"
            )

    def tokenizer_kwargs(self) -> dict[str, Any]:
        """``BertJapaneseTokenizer`` arguments that select this analyser when it is loaded."""
        if self.word_tokenizer == "mecab":
            return {
                "word_tokenizer_type": "mecab",
                "mecab_kwargs": {
                    "mecab_dic": MECAB_DICS[self.mecab_dic],
                    "normalize_text": self.normalize,
                },
            }
        return {
            "word_tokenizer_type": "sudachi",
            "sudachi_kwargs": {
                "sudachi_split_mode": self.sudachi_mode,
                "sudachi_dict_type": self.sudachi_dict,
                "normalize_text": self.normalize,
            },
        }

    def describe(self) -> str:
        if self.word_tokenizer == "mecab":
            return f"MeCab ({self.mecab_dic})"
        return f"Sudachi (mode {self.sudachi_mode}, {self.sudachi_dict} dictionary)"


def require_analyser(spec: SegmenterSpec) -> dict[str, str]:
    """Check that the analyser and its dictionary are installed; return their versions."""
    if spec.word_tokenizer == "mecab":
        packages = ["fugashi", MECAB_DICS[spec.mecab_dic]]
        hint = {
            "unidic-lite": _INSTALL,
            "ipadic": "pip install ipadic",
            "unidic": "pip install unidic && python -m unidic download",
        }[spec.mecab_dic]
    else:
        packages = ["sudachipy", SUDACHI_DICTS[spec.sudachi_dict]]
        hint = (
            _INSTALL
            if spec.sudachi_dict == "core"
            else f"pip install {SUDACHI_DICTS[spec.sudachi_dict].replace('_', '-')}"
        )
    versions = {}
    for package in packages:
        try:
            importlib.import_module(package)
        except ImportError as exc:
            raise HetlmError(
                f"{spec.describe()} needs the Python package {package!r}, which is "
                f"not installed: {hint}"
            ) from exc
        versions[package] = _version(package)
    if spec.word_tokenizer == "mecab" and spec.mecab_dic == "unidic":
        import os

        import unidic

        if not os.path.isdir(unidic.DICDIR):
            raise HetlmError(
                "the full UniDic dictionary is installed but not downloaded: run "
                "python -m unidic download (or use --mecab-dic unidic-lite)"
            )
    return versions


def _version(package: str) -> str:
    name = package.replace("_", "-")
    for candidate in (name, package):
        try:
            return importlib.metadata.version(candidate)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def build_segmenter(spec: SegmenterSpec) -> Any:
    """transformers' own ``MecabTokenizer`` / ``SudachiTokenizer`` for this spec.

    Its ``tokenize(text)`` returns the words ``BertJapaneseTokenizer`` would pass to WordPiece.
    """
    require_analyser(spec)
    from transformers.models.bert_japanese.tokenization_bert_japanese import (
        MecabTokenizer,
        SudachiTokenizer,
    )

    kwargs = spec.tokenizer_kwargs()
    if spec.word_tokenizer == "mecab":
        return MecabTokenizer(do_lower_case=False, **kwargs["mecab_kwargs"])
    import warnings

    with warnings.catch_warnings():  # SudachiPy 0.7 deprecates Dictionary.create, which HF uses
        warnings.simplefilter("ignore", DeprecationWarning)
        return SudachiTokenizer(do_lower_case=False, **kwargs["sudachi_kwargs"])


def segment(segmenter: Any, text: str) -> list[str]:
    """The words of ``text``, whitespace-only tokens dropped (WordPiece drops them too)."""
    words = []
    for start in range(0, len(text), MAX_SEGMENT_CHARS):
        for word in segmenter.tokenize(text[start : start + MAX_SEGMENT_CHARS]):
            words.extend(word.split())
    return words
