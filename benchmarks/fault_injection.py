"""Fault injection end to end through the CLI: what hetlm does for each fault and bad input.

Every scenario runs ``hetlm pretrain`` in a subprocess on a tiny BERT (fp32, CPU, 8 steps,
global batch 8, checkpoint every 2 steps) with a fault from ``HETLM_FAULT``
(``hetlm.train.faults``) or a bad input, then (where it makes sense) resumes, and compares the
final weights with an uninterrupted run of the same topology. The full disk is a real
tmpfs that is too small for the second checkpoint when this runs as root (else that row is
skipped, with the reason). Writes ``benchmarks/results/fault_injection.{md,json}``.

    .venv/bin/python benchmarks/fault_injection.py [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
RESULTS = REPO / "benchmarks" / "results"
STEPS, EVERY = 8, 2
HETLM = [sys.executable, "-m", "hetlm.cli"]


def prepare_data(root: Path) -> Path:
    from conftest import write_small_corpus

    from hetlm.data.prepare.pipeline import prepare_dataset
    from hetlm.data.prepare.tokenizer_training import train_tokenizer

    corpus = write_small_corpus(root / "corpus.jsonl")
    tokenizer = train_tokenizer([corpus], root / "tokenizer", vocab_size=3000)
    prepare_dataset(
        [corpus], tokenizer, root / "data", seq_len=32, validation_fraction=0.2, workers=1
    )
    return root / "data"


def config(data: Path, out: Path, **train) -> dict:
    from conftest import tiny_config

    # a bug that hangs fails within a minute
    train = {
        "dist_timeout_s": 60,
        "max_steps": STEPS,
        "save_steps": EVERY,
        "save_total_limit": 3,
        "max_eval_samples": 16,
        **train,
    }
    return tiny_config(data, out, **train)


def write(cfg: dict, path: Path) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    return path


class Run:
    def __init__(self, args: list[str], env: dict[str, str] | None = None, timeout: float = 300):
        started = time.perf_counter()
        self.args, self.env = args, env or {}
        proc = subprocess.run(
            [*HETLM, *args],
            env={**os.environ, **self.env},
            text=True,
            capture_output=True,
            timeout=timeout,
            cwd=REPO,
        )
        self.seconds = time.perf_counter() - started
        self.code, self.out, self.err = proc.returncode, proc.stdout, proc.stderr

    @property
    def command(self) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        return (env + " " if env else "") + "hetlm " + " ".join(shlex.quote(a) for a in self.args)

    def message(self) -> str:
        """hetlm's own lines (errors, fault announcements, restarts), shortened."""
        lines = [
            line.strip()
            for line in (self.out + "\n" + self.err).splitlines()
            if line.startswith("hetlm:") and "fault injection" not in line
        ]
        seen = list(dict.fromkeys(re.sub(r"\(rank \d+\)", "(rank r)", x) for x in lines))
        return " / ".join(seen) or f"exit {self.code}"


ELASTIC_STEPS = 30
ELASTIC_TRAIN = {"global_batch": 12, "micro_batch": 2, "save_total_limit": 100}  # keep them all
PACE = "slow:seconds=0.25"  # ~4 steps/s, so that a node dies and returns mid-run


class ElasticRun:
    """``hetlm pretrain CONFIG --elastic`` on 3 emulated nodes (``hetlm.launch.local.ElasticLocalJob``,
    what ``--local-nodes 3 --elastic`` starts); node 2 is killed once step ``kill_after`` is
    logged and, with ``rejoin_after``, started again once that step ran on two nodes."""

    def __init__(
        self,
        cfg: Path,
        out: Path,
        kill_after: int | None,
        rejoin_after: int | None,
        *,
        node_names: list[str] | None = None,
        kill: int = 2,
        extra: list[str] | None = None,
    ) -> None:
        from hetlm.launch.local import ElasticLocalJob

        started = time.perf_counter()
        names = node_names or ["node0", "node1", "node2"]
        self.env = {"HETLM_FAULT": PACE}
        self.args = ["pretrain", str(cfg), "--local-nodes", str(len(names)), "--elastic"]
        self.args += [*(extra or []), "--quiet"]
        self.killed = names[kill] if kill_after is not None else None
        log = out.parent / f"{out.name}.agents.log"
        os.environ["HETLM_FAULT"] = PACE
        with log.open("w") as sink:
            job = ElasticLocalJob(
                ["pretrain", str(cfg), "--elastic", *(extra or []), "--quiet"],
                nodes=len(names),
                min_nodes=min(2, len(names)),
                threads_per_rank=1,
                node_names=names,
                stderr=sink.fileno(),
            )
            job.start()
            try:
                if kill_after is not None:
                    self._until(out, len(names), kill_after, job)
                    job.kill_node(kill)
                    if rejoin_after is not None:
                        self._until(out, len(names) - 1, rejoin_after, job)
                        job.start_node(kill)
                self.code = job.wait(timeout=600)
            finally:
                del os.environ["HETLM_FAULT"]
                for i in range(len(names)):
                    if job.alive(i):
                        job.kill_node(i)
        self.seconds = time.perf_counter() - started
        self.out, self.err = "", log.read_text()

    @staticmethod
    def _until(out: Path, world: int, step: int, job) -> None:
        deadline = time.time() + 300
        while time.time() < deadline and job.alive(0):
            if any(
                "event" not in r and r["step"] >= step and len(r["busy_s_per_rank"]) == world
                for r in metrics(out)
            ):
                return
            time.sleep(0.3)
        raise RuntimeError(f"step {step} on {world} nodes never came (see {out})")

    @property
    def command(self) -> str:
        return (
            f"HETLM_FAULT={PACE} hetlm "
            + " ".join(shlex.quote(a) for a in self.args)
            + (f"; kill node {self.killed}'s agent and rank after step 5" if self.killed else "")
        )

    def message(self) -> str:
        return Run.message(self)  # type: ignore[arg-type]


def weights(out: Path):
    from _dist import final_weights

    return final_weights(out) if (out / "model" / "model.safetensors").is_file() else None


def equal(a, b, tol: float = 0.0) -> str:
    from _dist import max_abs_diff

    if a is None or b is None:
        return "no final model"
    diff = max_abs_diff(a, b)
    return "yes (bitwise)" if diff == 0 else ("yes" if diff <= tol else "no") + f" ({diff:.1e})"


def metrics(out: Path) -> list[dict]:
    from hetlm.train.metrics import read_metrics

    return read_metrics(out / "metrics.jsonl")


def steps_once(out: Path) -> bool:
    steps = [r["step"] for r in metrics(out) if "event" not in r]
    return steps == sorted(set(steps)) == list(range(1, len(steps) + 1))


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ---------------------------------------------------------------- scenarios


def scenarios(data: Path, work: Path, refs: dict) -> dict:
    def out(name: str) -> Path:
        return work / name

    two = {"micro_batch": {"per_rank": [3, 5]}}
    local2 = ["--local-nodes", "2"]

    def kill_restart():
        cfg = write(config(data, out("kill_restart"), **two), work / "kill_restart.yaml")
        run = Run(
            ["pretrain", str(cfg), *local2, "--max-restarts", "1", "--quiet"],
            {"HETLM_FAULT": "kill:rank=1:step=6"},
        )
        restart = next((r for r in metrics(out("kill_restart")) if r.get("event") == "restart"), {})
        return dict(
            fault="kill -9 of rank 1 at step 6 (2 torchrun agents, --max-restarts 1)",
            runs=[run],
            did=run.message() + f"; restart event: resumed from step "
            f"{restart.get('resumed_from')}, dropped steps {restart.get('dropped_steps')}",
            steps_lost=len(restart.get("dropped_steps", [])) + 1,
            equal=equal(refs["two"], weights(out("kill_restart"))),
            once=steps_once(out("kill_restart")),
        )

    def kill_manual():
        cfg = write(config(data, out("kill_manual"), **two), work / "kill_manual.yaml")
        first = Run(
            ["pretrain", str(cfg), *local2, "--quiet"], {"HETLM_FAULT": "kill:rank=1:step=6"}
        )
        second = Run(["pretrain", str(cfg), *local2, "--resume", "--quiet"])
        return dict(
            fault="kill -9 of rank 1 at step 6, no restarts; then --resume by hand",
            runs=[first, second],
            did=first.message(),
            steps_lost=1,
            equal=equal(refs["two"], weights(out("kill_manual"))),
            once=steps_once(out("kill_manual")),
        )

    def kill_checkpoint():
        cfg = write(config(data, out("kill_ckpt")), work / "kill_ckpt.yaml")
        first = Run(["pretrain", str(cfg), "--quiet"], {"HETLM_FAULT": "kill_checkpoint:step=4"})
        staging = (out("kill_ckpt") / "checkpoints" / ".tmp-step-00000004").is_dir()
        second = Run(["pretrain", str(cfg), "--resume", "--quiet"])
        return dict(
            fault="kill -9 while writing checkpoint 4 (one process)",
            runs=[first, second],
            did=f"killed (exit {first.code}); half-written .tmp-step-00000004 left: "
            f"{staging}, ignored; --resume continued from step 2",
            steps_lost=2,
            equal=equal(refs["one"], weights(out("kill_ckpt"))),
            once=steps_once(out("kill_ckpt")),
        )

    def disk_full():
        name = out("disk_full")
        if os.geteuid() != 0 or not shutil.which("mount"):
            return dict(
                fault="full disk (tmpfs) while writing checkpoint 4",
                runs=[],
                did="skipped: mounting a tmpfs needs root",
                steps_lost="-",
                equal="-",
            )
        name.mkdir(parents=True, exist_ok=True)
        size = int(refs["checkpoint_bytes"] * 1.5) + 200_000  # one checkpoint fits, not two
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(name)],
            capture_output=True,
            text=True,
        )
        if mounted.returncode != 0:
            return dict(
                fault="full disk (tmpfs) while writing checkpoint 4",
                runs=[],
                did=f"skipped: mount failed ({mounted.stderr.strip()})",
                steps_lost="-",
                equal="-",
            )
        try:
            cfg = write(config(data, name), work / "disk_full.yaml")
            first = Run(["pretrain", str(cfg), "--quiet"])
            from hetlm.train.checkpoint import CheckpointManager, verify_manifest

            complete = CheckpointManager(name / "checkpoints", 1).complete_checkpoints()
            intact = bool(complete) and all(verify_manifest(p) is None for _, p in complete)
            kept_steps = [step for step, _ in complete]
            staging = list((name / "checkpoints").glob(".tmp-*"))
            subprocess.run(["mount", "-o", "remount,size=64m", str(name)], check=True)
            second = Run(["pretrain", str(cfg), "--resume", "--quiet"])
            result = weights(name)
        finally:
            kept = work / "disk_full_metrics.jsonl"
            if (name / "metrics.jsonl").is_file():
                shutil.copy(name / "metrics.jsonl", kept)
            subprocess.run(["umount", str(name)], capture_output=True)
        return dict(
            fault=f"full disk: output_dir on a {size / 1e6:.1f} MB tmpfs (room for one "
            "checkpoint); then remounted larger and --resume",
            runs=[first, second],
            did=first.message() + f"; checkpoints left {kept_steps}, intact: {intact}; "
            f"staging folders left: {len(staging)}",
            steps_lost=0 if intact else "?",
            equal=equal(refs["one"], result),
            note=f"tmpfs size={size}",
        )

    def disk_full_injected():
        cfg = write(config(data, out("enospc")), work / "enospc.yaml")
        first = Run(["pretrain", str(cfg), "--quiet"], {"HETLM_FAULT": "enospc:step=4"})
        second = Run(["pretrain", str(cfg), "--resume", "--quiet"])
        return dict(
            fault="ENOSPC injected while writing checkpoint 4",
            runs=[first, second],
            did=first.message(),
            steps_lost=0,
            equal=equal(refs["one"], weights(out("enospc"))),
            once=steps_once(out("enospc")),
        )

    def stall():
        cfg = write(config(data, out("stall"), dist_timeout_s=15, **two), work / "stall.yaml")
        run = Run(
            ["pretrain", str(cfg), *local2, "--quiet"],
            {"HETLM_FAULT": "stall:rank=1:step=5:seconds=60"},
        )
        return dict(
            fault="rank 1 hangs at step 5 (train.dist_timeout_s 15)",
            runs=[run],
            did=run.message(),
            steps_lost=0,
            equal="- (stopped; resumable from step 4)",
        )

    def nan_stop():
        cfg = write(config(data, out("nan_bf16"), precision="bf16"), work / "nan_bf16.yaml")
        run = Run(["pretrain", str(cfg), "--quiet"], {"HETLM_FAULT": "nan:step=5"})
        return dict(
            fault="NaN loss at step 5, bf16 (on_nonfinite: stop)",
            runs=[run],
            did=run.message(),
            steps_lost=1,
            equal="- (stopped)",
        )

    def nan_rollback():
        cfg = write(
            config(data, out("nan_rollback"), on_nonfinite="rollback"), work / "nan_rollback.yaml"
        )
        run = Run(["pretrain", str(cfg), "--quiet"], {"HETLM_FAULT": "nan:step=5"})
        event = next((r for r in metrics(out("nan_rollback")) if r.get("event") == "rollback"), {})
        return dict(
            fault="NaN loss at step 5, fp32, on_nonfinite: rollback",
            runs=[run],
            did=run.message() + f"; rollback event to step {event.get('step')}, "
            f"lr x {event.get('lr_factor')}",
            steps_lost=1,
            equal=equal(refs["one"], weights(out("nan_rollback")))
            + " (expected: lr halved from step 5)",
            once=steps_once(out("nan_rollback")),
        )

    def inf_fp16():
        cfg = write(config(data, out("inf_fp16"), precision="fp16"), work / "inf_fp16.yaml")
        run = Run(["pretrain", str(cfg), "--quiet"], {"HETLM_FAULT": "inf:step=5"})
        steps = [r for r in metrics(out("inf_fp16")) if "event" not in r]
        skipped = [r["step"] for r in steps if r.get("skipped")]
        return dict(
            fault="inf loss at step 5, fp16",
            runs=[run],
            did=f"exit {run.code}; steps skipped by the scaler: {skipped} (counted: "
            f"skipped_steps={steps[-1]['skipped_steps'] if steps else '?'})",
            steps_lost=len(skipped),
            equal="- (a skipped step changes the result)",
        )

    def truncated():
        name = out("truncated")
        cfg = write(config(data, name), work / "truncated.yaml")
        first = Run(["pretrain", str(cfg), "--stop-at-step", "6", "--quiet"])
        target = name / "checkpoints" / "step-00000006" / "model.safetensors"
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
        second = Run(["pretrain", str(cfg), "--resume", "--quiet"])
        warn = [x.strip() for x in second.err.splitlines() if "skipping checkpoint" in x]
        return dict(
            fault="checkpoint 6's model.safetensors truncated to half, then --resume",
            runs=[first, second],
            did=(warn[0] if warn else second.message())[-220:] + "; resumed from step 4",
            steps_lost=2,
            equal=equal(refs["one"], weights(name)),
            once=steps_once(name),
        )

    def missing_dataset():
        cfg = write(config(work / "no-such-dataset", out("missing")), work / "missing.yaml")
        run = Run(["pretrain", str(cfg)])
        return dict(
            fault="data.dataset points at a missing folder",
            runs=[run],
            did=run.message(),
            steps_lost="-",
            equal="-",
        )

    def wrong_dataset():
        name = out("wrong_data")
        cfg = write(config(data, name), work / "wrong_data.yaml")
        first = Run(["pretrain", str(cfg), "--stop-at-step", "2", "--quiet"])
        other = work / "other-data"
        if not other.exists():
            shutil.copytree(data, other)
            meta = json.loads((other / "hetlm_dataset.json").read_text())
            meta["tokenizer_vocab_hash"] = "f" * 16  # as if tokenized with another tokenizer
            (other / "hetlm_dataset.json").write_text(json.dumps(meta))
        second = Run(
            ["pretrain", str(write(config(other, name), work / "wrong_data2.yaml")), "--resume"]
        )
        return dict(
            fault="--resume with a dataset tokenized by another tokenizer",
            runs=[first, second],
            did=second.message(),
            steps_lost="-",
            equal="-",
        )

    def changed_model():
        name = out("changed_model")
        cfg = write(config(data, name), work / "changed_model.yaml")
        first = Run(["pretrain", str(cfg), "--stop-at-step", "2", "--quiet"])
        changed = config(data, name, global_batch=16, micro_batch=16)
        changed["model"]["preset"] = "small"
        second = Run(["pretrain", str(write(changed, work / "changed_model2.yaml")), "--resume"])
        return dict(
            fault="--resume with another model preset and global batch",
            runs=[first, second],
            did=second.message(),
            steps_lost="-",
            equal="-",
        )

    def changed_split():
        name = out("changed_split")
        cfg = write(config(data, name), work / "changed_split.yaml")
        first = Run(["pretrain", str(cfg), "--stop-at-step", "4", "--quiet"])
        second = Run(
            [
                "pretrain",
                str(write(config(data, name, **two), work / "split2.yaml")),
                *local2,
                "--resume",
                "--quiet",
            ]
        )
        return dict(
            fault="--resume on 2 nodes, split (3, 5), of a 1-process run (same global batch)",
            runs=[first, second],
            did=f"continued (exit {second.code})",
            steps_lost=0,
            equal=equal(refs["one"], weights(name), tol=1e-5),
            once=steps_once(name),
        )

    def elastic(name: str, rejoin: bool) -> dict:
        """3 emulated nodes (elastic); node 2 dies after checkpoint 4; the job goes on with 2
        (and, with ``rejoin``, node 2 comes back once step 10 is logged on two)."""
        base = out(name)
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(out(f"{name}_ref"), ignore_errors=True)
        cfg = write(
            config(data, base, **ELASTIC_TRAIN, elastic=True, max_steps=ELASTIC_STEPS),
            work / f"{name}.yaml",
        )
        run = ElasticRun(cfg, base, kill_after=5, rejoin_after=10 if rejoin else None)
        events = metrics(base)
        restarts = [r for r in events if r.get("event") == "restart"]
        changes = [r for r in events if r.get("event") == "membership"]
        # the reference: from each checkpoint the job resumed from, on that topology
        ref = out(f"{name}_ref")
        ref_cfg = write(
            config(data, ref, **ELASTIC_TRAIN, max_steps=ELASTIC_STEPS), work / f"{name}_ref.yaml"
        )
        resumed = [base / "checkpoints" / f"step-{r['resumed_from']:08d}" for r in restarts]
        saved = work / f"{name}_resumed"
        shutil.rmtree(saved, ignore_errors=True)
        for path in resumed:  # (save_total_limit 100 keeps them)
            if path.is_dir():
                shutil.copytree(path, saved / path.name)
        refs_runs = []
        world = [c["world_size"] for c in changes]
        for i, path in enumerate(resumed):
            stop = (
                ["--stop-at-step", str(restarts[i + 1]["resumed_from"])]
                if i + 1 < len(resumed)
                else []
            )
            where = ["--resume", str(saved / path.name)] if i == 0 else ["--resume"]
            refs_runs.append(
                Run(
                    [
                        "pretrain",
                        str(ref_cfg),
                        "--local-nodes",
                        str(world[i]),
                        *where,
                        *stop,
                        "--quiet",
                        *(["--overwrite"] if i == 0 else []),
                    ]
                )
            )
        lost = sum(len(r.get("dropped_steps") or []) for r in restarts)
        did = " / ".join(
            f"membership: {c['world_size_before']} -> {c['world_size']} ranks at step "
            f"{c['step']} (left {c['left'] or '-'}, joined {c['joined'] or '-'}), shares "
            f"{c['shares_before']} x{c['micro_steps_before']} -> {c['shares']} "
            f"x{c['micro_steps']}"
            for c in changes
        )
        topo = " -> ".join(["3", *[str(w) for w in world]])
        return dict(
            fault="3 elastic nodes, node 2's agent and rank killed (SIGKILL) after step 5"
            + ("; node 2 started again once step 10 ran on two" if rejoin else "")
            + f" (global batch 12, {ELASTIC_STEPS} steps)",
            runs=[run, *refs_runs],
            did=f"exit {run.code}; topology {topo}; {did}; finished at step "
            f"{max((r['step'] for r in events if 'event' not in r), default=0)}",
            steps_lost=lost,
            equal=equal(weights(ref), weights(base), tol=1e-6)
            + " vs resuming each checkpoint on its topology by hand; "
            + equal(refs["three"], weights(base), tol=1e-6)
            + " vs 3 nodes throughout",
            once=steps_once(base),
        )

    def elastic_plan():
        """A plan for three nodes of speeds 30 / 20 / 10 samples/s; the middle one dies; the
        split for the two left is derived from their rows of the plan (a plan listing more
        nodes than are present)."""
        from hetlm.cluster.planner import make_plan
        from hetlm.cluster.spec import parse_cluster
        from hetlm.models.presets import bert_config

        base, ref = out("elastic_plan"), out("elastic_plan_ref")
        for path in (base, ref):
            shutil.rmtree(path, ignore_errors=True)
        speeds = {"fast": 30, "mid": 20, "slow": 10}
        cluster = parse_cluster(
            {
                "nodes": [
                    {
                        "name": n,
                        "gpus": {"model": "cpu", "memory_gib": 4, "count": 1},
                        "samples_per_s": [v],
                    }
                    for n, v in speeds.items()
                ],
                "network": {"inter_node_gbps": 10},
            }
        )
        plan = make_plan(cluster, bert_config("tiny", 3000), 12, 32, precision="fp32")
        plan_path = plan.save(work / "elastic_plan.plan.yaml")
        train = {"global_batch": 12, "save_total_limit": 100, "max_steps": ELASTIC_STEPS}
        cfg = config(data, base, **train, elastic=True, plan=str(plan_path))
        cfg["train"].pop("micro_batch")
        cfg_path = write(cfg, work / "elastic_plan.yaml")
        run = ElasticRun(cfg_path, base, 5, None, node_names=list(speeds), kill=1)
        events = metrics(base)
        restart = next(r for r in events if r.get("event") == "restart")
        change = next(r for r in events if r.get("event") == "membership")
        resumed = base / "checkpoints" / f"step-{restart['resumed_from']:08d}"
        # the reference: from that checkpoint on fast and slow from the start
        ref_cfg = dict(cfg, run={**cfg["run"], "output_dir": str(ref)})
        ref_path = write(ref_cfg, work / "elastic_plan_ref.yaml")
        reference = ElasticRun(
            ref_path,
            ref,
            None,
            None,
            node_names=["fast", "slow"],
            extra=["--resume", str(resumed), "--overwrite"],
        )
        return dict(
            fault="3 elastic nodes from a plan listing fast / mid / slow (30 / 20 / 10 "
            "samples/s); mid's agent and rank killed after step 5 (global batch 12, "
            f"{ELASTIC_STEPS} steps)",
            runs=[run, reference],
            did=f"exit {run.code}; plan split {list(plan.batch_split.shares)}; membership: "
            f"{change['world_size_before']} -> {change['world_size']} ranks at step "
            f"{change['step']} (left {change['left']}), shares {change['shares_before']} -> "
            f"{change['shares']} from {change['split_from']}",
            steps_lost=len(restart.get("dropped_steps") or []),
            equal=equal(weights(ref), weights(base), tol=1e-6)
            + " vs resuming that checkpoint on fast and slow by hand",
            once=steps_once(base),
        )

    def elastic_shrink():
        return elastic("elastic_shrink", rejoin=False)

    def elastic_rejoin():
        return elastic("elastic_rejoin", rejoin=True)

    return {
        f.__name__: f
        for f in (
            kill_restart,
            kill_manual,
            kill_checkpoint,
            disk_full,
            disk_full_injected,
            stall,
            nan_stop,
            nan_rollback,
            inf_fp16,
            truncated,
            missing_dataset,
            wrong_dataset,
            changed_model,
            changed_split,
            elastic_shrink,
            elastic_rejoin,
            elastic_plan,
        )
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="run these scenarios only")
    parser.add_argument("--work", type=Path, default=None, help="keep the runs here")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="hetlm-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "prep" / "data"
    if not data.is_dir():
        (work / "prep").mkdir(exist_ok=True)
        prepare_data(work / "prep")
    refs: dict = {}
    ref_one = Run(
        [
            "pretrain",
            str(write(config(data, work / "ref_one"), work / "ref_one.yaml")),
            "--quiet",
            "--overwrite",
        ]
    )
    ref_two = Run(
        [
            "pretrain",
            str(
                write(
                    config(data, work / "ref_two", micro_batch={"per_rank": [3, 5]}),
                    work / "ref_two.yaml",
                )
            ),
            "--local-nodes",
            "2",
            "--quiet",
            "--overwrite",
        ]
    )
    ref_three = Run(
        [
            "pretrain",
            str(
                write(
                    config(data, work / "ref_three", **ELASTIC_TRAIN, max_steps=ELASTIC_STEPS),
                    work / "ref_three.yaml",
                )
            ),
            "--local-nodes",
            "3",
            "--quiet",
            "--overwrite",
        ]
    )
    assert ref_one.code == 0 and ref_two.code == 0, (ref_one.err[-2000:], ref_two.err[-2000:])
    assert ref_three.code == 0, ref_three.err[-2000:]
    refs.update(
        one=weights(work / "ref_one"),
        two=weights(work / "ref_two"),
        three=weights(work / "ref_three"),
        checkpoint_bytes=dir_bytes(sorted((work / "ref_one" / "checkpoints").glob("step-*"))[-1]),
    )
    rows = []
    previous = RESULTS / "fault_injection.json"
    if args.only and previous.is_file():  # re-run some rows, keep the others
        rows = [r for r in json.loads(previous.read_text())["rows"] if r["name"] not in args.only]
    for name, scenario in scenarios(data, work, refs).items():
        if args.only and name not in args.only:
            continue
        print(f"== {name}", flush=True)
        row = scenario()
        runs = row.pop("runs")
        row.update(
            name=name,
            commands=[r.command for r in runs],
            exit_codes=[r.code for r in runs],
            seconds=round(sum(r.seconds for r in runs), 1),
        )
        print(json.dumps(row, ensure_ascii=False, indent=1), flush=True)
        rows.append(row)
    order = list(scenarios(data, work, refs))
    rows.sort(key=lambda r: order.index(r["name"]))
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {
        "steps": STEPS,
        "checkpoint_every": EVERY,
        "model": "tiny BERT, fp32 unless noted",
        "global_batch": 8,
        "reference_checkpoint_bytes": refs["checkpoint_bytes"],
        "torch": __import__("torch").__version__,
        "cpus": os.cpu_count(),
    }
    (RESULTS / "fault_injection.json").write_text(
        json.dumps({"meta": meta, "rows": rows}, indent=1, ensure_ascii=False)
    )
    (RESULTS / "fault_injection.md").write_text(markdown(rows, meta, work))
    print(f"wrote {RESULTS / 'fault_injection.md'} (runs in {work})")


def markdown(rows: list[dict], meta: dict, work: Path | None = None) -> str:
    def cell(text) -> str:
        text = str(text).replace("|", "\\|").replace("\n", " ")
        if work is not None:
            text = text.replace(f"{work}/", "WORK/")
        return re.sub(r"/tmp/hetlm-faults-[^/ ]+/", "WORK/", text)

    lines = [
        "# Fault injection",
        "",
        f"`benchmarks/fault_injection.py`: {meta['model']}, global batch "
        f"{meta['global_batch']}, {meta['steps']} steps, a checkpoint every "
        f"{meta['checkpoint_every']} steps (one is {meta['reference_checkpoint_bytes'] / 1e6:.1f}"
        f" MB), torch {meta['torch']}, {meta['cpus']} CPUs. *Steps lost*: optimizer steps "
        "computed and then thrown away (re-run from the checkpoint). *Data lost*: samples "
        "never trained on. *Final weights equal*: against an uninterrupted run of the same "
        "topology. WORK is the scenario's temporary folder.",
        "",
        "| fault / bad input | what hetlm did | steps lost | data lost | each step logged "
        "once | final weights equal | s | reproduce |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            "| "
            + " | ".join(
                cell(x)
                for x in (
                    row["fault"],
                    row["did"],
                    row["steps_lost"],
                    row.get("data_lost", "none"),
                    {True: "yes", False: "NO"}.get(row.get("once"), "-"),
                    row["equal"],
                    row["seconds"],
                    "<br>".join(f"`{c}`" for c in row["commands"]),
                )
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
