"""Fine-tune a checkpoint for sequence classification and score it, over several seeds.

Deliberately a small plain-PyTorch loop (AdamW, linear warmup/decay, a few epochs) rather than
the ``Trainer``: every model in the table gets exactly the same recipe, and nothing else
(evaluation strategy, early stopping, mixed precision defaults) differs between library
versions. The seed decides the classifier head's initialisation, dropout and the data order;
it never changes the split (see :mod:`hetlm.evaluate.tasks`), so seed-to-seed spread measures
fine-tuning noise only.

Any checkpoint ``AutoModelForSequenceClassification`` can load works: BERT, RoBERTa, DeBERTaV2,
an ELECTRA discriminator, a decoder with a sequence-classification class (the pad token is set
from EOS when missing), or a hub name.
"""

from __future__ import annotations

import hashlib
import math
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

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
from hetlm.evaluate.metrics import accuracy, macro_f1
from hetlm.evaluate.recipes import FINETUNE_EPOCHS, FINETUNE_LR
from hetlm.evaluate.tasks import Example, TaskData, subsample

Log = Callable[[str], None]


@dataclass
class FinetuneOptions:
    """The fine-tuning recipe; the same for every model and task in one table."""

    epochs: int = FINETUNE_EPOCHS
    batch_size: int = 16
    eval_batch_size: int = 64
    lr: float = FINETUNE_LR
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_length: int = 128
    grad_clip: float = 1.0
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    eval_split: str = "test"
    device: str = "cpu"
    # A linear probe instead of fine-tuning: a linear classifier on the frozen model's
    # features (hetlm.evaluate.linear_probe). It scores what pretraining put into the
    # representations, which full fine-tuning of a small model on thousands of examples can
    # relearn and so hide.
    linear_probe: bool = False

    def check(self) -> None:
        """One-line errors for impossible values, before any model is loaded."""
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise HetlmError(
                    f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}"
                )
        if self.max_length < 8:
            raise HetlmError(f"max-length must be at least 8, got {self.max_length}")
        if not self.lr > 0:
            raise HetlmError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise HetlmError(f"warmup ratio must be in [0, 1), got {self.warmup_ratio}")
        for name in ("max_train_examples", "max_eval_examples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise HetlmError(f"{name.replace('_', '-')} must be at least 1, got {value}")
        if self.eval_split not in ("dev", "test"):
            raise HetlmError(f"eval split must be dev or test, got {self.eval_split!r}")


@dataclass
class SeedResult:
    """One fine-tuning run: test metrics, the confusion matrix (gold rows), the cost."""

    seed: int
    accuracy: float
    macro_f1: float
    final_train_loss: float
    confusion: list[list[int]]
    seconds: float


@dataclass
class TaskResult:
    """All seeds of one (model, task)."""

    model: str
    task: str
    labels: list[str]
    eval_split: str
    train_examples: int
    eval_examples: int
    train_ids_sha256: str = ""  # which examples, so two reports can be checked to match
    eval_ids_sha256: str = ""
    runs: list[SeedResult] = field(default_factory=list)
    linear_probe: bool = False  # a linear probe, not fine-tuning (FinetuneOptions)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------- inputs


def crop_around(text: str, span: tuple[int, int] | None, max_chars: int) -> str:
    """At most ``max_chars`` characters of ``text``, centred on ``span`` when it is longer.

    A chABSA sentence can run to 400 characters with its target near the end; truncating the
    tail would cut the very expression the label is about.
    """
    if len(text) <= max_chars:
        return text
    start, end = span if span is not None else (0, 0)
    begin = max(0, min((start + end) // 2 - max_chars // 2, len(text) - max_chars))
    return text[begin : begin + max_chars]


def encode(
    examples: Sequence[Example], tokenizer: Any, max_length: int, decoder: bool = False
) -> list[dict[str, Any]]:
    """Tokenized inputs (NFKC-normalised; sentence pairs where the task has them).

    ``decoder``: drop a closing separator. A decoder classifies from its last token, and with a
    BERT-style template (hetlm's own tokenizers) that token is the closing ``[SEP]``, whose
    state was trained to predict the start of the next document, not to sum up this one;
    LLaMA's own tokenizers add no closing token, so this puts hetlm's decoders on the same
    footing (measured on the domain experiment's LLaMA-mini, chABSA linear probe: macro-F1
    0.30-0.36 with the [SEP], 0.44-0.49 without).
    """
    texts, pairs = [], []
    for e in examples:
        pair = unicodedata.normalize("NFKC", e.text_pair) if e.text_pair is not None else None
        room = max(8, max_length - 4 - (len(pair) if pair else 0))  # ~1 token per character
        texts.append(unicodedata.normalize("NFKC", crop_around(e.text, e.span, room)))
        pairs.append(pair)
    with quiet_transformers():
        encoded = tokenizer(
            texts,
            pairs if any(p is not None for p in pairs) else None,
            truncation="longest_first",
            max_length=max_length,
        )
    keys = [k for k in ("input_ids", "token_type_ids", "attention_mask") if k in encoded]
    features = [
        {k: encoded[k][i] for k in keys} | {"labels": e.label} for i, e in enumerate(examples)
    ]
    sep = tokenizer.sep_token_id
    if decoder and sep is not None:
        for f in features:
            if len(f["input_ids"]) > 1 and f["input_ids"][-1] == sep:
                for k in keys:
                    f[k] = f[k][:-1]
    return features


def collate(tokenizer: Any, features: list[dict[str, Any]], model: Any) -> dict[str, torch.Tensor]:
    labels = torch.tensor([f["labels"] for f in features])
    drop = {"labels"} | ({"token_type_ids"} if not _uses_segments(model) else set())
    inputs = [{k: v for k, v in f.items() if k not in drop} for f in features]
    with quiet_transformers():
        batch = tokenizer.pad(inputs, return_tensors="pt")
    return {k: v.to(model.device) for k, v in {**batch, "labels": labels}.items()}


def _uses_segments(model: Any) -> bool:
    """Whether to pass ``token_type_ids``: hetlm's tokenizers always return them (BERT-style
    pairs), but a RoBERTa with ``type_vocab_size=1`` would index past its table, and decoders
    have no segment embeddings at all."""
    import inspect

    types = getattr(model.config, "type_vocab_size", None)
    accepted = "token_type_ids" in inspect.signature(model.forward).parameters
    return accepted and (types is None or types >= 2)


def prepare_tokenizer(spec: ModelSpec) -> Any:
    """The checkpoint's tokenizer, with a pad token (decoders often have none: use EOS)."""
    tokenizer = load_tokenizer(spec)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise HetlmError(
                f"the tokenizer of {spec.path} has neither a pad nor an EOS token: "
                "batches cannot be padded"
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# ---------------------------------------------------------------- one run


def optimizer_for(model: torch.nn.Module, options: FinetuneOptions) -> torch.optim.Optimizer:
    """AdamW; biases and normalisation weights (1-D parameters) without weight decay."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": options.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=options.lr,
    )


def schedule_for(
    optimizer: torch.optim.Optimizer, examples: int, options: FinetuneOptions
) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warm-up over ``warmup_ratio`` of the steps, then linear decay to 0, for
    ``options.epochs`` passes over ``examples`` in batches of ``options.batch_size``."""
    from transformers import get_linear_schedule_with_warmup

    total = math.ceil(examples / options.batch_size) * options.epochs
    return get_linear_schedule_with_warmup(optimizer, int(options.warmup_ratio * total), total)


def load_classifier(spec: ModelSpec, task: TaskData, tokenizer: Any, seed: int) -> Any:
    """A fresh classifier from the checkpoint; ``seed`` initialises the new head."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    labels = list(task.labels)
    model, _ = load_model(
        spec,
        AutoModelForSequenceClassification,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
        ignore_mismatched_sizes=True,
    )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def train_and_score(
    spec: ModelSpec,
    task: TaskData,
    tokenizer: Any,
    train: list[dict[str, Any]],
    test: list[dict[str, Any]],
    seed: int,
    options: FinetuneOptions,
) -> SeedResult:
    """Fine-tune once with ``seed`` and score on ``test``."""
    started = time.perf_counter()
    model = load_classifier(spec, task, tokenizer, seed).to(options.device)
    optimizer = optimizer_for(model, options)
    scheduler = schedule_for(optimizer, len(train), options)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    epoch_loss = math.nan
    for _ in range(options.epochs):
        order = torch.randperm(len(train), generator=generator).tolist()
        losses = []
        for start in range(0, len(order), options.batch_size):
            chosen = order[start : start + options.batch_size]
            batch = collate(tokenizer, [train[i] for i in chosen], model)
            loss = model(**batch).loss
            if not torch.isfinite(loss):
                raise HetlmError(
                    f"fine-tuning {spec.name} on {task.name} (seed {seed}) diverged "
                    f"(loss {float(loss)}): lower --lr"
                )
            loss.backward()
            torch.nn.utils.clip_grad_norm_(
                [p for p in model.parameters() if p.requires_grad], options.grad_clip
            )
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        epoch_loss = sum(losses) / len(losses)
    predicted = predict(model, tokenizer, test, options.eval_batch_size)
    return scored(
        seed, [f["labels"] for f in test], predicted, len(task.labels), epoch_loss, started
    )


def scored(
    seed: int, gold: list[int], predicted: list[int], labels: int, loss: float, started: float
) -> SeedResult:
    """One seed's result from its test predictions (``started``: its ``perf_counter``)."""
    confusion = [[0] * labels for _ in range(labels)]
    for g, p in zip(gold, predicted, strict=True):
        confusion[g][p] += 1
    return SeedResult(
        seed=seed,
        accuracy=accuracy(gold, predicted),
        macro_f1=macro_f1(gold, predicted),
        final_train_loss=loss,
        confusion=confusion,
        seconds=time.perf_counter() - started,
    )


@torch.inference_mode()
def predict(
    model: Any, tokenizer: Any, features: list[dict[str, Any]], batch_size: int
) -> list[int]:
    """Argmax labels, in order."""
    model.eval()
    predicted: list[int] = []
    for start in range(0, len(features), batch_size):
        batch = collate(tokenizer, features[start : start + batch_size], model)
        batch.pop("labels")
        predicted.extend(model(**batch).logits.argmax(-1).tolist())
    return predicted


# ---------------------------------------------------------------- all seeds


def ids_digest(examples: Sequence[Example]) -> str:
    """SHA-256 of the example ids, in order: equal digests mean the same data."""
    return hashlib.sha256("\n".join(e.id for e in examples).encode()).hexdigest()


@dataclass
class PreparedTask:
    """A task's examples encoded for one checkpoint, and the empty result they will fill."""

    tokenizer: Any
    train: list[dict[str, Any]]
    test: list[dict[str, Any]]
    decoder: bool
    result: TaskResult


def prepare_task(spec: ModelSpec, task: TaskData, options: FinetuneOptions) -> PreparedTask:
    """The subsampled splits, encoded once and shared by every seed."""
    tokenizer = prepare_tokenizer(spec)
    train_examples = subsample(task.splits["train"], options.max_train_examples, task.name)
    eval_examples = subsample(task.splits[options.eval_split], options.max_eval_examples, task.name)
    if not eval_examples:
        raise HetlmError(f"the {task.name} {options.eval_split} split is empty")
    decoder = is_causal_lm(load_config(spec))
    train = encode(train_examples, tokenizer, options.max_length, decoder)
    test = encode(eval_examples, tokenizer, options.max_length, decoder)
    result = TaskResult(
        spec.name,
        task.name,
        list(task.labels),
        options.eval_split,
        len(train),
        len(test),
        ids_digest(train_examples),
        ids_digest(eval_examples),
        linear_probe=options.linear_probe,
    )
    return PreparedTask(tokenizer, train, test, decoder, result)


def log_run(spec: ModelSpec, task: TaskData, run: SeedResult, log: Log) -> None:
    log(
        f"  {spec.name} / {task.name} / seed {run.seed}: accuracy {run.accuracy:.3f}, "
        f"macro-F1 {run.macro_f1:.3f}, final train loss {run.final_train_loss:.3f} "
        f"({run.seconds:.1f} s)"
    )


def finetune_task(
    spec: ModelSpec,
    task: TaskData,
    seeds: Sequence[int],
    options: FinetuneOptions,
    log: Log = print,
) -> TaskResult:
    """Fine-tune ``spec`` on ``task`` once per seed; the data and its encoding are shared.
    (``options.linear_probe``: :func:`hetlm.evaluate.linear_probe.probe_task` instead.)"""
    if options.linear_probe:  # a result marked "linear probe" must not come from fine-tuning
        raise ValueError("finetune_task fine-tunes; a linear probe is linear_probe.probe_task")
    prepared = prepare_task(spec, task, options)
    for seed in seeds:
        run = train_and_score(
            spec, task, prepared.tokenizer, prepared.train, prepared.test, seed, options
        )
        prepared.result.runs.append(run)
        log_run(spec, task, run, log)
    return prepared.result
