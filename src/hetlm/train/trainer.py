"""The trainer: the loop, the optimizer step, evaluation, checkpoints, rollback, rebalancing and
metrics, for any recipe (``hetlm.train.recipe``: masked-LM / ELECTRA / causal-LM pretraining,
LoRA instruction tuning). Nothing here knows about masking, LoRA or adapters.

Read ``train_step`` first: micro-batches from the heterogeneous sampler, one all-reduce of the
number of targets, summed losses scaled by world_size / n_global (token-exact: the gradient is
that of one big batch, whatever the split), then the engine's step: unscale (fp16), clip, AdamW
step or a skip on every rank together (``Engine.step`` in ``train/engine.py``). ``Trainer`` is
set-up (split, run plan, engine, precision, checkpoint) and bookkeeping (eval, metrics, saving);
``run_training`` starts or resumes one run in this process.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hetlm.cluster.engines import engine_info, engines_that
from hetlm.config import TrainingConfig
from hetlm.data.collators import EVAL_EPOCH
from hetlm.data.microbatch import MicroBatch
from hetlm.data.prefetch import StepPrefetcher
from hetlm.errors import HetlmError
from hetlm.models.compile import compile_blocks, should_compile
from hetlm.topology import BatchSplit
from hetlm.train import distributed as D
from hetlm.train import faults
from hetlm.train import heartbeat as HB
from hetlm.train.checkpoint import CheckpointManager
from hetlm.train.collective import collective_io
from hetlm.train.engine import Engine, EngineOptions
from hetlm.train.engines import build_engine
from hetlm.train.membership import (
    ElasticSplit,
    MembershipChange,
    elastic_job_id,
    elastic_split,
    membership_change,
    under_torchrun,
)
from hetlm.train.metrics import MetricsLogger, membership_history, plot_loss
from hetlm.train.objectives import loss_terms, loss_weights
from hetlm.train.optim import Schedule, scheduler_for
from hetlm.train.precision import Precision
from hetlm.train.rebalance import ComputeTimer, Rebalancer, check_rebalance
from hetlm.train.recipe import Recipe
from hetlm.train.run_checkpoint import RankRNG, RunCheckpoint
from hetlm.train.run_dir import (
    RunStart,
    apply_start,
    latest_of_run,
    new_run_id,
    plan_start,
    read_elastic_job,
    read_run_id,
)
from hetlm.train.run_plan import RunPlan, gather_devices, resolve_run_plan
from hetlm.train.scoring import score_batches


@dataclass
class StepResult:
    loss_sum: torch.Tensor  # this rank's summed loss per term, [k] (detached)
    num_targets: tuple[int, ...]  # this rank's targets per term
    num_targets_global: tuple[int, ...]
    grad_norm: float
    stepped: bool  # False when an fp16 overflow skipped the update


def train_step(
    engine: Engine,
    precision: Precision,
    optimizer,
    scheduler,
    ctx: D.DistContext,
    micro_batches: Sequence[MicroBatch],
    max_grad_norm: float | None,
) -> StepResult:
    """One optimizer step. ``optimizer`` is the engine's (the scheduler drives it); it is passed
    so that stand-ins for this function (tests) can step it themselves. Micro-batches and the
    module follow ``train/objectives.py``."""
    terms = len(micro_batches[0].counts)
    n_local = torch.tensor(
        [sum(mb.counts[i] for mb in micro_batches) for i in range(terms)], dtype=torch.int64
    )
    n_global = D.all_reduce_sum(ctx, n_local.clone())
    # Summed, never averaged: / n_global makes each term's global token mean; * world cancels
    # the engine's average over ranks.
    weights = torch.tensor(loss_weights(engine.unwrapped), dtype=torch.float32)
    scale = (weights * engine.loss_scale_world / n_global.clamp(min=1)).to(ctx.device)
    loss_sum_local = torch.zeros(terms, device=ctx.device)
    for i, mb in enumerate(micro_batches):
        # non_blocking: the prefetcher pinned these on CUDA, so the copy overlaps compute
        inputs = {k: v.to(ctx.device, non_blocking=True) for k, v in mb.model_inputs().items()}
        with engine.sync_gradients(i == len(micro_batches) - 1):
            with precision.autocast():
                loss_sum, _ = engine.module(**inputs)
            loss_sum = torch.atleast_1d(loss_sum)
            engine.backward((loss_sum * scale).sum())
        loss_sum_local += loss_sum.detach().float()
    # unscale (fp16) -> clip -> AdamW step; on fp16 overflow every rank skips it together
    grad_norm, stepped = engine.step(max_grad_norm)
    scheduler.step()
    return StepResult(
        loss_sum_local, tuple(n_local.tolist()), tuple(n_global.tolist()), float(grad_norm), stepped
    )


def combined_loss(
    loss_sums: torch.Tensor, counts: torch.Tensor, weights: tuple[float, ...]
) -> float:
    """sum_i weight_i * loss_sum_i / count_i: the loss one big batch would report."""
    per_term = loss_sums.double() / counts.double().clamp(min=1)
    return float((per_term * torch.tensor(weights, dtype=torch.float64)).sum())


# ---------------------------------------------------------------- set-up helpers


def _check_shared_dir(ctx: D.DistContext, output_dir: Path) -> None:
    """Multi-node runs read checkpoints written by rank 0: output_dir must be shared."""
    marker = output_dir / ".hetlm-shared-check"
    if ctx.is_main:
        marker.write_text(str(time.time()))
    D.barrier(ctx)
    seen = marker.is_file()
    ok = D.all_gather_object(ctx, seen)
    D.barrier(ctx)
    if ctx.is_main:
        marker.unlink(missing_ok=True)
    if not all(ok):
        missing = [r for r, s in enumerate(ok) if not s]
        raise HetlmError(
            f"run.output_dir {output_dir} is not visible from ranks {missing}: put "
            "it on a filesystem every node shares (e.g. NFS)"
        )


# How a refusal names each fingerprint entry; the paths only inform (a dataset may move).
_FINGERPRINT_NAMES = {
    "dataset_vocab_hash": "tokenizer (vocabulary hash of the dataset's tokenizer)",
    "dataset_sequences": "dataset (sequences per split)",
    "seq_len": "dataset sequence length",
    "vocab_size": "vocabulary size",
    "model": "model",
    "global_batch": "train.global_batch",
    "seed": "run.seed",
}
_FINGERPRINT_INFO = ("dataset_path", "tokenizer_dir")


def engine_options(config: TrainingConfig, plan: RunPlan, rank: int) -> EngineOptions:
    """The engine's settings: its name and stage from the run plan, the rest from the config."""
    cfg = config.train
    return EngineOptions(
        name=plan.engine,
        zero_stage=plan.zero_stage,
        bucket_cap_mb=cfg.bucket_cap_mb,
        grad_compression=cfg.grad_compression,
        deepspeed_config=cfg.deepspeed_config,
        max_grad_norm=cfg.max_grad_norm,
        micro_steps=plan.split.micro_steps,
        micro_batch=plan.split.max_micro_batch(rank),
    )


def _check_resume_compatible(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Refuse a resume whose model, tokenizer, dataset, global batch or seed changed, naming
    each difference (a model's differing fields one by one)."""
    details = []
    for key, now in current.items():
        if key in _FINGERPRINT_INFO or key not in saved or saved[key] == now:
            continue
        name = _FINGERPRINT_NAMES.get(key, key)
        was = saved[key]
        if isinstance(was, dict) and isinstance(now, dict) and key == "model":
            # fields added to the config since the checkpoint (absent there) do not count
            details += [
                f"{name}.{k}: checkpoint {was[k]!r} vs now {now[k]!r}"
                for k in now
                if k in was and was[k] != now[k]
            ]
        else:
            details.append(f"{name}: checkpoint {was!r} vs now {now!r}")
        if key.startswith("dataset") or key in ("seq_len", "vocab_size"):
            details[-1] += (
                f" (trained on {saved.get('dataset_path', '?')}, now {current.get('dataset_path')})"
            )
    if details:
        raise HetlmError(
            f"cannot resume from {path}: {'; '.join(details)}; resume with the "
            "original settings or start a new output_dir"
        )


# ---------------------------------------------------------------- the run


class Trainer:
    """Owns the objects of one run; ``run()`` is the loop. What is trained, on what data and
    what comes out is the recipe's (``hetlm.train.recipe``)."""

    def __init__(
        self,
        config: TrainingConfig,
        recipe: Recipe,
        ctx: D.DistContext,
        resume: bool | Path,
        *,
        run_id: str | None = None,
        extend: str | None = None,
    ) -> None:
        """``resume``: continue from the latest valid checkpoint of this run (True), or from
        this one (a checkpoint folder its caller has already verified). ``run_id``: the run's
        id (``hetlm.train.run_dir``; None: the folder's). ``extend``: how a changed
        ``train.max_steps`` reshapes the lr schedule on resume (``continue`` / ``restart``;
        None refuses the change)."""
        self.config, self.ctx, self.train_cfg = config, ctx, config.train
        self.recipe = recipe
        self.command = recipe.command
        self.extend = extend
        self.run_id = run_id or read_run_id(Path(config.run.output_dir)) or new_run_id()
        self.output_dir = Path(config.run.output_dir)
        node_of_rank = [int(n) for n in D.all_gather_object(ctx, ctx.node_rank)]
        self.node_of_rank = node_of_rank
        devices = gather_devices(ctx)
        # the ranks present now (train.elastic): the same global batch re-split over them
        self.elastic: ElasticSplit | None = None
        if config.train.elastic:
            self.elastic = collective_io(ctx, lambda: elastic_split(config, devices, node_of_rank))
            self.split: BatchSplit = self.elastic.split
        else:
            self.split = config.batch_split(ctx.world_size, node_of_rank)
        # precision, engine, stage and split: one plan for the whole job, or a one-line error
        plan_file = config.load_plan() if config.train.plan is not None else None
        self.run_plan: RunPlan = resolve_run_plan(
            ctx,
            requested_precision=self.train_cfg.precision,
            engine=self.train_cfg.engine,
            zero_stage=self.train_cfg.zero_stage,
            split=self.split,
            plan_file=plan_file,
            plan_path=str(config.train.plan) if plan_file is not None else None,
            devices=devices,
        )
        if (
            self.elastic is not None
            and not engine_info(self.run_plan.engine).resumes_on_any_world_size
        ):
            anywhere = ", ".join(
                engines_that(lambda e: e.resumes_on_any_world_size, with_single=False)
            )
            raise HetlmError(
                f"train.elastic: {self.run_plan.engine} checkpoints resume on the same number "
                f"of ranks only; train with train.engine {anywhere} (their checkpoints resume "
                "on any number of ranks), or drop --elastic"
            )
        self.membership: MembershipChange | None = None

        seed = config.run.seed
        self.data = recipe.load_data(self)
        self.meta = self.data.meta
        self.train_data, self.eval_data = self.data.train, self.data.validation
        self.sampler = recipe.sampler(self.data, self.split, ctx.rank, config.run.seed)

        self.output_dir.mkdir(parents=True, exist_ok=True)
        if ctx.enabled:
            _check_shared_dir(ctx, self.output_dir)
        self.checkpoints = CheckpointManager(
            self.output_dir / "checkpoints", self.train_cfg.save_total_limit, run_id=self.run_id
        )

        model = recipe.build_model(self, self.data)
        self.fingerprint = recipe.fingerprint(self.data)
        resume_dir = (
            (resume if isinstance(resume, Path) else self._find_resume_dir()) if resume else None
        )
        if resume_dir is not None:
            saved = CheckpointManager.load_trainer_state(resume_dir)
            _check_resume_compatible(saved["fingerprint"], self.fingerprint, resume_dir)
            recipe.load_weights(model, resume_dir)
        if should_compile(self.train_cfg.compile, ctx.device, self.run_plan.engine):
            compile_blocks(model)
        self.engine = build_engine(
            recipe.objective(model),
            ctx,
            self.run_plan.precision,
            engine_options(config, self.run_plan, ctx.rank),
        )
        self.precision = self.engine.precision
        self.rebalancer = self._build_rebalancer(plan_file)
        self.weights = loss_weights(self.engine.unwrapped)
        self.term_names = loss_terms(self.engine.unwrapped)
        self.optimizer = self.engine.build_optimizer(
            lr=config.learning_rate,
            weight_decay=self.train_cfg.weight_decay,
            betas=(self.train_cfg.adam_beta1, self.train_cfg.adam_beta2),
            eps=self.train_cfg.adam_epsilon,
        )
        self.schedule = Schedule(
            config.warmup,
            self.train_cfg.max_steps,
            kind=self.train_cfg.lr_scheduler_type,
            min_lr_rate=self.train_cfg.min_lr_rate,
        )
        self.scheduler = scheduler_for(self.optimizer, lambda: self.schedule)
        # what a checkpoint holds: the engine's model and optimizer, these parts, the run record
        self.checkpoint = RunCheckpoint(
            self.checkpoints,
            ctx,
            self.engine,
            model=lambda: self.hf_model,
            parts={"scheduler": self.scheduler, "precision": self.precision, "rng": RankRNG(ctx)},
            json_parts={"sampler": self.sampler},
        )
        torch.manual_seed(seed * 1009 + ctx.rank)  # dropout stream of this rank
        self.step = 0
        self.skipped_steps = 0  # fp16 overflows so far (the same on every rank)
        self.lr_factor, self.rollbacks = 1.0, 0  # train.on_nonfinite: rollback (persisted)
        self.last_checkpoint: Path | None = None
        if resume_dir is not None:
            self._restore(resume_dir)

    def _build_rebalancer(self, plan_file) -> Rebalancer | None:
        """``train.rebalance``: caps from ``train.max_micro_batch``, else the plan's."""
        cfg, world = self.train_cfg, self.ctx.world_size
        caps = cfg.max_micro_batch
        if isinstance(caps, int):
            caps = [caps] * world
        elif self.elastic is not None and self.elastic.caps is not None:
            caps = self.elastic.caps  # the present ranks' rows of the plan
        elif caps is None and plan_file is not None:
            caps = [r.cap for r in plan_file.ranks]
        check_rebalance(cfg.rebalance, self.engine.name, caps, world)
        if not cfg.rebalance or world == 1:
            return None
        assert caps is not None
        return Rebalancer(cfg.rebalance, caps, cfg.rebalance_min_gain)

    def _apply_split(self, split: BatchSplit) -> None:
        """Every rank switches to ``split`` at the same step; the sampler keeps its position."""
        self.split = split
        self.sampler.split = split

    @property
    def hf_model(self):
        return self.engine.unwrapped.model

    # ---- resume

    def _find_resume_dir(self) -> Path:
        found = latest_of_run(self.output_dir, read_run_id(self.output_dir))
        if found is None:
            raise HetlmError(
                f"no complete checkpoint under {self.checkpoints.root} to resume "
                "from: run without --resume to start a new run"
            )
        return found

    def _restore(self, path: Path) -> None:
        """The checkpoint's state into every part (``RunCheckpoint.load``), then the run's own
        fields: its step and counters, the split it had rebalanced to, its lr schedule."""
        trainer = self.checkpoint.load(path)
        saved = (
            BatchSplit(
                self.split.global_batch, int(trainer["micro_steps"]), tuple(trainer["shares"])
            )
            if "shares" in trainer
            else None
        )
        self.membership = membership_change(
            trainer,
            list(self.run_plan.devices),
            self.split,
            self.elastic.source if self.elastic else "the config",
        )
        if (
            self.rebalancer is not None
            and saved is not None
            and saved != self.split
            and saved.world_size == self.ctx.world_size
            and self.membership is None
        ):
            self._apply_split(saved)  # continue with the split the run had rebalanced to
        self.step = int(trainer["step"])
        self.skipped_steps = int(trainer.get("skipped_steps", 0))
        self.lr_factor = float(trainer.get("lr_factor", 1.0))  # already in the scheduler's lrs
        self.rollbacks = int(trainer.get("rollbacks", 0))
        self.last_checkpoint = path
        if trainer.get("schedule"):  # checkpoints from before it was stored keep the config's
            self.schedule = Schedule(**trainer["schedule"])
            if self.schedule.end != self.train_cfg.max_steps:
                self._extend_schedule(path)

    def _extend_schedule(self, path: Path) -> None:
        """train.max_steps changed since the checkpoint: reshape the lr schedule from this step
        as ``--extend`` says (never silently: the recomputed schedule would jump the lr)."""
        was, now, step = self.schedule.end, self.train_cfg.max_steps, self.step
        if self.extend is None:
            raise HetlmError(
                f"train.max_steps is {now} but the run in {path} was scheduled for {was} steps: "
                "add --extend continue (decay from the current lr to 0 at the new max_steps) or "
                "--extend restart (a new warm-up and decay from this step), or set max_steps "
                f"back to {was}"
            )
        if now <= step:
            raise HetlmError(
                f"train.max_steps {now} is not beyond step {step} of {path}: "
                "raise it to extend the run"
            )
        base = self.scheduler.base_lrs[0]
        current = self.scheduler.get_last_lr()[0] / base if base else 0.0
        if self.extend == "continue":
            if current <= 0:
                raise HetlmError(
                    f"--extend continue: the lr is already 0 at step {step} (the "
                    f"schedule of {path} ended there), so it would train at lr 0: "
                    "use --extend restart"
                )
            self.schedule = self.schedule.continued(step, now, current)
            how = (
                f"the lr decays from {current * base:.3g} at step {step} to 0 at step {now} "
                "(no new warm-up)"
            )
        else:
            warmup = self.train_cfg.warmup_steps
            warmup = max(1, round(0.06 * (now - step))) if warmup is None else warmup
            self.schedule = self.schedule.restarted(step, now, warmup)
            how = (
                f"a new schedule from step {step} (lr {current * base:.3g} there): warm-up "
                f"over {warmup} steps to {base:.3g}, then decay to 0 at step {now}"
            )
        if self.ctx.is_main:
            print(
                f"hetlm: warning: --extend {self.extend}: max_steps {was} -> {now}; {how}",
                flush=True,
            )

    # ---- checkpoint, eval, final save

    def save_checkpoint(self) -> None:
        """Every rank takes part (``RunCheckpoint.save``): the engine gathers the full model and
        optimizer state to rank 0 (DeepSpeed writes per-rank files); rank 0 writes the folder."""
        HB.beat("checkpoint", self.step)
        self.last_checkpoint = self.checkpoint.save(self.step, self._record())

    def _record(self) -> dict[str, Any]:
        """The run's own fields of ``trainer_state.json`` (the parts add theirs)."""
        return {
            "step": self.step,
            "world_size": self.ctx.world_size,
            "shares": list(self.split.shares),
            "micro_steps": self.split.micro_steps,
            "run_plan": self.run_plan.to_dict(),
            "skipped_steps": self.skipped_steps,
            "fingerprint": self.fingerprint,
            "run_id": self.run_id,
            "schedule": self.schedule.as_dict(),
            "lr_factor": self.lr_factor,
            "rollbacks": self.rollbacks,
        }

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out loss and accuracy of the objective (masking fixed by (seed, EVAL_EPOCH,
        index)); perplexity too for a causal LM. Terms beyond the first (ELECTRA's
        discriminator) are reported as ``eval_<term>_loss`` / ``eval_<term>_accuracy``.

        Every rank runs the same number of batches (FSDP and ZeRO-3 all-gather parameters in
        each forward): a rank whose samples ran out runs a stand-in batch of sample 0 and does
        not count it.
        """
        if not self.recipe.has_validation(self.data):
            return {}  # nothing held out (hetlm sft with validation 0)
        count = min(self.train_cfg.max_eval_samples, len(self.eval_data))
        mine = np.arange(count)[self.ctx.rank :: self.ctx.world_size]
        size = self.train_cfg.per_device_eval_batch_size
        batches = math.ceil(math.ceil(count / self.ctx.world_size) / size)
        names = loss_terms(self.engine.unwrapped)
        parts = [mine[b * size : (b + 1) * size] for b in range(batches)]
        stand_in = np.zeros(1, dtype=np.int64)
        with self.engine.evaluating() as model:
            totals = score_batches(  # [loss, correct, targets] x terms
                model,
                (
                    (self.eval_data.batch(ids if len(ids) else stand_in, EVAL_EPOCH), len(ids) > 0)
                    for ids in parts
                ),
                self.ctx.device,
                self.precision.autocast,
                terms=len(names),
            )
        D.all_reduce_sum(self.ctx, totals)
        n = totals[2].clamp(min=1.0)
        metrics = {
            "eval_loss": float(totals[0, 0] / n[0]),
            "eval_accuracy": float(totals[1, 0] / n[0]),
            "eval_tokens": int(totals[2, 0]),
        }
        if self.recipe.perplexity:
            metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
        for i, name in enumerate(names[1:], start=1):
            metrics[f"eval_{name}_loss"] = float(totals[0, i] / n[i])
            metrics[f"eval_{name}_accuracy"] = float(totals[1, i] / n[i])
        return metrics

    # ---- the loop

    def run(self, stop_at_step: int | None = None) -> dict[str, Any]:
        """Train to ``max_steps`` (or stop, checkpointed, at ``stop_at_step``)."""
        cfg, ctx = self.train_cfg, self.ctx
        end_step = min(cfg.max_steps, stop_at_step or cfg.max_steps)
        logger = MetricsLogger(
            self.output_dir,
            total_steps=cfg.max_steps,
            start_step=self.step,
            enabled=ctx.is_main,
            log_every=cfg.logging_steps,
            report_to=cfg.report_to,
            run_config=self.config.model_dump(mode="json"),
            run_id=self.run_id,
            desc=self.command,
        )
        logger.event(
            event="resume" if self.step else "start",
            step=self.step,
            world_size=ctx.world_size,
            shares=list(self.split.shares),
            micro_steps=self.split.micro_steps,
            precision=self.precision.name,
            engine=self.engine.name,
            zero_stage=self.engine.zero_stage,
            devices=[d.to_dict() for d in self.run_plan.devices],
            time=time.time(),
        )
        if self.membership is not None:
            logger.event(**self.membership.event())
            if ctx.is_main:
                print(self.membership.line(), flush=True)
        self.engine.module.train()
        history: list[dict[str, Any]] = []
        HB.install(HB.Heartbeat(self.output_dir, ctx.rank) if ctx.enabled else None)
        faults.install(self.engine.unwrapped)  # inert unless HETLM_FAULT is set (tests)
        prefetcher = StepPrefetcher(
            self.sampler,
            lambda batch: [self.train_data.batch(ids, batch.epoch) for ids in batch.micro_batches],
            enabled=cfg.prefetch,
            pin=ctx.device.type == "cuda",
        )
        timer = ComputeTimer(self.engine.unwrapped, ctx.device)  # each rank's own compute
        try:
            return self._loop(end_step, logger, history, prefetcher, timer)
        finally:
            prefetcher.close()
            timer.close()

    def _loop(
        self,
        end_step: int,
        logger: MetricsLogger,
        history: list[dict[str, Any]],
        prefetcher: StepPrefetcher,
        timer: ComputeTimer,
    ) -> dict[str, Any]:
        cfg, ctx = self.train_cfg, self.ctx
        while self.step < end_step:
            started = time.perf_counter()
            faults.on_step(self.step + 1, ctx.rank)
            HB.beat("train", self.step + 1)
            batch, micro = prefetcher.next()  # built while the previous step computed
            result = train_step(
                self.engine,
                self.precision,
                self.optimizer,
                self.scheduler,
                ctx,
                micro,
                cfg.max_grad_norm,
            )
            self.step += 1
            busy_s = time.perf_counter() - started
            terms = len(result.num_targets_global)
            stats = torch.cat(
                [
                    result.loss_sum.double().cpu(),
                    torch.tensor(
                        [
                            sum(len(m) for m in micro),
                            sum(m.num_tokens for m in micro),
                            busy_s,
                            timer.take(),
                            float(result.stepped),
                        ],
                        dtype=torch.float64,
                    ),
                ]
            )
            per_rank = torch.stack(D.all_gather_tensor(ctx, stats))
            wall_s = time.perf_counter() - started
            if per_rank[:, -1].min() != per_rank[:, -1].max():  # the replicas would diverge
                raise RuntimeError(
                    f"ranks disagree whether step {self.step} was skipped "
                    f"(stepped per rank: {per_rank[:, -1].tolist()}): a bug"
                )
            self.skipped_steps += not result.stepped
            term_sums = per_rank[:, :terms].sum(0)
            global_counts = torch.tensor(result.num_targets_global, dtype=torch.float64)
            loss = combined_loss(term_sums, global_counts, self.weights)
            samples, tokens, busy, compute = (per_rank[:, terms + i] for i in range(4))
            record = {
                "step": self.step,
                "epoch": batch.epoch,
                "loss": loss,
                "lr": self.scheduler.get_last_lr()[0],
                "grad_norm": result.grad_norm,
                "skipped": not result.stepped,
                "skipped_steps": self.skipped_steps,
                "step_time_s": wall_s,
                "masked_tokens": result.num_targets_global[0],
                "samples_per_s": float(samples.sum()) / wall_s,
                "tokens_per_s": float(tokens.sum()) / wall_s,
                "tokens_per_s_per_rank": [float(t) / wall_s for t in tokens],
                "busy_s_per_rank": [float(b) for b in busy],
                "compute_s_per_rank": [float(c) for c in compute],
            }
            if terms > 1:
                for name, value, n in zip(self.term_names, term_sums, global_counts, strict=True):
                    record[f"loss_{name}"] = float(value / max(1.0, float(n)))
            history.append(record)
            logger.step(record)
            if HB.current() is not None and self.step % cfg.logging_steps == 0 and ctx.is_main:
                logger.event(
                    event="heartbeat",
                    step=self.step,
                    ranks=HB.summary(self.output_dir, ctx.world_size),
                )
            if not math.isfinite(loss) and self.precision.name != "fp16":
                if self._rollback(loss, logger, history):
                    continue
                logger.close()
                if self.last_checkpoint is None:
                    raise HetlmError(
                        f"the loss became {loss} at step {self.step}, before any "
                        "checkpoint was written: restart with a lower lr"
                    )
                raise HetlmError(
                    f"the loss became {loss} at step {self.step}; last good "
                    f"checkpoint: {self.last_checkpoint}; resume from it "
                    "(--resume) with a lower lr"
                )
            done = self.step == end_step
            if cfg.eval_steps and self.step % cfg.eval_steps == 0 and not done:
                HB.beat("eval", self.step)
                metrics = self.evaluate()
                logger.event(event="eval", step=self.step, **metrics)  # and to the trackers
            if self.rebalancer is not None:
                self.rebalancer.observe(samples.tolist(), compute.tolist())
                if self.rebalancer.due(self.step) and not done:
                    self._rebalance(logger)
            if done or (cfg.save_steps and self.step % cfg.save_steps == 0):
                self.save_checkpoint()
        if self.step < cfg.max_steps:  # stopped early on request: resumable, no final model
            logger.event(event="stop", step=self.step, checkpoint=str(self.last_checkpoint))
            logger.close()
            return {
                "steps": self.step,
                "stopped_at": self.step,
                "last_checkpoint": str(self.last_checkpoint),
            }
        HB.beat("eval", self.step)
        final_eval = self.evaluate()
        if final_eval:  # empty when there is nothing held out (hetlm sft, validation 0)
            logger.event(event="eval", step=self.step, **final_eval)
        final_dir = self.recipe.save_final(self)
        logger.event(event="end", step=self.step, time=time.time(), **final_eval)
        logger.close()
        summary = self._summary(history, final_eval, final_dir)
        if ctx.is_main:
            plot_loss(self.output_dir / "metrics.jsonl", self.output_dir / "loss.png")
            import json

            (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary

    def _rebalance(self, logger: MetricsLogger) -> None:
        """``train.rebalance``: a new split from the window's measured speeds, if it pays."""
        assert self.rebalancer is not None
        decision = self.rebalancer.propose(self.split)
        if decision is None:
            return
        self._apply_split(decision.new)
        logger.event(event="rebalance", step=self.step, **decision.event())
        if self.ctx.is_main:
            print(
                f"hetlm: step {self.step}: rebalanced shares {list(decision.old.shares)} -> "
                f"{list(decision.new.shares)} ({decision.new.micro_steps} micro-steps), "
                f"expected {decision.expected_gain:.0%} shorter steps",
                flush=True,
            )

    def _rollback(self, loss: float, logger: MetricsLogger, history: list[dict[str, Any]]) -> bool:
        """``train.on_nonfinite: rollback``: reload the last good checkpoint in-process (model,
        optimizer, scheduler, precision, sampler, RNG), lr x ``rollback_lr_factor``, continue.
        False (the caller stops) when off, exhausted, without a checkpoint, or on an engine
        whose weights are sharded (fsdp2, deepspeed: resume from the checkpoint instead)."""
        cfg = self.train_cfg
        if (
            cfg.on_nonfinite != "rollback"
            or self.last_checkpoint is None
            or self.rollbacks >= cfg.max_rollbacks
            or not engine_info(self.engine.name).holds_full_model
        ):
            return False
        bad_step, path = self.step, self.last_checkpoint
        factor, rollbacks = self.lr_factor * cfg.rollback_lr_factor, self.rollbacks + 1
        self.recipe.load_weights(self.hf_model, path)
        self._restore(path)  # the checkpoint's step, lrs (with its lr_factor), sampler, RNG
        ratio = factor / self.lr_factor
        self.scheduler.base_lrs = [lr * ratio for lr in self.scheduler.base_lrs]
        for group in self.optimizer.param_groups:
            group["lr"] *= ratio
        self.lr_factor, self.rollbacks = factor, rollbacks
        history[:] = [r for r in history if r["step"] <= self.step]
        dropped = logger.rewind(self.step)
        logger.event(
            event="rollback",
            step=self.step,
            from_step=bad_step,
            loss=str(loss),
            checkpoint=str(path),
            lr_factor=factor,
            rollbacks=rollbacks,
            dropped_steps=dropped,
        )
        if self.ctx.is_main:
            print(
                f"hetlm: the loss became {loss} at step {bad_step}: rolled back to {path} "
                f"(rollback {rollbacks} of {cfg.max_rollbacks}), lr x {factor:g}",
                flush=True,
            )
        return True

    def _summary(
        self, history: list[dict[str, Any]], final_eval: dict[str, float], final_dir: Path
    ) -> dict[str, Any]:
        timed = history[1:] or history  # the first step includes warm-up costs
        wall = sum(r["step_time_s"] for r in timed) or float("nan")
        per_rank = (
            [
                sum(r["tokens_per_s_per_rank"][i] * r["step_time_s"] for r in timed) / wall
                for i in range(self.ctx.world_size)
            ]
            if timed
            else []
        )
        summary = {
            "steps": self.step,
            "steps_this_run": len(history),
            "loss_first": history[0]["loss"] if history else None,
            "loss_last": history[-1]["loss"] if history else None,
            **final_eval,
            "tokens_per_s": sum(per_rank),
            "tokens_per_s_per_rank": per_rank,
            "micro_batches": [self.split.micro_batch_sizes(r) for r in range(self.ctx.world_size)],
            "global_batch": self.split.global_batch,
            "precision": self.precision.name,
            "engine": self.engine.name,
            "zero_stage": self.engine.zero_stage,
            "skipped_steps": self.skipped_steps,
            "membership": membership_history(self.output_dir) if self.ctx.is_main else [],
            "model_dir": str(final_dir),
            "output_dir": str(self.output_dir),
            "last_checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
        }
        return self.recipe.summary(self, summary)


def run_training(
    config: TrainingConfig,
    recipe: Recipe,
    *,
    resume: bool | str | Path = False,
    overwrite: bool = False,
    extend: str | None = None,
    stop_at_step: int | None = None,
    trainer: type[Trainer] = Trainer,
) -> dict[str, Any]:
    """Run (or resume) one training job of ``recipe`` in this process; returns the run
    summary. ``trainer``: the loop's class (a subclass can time or instrument it).

    ``resume``: True (this run's newest valid checkpoint) or a checkpoint folder; ``overwrite``
    deletes another run's artifacts in ``run.output_dir`` (a fresh start there is refused
    without it); ``extend`` (``continue`` / ``restart``) allows a changed ``train.max_steps`` on
    resume. See ``hetlm.train.run_dir``."""
    from transformers.utils import logging as hf_logging

    if extend not in (None, "continue", "restart"):
        raise HetlmError(f"--extend {extend}: choose continue or restart")
    hf_logging.disable_progress_bar()
    D.set_threads_for_rank()
    ctx = D.init_distributed(config.train.dist_timeout_s)
    try:
        # torchrun restarted the job (any rank's count: see D.restart_count): the same run,
        # continued from its newest good checkpoint; every rank decides alike
        restart = max(int(n) for n in D.all_gather_object(ctx, D.restart_count()))
        start, restart = _start_run(
            ctx,
            Path(config.run.output_dir),
            resume,
            overwrite,
            restart,
            elastic=config.train.elastic,
        )
        D.set_job_restart_count(restart)
        if restart and ctx.is_main:
            found = start.resume_from
            print(
                f"hetlm: restart {restart}: "
                + (
                    f"resuming from {found}" if found else "no checkpoint yet, starting from step 0"
                ),
                flush=True,
            )
        run = trainer(
            config, recipe, ctx, start.resume_from or False, run_id=start.run_id, extend=extend
        )
        return run.run(stop_at_step)
    except RuntimeError as exc:  # a collective timed out or lost a peer: say who and where
        if ctx.enabled and HB.is_collective_failure(exc):
            raise HB.diagnose(
                exc,
                Path(config.run.output_dir),
                ctx.rank,
                ctx.world_size,
                config.train.dist_timeout_s,
            ) from None
        raise
    finally:
        HB.install(None)
        D.set_job_restart_count(None)
        D.shutdown()


def _start_run(
    ctx: D.DistContext,
    output_dir: Path,
    resume: bool | str | Path,
    overwrite: bool,
    restart: int,
    *,
    elastic: bool = False,
) -> tuple[RunStart, int]:
    """Rank 0 decides how the run starts in ``output_dir`` (refusing another run's folder,
    picking this run's checkpoint, deleting what --overwrite names) and tells every rank.

    Returns the start and the job's restart count. Under ``train.elastic`` a start whose
    torchrun job id (``--rdzv-id``) is the one ``run.json`` recorded is a re-formed group of the
    same job (a node left or joined: torchrun counts no failure for a node that joins), so it
    resumes like a restart."""
    start, error = None, None
    if ctx.is_main:
        try:
            job = _elastic_job(elastic)
            if job is not None and restart == 0 and read_elastic_job(output_dir) == job:
                restart = 1
            start = plan_start(
                output_dir, resume=resume, overwrite=overwrite and not restart, restart=restart
            )
            start.elastic_job = job
            apply_start(output_dir, start)
        except (HetlmError, OSError) as exc:
            error = str(exc)
    start, error, restart = D.all_gather_object(ctx, (start, error, restart))[0]
    if error:
        raise HetlmError(error)
    return start, restart


def _elastic_job(elastic: bool) -> str | None:
    """The torchrun job id of an elastic run (None: not elastic, or not under torchrun)."""
    if not elastic or not under_torchrun():
        return None
    job = elastic_job_id()
    if job is None:
        raise HetlmError(
            "train.elastic under torchrun needs a job id: add --rdzv-id JOB (e.g. "
            "$SLURM_JOB_ID) to every node's torchrun, so that hetlm can tell the same job "
            "re-formed after a node left or joined from a new job"
        )
    return job
