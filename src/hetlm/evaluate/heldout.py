"""Held-out language-model metrics of a checkpoint on a corpus.

Encoders (``AutoModelForMaskedLM``): the corpus is tokenized with the checkpoint's tokenizer and
packed exactly as `hetlm prepare` packs (documents joined by the separator, ``[CLS] chunk
[SEP]`` rows of ``seq_len``, the last partial row dropped), then masked by ``MLMCollator`` at
the fixed ``EVAL_EPOCH``: the masks are a pure function of (row index, tokens), so the same
checkpoint gives the same number every time, and two checkpoints sharing a tokenizer are scored
on the very same masked positions. Reported: loss in nats per masked token, and accuracy.

Decoders (``AutoModelForCausalLM``): documents as ``[BOS] text [EOS]`` (whichever exist),
concatenated and cut into rows of ``seq_len``; every token after the first of a row is
predicted. Reported: loss in nats per predicted token, perplexity = exp(loss), accuracy.

Per-token numbers depend on the tokenizer: compare them between checkpoints that share one.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from hetlm.errors import HetlmError
from hetlm.evaluate.checkpoint import (
    ModelSpec,
    is_causal_lm,
    load_config,
    load_model,
    load_tokenizer,
    quiet_transformers,
)
from hetlm.train.scoring import CORRECT, LOSS, TARGETS, score_batches


@dataclass
class LMResult:
    """Held-out LM metrics of one checkpoint on one corpus (``skipped`` says why when empty)."""

    kind: str  # "mlm" or "clm"
    corpus: str
    loss: float | None = None  # nats per predicted token
    accuracy: float | None = None  # top-1 on the predicted tokens
    perplexity: float | None = None  # exp(loss), decoders only
    predicted_tokens: int = 0
    sequences: int = 0
    seq_len: int = 0
    dropped_tail_tokens: int = 0
    skipped: str | None = None
    missing_weights: list[str] = field(default_factory=list)  # why it was skipped

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------- corpora


@dataclass
class PackedCorpus:
    """The validation split of a `hetlm prepare` dataset: rows already packed and tokenized.

    Usable only by checkpoints whose tokenizer has the same vocabulary (``vocab_hash``), which
    makes the number directly comparable with the held-out MLM of `hetlm pretrain`.
    """

    path: str
    rows: np.ndarray
    vocab_hash: str
    seq_len: int


def load_packed_corpus(path: str, max_sequences: int | None = None) -> PackedCorpus:
    """Read the validation rows of a packed dataset (``load_packed_dataset`` checks it)."""
    from hetlm.data.packed import load_packed_dataset

    dataset, meta = load_packed_dataset(path)
    split = dataset["validation"]
    if max_sequences is not None:
        split = split.select(range(min(max_sequences, len(split))))
    rows = np.asarray(split.with_format("numpy")["input_ids"], dtype=np.int64)
    return PackedCorpus(
        str(path), rows, str(meta.get("tokenizer_vocab_hash", "")), int(meta["seq_len"])
    )


Corpus = Sequence[str] | PackedCorpus


# ---------------------------------------------------------------- packing in memory


def tokenize_texts(texts: Sequence[str], tokenizer: Any, batch: int = 256) -> Iterable[list[int]]:
    """Token ids of each text (NFKC-normalised, no special tokens), in order."""
    with quiet_transformers():  # "sequence longer than model_max_length": we pack it ourselves
        for start in range(0, len(texts), batch):
            chunk = [unicodedata.normalize("NFKC", t) for t in texts[start : start + batch]]
            yield from tokenizer(chunk, add_special_tokens=False)["input_ids"]


def pack_for_mlm(texts: Sequence[str], tokenizer: Any, seq_len: int) -> tuple[np.ndarray, int]:
    """``[CLS] chunk [SEP]`` rows as `hetlm prepare` makes them; (rows, dropped tail tokens)."""
    from hetlm.data.prepare.packing import SequencePacker

    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    if cls_id is None or sep_id is None:
        raise HetlmError(
            "the tokenizer has no CLS/SEP tokens: masked-LM evaluation packs "
            "[CLS] ... [SEP] rows (is this a decoder without a causal-LM config?)"
        )
    packer = SequencePacker(seq_len, cls_id, sep_id)
    rows = [packer.add(ids) for ids in tokenize_texts(texts, tokenizer) if ids]
    dropped = packer.finish().dropped_tail_tokens
    return _stack(rows, seq_len), dropped


def pack_for_clm(texts: Sequence[str], tokenizer: Any, seq_len: int) -> tuple[np.ndarray, int]:
    """``[BOS] text [EOS]`` documents concatenated and cut into rows; (rows, dropped tokens)."""
    bos = tokenizer.bos_token_id
    end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    stream: list[int] = []
    for ids in tokenize_texts(texts, tokenizer):
        if ids:
            stream.extend(
                ([bos] if bos is not None else []) + ids + ([end] if end is not None else [])
            )
    n = len(stream) // seq_len
    rows = np.asarray(stream[: n * seq_len], dtype=np.int64).reshape(n, seq_len)
    return rows, len(stream) - n * seq_len


def _stack(rows: list[np.ndarray], seq_len: int) -> np.ndarray:
    rows = [r for r in rows if len(r)]
    return np.concatenate(rows).astype(np.int64) if rows else np.zeros((0, seq_len), np.int64)


# ---------------------------------------------------------------- scoring


def mlm_collator(tokenizer: Any, seq_len: int, vocab_size: int) -> Any:
    """``MLMCollator`` (seed 0) with the tokenizer's special tokens.

    Only the specials at the bottom of the vocabulary count for the random-replacement range
    (the collator draws from ids above the highest special): RoBERTa's ``<mask>`` is the *last*
    id, which would otherwise leave no range at all. [CLS]/[SEP]/[PAD] are never masked.
    """
    from hetlm.data.collators import MLMCollator

    if tokenizer.mask_token_id is None:
        raise HetlmError("the tokenizer has no mask token: masked-LM evaluation needs one")
    core = {tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id}
    specials = {i for i in tokenizer.all_special_ids if i < vocab_size // 2} | core
    return MLMCollator(
        seq_len=seq_len,
        vocab_size=vocab_size,
        mask_id=tokenizer.mask_token_id,
        special_ids=sorted(i for i in specials if i is not None),
        seed=0,
    )


def score_mlm(
    model: Any, rows: np.ndarray, collator: Any, batch_size: int
) -> tuple[float, int, int]:
    """(summed loss, correct, predicted tokens) over the rows, masked at ``EVAL_EPOCH`` (row i
    as sample index i): `hetlm pretrain`'s scorer (``SparseMaskedLM`` in
    :func:`hetlm.train.scoring.score_batches`) on a ``*ForMaskedLM``, any model type."""
    from hetlm.data.collators import EVAL_EPOCH
    from hetlm.models.masked_lm import SparseMaskedLM

    def batches():
        for start in range(0, len(rows), batch_size):
            indices = np.arange(start, min(start + batch_size, len(rows)))
            yield collator(rows[indices], indices, EVAL_EPOCH), True

    return _sums(score_batches(SparseMaskedLM(model, any_type=True), batches(), model.device))


def score_clm(model: Any, rows: np.ndarray, batch_size: int) -> tuple[float, int, int]:
    """(summed next-token loss, correct, predicted tokens) over the rows: every token after
    the first of a row is predicted (`hetlm pretrain`'s scorer, ``SparseCausalLM``)."""
    from hetlm.data.readers import CLMBatch
    from hetlm.models.causal_lm import SparseCausalLM, target_index

    def batches():
        for start in range(0, len(rows), batch_size):
            ids = torch.from_numpy(np.ascontiguousarray(rows[start : start + batch_size]))
            targets = ids.shape[0] * (ids.shape[1] - 1)
            batch = CLMBatch(
                ids,
                ids,
                num_targets=targets,
                num_tokens=ids.numel(),
                target_index=target_index(ids),
            )
            yield batch, True

    return _sums(score_batches(SparseCausalLM(model), batches(), model.device))


def _sums(totals: torch.Tensor) -> tuple[float, int, int]:
    return (
        float(totals[LOSS, 0]),
        int(round(float(totals[CORRECT, 0]))),
        int(round(float(totals[TARGETS, 0]))),
    )


# ---------------------------------------------------------------- one checkpoint, one corpus


def _check_fits(
    rows: np.ndarray, config: Any, seq_len: int, spec: ModelSpec, corpus: str, vocab_size: int
) -> None:
    if len(rows) == 0:
        raise HetlmError(
            f"the corpus {corpus} gives no full sequence of {seq_len} tokens with the "
            f"tokenizer of {spec.path}: add text or lower --mlm-seq-len"
        )
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and seq_len > positions:
        raise HetlmError(
            f"--mlm-seq-len {seq_len} exceeds the {positions} positions of {spec.path}: lower it"
        )
    if int(rows.max()) >= vocab_size:
        raise HetlmError(
            f"the tokenizer of {spec.path} produces id {int(rows.max())} but the "
            f"model has {vocab_size} embeddings: tokenizer and model do not match"
        )


def evaluate_lm(
    spec: ModelSpec,
    corpora: dict[str, Corpus],
    *,
    seq_len: int = 128,
    batch_size: int = 16,
    max_sequences: int | None = None,
    device: str = "cpu",
) -> list[LMResult]:
    """Held-out metrics of one checkpoint on each named corpus (the model is loaded once).

    Text corpora are packed with the checkpoint's tokenizer into ``seq_len`` rows (the first
    ``max_sequences`` kept); a :class:`PackedCorpus` is used as packed, and only by checkpoints
    with its vocabulary.
    """
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    config = load_config(spec)
    causal = is_causal_lm(config)
    kind = "clm" if causal else "mlm"
    tokenizer = load_tokenizer(spec)
    model, info = load_model(spec, AutoModelForCausalLM if causal else AutoModelForMaskedLM)
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        reason = (
            f"skipped: no trained {kind.upper()} head in the checkpoint ({len(missing)} "
            "weights missing; e.g. an ELECTRA discriminator)"
        )
        return [
            LMResult(kind, name, seq_len=seq_len, skipped=reason, missing_weights=missing[:8])
            for name in corpora
        ]
    model.to(device).eval()
    vocab_size = int(model.get_input_embeddings().num_embeddings)
    results = []
    for name, corpus in corpora.items():
        if isinstance(corpus, PackedCorpus):
            reason = _packed_unusable(corpus, tokenizer, causal)
            if reason:
                results.append(LMResult(kind, name, seq_len=corpus.seq_len, skipped=reason))
                continue
            rows, dropped, length = corpus.rows, 0, corpus.seq_len
        else:
            pack = pack_for_clm if causal else pack_for_mlm
            rows, dropped = pack(corpus, tokenizer, seq_len)
            rows, length = rows[:max_sequences], seq_len
        _check_fits(rows, config, length, spec, name, vocab_size)
        if causal:
            loss_sum, correct, count = score_clm(model, rows, batch_size)
        else:
            collator = mlm_collator(tokenizer, length, min(vocab_size, len(tokenizer)))
            loss_sum, correct, count = score_mlm(model, rows, collator, batch_size)
        loss = loss_sum / max(count, 1)
        results.append(
            LMResult(
                kind,
                name,
                loss=loss,
                accuracy=correct / max(count, 1),
                perplexity=_exp(loss) if causal else None,
                predicted_tokens=count,
                sequences=len(rows),
                seq_len=length,
                dropped_tail_tokens=dropped,
            )
        )
    return results


def _packed_unusable(corpus: PackedCorpus, tokenizer: Any, causal: bool) -> str | None:
    from hetlm.data.tokenizer import vocab_hash

    if causal:
        return "skipped: a packed MLM dataset; pass the text corpus for a decoder"
    if vocab_hash(tokenizer) != corpus.vocab_hash:
        return "skipped: the dataset was packed with another tokenizer; pass the text corpus"
    return None


def _exp(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


# ---------------------------------------------------------------- the token-frequency baseline


@dataclass
class FrequencyBaseline:
    """What a model that ignores the context scores on held-out targets: the plateau to leave.

    A masked LM first learns how frequent each token is and predicts that, whatever the sentence
    (the "token-frequency plateau"); only a model above this baseline uses the context.
    ``accuracy``: always predicting the most frequent held-out target (chosen on the held-out
    targets themselves, so no constant guess does better); ``loss``: the cross-entropy in nats
    of the held-out targets under the training tokens' frequencies (add-one smoothed), which is
    what a model that learnt only those frequencies reports.
    """

    token_id: int
    accuracy: float
    loss: float
    targets: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def token_counts(rows: np.ndarray, vocab_size: int, exclude: Iterable[int] = ()) -> np.ndarray:
    """How often each token id occurs in ``rows`` (the ids in ``exclude``, e.g. [CLS]/[SEP]/
    [PAD], which are never masked, count 0)."""
    counts = np.bincount(np.asarray(rows, dtype=np.int64).reshape(-1), minlength=vocab_size)
    counts = counts[:vocab_size].astype(np.float64)
    counts[[i for i in exclude if 0 <= i < vocab_size]] = 0
    return counts


def frequency_baseline(labels: np.ndarray, train_counts: np.ndarray) -> FrequencyBaseline:
    """The baseline of held-out target ids ``labels`` (``-100`` slots ignored), with the
    frequencies ``train_counts`` (:func:`token_counts` of the training rows)."""
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    labels = labels[labels != -100]
    if labels.size == 0:
        raise HetlmError(
            "no held-out targets to compute the frequency baseline on: hold out "
            "more text (validation_fraction) or more samples (train.max_eval_samples)"
        )
    if int(labels.max()) >= len(train_counts):
        raise ValueError(
            f"target id {int(labels.max())} is outside the {len(train_counts)} "
            "token counts: count the training rows over the whole vocabulary"
        )
    held_out = np.bincount(labels)
    smoothed = np.asarray(train_counts, dtype=np.float64) + 1.0
    smoothed = smoothed / smoothed.sum()
    loss = float(-np.log(smoothed[labels]).mean())
    return FrequencyBaseline(
        token_id=int(held_out.argmax()),
        accuracy=float(held_out.max() / labels.size),
        loss=loss,
        targets=int(labels.size),
    )


def masked_targets(rows: np.ndarray, collator: Any, batch_size: int = 256) -> np.ndarray:
    """The target ids of ``rows`` masked at ``EVAL_EPOCH`` (row i as sample index i): the very
    positions that ``score_mlm`` and `hetlm pretrain`'s held-out evaluation score."""
    from hetlm.data.collators import EVAL_EPOCH

    out = []
    for start in range(0, len(rows), batch_size):
        indices = np.arange(start, min(start + batch_size, len(rows)))
        labels = collator(rows[indices], indices, EVAL_EPOCH).masked_labels.numpy().reshape(-1)
        out.append(labels[labels != -100])
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


TRAIN_ROWS_COUNTED = 50_000  # training rows whose tokens give the frequencies (evenly spaced)


def pretraining_heldout(config: Any) -> tuple[np.ndarray, Any, FrequencyBaseline]:
    """The held-out rows and collator that `hetlm pretrain` scores for this config (the first
    ``train.max_eval_samples`` validation sequences; a masked LM's masked at ``EVAL_EPOCH`` with
    ``run.seed``, a causal LM's every next token: collator None), and their
    :class:`FrequencyBaseline`. Token frequencies come from at most ``TRAIN_ROWS_COUNTED``
    training rows, evenly spaced over the split."""
    from hetlm.data.packed import load_packed_dataset
    from hetlm.data.readers import special_ids
    from hetlm.train.objectives import build_data

    dataset, meta = load_packed_dataset(config.data.dataset)
    validation = build_data(config, dataset["validation"], meta)
    train = build_data(config, dataset["train"], meta)
    rows = validation.rows_at(np.arange(min(config.train.max_eval_samples, len(validation))))
    counted = np.unique(
        np.linspace(0, len(train) - 1, min(len(train), TRAIN_ROWS_COUNTED)).astype(np.int64)
    )
    special = special_ids(meta)
    if config.model.causal:  # every token after a row's first is a target, padding aside
        counts = token_counts(train.rows_at(counted), int(meta["vocab_size"]), [special["pad"]])
        targets = rows[:, 1:][rows[:, 1:] != special["pad"]]
        return rows, None, frequency_baseline(targets, counts)
    counts = token_counts(train.rows_at(counted), int(meta["vocab_size"]), special.values())
    targets = masked_targets(rows, validation.collator)
    return rows, validation.collator, frequency_baseline(targets, counts)
