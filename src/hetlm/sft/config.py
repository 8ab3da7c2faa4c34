"""The ``hetlm sft`` configuration: YAML in, one clear error out (as ``hetlm.config``).

It reuses the pretraining sections where they mean the same thing (``run``, ``train``: batch
split, per-rank micro-batches, plan, precision, engine, checkpoints), and from
``hetlm.config.TrainingConfig`` what every run config does with them (the split, the plan file,
the recipe's hyper-parameters), and adds what LoRA
instruction tuning needs: the base ``model`` (a local/hub causal LM, or a preset built from
config for tests and demos), the instruction ``data``, the ``lora`` adapter, and quantization
(QLoRA) and gradient checkpointing in ``model``. Every section forbids unknown keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, ValidationError, model_validator

from hetlm.config import (
    RunSection,
    Section,
    TrainingConfig,
    TrainSection,
    config_help,
    fill_defaults,
    read_yaml,
)
from hetlm.errors import HetlmError
from hetlm.hparams import SFT_RECIPE
from hetlm.user_files import format_validation_error

Quantization = Literal["none", "8bit", "4bit"]
DEFAULT_LR = SFT_RECIPE.learning_rate  # the usual LoRA rate (a full fine-tune would use ~1e-5)


class SFTModelSection(Section):
    init_from: str | None = Field(
        None,
        description="The base causal LM: a save_pretrained folder (e.g. a hetlm pretrain "
        "run's model/) or a hub name.",
    )
    preset: str | None = Field(
        None,
        description="Instead of init_from: a llama preset (tiny|small|base|1b|7b|13b) with "
        "random weights, for tests and demos; saved to <output_dir>/base so the adapter has a "
        "base.",
    )
    type: Literal["llama"] = Field("llama", description="The architecture of a preset.")
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="Extra transformers config fields (preset)."
    )
    dropout: float | None = Field(
        None,
        ge=0.0,
        lt=1.0,
        description="Attention dropout of a preset (default 0); with "
        "init_from, None keeps the checkpoint's.",
    )
    tokenizer: str | None = Field(None, description="Default: the tokenizer saved with init_from.")
    quantization: Quantization = Field(
        "none",
        description="none | 8bit | 4bit (QLoRA: NF4, double quantization): the frozen "
        "base loaded through bitsandbytes; needs a CUDA GPU and `pip install 'hetlm[quant]'`.",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute each layer's activations in the backward: less memory, "
        "~30% more compute.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> SFTModelSection:
        if (self.init_from is None) == (self.preset is None):
            raise ValueError(
                "give exactly one of init_from (a pretrained causal LM) or preset "
                "(a randomly initialised one, for tests)"
            )
        if self.preset is not None and self.tokenizer is None:
            raise ValueError("a preset model needs tokenizer: the folder of its tokenizer")
        if self.preset is not None and self.quantization != "none":
            raise ValueError(
                "quantization loads pretrained weights in 8/4 bits: give init_from, "
                "or set quantization: none for a preset"
            )
        return self

    @property
    def causal(self) -> bool:
        return True

    @property
    def tokenizer_source(self) -> str:
        return str(self.tokenizer or self.init_from)


class SFTDataSection(Section):
    dataset: str | list[str] = Field(
        description="JSONL/JSON files, folders or globs of instruction or chat rows, or a "
        "`datasets` name (e.g. kunishou/databricks-dolly-15k-ja)."
    )
    split: str = Field("train", description="The split of a `datasets` name.")
    template: str = Field(
        "auto",
        description="auto | chat | ja-alpaca | ja-chat | a JSON template file (docs/SFT.md).",
    )
    validation_fraction: float = Field(
        0.02, ge=0.0, lt=1.0, description="Held out by a hash of (seed, index)."
    )
    max_length: int = Field(1024, ge=8, description="Tokens per example, prompt + response.")
    truncation: Literal["left", "middle"] = Field(
        "left", description="Where an over-long prompt is cut (the response never is)."
    )
    min_prompt_tokens: int = Field(
        1, ge=1, description="Drop an example whose response leaves less prompt than this."
    )
    train_on_prompt: bool = Field(False, description="Loss on the prompt tokens too.")
    length_grouping: bool = Field(
        True,
        description="Sort each global batch by length before cutting rank slices and "
        "micro-batches: less padding, the same result.",
    )


class LoraSection(Section):
    r: int = Field(16, gt=0, description="Rank of the update B @ A.")
    alpha: float = Field(32.0, gt=0, description="Scale alpha / r.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the adapter's input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="all-linear: every linear layer of attention and MLP (not the "
        "output head); or module names, e.g. [q_proj, v_proj].",
    )

    @model_validator(mode="after")
    def _some_modules(self) -> LoraSection:
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError("target_modules is empty: give module names or all-linear")
        return self


class SFTConfig(TrainingConfig):
    PLAN_TASK: ClassVar[str] = "sft"  # plans from `hetlm plan --task sft` / --sft-config

    run: RunSection
    model: SFTModelSection
    data: SFTDataSection
    lora: LoraSection = LoraSection()
    train: TrainSection

    @model_validator(mode="after")
    def _fill_recipe_defaults(self) -> SFTConfig:
        """Hyper-parameters left out take the LoRA recipe (``hetlm.hparams.SFT_RECIPE``)."""
        self._sources = fill_defaults(self.train, SFT_RECIPE, {})
        if self.model.dropout is None and self.model.preset is not None:
            self.model.dropout = SFT_RECIPE.dropout
            self._sources["model.dropout"] = SFT_RECIPE.source("dropout")
        return self

    def check_plan_settings(self, plan) -> None:
        """The plan's LoRA settings must be this run's: they sized every rank's micro-batch."""
        if plan.lora is None:
            return
        targets = self.lora.target_modules
        run = {
            "quantization": self.model.quantization,
            "r": self.lora.r,
            "target_modules": targets if isinstance(targets, str) else list(targets),
            "gradient_checkpointing": self.model.gradient_checkpointing,
        }
        differ = [
            f"{key} {plan.lora.get(key)!r} (this config: {value!r})"
            for key, value in run.items()
            if plan.lora.get(key) != value
        ]
        if differ:
            raise HetlmError(
                f"the plan {self.train.plan} was made for other LoRA settings: "
                f"{'; '.join(differ)}: re-plan with `hetlm plan --sft-config`"
            )


def parse_sft_config(raw: Any, source: str = "config") -> SFTConfig:
    if not isinstance(raw, dict):
        raise HetlmError(
            f"{source}: expected a mapping with run/model/data/lora/train sections, "
            f"got {type(raw).__name__}"
        )
    try:
        return SFTConfig.model_validate(raw)
    except ValidationError as exc:
        raise HetlmError(
            format_validation_error(exc, f"invalid {source}", keys_help="`hetlm sft --help-config`")
        ) from None


def load_sft_config(path: str | Path) -> SFTConfig:
    return parse_sft_config(read_yaml(path), source=str(path))


def sft_config_help() -> str:
    """Every key with its default and description (SFT's own defaults where they differ)."""
    return config_help(SFTConfig, descriptions=_SFT_DESCRIPTIONS, skip=("train.mlm_probability",))


_SFT_DESCRIPTIONS = {
    "train.learning_rate": f"None: {DEFAULT_LR:g} (LoRA; table below).",
    "train.warmup_steps": "None: warmup_ratio if given, else 3% of max_steps (table below).",
    "train.lr_scheduler_type": "linear | cosine | cosine_with_min_lr | constant_with_warmup. "
    "None: cosine (table below).",
    "train.max_eval_samples": "Validation examples evaluated (response-token loss, perplexity).",
}
