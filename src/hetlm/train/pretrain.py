"""Pretraining recipes: masked LM (BERT, RoBERTa, DeBERTaV2), ELECTRA and causal LM (LLaMA),
from scratch or continued from a checkpoint, on a packed dataset (``hetlm prepare``).

The loop is ``hetlm.train.trainer``; this module says what it trains: the packed data and its
readers (``train/objectives.py``: which reader and objective a model type uses), the model
(a preset, or ``model.init_from`` with its tokenizer checked against the dataset's), what a
resume must not change, and the final ``save_pretrained`` folder with the tokenizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from hetlm.config import PretrainConfig
from hetlm.data.readers import special_ids
from hetlm.data.sampler import HeterogeneousBatchSampler
from hetlm.errors import HetlmError
from hetlm.models.build import build_model, freeze, load_pretrained, tokenizer_source
from hetlm.models.source import check_positions
from hetlm.topology import BatchSplit
from hetlm.train import distributed as D
from hetlm.train.checkpoint import load_model_weights
from hetlm.train.objectives import build_data, objective_module
from hetlm.train.recipe import RunData
from hetlm.train.trainer import Trainer, run_training


def check_tokenizer_matches(init_from: str, model: torch.nn.Module, meta: dict[str, Any]) -> None:
    """Refuse data tokenized with another vocabulary than the checkpoint was trained on: the
    token ids would mean other words, and training would silently start from nonsense."""
    from hetlm.data.tokenizer import vocab_hash

    rows = model.get_input_embeddings().num_embeddings
    vocab_size = int(meta["vocab_size"])
    tokenizer = None
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(init_from)
        if not tokenizer.get_vocab():
            tokenizer = None
    except (OSError, ValueError, TypeError):
        tokenizer = None
    if tokenizer is not None:
        if vocab_hash(tokenizer) != meta.get("tokenizer_vocab_hash"):
            raise HetlmError(
                f"the dataset was tokenized with {meta.get('tokenizer_dir')}, not with the "
                f"tokenizer of model.init_from {init_from} (their vocabularies differ): run "
                f"`hetlm prepare ... --tokenizer {init_from}` and train on that dataset"
            )
    elif vocab_size != rows:
        raise HetlmError(
            f"model.init_from {init_from} has no tokenizer and {rows} token embeddings, but the "
            f"dataset's vocabulary has {vocab_size} tokens: prepare the data with the "
            "checkpoint's tokenizer"
        )
    if vocab_size > rows:
        raise HetlmError(
            f"the dataset's vocabulary ({vocab_size}) is larger than model.init_from "
            f"{init_from}'s embeddings ({rows}): use the checkpoint's tokenizer"
        )


def _fingerprint(config: PretrainConfig, meta: dict[str, Any]) -> dict[str, Any]:
    """What must not change across a resume (the split may). The dataset is identified by its
    content (sequences per split, sequence length, the tokenizer's vocabulary hash), not by its
    path, which may move; the paths are kept to name them in a refusal."""
    return {
        "dataset_vocab_hash": meta.get("tokenizer_vocab_hash"),
        "dataset_sequences": meta.get("num_sequences"),
        "seq_len": meta["seq_len"],
        "vocab_size": meta["vocab_size"],
        "model": config.model.model_dump(mode="json"),
        "global_batch": config.train.global_batch,
        "seed": config.run.seed,
        "dataset_path": str(config.data.dataset),
        "tokenizer_dir": str(meta.get("tokenizer_dir")),
    }


class PretrainingRecipe:
    """Pretraining on a packed dataset: see the module docstring."""

    command = "pretrain"

    def __init__(self, config: PretrainConfig) -> None:
        self.config = config
        self.perplexity = bool(config.model.causal)
        self.tokenizer_dir: Path | None = None

    def load_data(self, run: Trainer) -> RunData:
        """The packed dataset's train and validation splits, each read as micro-batches of
        the model type's objective (``train/objectives.py``)."""
        from hetlm.data.packed import load_packed_dataset
        from hetlm.data.staging import resolve_dataset_path

        config = self.config
        dataset_path = resolve_dataset_path(
            config.data.dataset, config.data.local_copy, report=print if run.ctx.is_main else None
        )
        dataset, meta = load_packed_dataset(dataset_path)
        self.tokenizer_dir = Path(config.data.tokenizer or meta["tokenizer_dir"])
        return RunData(
            build_data(config, dataset["train"], meta),
            build_data(config, dataset["validation"], meta),
            meta,
        )

    def sampler(
        self, data: RunData, split: BatchSplit, rank: int, seed: int
    ) -> HeterogeneousBatchSampler:
        return HeterogeneousBatchSampler(len(data.train), split, rank, seed)

    def fingerprint(self, data: RunData) -> dict[str, Any]:
        return _fingerprint(self.config, data.meta)

    def load_weights(self, model: nn.Module, path: Path) -> None:
        """The checkpoint's weights into the freshly built model (before the engine wraps it)."""
        load_model_weights(model, path)

    def objective(self, model: nn.Module) -> nn.Module:
        return objective_module(self.config, model)

    def has_validation(self, data: RunData) -> bool:
        return True

    def build_model(self, run: Trainer, data: RunData) -> nn.Module:
        """From the preset (seeded: the same weights on every rank), or the checkpoint
        ``model.init_from`` (continued pretraining: its tokenizer must be the dataset's)."""
        section, meta = self.config.model, data.meta
        if section.init_from is None:
            special = special_ids(meta)
            return build_model(
                section,
                vocab_size=int(meta["vocab_size"]),
                pad_token_id=special["pad"],
                max_position_embeddings=max(512, data.train.seq_len),
                seed=self.config.run.seed,
                special_ids=special,
            )
        model = load_pretrained(section)
        for part in [getattr(model, p) for p in getattr(model, "artifact_subdirs", ())] or [model]:
            check_positions(
                part.config,
                int(meta["seq_len"]),
                "the dataset's seq_len",
                str(section.init_from),
                "model.init_from",
                fix="prepare the data again with --seq-len {positions} or less",
            )
        check_tokenizer_matches(tokenizer_source(section), model, meta)
        frozen = freeze(
            model, embeddings=section.freeze_embeddings, first_layers=section.freeze_layers
        )
        if run.ctx.is_main:
            total = sum(p.numel() for p in model.parameters())
            print(
                f"continuing from {section.init_from}: {total / 1e6:.1f}M parameters"
                + (f", {frozen / 1e6:.1f}M frozen" if frozen else "")
            )
        return model

    def save_final(self, run: Trainer) -> Path:
        """The model as ``save_pretrained`` writes it, with the tokenizer beside it."""
        from hetlm.data.tokenizer import TOKENIZER_FILES, load_tokenizer, save_tokenizer

        final = run.output_dir / "model"
        state = run.engine.model_state_dict()  # a collective: gathered to rank 0
        if run.ctx.is_main:
            run.hf_model.save_pretrained(final, safe_serialization=True, state_dict=dict(state))
            assert self.tokenizer_dir is not None
            tokenizer = load_tokenizer(self.tokenizer_dir, required_tokens=())
            # a model saved as several loadable parts (ELECTRA) gets the tokenizer in each
            for part in getattr(run.hf_model, "artifact_subdirs", ("",)):
                save_tokenizer(tokenizer, final / part)
                if not any((final / part / name).is_file() for name in TOKENIZER_FILES):
                    raise HetlmError(
                        f"the tokenizer from {self.tokenizer_dir} saved no files "
                        f"into {final / part}: check data.tokenizer"
                    )
        D.barrier(run.ctx)
        return final

    def summary(self, run: Trainer, summary: dict[str, Any]) -> dict[str, Any]:
        return summary


def run_pretraining(
    config: PretrainConfig,
    *,
    resume: bool | str | Path = False,
    overwrite: bool = False,
    extend: str | None = None,
    stop_at_step: int | None = None,
    trainer: type[Trainer] = Trainer,
) -> dict[str, Any]:
    """Run (or resume) one pretraining job in this process (``run_training`` with the
    pretraining recipe); returns the run summary."""
    return run_training(
        config,
        PretrainingRecipe(config),
        resume=resume,
        overwrite=overwrite,
        extend=extend,
        stop_at_step=stop_at_step,
        trainer=trainer,
    )
