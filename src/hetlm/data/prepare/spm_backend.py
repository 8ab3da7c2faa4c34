"""A ``tokenizers`` backend that encodes like a SentencePiece model, built from its protobuf.

Why our own: transformers' ``SpmConverter.build_tokenizer_from_spm_proto`` is not a stable API.
It does not exist in transformers 5.0, takes no ``legacy`` argument in 5.17 (and there ignores the
model's dummy prefix and whitespace settings), and gained both in later 5.x releases. hetlm
declares ``transformers>=5.0``, so it builds the backend from ``tokenizers`` primitives, which are
stable, and follows the SentencePiece model's own settings the way SentencePiece does:

* normaliser: the model's precompiled NFKC map, SentencePiece's removal of extra spaces (only
  spaces: newlines are kept), and " " -> "▁" (transformers' converter drops a leading space
  together with the dummy prefix: "  前後" came out without its "▁");
* pre-tokeniser: the dummy prefix "▁" at the start of the text only (not after every special
  token such as ``[MASK]``, which is what "legacy" prefixing did), and user-defined pieces kept
  whole;
* model: unigram with the piece scores, or BPE with merges ranked by piece score (SentencePiece
  BPE stores no merge list);
* decoder: "▁" -> " ", byte fallback, and the dummy prefix stripped.

``tests/test_tokenizer.py`` checks that the result encodes exactly like
``SentencePieceProcessor.encode`` for unigram and BPE models.
"""

from __future__ import annotations

import re
from typing import Any

SPACE = "▁"
_NORMAL, _USER_DEFINED = 1, 4  # SentencePiece piece types
_BPE = 2  # trainer_spec.model_type


def parse_model_proto(model_bytes: bytes) -> Any:
    """The ``ModelProto`` of a ``.model`` file (sentencepiece ships the generated protobuf code)."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_bytes)
    return proto


def spm_backend(proto: Any) -> Any:
    """A ``tokenizers.Tokenizer`` equivalent to the SentencePiece model ``proto``."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer(_model(proto))
    spec = proto.normalizer_spec
    user_defined = [p.piece for p in proto.pieces if p.type == _USER_DEFINED]
    tokenizer.normalizer = _normalizer(spec)
    pre = _pre_tokenizers(spec, user_defined)
    if pre is not None:
        tokenizer.pre_tokenizer = pre
    tokenizer.decoder = _decoder(spec, proto.trainer_spec.byte_fallback)
    return tokenizer


def _model(proto: Any) -> Any:
    from tokenizers.models import BPE, Unigram

    trainer = proto.trainer_spec
    if trainer.model_type == _BPE:
        vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
        has_user_defined = any(p.type == _USER_DEFINED for p in proto.pieces)
        return BPE(
            vocab=vocab,
            merges=_bpe_merges(proto),
            unk_token=trainer.unk_piece,
            fuse_unk=True,
            byte_fallback=trainer.byte_fallback,
            dropout=None,
            ignore_merges=has_user_defined,
        )
    return Unigram(
        vocab=[(p.piece, p.score) for p in proto.pieces],
        unk_id=trainer.unk_id,
        byte_fallback=trainer.byte_fallback,
    )


def _bpe_merges(proto: Any) -> list[tuple[str, str]]:
    """Every split of a normal piece into two normal pieces, best-scored piece first."""
    normal = {p.piece: (p.score, i) for i, p in enumerate(proto.pieces) if p.type == _NORMAL}
    ranked = []
    for token, (score, index) in normal.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in normal and right in normal:
                ranked.append((-score, index, left, right))
    return [(left, right) for _, _, left, right in sorted(ranked)]


def _normalizer(spec: Any) -> Any:
    from tokenizers import Regex, normalizers

    parts = []
    if spec.precompiled_charsmap:
        parts.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        # Leading spaces become the dummy prefix itself rather than vanishing: the pre-tokeniser
        # adds the prefix only where the text starts at offset 0 of the original, which a
        # removed leading space would move.
        lead = SPACE if spec.add_dummy_prefix else ""
        parts += [
            normalizers.Replace(Regex(r" +\z"), ""),
            normalizers.Replace(Regex(r"\A +"), lead),
            normalizers.Replace(Regex(" {2,}"), " "),
        ]
    if spec.escape_whitespaces:
        parts.append(normalizers.Replace(" ", SPACE))
    return normalizers.Sequence(parts)


def _pre_tokenizers(spec: Any, user_defined: list[str]) -> Any:
    from tokenizers import Regex, pre_tokenizers

    parts = []
    if spec.add_dummy_prefix:
        parts.append(
            pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="first", split=False)
        )
    if user_defined:
        pattern = "|".join(re.escape(p) for p in sorted(user_defined, key=len, reverse=True))
        parts.append(pre_tokenizers.Split(Regex(pattern), behavior="isolated"))
    return pre_tokenizers.Sequence(parts) if parts else None


def _decoder(spec: Any, byte_fallback: bool) -> Any:
    from tokenizers import decoders

    parts = [decoders.Replace(SPACE, " ")]
    if byte_fallback:
        parts.append(decoders.ByteFallback())
    if spec.add_dummy_prefix:
        # Strip works per token: fuse first so that only the start of the text is stripped.
        parts += [decoders.Fuse(), decoders.Strip(content=" ", left=1)]
    elif byte_fallback:
        parts.append(decoders.Fuse())
    return decoders.Sequence(parts)
