"""LoRA instruction tuning in the shared training loop (``hetlm sft``).

:class:`InstructionTuningRecipe` is the trainer's recipe (``hetlm.train.recipe``) for it:
the data are tokenized instruction examples (response-only labels, ``hetlm.sft.masking``), the
model is a causal LM with a peft LoRA adapter, and the final output is the adapter. Everything
else is the trainer (``hetlm.train.trainer``): the heterogeneous sampler (per-rank micro-batch sizes,
gradient accumulation), ``train_step`` (token-exact loss: summed over response tokens, divided
by the response tokens of the whole global batch), the engines, checkpoints with exact resume,
evaluation and metrics.

- **Objective**: ``FusedSparseCausalLM`` (``hetlm.models.causal_head``) projects only the
  positions whose next token is a response token onto the vocabulary (the prompt's share of the
  output head's cost, large with a 32k+ vocabulary, is never paid), and runs that head with the
  cross-entropy in chunks that compute their gradient at once, so no ``[tokens, vocab]`` logits
  tensor is kept for the backward.
- **Length grouping** (``data.length_grouping``, on by default): each global batch is sorted by
  length (``order_by_length``) before it is cut into rank slices and micro-batches, so examples
  of similar length are padded together. Every rank computes the same order and the step sees
  the same examples, so the result does not depend on it (nor on the split).
- **Checkpoints** hold the adapter (``adapter_model.safetensors`` + ``adapter_config.json``,
  written by peft) with the optimizer, scheduler, RNG and sampler states, not the frozen base.
- **Output**: ``<output_dir>/adapter``, a peft adapter folder with the tokenizer and the prompt
  template (``hetlm_template.json``), for ``PeftModel.from_pretrained``, ``hetlm chat
  --adapter`` and ``hetlm export --merge``. A base built from a preset is saved to
  ``<output_dir>/base`` so the adapter has something to load onto.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from hetlm.cluster.precision import frozen_base_precision
from hetlm.data.sampler import HeterogeneousBatchSampler
from hetlm.errors import HetlmError
from hetlm.models.causal_head import FusedSparseCausalLM
from hetlm.models.source import check_positions, require_causal_lm, resolve_model_source
from hetlm.sft.collator import SFTBatch, SFTCollator, order_by_length
from hetlm.sft.config import LoraSection, SFTConfig, SFTModelSection
from hetlm.sft.export import import_peft, write_folder
from hetlm.sft.masking import TokenizedExample, TruncationStats
from hetlm.topology import BatchSplit
from hetlm.train import distributed as D
from hetlm.train.collective import collective_io
from hetlm.train.recipe import RunData

if TYPE_CHECKING:
    from hetlm.train.trainer import Trainer

ADAPTER_WEIGHTS = "adapter_model.safetensors"
RUN_RECORD = "hetlm_sft.json"


# ---------------------------------------------------------------- data


class SFTData:
    """Tokenized examples plus the collator: indices in, :class:`SFTBatch` out."""

    def __init__(self, examples: list[TokenizedExample], pad_id: int) -> None:
        self.examples = examples
        self.lengths = np.array([len(e) for e in examples], dtype=np.int64)
        self.collator = SFTCollator(pad_id)

    def __len__(self) -> int:
        return len(self.examples)

    def batch(self, indices: np.ndarray, epoch: int = 0) -> SFTBatch:
        """Nothing is random in SFT: ``epoch`` is accepted for the loop's interface only."""
        return self.collator([self.examples[int(i)] for i in indices])


class LengthGroupedSampler(HeterogeneousBatchSampler):
    """The heterogeneous sampler, each global batch ordered longest first before it is cut
    into rank slices and micro-batches (a pure function of the indices and lengths: every rank
    computes the same order; state and resume are the base sampler's)."""

    def __init__(self, lengths: np.ndarray, split: BatchSplit, rank: int, seed: int = 0) -> None:
        super().__init__(len(lengths), split, rank, seed)
        self.lengths = np.asarray(lengths, dtype=np.int64)

    def global_batch(self, epoch: int, step_in_epoch: int) -> np.ndarray:
        return order_by_length(super().global_batch(epoch, step_in_epoch), self.lengths)


# ---------------------------------------------------------------- tokenizer and model


def load_sft_tokenizer(source: str | Path):
    """The tokenizer, with BOS/EOS/PAD set: a hetlm SentencePiece tokenizer is BERT-style, and
    a LLaMA pretrained by hetlm begins texts with [CLS] and ends them with [SEP] (its config's
    bos/eos), so those become BOS and EOS; PAD falls back to EOS."""
    from hetlm.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(source, required_tokens=())
    if tokenizer.eos_token is None and tokenizer.sep_token is not None:
        tokenizer.eos_token = tokenizer.sep_token
    if tokenizer.bos_token is None and tokenizer.cls_token is not None:
        tokenizer.bos_token = tokenizer.cls_token
    if tokenizer.eos_token is None:
        raise HetlmError(
            f"the tokenizer {source} has no eos_token (nor sep_token): responses "
            "must end with one; use a tokenizer that defines it"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_quantization(kind: str) -> None:
    """8/4-bit loading needs bitsandbytes and a CUDA GPU: say which is missing, in one line."""
    if kind == "none":
        return
    missing = []
    if not torch.cuda.is_available():
        missing.append("a CUDA GPU")
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("bitsandbytes (pip install 'hetlm[quant]')")
    if missing:
        raise HetlmError(
            f"model.quantization {kind} loads the base through bitsandbytes, which "
            f"needs {' and '.join(missing)}: run on a CUDA machine with it "
            "installed, or set model.quantization: none"
        )


def bnb_config(kind: str, precision: str):
    """QLoRA's settings: NF4 with double quantization, computing in the run plan's precision
    (bf16; fp16 where some GPU lacks bf16, e.g. a V100: never emulated bf16)."""
    from transformers import BitsAndBytesConfig

    if kind == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
    )


def frozen_base_dtype(device: torch.device, precision: str) -> torch.dtype:
    """The dtype of the frozen base weights on ``device`` for a job training in ``precision``
    (the rule: ``hetlm.cluster.precision.frozen_base_precision``)."""
    held = frozen_base_precision(device.type == "cuda", precision)
    return torch.bfloat16 if held == "bf16" else torch.float32


def base_source(init_from: str) -> str:
    """``model.init_from`` as ``from_pretrained`` takes it: an existing folder with a
    ``config.json`` (a local-looking path never goes to the hub), or a hub name."""
    source = resolve_model_source(init_from, "model.init_from")
    if Path(source).exists() and not (Path(source) / "config.json").is_file():
        raise HetlmError(
            f"model.init_from {source} has no config.json: point it at a folder written "
            "by save_pretrained (e.g. a hetlm pretrain run's model/)"
        )
    return source


def build_base_model(
    section: SFTModelSection,
    tokenizer,
    *,
    max_length: int,
    seed: int,
    device: torch.device,
    precision: str = "fp32",
) -> nn.Module:
    """The base causal LM: from ``section.init_from`` (fp32, or 8/4-bit computing in
    ``precision``), or a seeded preset."""
    from transformers import AutoModelForCausalLM

    if section.preset is not None:
        from hetlm.models.build import from_config_seeded
        from hetlm.models.presets import model_config

        config = model_config(
            section.type,
            section.preset,
            vocab_size=len(tokenizer),
            max_position_embeddings=max(512, max_length),
            pad_token_id=tokenizer.pad_token_id,
            dropout=section.dropout,
            overrides=section.overrides,
            special_ids={"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id},
        )
        return from_config_seeded(config, seed).to(frozen_base_dtype(device, precision))
    check_quantization(section.quantization)
    kwargs: dict[str, Any] = dict(section.overrides)
    if section.quantization != "none":
        kwargs.update(
            quantization_config=bnb_config(section.quantization, precision), device_map={"": device}
        )
    else:
        kwargs.update(dtype=frozen_base_dtype(device, precision))
    source = base_source(section.init_from)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HetlmError(
            f"cannot load model.init_from {source!r} as a causal LM: {first}"
        ) from None
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise HetlmError(
            f"the tokenizer has {len(tokenizer)} tokens but model.init_from {source} "
            f"has {rows} token embeddings: use the model's own tokenizer"
        )
    return model


def check_base_model(section: SFTModelSection, max_length: int) -> None:
    """Before any data or weights are loaded: model.init_from exists (a local-looking path never goes
    to the hub), is a causal LM (a BERT would load into a causal head and fail on tensor
    sizes), and has positions for data.max_length. A preset base is sized to max_length."""
    if section.init_from is None:
        return
    from transformers import AutoConfig

    source = base_source(section.init_from)
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HetlmError(f"cannot read the config of model.init_from {source!r}: {first}") from None
    require_causal_lm(config, source, "model.init_from", "hetlm sft")
    check_positions(config, max_length, "data.max_length", source, "model.init_from")


def apply_lora(
    model: nn.Module,
    lora: LoraSection,
    *,
    base_name: str | None,
    seed: int,
    gradient_checkpointing: bool,
    quantized: bool,
) -> nn.Module:
    """The peft model: LoRA layers in place, only they train. The adapter's initialisation is
    seeded, so every rank (and every split) starts from the same weights."""
    peft = import_peft()
    gc_kwargs = {"use_reentrant": False}
    if quantized:
        model = peft.prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs=gc_kwargs,
        )
    elif gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers 5's name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=gc_kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
    model.config.use_cache = False  # no KV cache while training
    if base_name:  # peft records the model's name_or_path as the adapter's base
        model.name_or_path = base_name
    config = peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        bias="none",
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # peft reads transformers' deprecated is_gradient_checkpointing
        warnings.filterwarnings(
            "ignore", message=".*is_gradient_checkpointing", category=FutureWarning
        )
        torch.manual_seed(seed)
        try:
            return peft.get_peft_model(model, config)
        except ValueError as exc:  # e.g. target modules not found in the model
            message = " ".join(str(exc).split())
            raise HetlmError(f"lora.target_modules: {message}") from None


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- the run


class InstructionTuningRecipe:
    """Instruction data, a LoRA model and an adapter as output: the trainer's recipe
    (``hetlm.train.recipe``) for ``hetlm sft``."""

    command = "sft"
    perplexity = True

    def __init__(self, config: SFTConfig) -> None:
        check_quantization(config.model.quantization)
        check_base_model(config.model, config.data.max_length)
        self.config = config

    # ---- set-up

    def load_data(self, run: Trainer) -> RunData:
        from hetlm.chat.templates import resolve_template
        from hetlm.data.tokenizer import vocab_hash
        from hetlm.sft.data import load_examples, split_validation
        from hetlm.sft.masking import tokenize_examples

        cfg, data = self.config, self.config.data
        self.output_dir = run.output_dir
        self.tokenizer = load_sft_tokenizer(cfg.model.tokenizer_source)
        self.template = resolve_template(data.template, self.tokenizer)
        examples = load_examples(data.dataset, split=data.split)
        train, validation = split_validation(examples, data.validation_fraction, cfg.run.seed)
        options = dict(
            max_length=data.max_length,
            train_on_prompt=data.train_on_prompt,
            truncation=data.truncation,
            min_prompt_tokens=data.min_prompt_tokens,
        )
        train_tok, self.truncation_stats = tokenize_examples(
            train, self.tokenizer, self.template, **options
        )
        eval_tok, _ = tokenize_examples(validation, self.tokenizer, self.template, **options)
        if run.ctx.is_main:
            print(self.truncation_stats.summary())
        if not train_tok:
            raise HetlmError(
                f"no training example of {data.dataset} fits data.max_length "
                f"{data.max_length}: raise it"
            )
        if cfg.train.eval_steps and not eval_tok:
            raise HetlmError(
                "train.eval_steps is set but there are no validation examples: "
                "raise data.validation_fraction or set train.eval_steps: 0"
            )
        pad_id = self.tokenizer.pad_token_id
        meta = {
            "train_examples": len(train_tok),
            "validation_examples": len(eval_tok),
            "tokenizer_vocab_hash": vocab_hash(self.tokenizer),
        }
        return RunData(SFTData(train_tok, pad_id), SFTData(eval_tok, pad_id), meta)

    def sampler(
        self, data: RunData, split: BatchSplit, rank: int, seed: int
    ) -> HeterogeneousBatchSampler:
        if self.config.data.length_grouping:
            assert isinstance(data.train, SFTData)
            return LengthGroupedSampler(data.train.lengths, split, rank, seed)
        return HeterogeneousBatchSampler(len(data.train), split, rank, seed)

    @property
    def base_name(self) -> str:
        """What the adapter records as its base: model.init_from, or the saved preset base."""
        section = self.config.model
        return (
            str(section.init_from)
            if section.init_from is not None
            else str(self.output_dir / "base")
        )

    def build_model(self, run: Trainer, data: RunData) -> nn.Module:
        cfg, ctx = self.config, run.ctx
        model = build_base_model(
            cfg.model,
            self.tokenizer,
            max_length=cfg.data.max_length,
            seed=cfg.run.seed,
            device=ctx.device,
            precision=run.run_plan.precision,
        )
        if cfg.model.preset is not None:
            self._save_preset_base(model, ctx)
        model = apply_lora(
            model,
            cfg.lora,
            base_name=self.base_name,
            seed=cfg.run.seed,
            gradient_checkpointing=cfg.model.gradient_checkpointing,
            quantized=cfg.model.quantization != "none",
        )
        if ctx.is_main:
            trainable, total = count_parameters(model)
            print(
                f"LoRA r={cfg.lora.r} on {cfg.lora.target_modules}: {trainable / 1e6:.2f}M "
                f"trainable of {total / 1e6:.1f}M parameters ({trainable / total:.2%})"
            )
        return model

    def _save_preset_base(self, model: nn.Module, ctx: D.DistContext) -> None:
        """(rank 0) A preset's random base, once, so the adapter can be loaded onto it."""
        from hetlm.data.tokenizer import save_tokenizer

        base = self.output_dir / "base"

        def write(tmp: Path) -> None:
            model.save_pretrained(tmp, safe_serialization=True)
            save_tokenizer(self.tokenizer, tmp)

        collective_io(
            ctx,
            lambda: (
                ctx.is_main and not (base / "config.json").is_file() and write_folder(base, write)
            ),
        )

    def fingerprint(self, data: RunData) -> dict[str, Any]:
        cfg = self.config
        model = cfg.model.model_dump(mode="json", exclude={"gradient_checkpointing"})
        config_data = cfg.data.model_dump(mode="json", exclude={"length_grouping"})
        return {
            **data.meta,
            "model": model,
            "data": config_data,
            "lora": cfg.lora.model_dump(mode="json"),
            "global_batch": cfg.train.global_batch,
            "seed": cfg.run.seed,
        }

    def load_weights(self, model: nn.Module, path: Path) -> None:
        """The checkpoint's adapter weights (the base is rebuilt from model.init_from / preset)."""
        from safetensors.torch import load_file

        file = path / ADAPTER_WEIGHTS
        if not file.is_file():
            raise HetlmError(
                f"checkpoint {path} has no {ADAPTER_WEIGHTS}: it was not written by "
                "hetlm sft; start a new run.output_dir"
            )
        result = import_peft().set_peft_model_state_dict(model, load_file(str(file)))
        missing = [k for k in result.missing_keys if "lora_" in k]
        if missing or result.unexpected_keys:
            raise HetlmError(
                f"checkpoint {path} does not match the LoRA model (missing "
                f"{missing[:3]}, unexpected {result.unexpected_keys[:3]}): resume "
                "with the lora settings it was trained with"
            )

    def objective(self, model: nn.Module) -> nn.Module:
        return FusedSparseCausalLM(model)

    # ---- evaluation and output

    def has_validation(self, data: RunData) -> bool:
        """Held-out response tokens exist (none with data.validation_fraction 0)."""
        return len(data.validation) > 0

    def save_final(self, run: Trainer) -> Path:
        """The peft adapter folder with the tokenizer, the template and a run record."""
        from hetlm.chat.templates import save_template
        from hetlm.data.tokenizer import save_tokenizer

        final = run.output_dir / "adapter"
        state = run.engine.model_state_dict()  # a collective: gathered to rank 0
        model, ctx = run.hf_model, run.ctx

        def write(tmp: Path) -> None:
            model.save_pretrained(
                tmp, safe_serialization=True, state_dict=dict(state), save_embedding_layers=False
            )
            save_tokenizer(self.tokenizer, tmp)
            save_template(self.template, tmp)
            record = {
                "base_model": self.base_name,
                "steps": run.step,
                "config": self.config.model_dump(mode="json"),
                "truncation": _stats_record(self.truncation_stats),
            }
            (tmp / RUN_RECORD).write_text(
                json.dumps(record, ensure_ascii=False, indent=1) + "\n", encoding="utf-8"
            )

        collective_io(ctx, lambda: ctx.is_main and write_folder(final, write))
        return final

    def summary(self, run: Trainer, summary: dict[str, Any]) -> dict[str, Any]:
        summary.update(
            adapter_dir=summary["model_dir"],
            base_model=self.base_name,
            train_examples=len(run.train_data),
            validation_examples=len(run.eval_data),
            response_tokens=self.truncation_stats.target_tokens,
        )
        return summary


def _stats_record(stats: TruncationStats) -> dict[str, Any]:
    return {
        k: getattr(stats, k)
        for k in (
            "max_length",
            "examples",
            "kept",
            "truncated",
            "dropped",
            "prompt_tokens_removed",
            "target_tokens",
        )
    }


def run_sft(
    config: SFTConfig,
    *,
    resume: bool | str | Path = False,
    overwrite: bool = False,
    extend: str | None = None,
    stop_at_step: int | None = None,
) -> dict[str, Any]:
    """Run (or resume) one instruction-tuning job in this process; returns the run summary.
    The process set-up (threads, process group, restarts, the output folder's run, diagnosing
    a hung collective) is pretraining's."""
    from hetlm.train.trainer import run_training

    check_quantization(config.model.quantization)  # before any process group exists
    return run_training(
        config,
        InstructionTuningRecipe(config),
        resume=resume,
        overwrite=overwrite,
        extend=extend,
        stop_at_step=stop_at_step,
    )
