"""The planner: cluster + model + global batch -> per-rank shares, precision, ZeRO stage, engine.

Speed decides each rank's share and memory caps it. A rank that is twice as fast gets twice the
samples, so all ranks finish a step together; no rank takes more than ``micro_steps * cap`` samples,
where ``cap`` is the largest micro-batch its memory holds. Every rank runs the same number of
micro-steps (design invariant 2: ZeRO-3/FSDP all-gather on every forward), which is the
smallest number that fits the global batch: ``a = ceil(B / sum(cap_r))``.

The predicted step time is compute (share / speed) plus communication over the slowest link, with
no overlap assumed: an upper bound meant for comparing plans, not a promise.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from hetlm.cluster.engines import ENGINE_FOR_STAGE, ENGINE_NAMES, ENGINE_STAGES
from hetlm.cluster.hardware import GpuModel, lookup_gpu
from hetlm.cluster.memory import (
    GIB,
    MemoryModel,
    ModelShape,
    bytes_per_element,
    estimate_memory,
    max_micro_batch,
)
from hetlm.cluster.memory_lora import (
    LoraSpec,
    base_bytes,
    lora_flops_per_sample,
    lora_parameter_count,
)
from hetlm.cluster.precision import DeviceSupport, choose_job_precision
from hetlm.cluster.spec import Cluster, format_validation_error
from hetlm.errors import HetlmError
from hetlm.topology import BatchSplit

PLAN_FORMAT = "hetlm-plan/1"
#: ZeRO-0 (plain DDP) is chosen when the model states take at most this part of usable memory,
#: leaving the rest for activations; beyond it partitioning buys micro-batch room cheaply.
COMFORTABLE_STATE_FRACTION = 0.5
DEFAULT_EFFICIENCY = 0.4  # achieved / peak dense FLOP/s for transformer training (MFU prior)


# --------------------------------------------------------------------------- choices


def choose_precision(cluster: Cluster, requested: str = "auto") -> str:
    """bf16 if every device has it, else fp16 (dynamic loss scaling), else fp32; or check a
    request (the one rule: ``hetlm.cluster.precision``)."""
    devices = [
        DeviceSupport(f"{gpu.describe()} on {', '.join(nodes)}", gpu.precisions)
        for gpu, nodes in _distinct_gpus(cluster)
    ]
    return choose_job_precision(requested, devices, option="--precision")


def _distinct_gpus(cluster: Cluster) -> list[tuple[GpuModel, list[str]]]:
    seen: dict[str, tuple[GpuModel, list[str]]] = {}
    for node in cluster.nodes:
        for device in node.devices:
            _, names = seen.setdefault(device.gpu.name, (device.gpu, []))
            if node.name not in names:
                names.append(node.name)
    return list(seen.values())


def candidate_stages(zero_stage: int | str, engine: str) -> list[int]:
    """ZeRO stages to try, smallest first, for a requested stage and engine."""
    if engine != "auto" and engine not in ENGINE_STAGES:
        raise HetlmError(f"engine must be auto or one of {', '.join(ENGINE_NAMES)}, not {engine!r}")
    allowed = ENGINE_STAGES.get(engine, (0, 1, 2, 3))
    if zero_stage == "auto":
        return list(allowed)
    try:
        stage = int(zero_stage)
    except (TypeError, ValueError):
        stage = -1
    if stage not in (0, 1, 2, 3):
        raise HetlmError(f"ZeRO stage must be auto, 0, 1, 2 or 3, not {zero_stage!r}")
    if stage not in allowed:
        raise HetlmError(
            f"engine {engine} cannot run ZeRO stage {stage} (it runs stage "
            f"{'/'.join(map(str, allowed))}): use --engine {engine_for_stage(stage)} or another --zero"
        )
    return [stage]


def engine_for_stage(stage: int, requested: str = "auto") -> str:
    """ddp for 0, torch's ZeroRedundancyOptimizer for 1, FSDP2 for 2/3; DeepSpeed only on request."""
    if requested != "auto":
        return requested
    return ENGINE_FOR_STAGE[stage]


def memory_model_for(gpu: GpuModel, engine: str) -> MemoryModel:
    return MemoryModel.for_device(gpu.is_cpu, layout="zero" if engine == "deepspeed" else "torch")


# --------------------------------------------------------------------------- shares


def allocate_shares(
    global_batch: int, caps: list[int], speeds: list[float]
) -> tuple[int, list[int]]:
    """(micro_steps, shares): shares ∝ speed, a <= share_r <= a*cap_r, sum == global_batch.

    ``a = ceil(B / sum(caps))`` is the fewest micro-steps that fit B. The continuous split is
    water-filling: ``share_r = clamp(t * speed_r, a, a * cap_r)`` with t chosen so the shares sum
    to B (a capped fast rank's surplus goes to the others in proportion to their speeds); it is
    then rounded to integers by largest remainder within the same bounds, so the sum stays B.
    """
    n = len(caps)
    if n == 0 or len(speeds) != n:
        raise ValueError("caps and speeds must be non-empty and of equal length")
    if any(c < 1 for c in caps) or any(not v > 0 for v in speeds):
        raise ValueError(f"caps must be >= 1 and speeds > 0, got {caps} and {speeds}")
    if global_batch < n:
        raise HetlmError(
            f"global batch {global_batch} is smaller than the {n} ranks: every rank "
            f"needs at least one sample per step; use a global batch >= {n}"
        )
    steps = math.ceil(global_batch / sum(caps))
    if n * steps > global_batch:
        raise HetlmError(
            f"global batch {global_batch} cannot be split over {n} ranks with micro-batch caps "
            f"{caps} and the same number of micro-steps on every rank (each rank needs a sample "
            f"per micro-step): use one of the nearest global batches that work, "
            f"{_nearest_feasible(global_batch, caps)}"
        )
    lo, hi = [steps] * n, [steps * c for c in caps]
    ideal = _water_fill(global_batch, lo, hi, speeds)
    shares = [min(hi[r], max(lo[r], math.floor(ideal[r]))) for r in range(n)]
    # Hand out the remainder by largest fractional part (ties: faster, then lower rank).
    order = sorted(range(n), key=lambda r: (-(ideal[r] - shares[r]), -speeds[r], r))
    while sum(shares) < global_batch:
        progressed = False
        for r in order:
            if sum(shares) == global_batch:
                break
            if shares[r] < hi[r]:
                shares[r] += 1
                progressed = True
        if not progressed:  # pragma: no cover - excluded by the feasibility check above
            raise AssertionError("share allocation failed to place every sample")
    while sum(shares) > global_batch:  # float round-off only
        r = max((r for r in range(n) if shares[r] > lo[r]), key=lambda r: shares[r] - ideal[r])
        shares[r] -= 1
    return steps, shares


def _water_fill(total: int, lo: list[int], hi: list[int], speeds: list[float]) -> list[float]:
    def fill(t: float) -> list[float]:
        return [min(h, max(low, t * v)) for low, h, v in zip(lo, hi, speeds, strict=True)]

    low_t, high_t = 0.0, max(h / v for h, v in zip(hi, speeds, strict=True))
    for _ in range(200):
        mid = (low_t + high_t) / 2
        if sum(fill(mid)) < total:
            low_t = mid
        else:
            high_t = mid
    return fill(high_t)


def _nearest_feasible(global_batch: int, caps: list[int]) -> str:
    n, total = len(caps), sum(caps)

    def ok(b: int) -> bool:
        return b >= n and n * math.ceil(b / total) <= b

    below = next((b for b in range(global_batch - 1, n - 1, -1) if ok(b)), None)
    above = next(b for b in range(global_batch + 1, global_batch + n * total + 2) if ok(b))
    return f"{below} or {above}" if below else str(above)


# --------------------------------------------------------------------------- cost model


def flops_per_sample(shape: ModelShape, seq_len: int) -> float:
    """Training FLOPs of one sample: 6 x (matmul parameters) per token + attention + vocab head.

    6 = 2 (multiply-add) x 3 (forward, input grads, weight grads). Attention scores and their
    product with V add 12*L*s*h per token (Narayanan et al. 2021); the vocabulary projection costs
    6*h*V only at predicted positions (15% for hetlm's MLM head). Embedding lookups are free.
    """
    s, h, layers = seq_len, shape.hidden_size, shape.num_layers
    per_token = 6 * shape.layer_params * layers + 12 * layers * s * h
    head_transform = 0 if shape.causal else h * h
    head = shape.predicted_positions(s) * 6 * (h * shape.vocab_size + head_transform)
    return s * per_token + head


def comm_bytes(
    stage: int, engine: str, n_params: int, precision: str, world_size: int, micro_steps: int
) -> float:
    """Bytes each rank sends (= receives) per optimizer step over ring collectives.

    A ring all-reduce of X bytes moves 2(N-1)/N*X per rank; reduce-scatter and all-gather half
    that each. Stage 0/1: one all-reduce of the gradients per step (micro-steps before the last
    skip sync); torch's ZeroRedundancyOptimizer then broadcasts the updated fp32 shards. Stage 2:
    reduce-scatter of gradients + all-gather of parameters (DeepSpeed: gradients every micro-step,
    parameters once; FSDP2: both every micro-step, as it reshards after backward). Stage 3: params
    gathered for forward and again for backward in every micro-step, gradients reduce-scattered.
    Torch engines reduce fp32 gradients; DeepSpeed 16-bit ones in mixed precision.
    """
    if world_size <= 1:
        return 0.0
    psi, f, a = float(n_params), (world_size - 1) / world_size, micro_steps
    mixed = bytes_per_element(precision) == 2
    param_b = 2 if mixed else 4
    grad_b = 2 if mixed and engine == "deepspeed" else 4
    if stage == 0:
        return 2 * f * grad_b * psi
    if stage == 1:
        broadcast = f * 4 * psi if engine == "zero1" else 0.0
        return 2 * f * grad_b * psi + broadcast
    if stage == 2:
        if engine == "deepspeed":
            return f * psi * (a * grad_b + param_b)
        return a * f * psi * (grad_b + param_b)
    return a * f * psi * (2 * param_b + grad_b)


def estimate_training_flops(
    model_config: Any, steps: int, global_batch: int, seq_len: int
) -> float:
    shape = ModelShape.from_config(model_config)
    return float(steps) * global_batch * flops_per_sample(shape, seq_len)


def estimate_gpu_days(
    model_config: Any,
    steps: int,
    global_batch: int,
    seq_len: int,
    gpu: str | GpuModel,
    precision: str = "fp16",
    efficiency: float = DEFAULT_EFFICIENCY,
) -> float:
    """GPU-days of compute for a run: training FLOPs / (peak * efficiency), communication excluded."""
    device = lookup_gpu(gpu) if isinstance(gpu, str) else gpu
    if not 0 < efficiency <= 1:
        raise HetlmError(f"efficiency must be in (0, 1], got {efficiency}")
    flops = estimate_training_flops(model_config, steps, global_batch, seq_len)
    return flops / (device.peak(precision) * 1e12 * efficiency) / 86400


# --------------------------------------------------------------------------- the plan


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RankPlan(_Strict):
    """One rank's row of the plan."""

    rank: int = Field(ge=0)
    node: str
    node_rank: int = Field(ge=0)
    local_rank: int = Field(ge=0)
    gpu: str
    memory_gib: float = Field(gt=0)  # device memory the plan assumed
    cap: int = Field(ge=1)  # largest micro-batch that fits
    share: int = Field(ge=1)  # samples of each global batch
    micro_batches: list[int]
    precision: Literal["fp32", "fp16", "bf16"]
    zero_stage: int = Field(ge=0, le=3)
    engine: Literal["ddp", "zero1", "fsdp2", "deepspeed"]
    est_memory_gib: float  # predicted peak at this rank's largest micro-batch
    samples_per_s: float = Field(gt=0)
    speed_source: Literal["measured", "peak"]
    compute_s: float = Field(ge=0)
    comm_s: float = Field(ge=0)


class NodePlan(_Strict):
    name: str
    host: str | None = None
    hostname: str | None = None  # the Slurm node name, where the cluster file gives one
    ranks: int = Field(ge=1)


class ModelInfo(_Strict):
    name: str
    model_type: str
    n_params: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    vocab_size: int


class Plan(_Strict):
    """A validated plan: the topology object the training loop trusts (see module docstring)."""

    format: Literal["hetlm-plan/1"] = PLAN_FORMAT
    model: ModelInfo
    global_batch: int = Field(ge=1)
    seq_len: int = Field(ge=1)
    micro_steps: int = Field(ge=1)
    precision: Literal["fp32", "fp16", "bf16"]
    zero_stage: int = Field(ge=0, le=3)
    engine: Literal["ddp", "zero1", "fsdp2", "deepspeed"]
    nodes: list[NodePlan] = Field(min_length=1)
    network: dict[str, float]
    assumptions: dict[str, Any] = Field(default_factory=dict)
    ranks: list[RankPlan] = Field(min_length=1)
    step_s: float = Field(ge=0)
    samples_per_s: float = Field(ge=0)
    #: What the plan is for: ``hetlm pretrain`` or ``hetlm sft`` (LoRA/QLoRA; ``seq_len`` is then
    #: data.max_length and ``lora`` says how the base is held and what trains).
    task: Literal["pretrain", "sft"] = "pretrain"
    lora: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Plan:
        problems = []
        if [r.rank for r in self.ranks] != list(range(len(self.ranks))):
            problems.append("ranks must be numbered 0, 1, ... in order")
        expected = [
            (node.name, i, local)
            for i, node in enumerate(self.nodes)
            for local in range(node.ranks)
        ]
        if [(r.node, r.node_rank, r.local_rank) for r in self.ranks] != expected:
            problems.append("ranks must list each node's GPUs in node order, matching 'nodes'")
        for r in self.ranks:
            if (r.precision, r.zero_stage, r.engine) != (
                self.precision,
                self.zero_stage,
                self.engine,
            ):
                problems.append(
                    f"rank {r.rank} has another precision/zero_stage/engine than the plan"
                )
        try:
            split = self.batch_split
        except HetlmError as exc:
            problems.append(str(exc))
        else:
            for r in self.ranks:
                if r.micro_batches != split.micro_batch_sizes(r.rank):
                    problems.append(
                        f"rank {r.rank}: micro_batches {r.micro_batches} do not cut "
                        f"share {r.share} into {self.micro_steps} micro-steps"
                    )
                elif max(r.micro_batches) > r.cap:
                    problems.append(
                        f"rank {r.rank}: micro-batch {max(r.micro_batches)} exceeds its cap {r.cap}"
                    )
        if (self.task == "sft") != (self.lora is not None):
            problems.append("an sft plan needs its lora settings, a pretrain plan has none")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    # ---- views

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    @property
    def ranks_per_node(self) -> list[int]:
        return [node.ranks for node in self.nodes]

    @property
    def batch_split(self) -> BatchSplit:
        return BatchSplit(
            global_batch=self.global_batch,
            micro_steps=self.micro_steps,
            shares=tuple(r.share for r in self.ranks),
        )

    # ---- checks at start-up

    def check_topology(self, world_size: int, ranks_per_node: list[int] | None = None) -> None:
        """Refuse a launch that does not match the plan (world size and ranks per node)."""
        planned = self.ranks_per_node
        launched_nodes = (
            f" on {len(ranks_per_node)} nodes ({_plus(ranks_per_node)})" if ranks_per_node else ""
        )
        mismatch = world_size != self.world_size or (
            ranks_per_node is not None and list(ranks_per_node) != planned
        )
        if mismatch:
            raise HetlmError(
                f"the plan is for {self.world_size} ranks on {len(planned)} nodes "
                f"({_plus(planned)}) but {world_size} were launched{launched_nodes}: start "
                "torchrun on each node with the --nnodes/--node-rank/--nproc-per-node that "
                "`hetlm plan` printed, or re-plan for this cluster"
            )

    def check_device(self, rank: int, memory_bytes: float, tolerance: float = 0.03) -> None:
        """Refuse a device with less memory than the plan assumed for ``rank``."""
        row = self.ranks[rank]
        found = memory_bytes / GIB
        if found < row.memory_gib * (1 - tolerance):
            raise HetlmError(
                f"rank {rank} ({row.node}, local rank {row.local_rank}) has a device with "
                f"{found:.1f} GiB but the plan assumed {row.gpu} with {row.memory_gib:g} GiB: "
                "fix the cluster file (GPU model or memory_gib) and re-plan, or check "
                "CUDA_VISIBLE_DEVICES"
            )

    # ---- files

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: Any, source: str = "plan") -> Plan:
        if not isinstance(data, dict):
            raise HetlmError(
                f"{source}: a plan must be a mapping written by `hetlm plan`, got "
                f"{type(data).__name__}"
            )
        if data.get("format") not in (None, PLAN_FORMAT):
            raise HetlmError(
                f"{source}: plan format {data.get('format')!r} is not "
                f"{PLAN_FORMAT!r}: re-run `hetlm plan` with this version of hetlm"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise HetlmError(
                format_validation_error(
                    exc, f"{source}: invalid plan (re-run `hetlm plan` rather than editing it)"
                )
            ) from None

    def save(self, path: str | Path) -> Path:
        import yaml

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = "# written by `hetlm plan`; the training run checks itself against it\n"
        text += yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=100)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
        return path

    # ---- display

    def format_table(self) -> str:
        """The per-rank table and the totals, as printed by `hetlm plan`."""
        header = [
            "rank",
            "node",
            "gpu",
            "cap",
            "share",
            "micro-batches",
            "precision",
            "zero/engine",
            "mem GiB",
            "samples/s",
            "compute ms",
            "comm ms",
        ]
        rows = [
            [
                str(r.rank),
                r.node,
                r.gpu,
                str(r.cap),
                str(r.share),
                format_micro_batches(r.micro_batches),
                r.precision,
                f"{r.zero_stage}/{r.engine}",
                f"{r.est_memory_gib:.1f}/{r.memory_gib:g}",
                f"{r.samples_per_s:.1f}" + ("" if r.speed_source == "measured" else "*"),
                f"{r.compute_s * 1e3:.0f}",
                f"{r.comm_s * 1e3:.0f}",
            ]
            for r in self.ranks
        ]
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        lines = [
            "  ".join(
                cell.rjust(w) if i in (0, 3, 4) or i >= 8 else cell.ljust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            ).rstrip()
            for row in [header, *rows]
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        tokens = self.samples_per_s * self.seq_len
        what = f"seq {self.seq_len}"
        if self.lora is not None:
            what = f"max_length {self.seq_len}"
        lines += [
            "",
            f"model {self.model.name} ({self.model.n_params / 1e6:.1f}M parameters), global batch "
            f"{self.global_batch} x {what}, {self.micro_steps} micro-step(s) per step, "
            f"{self.precision}, ZeRO-{self.zero_stage} ({self.engine})",
            f"predicted step {self.step_s:.3f} s = {self.samples_per_s:.1f} samples/s "
            f"({tokens:,.0f} tokens/s)",
        ]
        if self.lora is not None:
            lora = self.lora
            lines.insert(
                len(lines) - 1,
                f"hetlm sft: LoRA r {lora['r']} on {_targets(lora['target_modules'])}, "
                f"{lora['trainable_params'] / 1e6:.2f}M trainable, base "
                f"{_base_words(lora)} ({lora['base_gib']:.2f} GiB)"
                + (", gradient checkpointing" if lora["gradient_checkpointing"] else ""),
            )
        if any(r.speed_source == "peak" for r in self.ranks):
            eff = self.assumptions.get("efficiency", DEFAULT_EFFICIENCY)
            lines.append(
                f"* speed from peak TFLOP/s x {eff:g} efficiency; measured samples_per_s "
                "in the cluster file replace it"
            )
        return "\n".join(lines)


def _targets(modules: Any) -> str:
    return modules if isinstance(modules, str) else "+".join(modules)


def _base_words(lora: dict[str, Any]) -> str:
    return {"none": f"{lora['base_dtype']}", "8bit": "8-bit", "4bit": "4-bit NF4"}[
        lora["quantization"]
    ]


def format_micro_batches(sizes: list[int]) -> str:
    """[30, 30] -> "30x2", [31, 31, 30] -> "31x2+30"."""
    parts = []
    for size in sorted(set(sizes), reverse=True):
        count = sizes.count(size)
        parts.append(f"{size}x{count}" if count > 1 else str(size))
    return "+".join(parts)


def _plus(counts: list[int]) -> str:
    return "+".join(map(str, counts))


def load_plan(path: str | Path) -> Plan:
    """Read a plan written by ``Plan.save``; every problem is a one-line HetlmError."""

    from hetlm.user_files import read_yaml

    data = read_yaml(
        path,
        "plan file",
        allow_empty=False,
        missing_fix="create it with `hetlm plan CLUSTER.yaml ... --output PLAN.yaml`",
        syntax_fix="re-run `hetlm plan`",
    )
    return Plan.from_dict(data, source=str(path))


# --------------------------------------------------------------------------- planning


def make_plan(
    cluster: Cluster,
    model_config: Any,
    global_batch: int,
    seq_len: int,
    *,
    precision: str = "auto",
    zero_stage: int | str = "auto",
    engine: str = "auto",
    memory_fraction: float = 0.9,
    efficiency: float = DEFAULT_EFFICIENCY,
    model_name: str | None = None,
    lora: LoraSpec | None = None,
) -> Plan:
    """Plan a data-parallel run of ``model_config`` on ``cluster`` (see the module docstring).

    ``model_config`` is a ``transformers`` config or a ``ModelShape``. ``memory_fraction`` of each
    device's memory is planned for (the rest is headroom); ``efficiency`` converts peak TFLOP/s
    into speed where no measured samples/s are given. ``lora`` plans ``hetlm sft`` (LoRA/QLoRA:
    frozen base, trained adapters; ``seq_len`` is data.max_length) instead of pretraining.
    """
    if global_batch < 1 or seq_len < 1:
        raise HetlmError(
            f"global batch and sequence length must be >= 1, got {global_batch} and {seq_len}"
        )
    if not 0 < memory_fraction <= 1:
        raise HetlmError(f"memory fraction must be in (0, 1], got {memory_fraction}")
    if not 0 < efficiency <= 1:
        raise HetlmError(f"efficiency must be in (0, 1], got {efficiency}")
    shape = ModelShape.from_config(model_config, name=model_name)
    chosen_precision = choose_precision(cluster, precision)
    stages = candidate_stages(zero_stage, engine)
    if lora is not None:
        stages = _lora_stages(stages, lora, zero_stage == "auto")
    devices = cluster.devices
    n = len(devices)
    flops = (
        lora_flops_per_sample(shape, seq_len, lora) if lora else flops_per_sample(shape, seq_len)
    )
    speeds = [_speed(d.gpu, d.samples_per_s, chosen_precision, efficiency, flops) for d in devices]

    stage, caps = _choose_stage(
        cluster,
        shape,
        seq_len,
        chosen_precision,
        stages,
        engine,
        memory_fraction,
        auto=zero_stage == "auto",
        lora=lora,
    )
    chosen_engine = engine_for_stage(stage, engine)
    steps, shares = allocate_shares(global_batch, caps, speeds)
    if lora is not None:
        sent = lora_comm_bytes(stage, chosen_engine, shape, lora, chosen_precision, n, steps)
    else:
        sent = comm_bytes(stage, chosen_engine, shape.n_params, chosen_precision, n, steps)
    comm_s = sent / (cluster.slowest_link_gbps * 1e9 / 8)
    split = BatchSplit(global_batch=global_batch, micro_steps=steps, shares=tuple(shares))
    rows = []
    for d, cap, share, speed in zip(devices, caps, shares, speeds, strict=True):
        node = cluster.nodes[d.node_index]
        micro = split.micro_batch_sizes(d.rank)
        est = estimate_memory(
            shape,
            max(micro),
            seq_len,
            chosen_precision,
            stage,
            n,
            memory_model_for(d.gpu, chosen_engine),
            lora,
        )
        rows.append(
            RankPlan(
                rank=d.rank,
                node=node.name,
                node_rank=d.node_index,
                local_rank=d.local_rank,
                gpu=d.gpu.name,
                memory_gib=round(d.gpu.memory_gib, 3),
                cap=cap,
                share=share,
                micro_batches=micro,
                precision=chosen_precision,
                zero_stage=stage,
                engine=chosen_engine,
                est_memory_gib=round(est.total_gib, 3),
                samples_per_s=_round(speed),
                speed_source="measured" if d.samples_per_s else "peak",
                compute_s=_round(share / speed),
                comm_s=_round(comm_s),
            )
        )
    step_s = max(r.compute_s for r in rows) + comm_s
    return Plan(
        model=ModelInfo(
            name=shape.name,
            model_type=shape.model_type,
            n_params=shape.n_params,
            hidden_size=shape.hidden_size,
            num_layers=shape.num_layers,
            num_heads=shape.num_heads,
            intermediate_size=shape.intermediate_size,
            vocab_size=shape.vocab_size,
        ),
        global_batch=global_batch,
        seq_len=seq_len,
        micro_steps=steps,
        precision=chosen_precision,
        zero_stage=stage,
        engine=chosen_engine,
        nodes=[
            {
                "name": node.name,
                "host": node.host,
                "hostname": node.hostname,
                "ranks": len(node.devices),
            }
            for node in cluster.nodes
        ],
        network={
            "inter_node_gbps": cluster.inter_node_gbps,
            "intra_node_gbps": cluster.intra_node_gbps,
        },
        assumptions={
            "memory_fraction": memory_fraction,
            "efficiency": efficiency,
            "flops_per_sample": float(f"{flops:.6g}"),
            "attention": sorted(
                {memory_model_for(d.gpu, chosen_engine).attention for d in devices}
            ),
        },
        ranks=rows,
        step_s=_round(step_s),
        task="sft" if lora is not None else "pretrain",
        lora=None
        if lora is None
        else {
            **lora.as_dict(),
            "trainable_params": lora_parameter_count(shape, lora),
            "base_gib": round(base_bytes(shape, lora) / GIB, 3),
        },
        samples_per_s=_round(global_batch / step_s if step_s > 0 else 0.0),
    )


def _round(x: float) -> float:
    return float(f"{x:.6g}")


def _speed(
    gpu: GpuModel, measured: float | None, precision: str, efficiency: float, flops: float
) -> float:
    if measured:
        return measured
    peak = gpu.peak_tflops.get(precision, 0.0)
    if peak <= 0:
        raise HetlmError(
            f"{gpu.name} has no {precision} TFLOP/s and no measured samples_per_s: "
            "give tflops or samples_per_s for it in the cluster file"
        )
    return peak * 1e12 * efficiency / flops


def _choose_stage(
    cluster: Cluster,
    shape: ModelShape,
    seq_len: int,
    precision: str,
    stages: list[int],
    engine: str,
    memory_fraction: float,
    auto: bool,
    lora: LoraSpec | None = None,
) -> tuple[int, list[int]]:
    """The first stage in ``stages`` whose caps are all >= 1 (stage 0 only if comfortable)."""
    devices = cluster.devices
    n = len(devices)
    tried = []
    for stage in stages:
        eng = engine_for_stage(stage, engine)
        caps, comfortable = [], True
        for d in devices:
            usable = d.gpu.memory_bytes * memory_fraction
            model = memory_model_for(d.gpu, eng)
            cap = max_micro_batch(usable, shape, seq_len, precision, stage, n, model, lora)
            if d.max_micro_batch is not None:
                # A probed cap is a measurement of the real process (allocator, libraries),
                # which the memory model can underestimate: it is a ceiling at every stage.
                cap = min(cap, d.max_micro_batch)
            caps.append(cap)
            states = estimate_memory(
                shape, 0, seq_len, precision, stage, n, model, lora
            ).states.total
            comfortable &= states <= COMFORTABLE_STATE_FRACTION * usable
        tried.append((stage, caps))
        if min(caps) < 1:
            continue
        later = [s for s in stages if s > stage]
        if auto and stage == 0 and not comfortable and n > 1 and later:
            continue  # DDP would fit but leave little for activations: partition instead
        return stage, caps
    if auto and tried and min(tried[0][1]) >= 1:
        return tried[0]  # nothing partitioned fits either: uncomfortable DDP is still a plan
    stage, caps = tried[-1]
    worst = min(range(n), key=lambda r: caps[r])
    d = devices[worst]
    est = estimate_memory(
        shape,
        1,
        seq_len,
        precision,
        stage,
        n,
        memory_model_for(d.gpu, engine_for_stage(stage, engine)),
        lora,
    )
    if lora is None:
        what, fixes = f"at seq {seq_len}", "shorten --seq-len, use a smaller model, --zero 3"
    else:
        what = f"({lora.describe()}) at max_length {seq_len}"
        fixes = "lower --max-length, --gradient-checkpointing, --quantization 4bit"
        if lora.quantization == "none":
            fixes += ", --zero 3"
    raise HetlmError(
        f"{shape.name} {what} does not fit on rank {d.rank} ({d.gpu.describe()}) even "
        f"with one sample per micro-step and ZeRO-{stage}: it needs ~{est.total_gib:.1f} GiB but "
        f"{memory_fraction:g} x {d.gpu.memory_gib:g} GiB is planned; {fixes}, a smaller model "
        "or more ranks"
    )


def _lora_stages(stages: list[int], lora: LoraSpec, auto: bool) -> list[int]:
    """Stages worth trying for LoRA: ZeRO-1 only partitions the adapters' tiny optimizer states,
    so auto skips it; FSDP2 (2/3) shards a 16/32-bit base, never a quantized one."""
    if lora.quantization != "none":
        bad = [s for s in stages if s >= 2]
        if bad and not auto:
            raise HetlmError(
                f"ZeRO stage {bad[0]} (FSDP2) shards the base, which hetlm does not do for a "
                f"{lora.quantization} base: use --zero 0 or 1, or --quantization none"
            )
        stages = [s for s in stages if s < 2]
    if auto:
        stages = [s for s in stages if s != 1] or stages
    if not stages:
        raise HetlmError(
            f"no engine can run a {lora.quantization} base with the requested --engine: "
            "use --engine ddp"
        )
    return stages


def lora_comm_bytes(
    stage: int,
    engine: str,
    shape: ModelShape,
    lora: LoraSpec,
    precision: str,
    world_size: int,
    micro_steps: int,
) -> float:
    """Bytes each rank sends per step for LoRA: the adapters' gradients as in pretraining, and
    at stage 2/3 the all-gather of the (frozen, never reduced) base in every micro-step, once
    (stage 2) or for forward and backward (stage 3)."""
    adapters = lora_parameter_count(shape, lora)
    sent = comm_bytes(min(stage, 1), engine, adapters, precision, world_size, micro_steps)
    if world_size <= 1 or stage < 2:
        return sent
    gathers = micro_steps * (1 if stage == 2 else 2)
    param_b = bytes_per_element(precision)
    return sent + gathers * (world_size - 1) / world_size * param_b * float(shape.n_params)
