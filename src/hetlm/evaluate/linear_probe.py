"""A linear probe: a linear classifier on the frozen features of a checkpoint, over seeds.

Why not ``AutoModelForSequenceClassification`` with its backbone frozen: it reads an encoder
through parts an MLM checkpoint never trained (BERT's pooler: a random dense layer and tanh,
frozen with the backbone; DeBERTa's pooler), from the ``[CLS]`` output, which the masked-LM
loss never trains either; and it would run the frozen network again for every epoch and seed.
Here the network runs once per split, in inference mode, and gives one vector per example:

- an encoder: the mean of its last hidden states over the example's tokens (every token's
  state is trained by the MLM loss to describe its context);
- a decoder: the last text token's state (the only one that has seen the whole text; the
  closing ``[SEP]`` is already dropped by :func:`hetlm.evaluate.finetune.encode`).

The vectors are standardised with the train split's mean and spread (so one learning rate
suits models whose hidden states differ in scale), then per seed a linear layer (logistic
regression) trains on them with the fine-tuning recipe's AdamW, warm-up and decay, batch size
and epochs. The seed decides the layer's initialisation and the data order, never the data.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from hetlm.errors import HetlmError
from hetlm.evaluate.checkpoint import ModelSpec, load_model
from hetlm.evaluate.finetune import (
    FinetuneOptions,
    Log,
    TaskResult,
    collate,
    log_run,
    optimizer_for,
    prepare_task,
    schedule_for,
    scored,
)
from hetlm.evaluate.tasks import TaskData


def load_backbone(spec: ModelSpec, device: str) -> Any:
    """The checkpoint without any head (``AutoModel``), in fp32 on ``device``, for inference."""
    from transformers import AutoModel

    model, _ = load_model(spec, AutoModel, dtype=torch.float32)
    return model.to(device).eval()


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, decoder: bool) -> torch.Tensor:
    """One vector per row of ``hidden`` [batch, length, width]: the mean over the attended
    tokens (encoder), or the last attended token's state (decoder; either padding side)."""
    mask = attention_mask.to(hidden.dtype)
    if decoder:
        positions = torch.arange(mask.shape[1], device=mask.device, dtype=hidden.dtype)
        last = (mask * (positions + 1)).argmax(-1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)


@torch.inference_mode()
def frozen_features(
    model: Any, tokenizer: Any, features: list[dict[str, Any]], batch_size: int, decoder: bool
) -> torch.Tensor:
    """[examples, width] float32 on the CPU: the pooled last hidden states, in order."""
    pooled = []
    for start in range(0, len(features), batch_size):
        batch = collate(tokenizer, features[start : start + batch_size], model)
        batch.pop("labels")
        hidden = model(**batch).last_hidden_state.float()
        pooled.append(pool(hidden, batch["attention_mask"], decoder).cpu())
    return torch.cat(pooled)


def standardise(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both scaled with the train split's per-feature mean and standard deviation."""
    mean = train.mean(0)
    std = train.std(0, unbiased=False).clamp(min=1e-6)
    return (train - mean) / std, (test - mean) / std


def train_linear_head(
    features: torch.Tensor, labels: torch.Tensor, classes: int, seed: int, options: FinetuneOptions
) -> tuple[nn.Linear, float]:
    """A logistic-regression layer trained on (``features``, ``labels``); returns it and the
    mean loss of its last epoch. Same recipe as fine-tuning: AdamW (no decay on the bias),
    linear warm-up and decay, gradient clipping."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = nn.Linear(features.shape[1], classes)
    optimizer = optimizer_for(head, options)
    scheduler = schedule_for(optimizer, len(features), options)
    generator = torch.Generator().manual_seed(seed)
    epoch_loss = math.nan
    for _ in range(options.epochs):
        order = torch.randperm(len(features), generator=generator)
        losses = []
        for chosen in order.split(options.batch_size):
            loss = F.cross_entropy(head(features[chosen]), labels[chosen])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), options.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        epoch_loss = sum(losses) / len(losses)
    return head, epoch_loss


def probe_task(
    spec: ModelSpec,
    task: TaskData,
    seeds: Sequence[int],
    options: FinetuneOptions,
    log: Log = print,
) -> TaskResult:
    """A linear probe of ``spec`` on ``task`` once per seed, on features computed once."""
    prepared = prepare_task(spec, task, options)
    model = load_backbone(spec, options.device)
    train_x, test_x = standardise(
        *(
            frozen_features(
                model, prepared.tokenizer, split, options.eval_batch_size, prepared.decoder
            )
            for split in (prepared.train, prepared.test)
        )
    )
    del model
    if not torch.isfinite(train_x).all() or not torch.isfinite(test_x).all():
        raise HetlmError(
            f"{spec.name} gives non-finite hidden states on {task.name}: the checkpoint is "
            "broken (a diverged run?); probe another one"
        )
    train_y = torch.tensor([f["labels"] for f in prepared.train])
    gold = [f["labels"] for f in prepared.test]
    for seed in seeds:
        started = time.perf_counter()
        head, loss = train_linear_head(train_x, train_y, len(task.labels), seed, options)
        with torch.no_grad():
            predicted = head(test_x).argmax(-1).tolist()
        run = scored(seed, gold, predicted, len(task.labels), loss, started)
        prepared.result.runs.append(run)
        log_run(spec, task, run, log)
    return prepared.result
