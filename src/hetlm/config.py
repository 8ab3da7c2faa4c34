"""Typed, validated run configuration: YAML in, one clear error out.

Every section is a pydantic model with ``extra="forbid"``, so a misspelt key is an error rather
than a silently ignored setting. All problems of a file are collected into one ``HetlmError``
line that names each bad field by its path (``train.global_batch: ...``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from hetlm.errors import HetlmError
from hetlm.hparams import (
    CONTINUED_LR,
    CONTINUED_SOURCE,
    CONTINUED_WARMUP_RATIO,
    Recipe,
    pretrain_recipe,
    recipe_table,
)
from hetlm.names import RENAMED_KEYS, rename_config_keys
from hetlm.topology import BatchSplit
from hetlm.user_files import format_validation_error

Precision = Literal["auto", "fp32", "bf16", "fp16"]
Schedule = Literal["linear", "cosine", "cosine_with_min_lr", "constant_with_warmup"]


class Section(BaseModel):
    """A config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunSection(Section):
    output_dir: Path = Field(description="Where checkpoints, metrics and the final model go.")
    seed: int = Field(
        0, description="Seeds init, data order and masking (all pure functions of it)."
    )


class DataSection(Section):
    dataset: Path = Field(description="A packed dataset made by `hetlm prepare`.")
    tokenizer: Path | None = Field(None, description="Defaults to the dataset's tokenizer.")
    local_copy: Path | None = Field(
        None,
        description="A node-local copy made by `hetlm stage`; read when it is complete "
        "and current, else the shared dataset is read (and the reason printed).",
    )
    whole_word_masking: bool | None = Field(
        None,
        description="Mask every piece of a chosen word together; None: on when the "
        "tokenizer segments words (MeCab/Sudachi + WordPiece).",
    )


ModelType = Literal["bert", "roberta", "deberta-v2", "electra", "llama"]


class ModelSection(Section):
    type: ModelType = Field(
        "bert",
        description="bert | roberta | deberta-v2 (masked LM), "
        "electra (replaced-token detection), llama (causal LM).",
    )
    preset: str = Field(
        "small",
        description="Encoders: tiny | small | base | large; llama: "
        "tiny | small | base | 1b | 7b | 13b. Ignored with init_from.",
    )
    dropout: float | None = Field(
        None,
        ge=0.0,
        lt=1.0,
        description="Hidden and attention dropout. None: the recipe's "
        "(encoders 0.1, llama 0); with init_from, the checkpoint's.",
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="Extra transformers config fields."
    )
    init_from: str | None = Field(
        None,
        description="Continued pretraining: a save_pretrained folder or a hub name; its "
        "tokenizer must be the dataset's.",
    )
    freeze_embeddings: bool = Field(False, description="Do not train the input embeddings.")
    freeze_layers: int = Field(0, ge=0, description="Do not train the first k transformer layers.")
    generator_fraction: float = Field(
        0.25,
        gt=0.0,
        le=1.0,
        description="electra: the generator's hidden size, heads and MLP "
        "width as a fraction of the discriminator's (same depth, shared embeddings).",
    )
    discriminator_weight: float = Field(
        50.0,
        gt=0.0,
        description="electra: weight of the replaced-token-detection loss (the generator's is 1).",
    )

    @model_validator(mode="after")
    def _electra_fields_need_electra(self) -> ModelSection:
        given = {"generator_fraction", "discriminator_weight"} & self.model_fields_set
        if given and self.type != "electra":
            raise ValueError(
                f"{', '.join(sorted(given))}: only for model.type electra; "
                f"remove it for {self.type}"
            )
        return self

    @model_validator(mode="after")
    def _freezing_needs_a_checkpoint(self) -> ModelSection:
        if (self.freeze_embeddings or self.freeze_layers) and self.init_from is None:
            raise ValueError(
                "freeze_embeddings / freeze_layers keep pretrained weights: set "
                "init_from too (freezing a random initialisation trains nothing "
                "useful)"
            )
        return self

    @property
    def causal(self) -> bool:
        return self.type == "llama"


class MicroBatchSection(Section):
    """Micro-batch size per node (every rank on node i uses per_node[i]) or per rank."""

    per_node: list[int] | None = None
    per_rank: list[int] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> MicroBatchSection:
        if (self.per_node is None) == (self.per_rank is None):
            raise ValueError("give exactly one of per_node or per_rank")
        sizes = self.per_node if self.per_node is not None else self.per_rank
        if not sizes or any(m < 1 for m in sizes):
            raise ValueError("micro-batch sizes must be positive integers")
        return self


class TrainSection(Section):
    global_batch: int = Field(gt=0, description="Samples per optimizer step, over all ranks.")
    micro_batch: MicroBatchSection | int | None = Field(
        None,
        description="An int (same on every rank), {per_node: [...]}, or {per_rank: [...]}; "
        "not needed with a plan.",
    )
    plan: Path | None = Field(
        None, description="A plan from `hetlm plan` (or --plan): per-rank shares and precision."
    )
    max_steps: int = Field(gt=0)
    learning_rate: float | None = Field(
        None,
        gt=0,
        description="Peak learning rate. None: the recipe's (model type and preset, "
        "table below); 1e-4 when continuing (model.init_from).",
    )
    warmup_steps: int | None = Field(
        None,
        ge=0,
        description="Linear warm-up steps. None: warmup_ratio if given, else the "
        "recipe's (the paper's steps, at most 10% of max_steps, at least 1); 6% of max_steps "
        "when continuing.",
    )
    warmup_ratio: float | None = Field(
        None, ge=0, lt=1, description="Warm-up as a share of max_steps (instead of warmup_steps)."
    )
    lr_scheduler_type: Schedule | None = Field(
        None,
        description="linear | cosine | cosine_with_min_lr | constant_with_warmup (after "
        "the warm-up). None: the recipe's (encoders linear, llama cosine_with_min_lr).",
    )
    min_lr_rate: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="cosine_with_min_lr: the final lr as a share of the peak. "
        "None: the recipe's (0.1, LLaMA).",
    )
    weight_decay: float | None = Field(
        None,
        ge=0,
        description="AdamW weight decay (never on biases and norms). None: the recipe's.",
    )
    adam_beta1: float | None = Field(None, ge=0, lt=1, description="None: the recipe's.")
    adam_beta2: float | None = Field(
        None, ge=0, lt=1, description="None: the recipe's (RoBERTa 0.98, LLaMA 0.95, else 0.999)."
    )
    adam_epsilon: float | None = Field(None, gt=0, description="None: the recipe's.")
    max_grad_norm: float | None = Field(
        None, ge=0, description="Gradient clipping; 0 disables it. None: the recipe's."
    )
    precision: Precision = Field(
        "auto",
        description="auto | fp32 | bf16 | fp16 (fp16 on CPU: "
        "slow, for testing the overflow logic).",
    )
    engine: Literal["auto", "ddp", "zero1", "fsdp2", "deepspeed"] = Field(
        "auto", description="auto: the plan's engine, else one for zero_stage (ddp for 0)."
    )
    zero_stage: Literal["auto", 0, 1, 2, 3] = Field(
        "auto",
        description="auto: the plan's stage, else the engine's smallest (ddp 0, zero1 1, "
        "fsdp2 2, deepspeed 0).",
    )
    bucket_cap_mb: float | None = Field(
        None, gt=0, description="DDP gradient bucket size in MB (ddp, zero1); None: torch's 25."
    )
    grad_compression: Literal["none", "fp16", "bf16"] = Field(
        "none",
        description="16-bit gradient all-reduce (ddp, zero1): half the traffic, results "
        "differ by 16-bit rounding (~1e-3).",
    )
    deepspeed_config: Path | None = Field(
        None,
        description="A DeepSpeed JSON (engine deepspeed); batch sizes, clipping and "
        "precision are filled in from this config.",
    )
    mlm_probability: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Share of tokens masked (masked LM, ELECTRA). None: the "
        "recipe's (0.15; ELECTRA-large 0.25).",
    )
    save_steps: int = Field(0, ge=0, description="Checkpoint every N steps; 0: only at the end.")
    save_total_limit: int = Field(2, ge=1, description="Checkpoints kept (the newest).")
    eval_steps: int = Field(0, ge=0, description="Evaluate every N steps; 0: only at the end.")
    max_eval_samples: int = Field(256, ge=0, description="Validation samples evaluated.")
    per_device_eval_batch_size: int = Field(16, gt=0, description="Evaluation batch per rank.")
    logging_steps: int = Field(
        10,
        gt=0,
        description="Progress-bar and report_to cadence (and step 1); JSONL has every step.",
    )
    report_to: list[str] = Field(
        default_factory=lambda: ["tensorboard"],
        description="Experiment trackers: a list of "
        "tensorboard, wandb, mlflow, or none (wandb/mlflow: pip install 'hetlm[track]').",
    )
    dist_timeout_s: float = Field(
        600.0,
        gt=0,
        description="A collective slower than this ends "
        "the run, naming the ranks that did not arrive (heartbeats).",
    )
    on_nonfinite: Literal["stop", "rollback"] = Field(
        "stop",
        description="A NaN/inf loss (fp32/bf16): stop naming the last good checkpoint, "
        "or roll back to it in-process with the lr times rollback_lr_factor (ddp/zero1/one "
        "process).",
    )
    rollback_lr_factor: float = Field(0.5, gt=0, le=1, description="lr multiplier per rollback.")
    max_rollbacks: int = Field(
        3, ge=0, description="Rollbacks before a non-finite loss stops the run."
    )
    compile: bool | Literal["auto"] = Field(
        "auto",
        description="torch.compile each transformer block (in place: parameter names "
        "unchanged). auto: on CUDA, off on CPU (0-13% there after a 30 s compile); never with "
        "deepspeed.",
    )
    prefetch: bool = Field(
        True,
        description="Build the next step's micro-batches in a background thread while "
        "the current step computes (pinned memory and non-blocking copies on CUDA).",
    )
    rebalance: int = Field(
        0,
        ge=0,
        description="Every N steps, re-split the global batch by each rank's measured "
        "compute speed, within max_micro_batch (same model: split invariance); 0: off. ddp and "
        "zero1 only.",
    )
    rebalance_min_gain: float = Field(
        0.05,
        ge=0,
        lt=1,
        description="Take a new split only if it is expected to shorten the "
        "step by at least this fraction (hysteresis against measurement noise).",
    )
    elastic: bool = Field(
        False,
        description="Elastic membership (torchrun --nnodes MIN:MAX, or --local-nodes N "
        "--elastic): when nodes leave or join, the same global batch is re-split over the "
        "ranks present (from train.plan, which may list more nodes, or from one int "
        "train.micro_batch) and the job resumes from its newest checkpoint. docs/ELASTIC.md",
    )
    max_micro_batch: int | list[int] | None = Field(
        None,
        description="The largest micro-batch each rank's memory holds (an int, or one "
        "per rank): the cap for rebalance. None: the plan's caps.",
    )

    @field_validator("report_to", mode="before")
    @classmethod
    def _trackers(cls, value: Any) -> list[str]:
        """One name, a list, or "wandb,mlflow"; "none" for none; each one's library installed
        (checked here, before any rank starts)."""
        from hetlm.tracker_names import check_installed, normalize_report_to

        names = normalize_report_to(value)
        check_installed(names)
        return names


class TrainingConfig(Section):
    """What every run config of the training loop shares (``PretrainConfig`` here,
    ``hetlm.sft.config.SFTConfig``): the ``run`` and ``train`` sections, the hyper-parameters
    filled from a recipe, the split of the global batch and the plan file.

    Each subclass declares its own fields, in the order its ``--help-config`` and dumps show
    them; ``model`` and ``data`` are its own sections (``model.causal`` in both)."""

    #: The `hetlm plan --task` whose plans this config accepts.
    PLAN_TASK: ClassVar[str]

    if TYPE_CHECKING:  # declared by each subclass (pydantic keeps the subclass's field order)
        run: RunSection
        train: TrainSection
        data: Any
        model: Any

    _sources: dict[str, str] = PrivateAttr(default_factory=dict)
    #: (path, plan) of the plan file last read: start-up asks for the plan several times (the
    #: split, the run plan, the elastic split), the file is read once. Private: not in
    #: model_dump, so neither in the run's config record nor in any fingerprint.
    _plan_file: tuple[Path, Any] | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _old_names(cls, raw: Any) -> Any:
        return rename_config_keys(raw)

    @property
    def learning_rate(self) -> float:
        """The peak learning rate (train.learning_rate, or its default)."""
        assert self.train.learning_rate is not None  # filled by _fill_recipe_defaults
        return self.train.learning_rate

    @property
    def warmup(self) -> int:
        """Warm-up steps (train.warmup_steps, or train.warmup_ratio, or the default)."""
        assert self.train.warmup_steps is not None  # filled by _fill_recipe_defaults
        return self.train.warmup_steps

    def hyperparameters(self) -> list[tuple[str, Any, str]]:
        """(key, value, where it comes from) of every resolved hyper-parameter."""
        return resolved_rows(self, self._sources)

    def micro_batches_for(self, world_size: int, node_of_rank: list[int]) -> list[int]:
        """Per-rank micro-batch sizes for the launched topology (checked against it)."""
        mb = self.train.micro_batch
        if mb is None:
            raise HetlmError(
                "give train.micro_batch (e.g. {per_node: [8, 4]}) or a plan (train.plan or --plan)"
            )
        if isinstance(mb, int):
            return [mb] * world_size
        if mb.per_rank is not None:
            if len(mb.per_rank) != world_size:
                raise HetlmError(
                    f"train.micro_batch.per_rank has {len(mb.per_rank)} entries but {world_size} "
                    "ranks were launched: give one per rank, or launch that many ranks"
                )
            return list(mb.per_rank)
        assert mb.per_node is not None
        num_nodes = max(node_of_rank) + 1
        if len(mb.per_node) != num_nodes:
            raise HetlmError(
                f"train.micro_batch.per_node has {len(mb.per_node)} entries but {num_nodes} nodes "
                "were launched: give one per node (torchrun --nnodes), or launch that many nodes"
            )
        return [mb.per_node[node] for node in node_of_rank]

    def batch_split(self, world_size: int, node_of_rank: list[int]) -> BatchSplit:
        """The split of the global batch for the launched topology: from the plan if one is
        given (checked against the launched ranks per node), else from the micro-batches."""
        if self.train.plan is not None:
            plan = self.load_plan()
            ranks_per_node = [node_of_rank.count(n) for n in range(max(node_of_rank) + 1)]
            plan.check_topology(world_size, ranks_per_node)
            return plan.batch_split
        return BatchSplit.from_micro_batches(
            self.train.global_batch, self.micro_batches_for(world_size, node_of_rank)
        )

    def check_plan_settings(self, plan) -> None:
        """Refuse a plan made for other memory-relevant settings (nothing beyond the task here)."""

    def load_plan(self):
        """The plan of ``train.plan``, checked against this config. The file is read and
        validated once per config object (again only if ``train.plan`` names another file);
        the checks against the config run on every call, as the config may have changed."""
        from hetlm.cluster.planner import load_plan

        assert self.train.plan is not None
        path = Path(self.train.plan)
        if self._plan_file is None or self._plan_file[0] != path:
            self._plan_file = (path, load_plan(path))
        plan = self._plan_file[1]
        if plan.global_batch != self.train.global_batch:
            raise HetlmError(
                f"the plan {self.train.plan} is for global batch {plan.global_batch} but "
                f"train.global_batch is {self.train.global_batch}: re-plan or fix the config"
            )
        if plan.task != self.PLAN_TASK:
            raise HetlmError(
                f"the plan {self.train.plan} was made for hetlm {plan.task}, not hetlm "
                f"{self.PLAN_TASK}: re-plan with `hetlm plan --task {self.PLAN_TASK}`"
            )
        self.check_plan_settings(plan)
        max_length = getattr(self.data, "max_length", None)
        if max_length is not None and plan.seq_len < max_length:
            raise HetlmError(
                f"the plan {self.train.plan} sized micro-batches for max_length {plan.seq_len} but "
                f"data.max_length is {max_length}: re-plan with --max-length {max_length}"
            )
        return plan


class PretrainConfig(TrainingConfig):
    PLAN_TASK: ClassVar[str] = "pretrain"

    run: RunSection
    data: DataSection
    model: ModelSection = ModelSection()
    train: TrainSection

    @model_validator(mode="after")
    def _fill_recipe_defaults(self) -> PretrainConfig:
        """Every hyper-parameter left out takes the recipe of the model type and preset
        (``hetlm.hparams``); continuing a checkpoint takes its own rate and warm-up."""
        recipe = pretrain_recipe(self.model.type, self.model.preset)
        special: dict[str, tuple[Any, str]] = {}
        if self.continued:
            special = {
                "learning_rate": (CONTINUED_LR, CONTINUED_SOURCE),
                "warmup_steps": (
                    round(CONTINUED_WARMUP_RATIO * self.train.max_steps),
                    CONTINUED_SOURCE,
                ),
            }
        self._sources = fill_defaults(self.train, recipe, special)
        if self.model.dropout is None and not self.continued:
            self.model.dropout = recipe.dropout
            self._sources["model.dropout"] = recipe.source("dropout")
        elif self.model.dropout is not None:
            self._sources["model.dropout"] = "set in the config"
        else:
            self._sources["model.dropout"] = "the checkpoint's (model.init_from)"
        if self.train.mlm_probability is None and not self.model.causal:
            self.train.mlm_probability = recipe.mlm_probability
            self._sources["train.mlm_probability"] = recipe.source("mlm_probability")
        elif self.train.mlm_probability is not None:
            self._sources["train.mlm_probability"] = "set in the config"
        return self

    @property
    def continued(self) -> bool:
        return self.model.init_from is not None


# Train keys a recipe fills (warm-up apart: steps or ratio), in --help-config's order.
RECIPE_KEYS = (
    "learning_rate",
    "lr_scheduler_type",
    "min_lr_rate",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "max_grad_norm",
)


def fill_defaults(
    train: TrainSection, recipe: Recipe, special: dict[str, tuple[Any, str]]
) -> dict[str, str]:
    """Set every hyper-parameter of ``train`` the user left out (``special`` first, then the
    recipe); returns where each value comes from (``train.<key>`` -> source)."""
    if train.warmup_steps is not None and train.warmup_ratio is not None:
        raise ValueError("train.warmup_steps and train.warmup_ratio both given: keep one")
    sources: dict[str, str] = {}
    for key in RECIPE_KEYS:
        if getattr(train, key) is not None:
            sources[f"train.{key}"] = "set in the config"
        elif key in special:
            setattr(train, key, special[key][0])
            sources[f"train.{key}"] = special[key][1]
        else:
            setattr(train, key, getattr(recipe, key))
            sources[f"train.{key}"] = recipe.source(key)
    if train.lr_scheduler_type != "cosine_with_min_lr":
        del sources["train.min_lr_rate"]  # used by that schedule only
    if train.warmup_steps is not None:
        sources["train.warmup_steps"] = "set in the config"
    elif train.warmup_ratio is not None:
        train.warmup_steps = round(train.warmup_ratio * train.max_steps)
        sources["train.warmup_steps"] = f"train.warmup_ratio {train.warmup_ratio:g}"
    elif "warmup_steps" in special:
        train.warmup_steps, sources["train.warmup_steps"] = special["warmup_steps"]
    else:
        train.warmup_steps = recipe.resolved_warmup(train.max_steps)
        sources["train.warmup_steps"] = (
            f"{recipe.describe_warmup()}: {recipe.source('warmup_steps')}"
        )
    return sources


def resolved_rows(config: BaseModel, sources: dict[str, str]) -> list[tuple[str, Any, str]]:
    rows = []
    for key, source in sources.items():
        section, name = key.split(".")
        rows.append((key, getattr(getattr(config, section), name), source))
    return rows


def resolved_help(config: TrainingConfig) -> str:
    """The hyper-parameters of one config as resolved, each with its source."""
    rows = config.hyperparameters()
    width = max(len(key) for key, _, _ in rows)
    lines = [f"{key:<{width}}  {value!s:<18} {source}" for key, value, source in rows]
    return "\n".join(["hyper-parameters as resolved for this config (value, source):", *lines])


def parse_config(raw: Any, source: str = "config") -> PretrainConfig:
    if not isinstance(raw, dict):
        raise HetlmError(
            f"{source}: expected a mapping with run/data/model/train sections, "
            f"got {type(raw).__name__}"
        )
    try:
        return PretrainConfig.model_validate(raw)
    except ValidationError as exc:
        raise HetlmError(
            format_validation_error(
                exc, f"invalid {source}", keys_help="`hetlm pretrain --help-config`"
            )
        ) from None


def read_yaml(path: str | Path) -> Any:
    """A run config file, parsed (one line for a missing or malformed file)."""
    from hetlm.user_files import read_yaml as read

    return read(
        path, "config file", missing_fix="check the path", syntax_fix="fix the YAML syntax there"
    )


def load_config(path: str | Path) -> PretrainConfig:
    return parse_config(read_yaml(path), source=str(path))


def config_help(
    config_class: type[BaseModel] = PretrainConfig,
    *,
    descriptions: dict[str, str] | None = None,
    skip: tuple[str, ...] = (),
    recipes: bool = True,
) -> str:
    """Every config key with its default and description, generated from the models.

    ``descriptions`` replaces a key's description (``"train.learning_rate": ...``, for a command whose
    default differs); ``skip`` leaves keys out (``"train.mlm_probability"``)."""
    lines: list[str] = []
    for section_name, field in config_class.model_fields.items():
        lines.append(f"{section_name}:")
        section_type = field.annotation  # every field of a run config is a section
        assert isinstance(section_type, type) and issubclass(section_type, BaseModel)
        for name, sub in section_type.model_fields.items():
            key = f"{section_name}.{name}"
            if key in skip:
                continue
            default = (
                "required"
                if sub.is_required()
                else repr(sub.get_default(call_default_factory=True))
            )
            description = (descriptions or {}).get(key, sub.description)
            desc = f"  # {description}" if description else ""
            lines.append(f"  {name}: {default}{desc}")
    if recipes:
        lines += [
            "",
            "Defaults by model type and preset (None above: this table; an explicit "
            "value always wins; docs/CONFIG.md):",
            recipe_table(),
        ]
    sections = set(config_class.model_fields)
    renamed = [
        f"{section}.{old} -> " + ", ".join(f"{section}.{n.strip()}" for n in new.split(","))
        for (section, old), new in RENAMED_KEYS.items()
        if section in sections
    ]
    lines += ["", "Old names, still accepted (with a deprecation warning): " + "; ".join(renamed)]
    return "\n".join(lines)
