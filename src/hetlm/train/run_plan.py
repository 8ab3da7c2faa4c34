"""The run plan: precision, engine, ZeRO stage and the batch split, resolved once per job.

Every choice that ranks must share is made here, at start-up, from the same inputs on every rank:
the plan file when one is given, else the config, and the devices that every rank reports
(gathered once). ``auto`` precision is what every device supports (``hetlm.cluster.precision``),
so a V100 beside an A6000 trains the whole job in fp16 instead of leaving the fp16 rank alone in
the overflow all-reduce until the collective times out.

The ranks then compare their plans: a rank that resolved something else (another config file on
its node, say) stops the job with a one-line error naming it and its device, instead of a hang
later. The plan is logged in the ``start`` event and saved in every checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from hetlm.cluster.precision import choose_job_precision
from hetlm.errors import HetlmError
from hetlm.topology import BatchSplit
from hetlm.train import distributed as D
from hetlm.train.devices import DeviceReport
from hetlm.train.engine import resolve_engine


@dataclass(frozen=True)
class RunPlan:
    precision: str
    engine: str
    zero_stage: int
    split: BatchSplit
    devices: tuple[DeviceReport, ...]
    source: str  # "plan file <path>" or "config"

    def key(self) -> tuple:
        """What every rank must agree on."""
        return (
            self.precision,
            self.engine,
            self.zero_stage,
            tuple(self.split.shares),
            self.split.micro_steps,
            self.split.global_batch,
        )

    def describe_key(self) -> str:
        return (
            f"precision {self.precision}, engine {self.engine} (ZeRO {self.zero_stage}), "
            f"shares {list(self.split.shares)} in {self.split.micro_steps} micro-steps"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "precision": self.precision,
            "engine": self.engine,
            "zero_stage": self.zero_stage,
            "shares": list(self.split.shares),
            "micro_steps": self.split.micro_steps,
            "global_batch": self.split.global_batch,
            "source": self.source,
            "devices": [d.to_dict() for d in self.devices],
        }


def resolve_plan(
    *,
    requested_precision: str,
    engine: str,
    zero_stage: int | str,
    split: BatchSplit,
    devices: list[DeviceReport],
    plan_file: Any = None,
    plan_path: str | None = None,
) -> RunPlan:
    """The job's plan from its inputs (a pure function: the same on every rank).

    With a plan file, its precision stands in for ``auto`` but is still checked against the
    devices really present (a plan made for A100s refuses to run bf16 on a V100)."""
    option = "train.precision"
    if plan_file is not None and requested_precision == "auto":
        requested_precision = plan_file.precision
        option = (
            f"train.precision (the plan {plan_path} chose {plan_file.precision}; re-plan or set)"
        )
    precision = choose_job_precision(
        requested_precision, [d.support() for d in devices], option=option
    )
    name, stage = resolve_engine(
        engine,
        zero_stage,
        plan_file.engine if plan_file is not None else None,
        plan_file.zero_stage if plan_file is not None else None,
    )
    source = f"plan file {plan_path}" if plan_file is not None else "config"
    return RunPlan(precision, name, stage, split, tuple(devices), source)


def check_agreement(plans: list[tuple], devices: list[DeviceReport], describe: list[str]) -> None:
    """Every rank's plan key must equal rank 0's; else name the ranks that differ."""
    differ = [r for r, key in enumerate(plans) if key != plans[0]]
    if differ:
        names = "; ".join(f"{devices[r].describe()} resolved {describe[r]}" for r in differ)
        raise HetlmError(
            f"the ranks disagree on the run plan: rank 0 resolved {describe[0]}, "
            f"but {names}: give every node the same config (and plan file)"
        )


def gather_devices(ctx: D.DistContext) -> list[DeviceReport]:
    """Every rank's DeviceReport (a picklable dataclass), in rank order."""
    return cast(
        list[DeviceReport], D.all_gather_object(ctx, DeviceReport.local(ctx.rank, ctx.device))
    )


def resolve_run_plan(
    ctx: D.DistContext,
    *,
    requested_precision: str,
    engine: str,
    zero_stage: int | str,
    split: BatchSplit,
    plan_file: Any = None,
    plan_path: str | None = None,
    devices: list[DeviceReport] | None = None,
) -> RunPlan:
    """Gather every rank's device (unless ``devices``, already gathered, is given), resolve the
    plan, and check that all ranks agree on it.

    Every rank resolves the plan even when its own resolution fails, so that the error (the
    same on every rank, or one rank's) is raised on all of them together instead of leaving the
    others waiting in the next collective."""
    if devices is None:
        devices = gather_devices(ctx)
    error, plan = None, None
    try:
        plan = resolve_plan(
            requested_precision=requested_precision,
            engine=engine,
            zero_stage=zero_stage,
            split=split,
            devices=devices,
            plan_file=plan_file,
            plan_path=plan_path,
        )
    except HetlmError as exc:
        error = str(exc)
    answers = D.all_gather_object(
        ctx, (error, plan.key() if plan else None, plan.describe_key() if plan else None)
    )
    errors = [(r, e) for r, (e, _, _) in enumerate(answers) if e]
    if errors:
        rank, message = errors[0]
        raise HetlmError(
            message
            if rank == ctx.rank or len(errors) == len(answers)
            else f"rank {rank}: {message}"
        )
    check_agreement([a[1] for a in answers], devices, [a[2] for a in answers])
    assert plan is not None
    return plan
