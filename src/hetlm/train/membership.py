"""Elastic membership: who is present now, the split of the same global batch over them, and
what changed since the checkpoint a re-formed job resumes from.

Under ``torchrun --nnodes MIN:MAX`` (or ``--local-nodes N --elastic``) a lost or returning node
makes torchrun stop every rank and start them again on the nodes present. With ``train.elastic``
each rank then reports its node (``HETLM_NODE_NAME``, else the host name) and its index there;
the split of the *unchanged* global batch is derived for exactly those ranks:

- from a plan (``train.plan``): each present rank gets its plan row (matched by node name or
  host name, else by GPU model), and the shares are the planner's rule (``allocate_shares``:
  proportional to the rows' speeds, within their memory caps, one number of micro-steps, more
  micro-steps when the caps demand it). All of the plan's nodes present, in its order: the
  plan's own split. A plan may list more nodes than are present;
- from one micro-batch for every rank (``train.micro_batch: 8``): the usual split when it makes
  the global batch, else the same rule with that micro-batch as every rank's cap.

Split invariance makes the result the model the original topology would have trained; the
sampler's position (epoch, step) is split-free, so no sample is lost or seen twice.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hetlm.cluster.hardware import find_gpu
from hetlm.cluster.planner import allocate_shares
from hetlm.errors import HetlmError
from hetlm.topology import BatchSplit
from hetlm.train.devices import NODE_ENV, DeviceReport

if TYPE_CHECKING:
    from hetlm.cluster.planner import Plan, RankPlan


def elastic_job_id() -> str | None:
    """torchrun's ``--rdzv-id`` (``TORCHELASTIC_RUN_ID``): the same for every re-formed group of
    one job. None outside torchrun, or when it was left at torchrun's default ``none``."""
    value = os.environ.get("TORCHELASTIC_RUN_ID")
    return value if value and value != "none" else None


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


@dataclass(frozen=True)
class ElasticSplit:
    split: BatchSplit
    caps: list[int] | None  # each present rank's largest micro-batch (for train.rebalance)
    source: str  # how the split was derived, for the membership line


def _names(devices: list[DeviceReport]) -> str:
    nodes = list(dict.fromkeys(d.node or d.host for d in devices))
    return ", ".join(nodes)


def plan_rows(plan: Plan, devices: list[DeviceReport]) -> list[RankPlan]:
    """Each present rank's row of the plan: its node's row for its local rank (the node matched
    by the plan's node name, Slurm host name or address), else a row of the same GPU model."""
    rows = []
    for device in devices:
        name = device.node or device.host
        node = next(
            (n for n in plan.nodes if name in (n.name, n.hostname, n.host)),
            None,
        )
        row = None
        if node is not None:
            row = next(
                (
                    r
                    for r in plan.ranks
                    if r.node == node.name and r.local_rank == device.local_rank
                ),
                None,
            )
            if row is None:
                raise HetlmError(
                    f"node {name} runs local rank {device.local_rank} but the plan gives it "
                    f"{node.ranks} rank{'s' if node.ranks > 1 else ''}: start "
                    f"--nproc-per-node {node.ranks} there, or re-plan"
                )
        elif device.kind == "cuda":
            model = _gpu_model(device.name)
            row = next((r for r in plan.ranks if model and _gpu_model(r.gpu) == model), None)
        if row is None:
            known = ", ".join(n.name for n in plan.nodes)
            raise HetlmError(
                f"rank {device.rank} runs on node {name} ({device.name}), which the plan "
                f"does not list (its nodes: {known}) and whose device is not one of its GPU "
                f"models: set {NODE_ENV} to the plan's name for that node, or re-plan with it "
                "in the cluster file"
            )
        rows.append(row)
    return rows


def _gpu_model(name: str) -> str | None:
    """The GPU table's name for a CUDA device name or a plan's GPU ("Tesla V100-SXM2-32GB" and
    "V100-32GB" are one model); None when the table does not know it."""
    try:
        found = find_gpu(name)
    except HetlmError:  # an ambiguous spelling: no match rather than a guess
        return None
    return found.name if found is not None else None


def _allocate(
    global_batch: int, caps: list[int], speeds: list[float], devices: list[DeviceReport]
) -> BatchSplit:
    """The planner's rule over the present ranks; where it cannot make the global batch (every
    rank needs a sample in each of the common micro-steps), one line naming what is needed."""
    try:
        steps, shares = allocate_shares(global_batch, caps, speeds)
    except HetlmError:
        steps, ranks = math.ceil(global_batch / sum(caps)), len(devices)
        raise HetlmError(
            f"the global batch {global_batch} cannot be made on the {ranks} ranks present now "
            f"(nodes {_names(devices)}): with micro-batch caps {caps} it takes {steps} "
            f"micro-step{'s' if steps > 1 else ''}, and every rank needs a sample in each: it "
            f"needs at most {global_batch // steps} ranks (torchrun --nnodes MIN:MAX) or a new "
            f"run with a global batch of at least {ranks * steps}"
        ) from None
    return BatchSplit(global_batch, steps, tuple(shares))


def elastic_split(
    config: Any, devices: list[DeviceReport], node_of_rank: list[int]
) -> ElasticSplit:
    """The split of ``train.global_batch`` over the ranks present (``devices``, in rank order)."""
    train = config.train
    global_batch = train.global_batch
    if train.plan is not None:
        plan = config.load_plan()
        rows = plan_rows(plan, devices)
        caps = [r.cap for r in rows]
        if rows == list(plan.ranks):
            return ElasticSplit(plan.batch_split, caps, f"the plan {train.plan}")
        split = _allocate(global_batch, caps, [r.samples_per_s for r in rows], devices)
        present = len({r.node for r in rows})
        return ElasticSplit(
            split,
            caps,
            f"the plan {train.plan} ({present} of its {len(plan.nodes)} nodes present)",
        )
    micro = train.micro_batch
    world = len(devices)
    if isinstance(micro, int):
        caps = [train.max_micro_batch] * world if isinstance(train.max_micro_batch, int) else None
        try:
            split = BatchSplit.from_micro_batches(global_batch, [micro] * world)
            return ElasticSplit(split, caps, f"train.micro_batch {micro} on every rank")
        except HetlmError:
            split = _allocate(global_batch, [micro] * world, [1.0] * world, devices)
            return ElasticSplit(
                split, caps, f"train.micro_batch {micro} as every rank's largest micro-batch"
            )
    if micro is None:
        raise HetlmError(
            "train.elastic needs train.plan, or train.micro_batch as one int (the largest "
            "micro-batch every rank fits), to split the global batch over the ranks present"
        )
    what = "per_rank" if micro.per_rank is not None else "per_node"
    given = micro.per_rank if micro.per_rank is not None else micro.per_node
    assert given is not None
    count = world if what == "per_rank" else max(node_of_rank) + 1
    if len(given) != count:
        raise HetlmError(
            f"train.elastic: train.micro_batch.{what} lists {len(given)} entries but "
            f"{count} {'ranks' if what == 'per_rank' else 'nodes'} are present now (nodes "
            f"{_names(devices)}): a list fits one topology only; give one micro-batch for "
            "every rank (train.micro_batch: 8) or a plan (train.plan) that names the nodes"
        )
    caps = list(train.max_micro_batch) if isinstance(train.max_micro_batch, list) else None
    return ElasticSplit(config.batch_split(world, node_of_rank), caps, f"train.micro_batch.{what}")


def emulated_devices(node_names: list[str], nproc_per_node: int) -> list[DeviceReport]:
    """The reports of CPU ranks on the named emulated nodes (for the launcher's pre-check)."""
    return [
        DeviceReport(i * nproc_per_node + k, "localhost", "cpu", "cpu", None, 0, name, k)
        for i, name in enumerate(node_names)
        for k in range(nproc_per_node)
    ]


def describe_members(devices: list[dict[str, Any]] | list[DeviceReport]) -> list[str]:
    """One ``node/local_rank`` label per rank (checkpoint dicts or live reports)."""
    labels = []
    for d in devices:
        if isinstance(d, dict):
            node, local = d.get("node") or d.get("host", "?"), d.get("local_rank", 0)
        else:
            node, local = d.node or d.host, d.local_rank
        labels.append(f"{node}/{local}")
    return labels


@dataclass(frozen=True)
class MembershipChange:
    """The ranks of the checkpoint's job against the ranks present now (None: the same)."""

    step: int
    before: list[str]
    after: list[str]
    shares_before: list[int]
    micro_steps_before: int
    split: BatchSplit
    source: str

    def event(self) -> dict[str, Any]:
        return {
            "event": "membership",
            "step": self.step,
            "world_size_before": len(self.before),
            "world_size": len(self.after),
            "ranks_before": self.before,
            "ranks": self.after,
            "left": sorted(set(self.before) - set(self.after)),
            "joined": sorted(set(self.after) - set(self.before)),
            "shares_before": self.shares_before,
            "micro_steps_before": self.micro_steps_before,
            "shares": list(self.split.shares),
            "micro_steps": self.split.micro_steps,
            "split_from": self.source,
        }

    def line(self) -> str:
        left = sorted(set(self.before) - set(self.after))
        joined = sorted(set(self.after) - set(self.before))
        what = "; ".join(
            part
            for part in (
                f"left: {', '.join(left)}" if left else "",
                f"joined: {', '.join(joined)}" if joined else "",
            )
            if part
        )
        return (
            f"hetlm: membership changed at step {self.step} ({what}): {len(self.before)} -> "
            f"{len(self.after)} ranks; global batch {self.split.global_batch} re-split "
            f"{self.shares_before} in {self.micro_steps_before} micro-steps -> "
            f"{list(self.split.shares)} in {self.split.micro_steps} (from {self.source})"
        )


def membership_change(
    trainer_state: dict[str, Any], devices: list[DeviceReport], split: BatchSplit, source: str
) -> MembershipChange | None:
    """What changed between the checkpoint's ranks and the present ones (None: nothing)."""
    saved = (trainer_state.get("run_plan") or {}).get("devices")
    if not saved:  # checkpoints from before run plans: compare the world size only
        if int(trainer_state.get("world_size", len(devices))) == len(devices):
            return None
        before = [f"rank{r}" for r in range(int(trainer_state["world_size"]))]
    else:
        before = describe_members(saved)
    after = describe_members(devices)
    if before == after:
        return None
    return MembershipChange(
        int(trainer_state["step"]),
        before,
        after,
        list(trainer_state.get("shares", [])),
        int(trainer_state.get("micro_steps", 1)),
        split,
        source,
    )
