"""Typed, validated run configuration: YAML in, one clear error out.

Every section is a pydantic model with ``extra="forbid"``, so a misspelt key is an error rather
than a silently ignored setting. All problems of a file are collected into one ``HetlmError``
line that names each bad field by its path (``train.global_batch: ...``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from hetlm.errors import HetlmError
from hetlm.topology import BatchSplit

Precision = Literal["auto", "fp32", "bf16", "fp16"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunSection(_Section):
    output_dir: Path = Field(description="Where checkpoints, metrics and the final model go.")
    seed: int = Field(0, description="Seeds init, data order and masking (all pure functions of it).")


class DataSection(_Section):
    dataset: Path = Field(description="A packed dataset made by `hetlm prepare`.")
    tokenizer: Path | None = Field(None, description="Defaults to the dataset's tokenizer.")
    local_copy: Path | None = Field(
        None, description="A node-local copy made by `hetlm stage`; read when it is complete "
        "and current, else the shared dataset is read (and the reason printed).")
    whole_word_masking: bool | None = Field(
        None, description="Mask every piece of a chosen word together; None: on when the "
        "tokenizer segments words (MeCab/Sudachi + WordPiece).")


ModelType = Literal["bert", "roberta", "deberta-v2", "electra", "llama"]


class ModelSection(_Section):
    type: ModelType = Field("bert", description="bert | roberta | deberta-v2 (masked LM), "
                            "electra (replaced-token detection), llama (causal LM).")
    preset: str = Field("small", description="Encoders: tiny | small | base | large; llama: "
                        "tiny | small | base | 1b | 7b | 13b. Ignored with init_from.")
    dropout: float | None = Field(None, ge=0.0, lt=1.0, description="None keeps the preset's 0.1.")
    overrides: dict[str, Any] = Field(default_factory=dict,
                                      description="Extra transformers config fields.")
    init_from: str | None = Field(
        None, description="Continued pretraining: a save_pretrained folder or a hub name; its "
        "tokenizer must be the dataset's.")
    freeze_embeddings: bool = Field(False, description="Do not train the input embeddings.")
    freeze_layers: int = Field(0, ge=0, description="Do not train the first k transformer layers.")
    generator_fraction: float = Field(
        0.25, gt=0.0, le=1.0, description="electra: the generator's hidden size, heads and MLP "
        "width as a fraction of the discriminator's (same depth, shared embeddings).")
    discriminator_weight: float = Field(50.0, gt=0.0, description="electra: weight of the "
                                        "replaced-token-detection loss (the generator's is 1).")

    @model_validator(mode="after")
    def _electra_fields_need_electra(self) -> ModelSection:
        given = {"generator_fraction", "discriminator_weight"} & self.model_fields_set
        if given and self.type != "electra":
            raise ValueError(f"{', '.join(sorted(given))}: only for model.type electra; "
                             f"remove it for {self.type}")
        return self

    @model_validator(mode="after")
    def _freezing_needs_a_checkpoint(self) -> ModelSection:
        if (self.freeze_embeddings or self.freeze_layers) and self.init_from is None:
            raise ValueError("freeze_embeddings / freeze_layers keep pretrained weights: set "
                             "init_from too (freezing a random initialisation trains nothing "
                             "useful)")
        return self

    @property
    def causal(self) -> bool:
        return self.type == "llama"


class MicroBatchSection(_Section):
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


class TrainSection(_Section):
    global_batch: int = Field(gt=0, description="Samples per optimizer step, over all ranks.")
    micro_batch: MicroBatchSection | int | None = Field(
        None, description="An int (same on every rank), {per_node: [...]}, or {per_rank: [...]}; "
        "not needed with a plan.")
    plan: Path | None = Field(
        None, description="A plan from `hetlm plan` (or --plan): per-rank shares and precision.")
    max_steps: int = Field(gt=0)
    lr: float | None = Field(None, gt=0, description="None: 5e-4 from scratch, 1e-4 when "
                             "continuing (model.init_from).")
    warmup_steps: int | None = Field(None, ge=0, description="None: 0 from scratch, 6% of "
                                     "max_steps when continuing (model.init_from).")
    weight_decay: float = Field(0.01, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = Field(1e-6, gt=0)
    max_grad_norm: float | None = Field(1.0, description="None or 0 disables clipping.")
    precision: Precision = Field("auto", description="auto | fp32 | bf16 | fp16 (fp16 on CPU: "
                                 "slow, for testing the overflow logic).")
    engine: Literal["auto", "ddp", "zero1", "fsdp2", "deepspeed"] = Field(
        "auto", description="auto: the plan's engine, else one for zero_stage (ddp for 0).")
    zero_stage: Literal["auto", 0, 1, 2, 3] = Field(
        "auto", description="auto: the plan's stage, else the engine's smallest (ddp 0, zero1 1, "
        "fsdp2 2, deepspeed 0).")
    bucket_cap_mb: float | None = Field(
        None, gt=0, description="DDP gradient bucket size in MB (ddp, zero1); None: torch's 25.")
    grad_compression: Literal["none", "fp16", "bf16"] = Field(
        "none", description="16-bit gradient all-reduce (ddp, zero1): half the traffic, results "
        "differ by 16-bit rounding (~1e-3).")
    deepspeed_config: Path | None = Field(
        None, description="A DeepSpeed JSON (engine deepspeed); batch sizes, clipping and "
        "precision are filled in from this config.")
    mlm_probability: float = Field(0.15, gt=0, lt=1)
    checkpoint_every: int = Field(0, ge=0, description="0: only at the end.")
    keep_last: int = Field(2, ge=1)
    eval_every: int = Field(0, ge=0, description="0: only at the end.")
    eval_samples: int = Field(256, ge=0)
    eval_batch: int = Field(16, gt=0)
    log_every: int = Field(10, gt=0, description="Progress-bar/TensorBoard cadence; JSONL has every step.")
    dist_timeout_s: float = Field(600.0, gt=0, description="A collective slower than this ends "
                                  "the run, naming the ranks that did not arrive (heartbeats).")
    on_nonfinite: Literal["stop", "rollback"] = Field(
        "stop", description="A NaN/inf loss (fp32/bf16): stop naming the last good checkpoint, "
        "or roll back to it in-process with the lr times rollback_lr_factor (ddp/zero1/one "
        "process).")
    rollback_lr_factor: float = Field(0.5, gt=0, le=1, description="lr multiplier per rollback.")
    max_rollbacks: int = Field(3, ge=0, description="Rollbacks before a non-finite loss stops "
                               "the run.")


class PretrainConfig(_Section):
    #: The `hetlm plan --task` whose plans this config accepts.
    PLAN_TASK: ClassVar[str] = "pretrain"

    run: RunSection
    data: DataSection
    model: ModelSection = ModelSection()
    train: TrainSection

    @property
    def continued(self) -> bool:
        return self.model.init_from is not None

    @property
    def learning_rate(self) -> float:
        """train.lr, or the default for training from scratch / continuing a checkpoint."""
        if self.train.lr is not None:
            return self.train.lr
        return 1e-4 if self.continued else 5e-4

    @property
    def warmup(self) -> int:
        """train.warmup_steps, or the default: none from scratch, 6% when continuing (a
        checkpoint's Adam moments are not kept: a short warm-up avoids a jolt)."""
        if self.train.warmup_steps is not None:
            return self.train.warmup_steps
        return round(0.06 * self.train.max_steps) if self.continued else 0

    def micro_batches_for(self, world_size: int, node_of_rank: list[int]) -> list[int]:
        """Per-rank micro-batch sizes for the launched topology (checked against it)."""
        mb = self.train.micro_batch
        if mb is None:
            raise HetlmError("give train.micro_batch (e.g. {per_node: [8, 4]}) or a plan "
                             "(train.plan or --plan)")
        if isinstance(mb, int):
            return [mb] * world_size
        if mb.per_rank is not None:
            if len(mb.per_rank) != world_size:
                raise HetlmError(
                    f"train.micro_batch.per_rank has {len(mb.per_rank)} entries but {world_size} "
                    "ranks were launched: give one per rank, or launch that many ranks")
            return list(mb.per_rank)
        assert mb.per_node is not None
        num_nodes = max(node_of_rank) + 1
        if len(mb.per_node) != num_nodes:
            raise HetlmError(
                f"train.micro_batch.per_node has {len(mb.per_node)} entries but {num_nodes} nodes "
                "were launched: give one per node (torchrun --nnodes), or launch that many nodes")
        return [mb.per_node[node] for node in node_of_rank]

    def batch_split(self, world_size: int, node_of_rank: list[int]) -> BatchSplit:
        """The split of the global batch for the launched topology: from the plan if one is
        given (checked against the launched ranks per node), else from the micro-batches."""
        if self.train.plan is not None:
            plan = self.load_plan()
            ranks_per_node = [node_of_rank.count(n) for n in range(max(node_of_rank) + 1)]
            plan.check_topology(world_size, ranks_per_node)
            return plan.batch_split
        return BatchSplit.from_micro_batches(self.train.global_batch,
                                             self.micro_batches_for(world_size, node_of_rank))

    def check_plan_settings(self, plan) -> None:
        """Refuse a plan made for other memory-relevant settings (nothing beyond the task here)."""

    def load_plan(self):
        from hetlm.cluster.planner import load_plan

        assert self.train.plan is not None
        plan = load_plan(self.train.plan)
        if plan.global_batch != self.train.global_batch:
            raise HetlmError(
                f"the plan {self.train.plan} is for global batch {plan.global_batch} but "
                f"train.global_batch is {self.train.global_batch}: re-plan or fix the config")
        if plan.task != self.PLAN_TASK:
            raise HetlmError(
                f"the plan {self.train.plan} was made for hetlm {plan.task}, not hetlm "
                f"{self.PLAN_TASK}: re-plan with `hetlm plan --task {self.PLAN_TASK}`")
        self.check_plan_settings(plan)
        max_length = getattr(self.data, "max_length", None)
        if max_length is not None and plan.seq_len < max_length:
            raise HetlmError(
                f"the plan {self.train.plan} sized micro-batches for max_length {plan.seq_len} but "
                f"data.max_length is {max_length}: re-plan with --max-length {max_length}")
        return plan


def _format_errors(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
        where = where if where.isprintable() else repr(where)  # keep the error on one line
        msg = " ".join(str(err["msg"]).split())
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see `hetlm pretrain --help-config`)"
        parts.append(f"{where or '<top>'}: {msg}")
    return "; ".join(dict.fromkeys(parts))


def parse_config(raw: Any, source: str = "config") -> PretrainConfig:
    if not isinstance(raw, dict):
        raise HetlmError(f"{source}: expected a mapping with run/data/model/train sections, "
                         f"got {type(raw).__name__}")
    try:
        return PretrainConfig.model_validate(raw)
    except ValidationError as exc:
        raise HetlmError(f"invalid {source}: {_format_errors(exc)}") from None


def read_yaml(path: str | Path) -> Any:
    """The parsed YAML file, or one line saying what is wrong with the file (missing, not
    UTF-8, malformed at line/column)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise HetlmError(f"config file {path} does not exist: check the path")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise HetlmError(f"config file {path} is not UTF-8 text") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "malformed YAML"
        raise HetlmError(f"config file {path}{where}: {problem}; fix the YAML syntax") from None


def load_config(path: str | Path) -> PretrainConfig:
    return parse_config(read_yaml(path), source=str(path))


def config_help(config_class: type[BaseModel] = PretrainConfig, *,
                descriptions: dict[str, str] | None = None, skip: tuple[str, ...] = ()) -> str:
    """Every config key with its default and description, generated from the models.

    ``descriptions`` replaces a key's description (``"train.lr": ...``, for a command whose
    default differs); ``skip`` leaves keys out (``"train.mlm_probability"``)."""
    lines: list[str] = []
    for section_name, field in config_class.model_fields.items():
        lines.append(f"{section_name}:")
        section_type = field.annotation
        for name, sub in section_type.model_fields.items():  # type: ignore[union-attr]
            key = f"{section_name}.{name}"
            if key in skip:
                continue
            default = "required" if sub.is_required() else repr(sub.get_default(call_default_factory=True))
            description = (descriptions or {}).get(key, sub.description)
            desc = f"  # {description}" if description else ""
            lines.append(f"  {name}: {default}{desc}")
    return "\n".join(lines)
