"""An emulated heterogeneous cluster on one machine: equal, memory-proportional and planned shares.

Two "nodes" are two torchrun agents on 127.0.0.1 whose ranks run in their own cgroup v1 groups:
node0 owns core 0 and the larger memory cap; node1 owns core 1 under a CPU quota of half a core
(a slower device) and a smaller memory cap (a smaller device). A small BERT (bert-small, the
shipped Aozora corpus, SentencePiece vocab 8000, seq 128, bf16 autocast) is trained with the same
global batch under three allocations of the micro-batches:

  (a) equal micro-batches, bounded by the smaller node (what stock DDP forces);
  (b) micro-batches proportional to memory (the reference work's rule);
  (c) hetlm's plan: `hetlm probe` inside each node measures its largest micro-batch and its
      samples/s, `hetlm bench net` between the nodes measures the link, `hetlm plan` makes the
      shares from them, and `hetlm pretrain CONFIG --plan PLAN` runs it.

For reference each node also trains alone (both at once, each in its cgroup, no communication)
with the share the plan gave it. Runs alternate (a, b, c, a, b, c, ...) so that drift of the
machine hits all alike; throughput is the global batch over the wall-clock step time of rank 0,
summed over the steps after a warm-up. Needs root (cgroup v1 under /sys/fs/cgroup).

    sudo .venv/bin/python benchmarks/emulated_cluster.py [--steps 20] [--repeats 3]

Writes benchmarks/results/emulated_cluster.{md,json,png}; the work (data, probes, plan, runs)
goes to runs/emulated/. The cgroups are removed at the end, whatever happens.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data" / "general_aozora" / "aozora_soseki_akutagawa.jsonl"
RESULTS = ROOT / "benchmarks" / "results"
GIB = 2**30
ALLOCATIONS = {
    "a": "equal micro-batches (bounded by the smaller node)",
    "b": "micro-batches proportional to memory",
    "c": "hetlm plan (probe + bench net + plan)",
}


@dataclass
class NodeSetup:
    name: str
    cpus: str
    cpu_quota: float | None
    memory_gib: float


@dataclass
class RunResult:
    label: str
    repeat: int
    samples_per_s: float
    step_s: float  # mean wall-clock step time over the timed steps
    steps_timed: int
    micro_batches: list[list[int]]
    busy_s_per_rank: list[float] = field(default_factory=list)
    peak_memory_gib: list[float] = field(default_factory=list)  # per node, anonymous memory
    peak_charge_gib: list[float] = field(default_factory=list)  # per node, with page cache
    memory_failcnt: list[int] = field(default_factory=list)  # limit hits (reclaim) per node
    oom_kills: list[int] = field(default_factory=list)  # ranks the kernel killed, per node
    loss_last: float | None = None
    load_avg: float | None = None
    returncode: int = 0


# --------------------------------------------------------------------------- set-up


def prepare_data(work: Path, vocab_size: int, seq_len: int) -> Path:
    """Tokenizer + packed dataset of the shipped corpus, cached under ``work``."""
    from hetlm.data.prepare.pipeline import prepare_dataset
    from hetlm.data.prepare.tokenizer_training import train_tokenizer

    data = work / f"data-v{vocab_size}-s{seq_len}"
    if not (data / "hetlm_dataset.json").is_file():
        tokenizer = work / f"tokenizer-v{vocab_size}"
        if not (tokenizer / "tokenizer.json").is_file():
            train_tokenizer([CORPUS], tokenizer, vocab_size=vocab_size)
        prepare_dataset(
            [CORPUS], tokenizer, data, seq_len=seq_len, validation_fraction=0.02, overwrite=True
        )
    return data


def hetlm_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "hetlm.cli", *args]


def one_thread_env() -> dict[str, str]:
    """One intra-op thread per rank: each node owns one core."""
    return dict(
        os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_DATASETS_DISABLE_PROGRESS_BARS="1"
    )


def probe_nodes(
    nodes, work: Path, args: argparse.Namespace, extra: list[str] | None = None
) -> list[dict[str, Any]]:
    """``hetlm probe`` inside each node's cgroups (both at once: each has its own core)."""
    procs = []
    for i, node in enumerate(nodes):
        out = work / f"probe-node{i}.yaml"
        command = [
            *node.prefix(),
            *hetlm_command(
                "probe",
                "--model-type",
                "bert",
                "--preset",
                args.preset,
                "--vocab-size",
                str(args.vocab_size),
                "--seq-len",
                str(args.seq_len),
                "--precision",
                "bf16",
                "--device",
                "cpu",
                "--steps",
                "5",
                "--output",
                str(out),
            ),
        ]
        if args.reserve_gib is not None:
            command += ["--reserve-gib", str(args.reserve_gib)]
        command += extra or []
        log = (work / f"probe-node{i}.log").open("w")
        procs.append(
            (
                subprocess.Popen(
                    command, env=one_thread_env(), stdout=log, stderr=subprocess.STDOUT
                ),
                out,
                log,
            )
        )
    probes = []
    for proc, out, log in procs:
        code = proc.wait()
        log.close()
        if code != 0:
            raise SystemExit(f"probe failed, see {log.name}:\n" + Path(log.name).read_text())
        probes.append(yaml.safe_load(out.read_text()))
        print(Path(log.name).read_text(), end="")
    return probes


def bench_net(nodes, work: Path) -> dict[str, Any]:
    """``hetlm bench net`` between the two nodes' ranks (each rank in its node's cgroups)."""
    from hetlm.launch.local import run_local_nodes

    prefix = work / "net"
    code = run_local_nodes(
        [
            "bench",
            "net",
            "--min-size",
            "1M",
            "--max-size",
            "64M",
            "--iters",
            "10",
            "--output",
            str(prefix),
        ],
        nodes=2,
        threads_per_rank=1,
        rank_prefixes=[node.prefix() for node in nodes],
    )
    if code != 0:
        raise SystemExit(f"hetlm bench net failed ({code})")
    return json.loads(prefix.with_suffix(".json").read_text())


def write_cluster(work: Path, setups: list[NodeSetup], gbps: float) -> Path:
    """The cluster file: CPU 'GPUs' with their memory caps and the probe files' speeds."""
    cluster = {
        "nodes": [
            {
                "name": s.name,
                "host": "127.0.0.1",
                "gpus": {"model": "cpu", "memory_gib": s.memory_gib, "count": 1},
                "samples_per_s": f"probe-node{i}.yaml",
            }
            for i, s in enumerate(setups)
        ],
        "network": {"inter_node_gbps": round(gbps, 3), "intra_node_gbps": 100},
    }
    path = work / "cluster.yaml"
    path.write_text(yaml.safe_dump(cluster, sort_keys=False))
    return path


def make_plan(work: Path, cluster: Path, config: Path, args: argparse.Namespace):
    from hetlm.cluster.planner import load_plan

    plan_path = work / "plan.yaml"
    result = subprocess.run(
        hetlm_command(
            "plan",
            str(cluster),
            "--model-type",
            "bert",
            "--preset",
            args.preset,
            "--vocab-size",
            str(args.vocab_size),
            "--global-batch",
            str(args.global_batch),
            "--seq-len",
            str(args.seq_len),
            "--precision",
            "bf16",
            "--output",
            str(plan_path),
            "--config",
            str(config),
        ),
        capture_output=True,
        text=True,
    )
    print(result.stdout, result.stderr, end="")
    if result.returncode != 0:
        raise SystemExit("hetlm plan failed")
    (work / "plan.txt").write_text(result.stdout)
    return load_plan(plan_path)


def equal_micro_batches(cap_small: int, global_batch: int) -> list[int] | None:
    """(a): the largest m <= the smaller node's cap with global_batch a multiple of 2m."""
    for m in range(cap_small, 0, -1):
        if global_batch % (2 * m) == 0:
            return [m, m]
    return None


def memory_proportional(
    caps: list[int], memory: list[float], global_batch: int
) -> list[int] | None:
    """(b): micro-batches in the ratio of the nodes' memory, the smaller node at most its cap."""
    small = min(range(len(caps)), key=lambda i: memory[i])
    for m in range(caps[small], 0, -1):
        sizes = [round(m * memory[i] / memory[small]) for i in range(len(caps))]
        if all(s <= c for s, c in zip(sizes, caps, strict=True)) and global_batch % sum(sizes) == 0:
            return sizes
    return None


def write_config(
    path: Path,
    output_dir: Path,
    data: Path,
    args: argparse.Namespace,
    per_node: list[int] | None,
    global_batch: int,
) -> Path:
    train: dict[str, Any] = {
        "global_batch": global_batch,
        "max_steps": args.steps,
        "learning_rate": 5e-4,
        "warmup_steps": 2,
        "precision": "bf16",
        "max_eval_samples": 8,
        "per_device_eval_batch_size": 8,
        "save_steps": 0,
        "save_total_limit": 1,
        "logging_steps": 1,
        "dist_timeout_s": 300,
    }
    if per_node is not None:
        train["micro_batch"] = {"per_node": per_node}
    config = {
        "run": {"output_dir": str(output_dir), "seed": 0},
        "data": {"dataset": str(data)},
        "model": {"type": "bert", "preset": args.preset},
        "train": train,
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# --------------------------------------------------------------------------- measuring a run


class NodeMemory:
    """The kernel's accounting of each node's memory cgroup during a run: the peak of its
    anonymous memory (sampled ``memory.stat`` rss: tensors and heaps, what a GPU's memory
    would hold), the peak charge including page cache (``memory.max_usage_in_bytes``, which
    may reach the limit harmlessly: cache is dropped first), and how often the limit was hit
    (``memory.failcnt``: each hit made the kernel reclaim before it could allocate)."""

    def __init__(self, nodes, interval_s: float = 0.1) -> None:
        self.nodes, self.interval_s = nodes, interval_s
        self.anon_peaks = [0] * len(nodes)
        self.charge_peaks: list[float] = []
        self.failcnt: list[int] = []
        self.oom_kills: list[int] = []
        self._oom_before = [node.oom_kills() for node in nodes]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> NodeMemory:
        for node in self.nodes:
            node.reset_stats()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.charge_peaks = [(node.max_memory_bytes() or 0) / GIB for node in self.nodes]
        self.failcnt = [node.memory_failcnt() or 0 for node in self.nodes]
        self.oom_kills = [
            node.oom_kills() - before
            for node, before in zip(self.nodes, self._oom_before, strict=True)
        ]

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            for i, node in enumerate(self.nodes):
                self.anon_peaks[i] = max(self.anon_peaks[i], node.anon_memory_bytes() or 0)

    @property
    def peaks(self) -> list[float]:
        return [p / GIB for p in self.anon_peaks]


def read_throughput(output_dir: Path, warmup_steps: int) -> dict[str, Any]:
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "event" not in r]
    timed = steps[warmup_steps:]
    if not timed:
        raise SystemExit(f"{output_dir}: no steps after the warm-up")
    wall = sum(r["step_time_s"] for r in timed)
    samples = sum(r["samples_per_s"] * r["step_time_s"] for r in timed)
    busy = [
        statistics.mean(r["busy_s_per_rank"][i] for r in timed)
        for i in range(len(timed[0]["busy_s_per_rank"]))
    ]
    return {
        "samples_per_s": samples / wall,
        "step_s": wall / len(timed),
        "steps": len(timed),
        "busy_s_per_rank": busy,
        "loss_last": steps[-1]["loss"],
    }


def train_distributed(
    label: str, repeat: int, config: Path, plan: Path | None, nodes, args: argparse.Namespace
) -> RunResult:
    """``hetlm pretrain CONFIG [--plan PLAN]`` on two agents, each node's rank in its cgroups:
    what ``hetlm pretrain --local-nodes 2`` runs, plus the per-node command prefix."""
    from hetlm.config import load_config
    from hetlm.launch.local import run_local_nodes

    forwarded = ["pretrain", str(config), "--quiet"] + (["--plan", str(plan)] if plan else [])
    cfg = load_config(config)
    if plan:
        cfg.train.plan = plan
    split = cfg.batch_split(2, [0, 1])  # the topology check of --local-nodes, before launching
    out = Path(cfg.run.output_dir)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    load = os.getloadavg()[0]
    with NodeMemory(nodes) as memory:
        code = run_local_nodes(
            forwarded, nodes=2, threads_per_rank=1, rank_prefixes=[node.prefix() for node in nodes]
        )
    micro = [split.micro_batch_sizes(r) for r in (0, 1)]
    if code != 0:
        print(f"  {label} repeat {repeat}: exit code {code}, OOM kills per node {memory.oom_kills}")
        return RunResult(
            label,
            repeat,
            0.0,
            0.0,
            0,
            micro,
            peak_memory_gib=memory.peaks,
            peak_charge_gib=memory.charge_peaks,
            memory_failcnt=memory.failcnt,
            oom_kills=memory.oom_kills,
            load_avg=load,
            returncode=code,
        )
    measured = read_throughput(out, args.warmup_steps)
    return RunResult(
        label,
        repeat,
        measured["samples_per_s"],
        measured["step_s"],
        measured["steps"],
        micro,
        measured["busy_s_per_rank"],
        memory.peaks,
        memory.charge_peaks,
        memory.failcnt,
        memory.oom_kills,
        measured["loss_last"],
        load,
    )


def train_standalone(
    repeat: int, configs: list[Path], nodes, args: argparse.Namespace
) -> list[RunResult]:
    """Each node alone (one process, no communication), both at once on their own cores."""
    from hetlm.config import load_config

    procs = []
    load = os.getloadavg()[0]
    with NodeMemory(nodes) as memory:
        for node, config in zip(nodes, configs, strict=True):
            out = Path(load_config(config).run.output_dir)
            if out.exists():
                import shutil

                shutil.rmtree(out)
            procs.append(
                (
                    subprocess.Popen(
                        [*node.prefix(), *hetlm_command("pretrain", str(config), "--quiet")],
                        env=one_thread_env(),
                    ),
                    out,
                )
            )
        codes = [proc.wait() for proc, _ in procs]
    results = []
    for i, ((_, out), code) in enumerate(zip(procs, codes, strict=True)):
        label = f"node{i} alone"
        if code != 0:
            results.append(
                RunResult(
                    label, repeat, 0.0, 0.0, 0, [], oom_kills=[memory.oom_kills[i]], returncode=code
                )
            )
            continue
        m = read_throughput(out, args.warmup_steps)
        results.append(
            RunResult(
                label,
                repeat,
                m["samples_per_s"],
                m["step_s"],
                m["steps"],
                [],
                m["busy_s_per_rank"],
                [memory.peaks[i]],
                [memory.charge_peaks[i]],
                [memory.failcnt[i]],
                [memory.oom_kills[i]],
                m["loss_last"],
                load,
            )
        )
    return results


# --------------------------------------------------------------------------- report


def summarize(results: list[RunResult]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for label in dict.fromkeys(r.label for r in results):
        values = [r.samples_per_s for r in results if r.label == label and r.returncode == 0]
        if values:
            out[label] = {
                "mean": statistics.mean(values),
                "min": min(values),
                "max": max(values),
                "runs": len(values),
                "step_s": statistics.mean(
                    r.step_s for r in results if r.label == label and r.returncode == 0
                ),
            }
    return out


def render(report: dict[str, Any]) -> str:
    s = report["summary"]
    setups = report["nodes"]
    lines = [
        "# Emulated heterogeneous cluster: equal vs memory-proportional vs planned shares",
        "",
        f"Generated by `benchmarks/emulated_cluster.py` on {report['machine']} "
        f"({report['date']}); see docs/EMULATED_CLUSTER.md for the method.",
        "",
        f"Model bert-{report['preset']} (vocab {report['vocab_size']}, "
        f"{report['probes'][0]['model']['n_params']:,} parameters), seq {report['seq_len']}, "
        f"bf16 autocast, global batch {report['global_batch']}, "
        f"{report['steps']} steps per run of which the first {report['warmup_steps']} are not "
        f"timed, {report['repeats']} alternating repeats; DDP over gloo.",
        "",
        "| node | cores | CPU quota | memory cap | probe: max micro-batch | probe: samples/s |"
        " planner memory model cap |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for setup, probe in zip(setups, report["probes"], strict=True):
        dev = probe["devices"][0]
        lines.append(
            f"| {setup['name']} | {setup['cpus']} | "
            f"{setup['cpu_quota'] if setup['cpu_quota'] else 'none'} | "
            f"{setup['memory_gib']} GiB | {dev['max_micro_batch']} | "
            f"{dev['samples_per_s']:.1f} | {dev['planner_memory_model_cap']} |"
        )
    net = report["net"]
    peak = max(r["busbw_gbps"] for r in net["rows"])
    lines += [
        "",
        f"`hetlm bench net` between the two nodes (gloo, loopback, 1M-64M): peak busbw "
        f"{peak:.2f} GB/s = {peak * 8:.1f} Gbit/s, used as the cluster file's "
        f"`inter_node_gbps`.",
        "",
        "| allocation | micro-batches per step (node0; node1) | samples/s (mean of runs) | "
        "min - max | vs (a) | step s | predicted step s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    base = s.get("a", {}).get("mean")
    for key, title in ALLOCATIONS.items():
        if key not in s:
            lines.append(
                f"| ({key}) {title} | {report['micro_batches'].get(key)} | failed | | | | |"
            )
            continue
        mb = report["micro_batches"][key]
        ratio = f"{s[key]['mean'] / base:.2f}x" if base else "-"
        predicted = f"{report['plan']['step_s']:.2f}" if key == "c" else ""
        lines.append(
            f"| ({key}) {title} | {mb[0]}; {mb[1]} | {s[key]['mean']:.1f} | "
            f"{s[key]['min']:.1f} - {s[key]['max']:.1f} | {ratio} | "
            f"{s[key]['step_s']:.2f} | {predicted} |"
        )
    alone = [s.get(f"node{i} alone", {}).get("mean", 0.0) for i in range(2)]
    total = sum(alone)
    lines += [
        f"| node0 alone ((c)'s micro-batch, no communication) | {report['standalone_batches'][0]} |"
        f" {alone[0]:.1f} | | | | |",
        f"| node1 alone ((c)'s micro-batch, no communication) | {report['standalone_batches'][1]} |"
        f" {alone[1]:.1f} | | | | |",
        f"| sum of the two alone | | {total:.1f} | | | | |",
        "",
    ]
    goals = report["goals"]
    lines += [
        "Goals:",
        f"- (c) >= 1.4 x (a): {goals['c_over_a']:.2f}x -> "
        f"{'met' if goals['c_over_a'] >= 1.4 else 'NOT met'}",
        f"- (c) >= 90% of the sum of the standalone throughputs: "
        f"{goals['c_over_standalone']:.1%} -> "
        f"{'met' if goals['c_over_standalone'] >= 0.9 else 'NOT met'}",
        "",
        "Per run, in the order run (busy = a rank's compute + communication time per step; "
        "anon = peak anonymous memory of the node's cgroup, sampled every 0.1 s; charge = "
        "`memory.max_usage_in_bytes`, page cache included, which the kernel drops first at the "
        "limit; limit hits = `memory.failcnt`; OOM = ranks killed by the kernel "
        "(`memory.oom_control`); load = the machine's 1-minute load average when the run "
        "started, other users' jobs included):",
        "",
        "| run | repeat | samples/s | step s | busy s per rank | anon GiB per node | "
        "charge GiB per node | limit hits | OOM | load | exit |",
        "|---|---:|---:|---:|---|---|---|---|---|---:|---:|",
    ]
    for r in report["runs"]:
        busy = ", ".join(f"{b:.2f}" for b in r["busy_s_per_rank"])
        rss = ", ".join(f"{p:.2f}" for p in r["peak_memory_gib"])
        charge = ", ".join(f"{p:.2f}" for p in r["peak_charge_gib"])
        fails = ", ".join(str(f) for f in r["memory_failcnt"])
        ooms = ", ".join(str(k) for k in r["oom_kills"])
        load = f"{r['load_avg']:.1f}" if r["load_avg"] is not None else ""
        lines.append(
            f"| {r['label']} | {r['repeat']} | {r['samples_per_s']:.1f} | "
            f"{r['step_s']:.2f} | {busy} | {rss} | {charge} | {fails} | {ooms} | "
            f"{load} | {r['returncode']} |"
        )
    table = report["plan_table"].split("\n\nplan written")[0].rstrip()  # not the launch lines
    lines += ["", "The plan (`hetlm plan`):", "", "```", table, "```"]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"({k})" for k in ALLOCATIONS] + ["node0+node1\nalone"]
    runs = report["runs"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for x, key in enumerate(ALLOCATIONS):
        values = [r["samples_per_s"] for r in runs if r["label"] == key and r["returncode"] == 0]
        if values:
            ax.bar(x, statistics.mean(values), color="#4c72b0" if key != "c" else "#dd8452")
            ax.scatter([x] * len(values), values, color="black", s=12, zorder=3)
    alone = [report["summary"].get(f"node{i} alone", {}).get("mean", 0.0) for i in range(2)]
    x = len(ALLOCATIONS)
    ax.bar(x, alone[0], color="#55a868", label="node0 alone")
    ax.bar(x, alone[1], bottom=alone[0], color="#8fd19e", label="node1 alone")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("samples/s (global)")
    ax.set_title(
        f"bert-{report['preset']}, global batch {report['global_batch']}: node0 = 1 core, "
        f"node1 = 0.5 core,\nmemory caps {report['nodes'][0]['memory_gib']} / "
        f"{report['nodes'][1]['memory_gib']} GiB",
        fontsize=10,
    )
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default=str(ROOT / "runs" / "emulated"))
    p.add_argument("--preset", default="small")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--global-batch", type=int, default=120)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup-steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--memory-gib", default="1.35,0.9", help="memory cap of node0,node1")
    p.add_argument("--slow-quota", type=float, default=0.5, help="node1's CPU quota (cores)")
    p.add_argument(
        "--cpu-shares",
        type=int,
        default=16384,
        help="cpu.shares of the nodes (and 2x for their parent) against the "
        "machine's other tasks; 1024 = one ordinary task",
    )
    p.add_argument(
        "--reserve-gib",
        type=float,
        default=None,
        help="passed to hetlm probe (default: its own, 10%% of the memory limit)",
    )
    p.add_argument("--output", default=str(RESULTS / "emulated_cluster"))
    p.add_argument(
        "--render-only",
        action="store_true",
        help="rewrite OUTPUT.md and OUTPUT.png from OUTPUT.json, run nothing",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from emulation import cgroups

    args = parse_args(argv)
    out = Path(args.output)
    if args.render_only:
        report = json.loads(out.with_suffix(".json").read_text())
        out.with_suffix(".md").write_text(render(report))
        plot(report, out.with_suffix(".png"))
        return 0
    why = cgroups.available()
    if why:
        raise SystemExit(f"emulated_cluster: {why}")
    if (os.cpu_count() or 1) < 2:
        raise SystemExit("emulated_cluster: needs 2 CPU cores (one per emulated node)")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    memory = [float(m) for m in args.memory_gib.split(",")]
    setups = [
        NodeSetup("node0", "0", None, memory[0]),
        NodeSetup("node1", "1", args.slow_quota, memory[1]),
    ]
    print(f"[1/5] data: {CORPUS.name}, vocab {args.vocab_size}, seq {args.seq_len}", flush=True)
    data = prepare_data(work, args.vocab_size, args.seq_len)

    parent = f"hetlm-emu-{os.getpid()}"
    nodes = [
        cgroups.NodeCgroup(
            f"{parent}/{s.name}",
            cpus=s.cpus,
            cpu_quota=s.cpu_quota,
            memory_bytes=int(s.memory_gib * GIB),
            cpu_shares=args.cpu_shares,
        )
        for s in setups
    ]
    results: list[RunResult] = []
    try:
        for node in nodes:
            node.create()
        print("[2/5] hetlm probe inside each node", flush=True)
        probes = probe_nodes(nodes, work, args)
        print("[3/5] hetlm bench net between the nodes", flush=True)
        net = bench_net(nodes, work)
        gbps = max(r["busbw_gbps"] for r in net["rows"]) * 8
        cluster = write_cluster(work, setups, gbps)
        config_c = write_config(
            work / "config-c.yaml", work / "runs" / "c", data, args, None, args.global_batch
        )
        plan = make_plan(work, cluster, config_c, args)
        caps = [p["devices"][0]["max_micro_batch"] for p in probes]
        micro = {
            "a": equal_micro_batches(min(caps), args.global_batch),
            "b": memory_proportional(caps, memory, args.global_batch),
        }
        configs = {"c": config_c}
        for key in ("a", "b"):
            if micro[key] is None:
                raise SystemExit(
                    f"no micro-batches for ({key}) divide the global batch "
                    f"{args.global_batch} under caps {caps}: change --global-batch"
                )
            configs[key] = write_config(
                work / f"config-{key}.yaml",
                work / "runs" / key,
                data,
                args,
                micro[key],
                args.global_batch,
            )
        micro["c"] = [plan.ranks[r].micro_batches[0] for r in (0, 1)]
        shares = [plan.ranks[r].share for r in (0, 1)]
        # Alone, a node runs its largest micro-batch of (c) for the plan's number of micro-steps
        # (its share rounded up to a multiple: one config micro-batch size per node).
        alone_batches = [[plan.ranks[i].micro_batches[0]] * plan.micro_steps for i in (0, 1)]
        alone_configs = [
            write_config(
                work / f"config-alone{i}.yaml",
                work / "runs" / f"alone{i}",
                data,
                args,
                [alone_batches[i][0]],
                sum(alone_batches[i]),
            )
            for i in (0, 1)
        ]
        print(
            f"[4/5] training: {args.repeats} x (a) {micro['a']}, (b) {micro['b']}, "
            f"(c) shares {shares}, then each node alone",
            flush=True,
        )
        for repeat in range(args.repeats):
            for key in ALLOCATIONS:
                result = train_distributed(
                    key,
                    repeat,
                    configs[key],
                    work / "plan.yaml" if key == "c" else None,
                    nodes,
                    args,
                )
                results.append(result)
                peaks = ", ".join(f"{p:.2f}" for p in result.peak_memory_gib)
                print(
                    f"  ({key}) repeat {repeat}: {result.samples_per_s:.1f} samples/s, step "
                    f"{result.step_s:.2f} s, peak memory {peaks} GiB",
                    flush=True,
                )
            for result in train_standalone(repeat, alone_configs, nodes, args):
                results.append(result)
                print(
                    f"  {result.label} repeat {repeat}: {result.samples_per_s:.1f} samples/s",
                    flush=True,
                )
    finally:
        for node in nodes:
            node.destroy()
        cgroups.remove_parent(parent)

    print("[5/5] report", flush=True)
    summary = summarize(results)
    alone_sum = sum(summary.get(f"node{i} alone", {}).get("mean", 0.0) for i in range(2))
    c = summary.get("c", {}).get("mean", 0.0)
    a = summary.get("a", {}).get("mean", math.nan)
    report = {
        "machine": f"{platform.node()}, {os.cpu_count()} cores ({platform.processor() or 'cpu'})",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "preset": args.preset,
        "vocab_size": args.vocab_size,
        "seq_len": args.seq_len,
        "global_batch": args.global_batch,
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "repeats": args.repeats,
        "cpu_shares": args.cpu_shares,
        "nodes": [vars(s) for s in setups],
        "probes": probes,
        "net": net,
        "plan": {
            "step_s": plan.step_s,
            "samples_per_s": plan.samples_per_s,
            "shares": shares,
            "micro_steps": plan.micro_steps,
            "caps": [r.cap for r in plan.ranks],
            "compute_s": [r.compute_s for r in plan.ranks],
            "comm_s": [r.comm_s for r in plan.ranks],
        },
        "plan_table": (work / "plan.txt").read_text(),
        "micro_batches": micro,
        "standalone_batches": alone_batches,
        "summary": summary,
        "goals": {
            "c_over_a": c / a if a else math.nan,
            "c_over_standalone": c / alone_sum if alone_sum else math.nan,
        },
        "runs": [vars(r) for r in results],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    out.with_suffix(".md").write_text(render(report))
    plot(report, out.with_suffix(".png"))
    print(render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
