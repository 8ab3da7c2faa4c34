"""Online rebalancing on the emulated cluster: a wrong split corrected, a throttled node followed.

Two emulated nodes as in ``benchmarks/emulated_cluster.py`` (two torchrun agents on 127.0.0.1,
each rank in its own cgroup v1 group): node0 owns core 0, node1 owns core 1 under a CPU quota of
half a core, so the right split of the global batch is about 2 : 1. bert-small, fp32 (so that
weights can be compared to 1e-5), DDP over gloo. Runs:

  right      the right split (2 : 1), no rebalancing;
  wrong      equal shares, no rebalancing;
  wrong+rb   equal shares, ``train.rebalance: N``;
  throttled      the right split; at step T node0's quota drops to --throttle-quota cores;
  throttled+rb   the same with rebalancing.

Throughput is the global batch over rank 0's wall-clock step time, summed over the steps after
the first rebalance (after the throttle for the throttled runs). The wrong+rb and wrong runs
train the same samples in the same steps: their final weights are compared (split invariance).

    sudo .venv/bin/python benchmarks/rebalance.py [--steps 30] [--every 5]

Writes benchmarks/results/rebalance.{md,json}; work goes to runs/rebalance/. Needs root.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from emulated_cluster import prepare_data  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def write_config(
    path: Path,
    output_dir: Path,
    data: Path,
    args: argparse.Namespace,
    per_rank: list[int],
    rebalance: int,
) -> Path:
    train: dict[str, Any] = {
        "global_batch": sum(per_rank),
        "micro_batch": {"per_rank": per_rank},
        "max_steps": args.steps,
        "learning_rate": 5e-4,
        "warmup_steps": 2,
        "precision": "fp32",
        "max_eval_samples": 8,
        "per_device_eval_batch_size": 8,
        "save_steps": 0,
        "save_total_limit": 1,
        "logging_steps": 1,
        "dist_timeout_s": 300,
        "engine": "ddp",
    }
    if rebalance:
        train.update(rebalance=rebalance, max_micro_batch=sum(per_rank), rebalance_min_gain=0.05)
    config = {
        "run": {"output_dir": str(output_dir), "seed": 0},
        "data": {"dataset": str(data)},
        "model": {"type": "bert", "preset": args.preset, "dropout": 0.0},
        "train": train,
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def read_steps(output_dir: Path) -> tuple[list[dict], list[dict]]:
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "event" not in r], [r for r in records if "event" in r]


def throughput(steps: list[dict], after_step: int) -> float:
    timed = [r for r in steps if r["step"] > after_step]
    wall = sum(r["step_time_s"] for r in timed)
    return sum(r["samples_per_s"] * r["step_time_s"] for r in timed) / wall if wall else 0.0


def throttle_at(node, output_dir: Path, step: int, quota: float, stop: threading.Event) -> None:
    """Lower ``node``'s CPU quota once rank 0 has logged ``step``."""
    from emulation.cgroups import DEFAULT_PERIOD_US

    metrics = output_dir / "metrics.jsonl"
    while not stop.wait(0.2):
        if metrics.is_file() and any(
            f'"step": {step},' in line for line in metrics.read_text().splitlines()
        ):
            (node.path("cpu") / "cpu.cfs_quota_us").write_text(str(int(quota * DEFAULT_PERIOD_US)))
            return


def run(
    label: str, config: Path, nodes, throttle: tuple[int, float] | None = None
) -> dict[str, Any]:
    from emulation.cgroups import DEFAULT_PERIOD_US

    from hetlm.config import load_config
    from hetlm.launch.local import run_local_nodes

    out = Path(load_config(config).run.output_dir)
    if out.exists():
        shutil.rmtree(out)
    for node, quota in zip(nodes, (None, 0.5), strict=True):  # the cluster as built
        (node.path("cpu") / "cpu.cfs_quota_us").write_text(
            "-1" if quota is None else str(int(quota * DEFAULT_PERIOD_US))
        )
    stop = threading.Event()
    watcher = None
    if throttle is not None:
        watcher = threading.Thread(
            target=throttle_at, args=(nodes[0], out, *throttle, stop), daemon=True
        )
        watcher.start()
    started = time.time()
    code = run_local_nodes(
        ["pretrain", str(config), "--quiet"],
        nodes=2,
        threads_per_rank=1,
        rank_prefixes=[node.prefix() for node in nodes],
    )
    stop.set()
    if watcher is not None:
        watcher.join()
    if code != 0:
        raise SystemExit(f"{label}: exit code {code}")
    steps, events = read_steps(out)
    rebalances = [e for e in events if e["event"] == "rebalance"]
    print(
        f"  {label}: {time.time() - started:.0f} s, rebalances at "
        f"{[e['step'] for e in rebalances]}",
        flush=True,
    )
    return {"label": label, "output_dir": str(out), "steps": steps, "rebalances": rebalances}


def main(argv: list[str] | None = None) -> int:
    from emulation import cgroups

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default=str(ROOT / "runs" / "rebalance"))
    p.add_argument("--preset", default="small")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--global-batch", type=int, default=48)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--every", type=int, default=5, help="train.rebalance")
    p.add_argument("--throttle-step", type=int, default=12)
    p.add_argument("--throttle-quota", type=float, default=0.3)
    p.add_argument("--output", default=str(RESULTS / "rebalance"))
    args = p.parse_args(argv)
    why = cgroups.available()
    if why:
        raise SystemExit(f"rebalance: {why}")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = prepare_data(work, args.vocab_size, args.seq_len)
    b = args.global_batch
    right, equal = [b * 2 // 3, b - b * 2 // 3], [b // 2, b - b // 2]
    configs = {
        "right": write_config(work / "right.yaml", work / "runs" / "right", data, args, right, 0),
        "wrong": write_config(work / "wrong.yaml", work / "runs" / "wrong", data, args, equal, 0),
        "wrong+rb": write_config(
            work / "wrong-rb.yaml", work / "runs" / "wrong-rb", data, args, equal, args.every
        ),
        "throttled": write_config(work / "thr.yaml", work / "runs" / "thr", data, args, right, 0),
        "throttled+rb": write_config(
            work / "thr-rb.yaml", work / "runs" / "thr-rb", data, args, right, args.every
        ),
    }
    parent = f"hetlm-rebalance-{os.getpid()}"
    nodes = [
        cgroups.NodeCgroup(f"{parent}/node0", cpus="0", cpu_shares=16384),
        cgroups.NodeCgroup(f"{parent}/node1", cpus="1", cpu_quota=0.5, cpu_shares=16384),
    ]
    runs: dict[str, dict[str, Any]] = {}
    try:
        for node in nodes:
            node.create()
        for label in ("right", "wrong", "wrong+rb"):
            runs[label] = run(label, configs[label], nodes)
        for label in ("throttled", "throttled+rb"):
            runs[label] = run(
                label, configs[label], nodes, throttle=(args.throttle_step, args.throttle_quota)
            )
    finally:
        for node in nodes:
            node.destroy()
        cgroups.remove_parent(parent)

    from safetensors.torch import load_file

    first_rb = (
        runs["wrong+rb"]["rebalances"][0]["step"] if runs["wrong+rb"]["rebalances"] else args.steps
    )
    after = first_rb + 1  # the first step on the new split
    speeds = {k: throughput(runs[k]["steps"], after) for k in ("right", "wrong", "wrong+rb")}
    thr_after = args.throttle_step + args.every + 1
    speeds["throttled"] = throughput(runs["throttled"]["steps"], thr_after)
    speeds["throttled+rb"] = throughput(runs["throttled+rb"]["steps"], thr_after)
    a = load_file(str(Path(runs["wrong"]["output_dir"]) / "model" / "model.safetensors"))
    c = load_file(str(Path(runs["wrong+rb"]["output_dir"]) / "model" / "model.safetensors"))
    diff = max(float((a[k] - c[k]).abs().max()) for k in a)
    report = {
        "machine": f"{platform.node()}, {os.cpu_count()} cores",
        "load_avg": os.getloadavg()[0],
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "args": vars(args),
        "right": right,
        "equal": equal,
        "samples_per_s": speeds,
        "first_rebalance_step": first_rb,
        "weights_max_abs_diff": diff,
        "rebalances": {k: runs[k]["rebalances"] for k in runs},
    }
    out = Path(args.output)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    out.with_suffix(".md").write_text(render(report))
    print(render(report))
    return 0


def render(r: dict[str, Any]) -> str:
    s, a = r["samples_per_s"], r["args"]
    rows = [
        (
            "right split " + str(r["right"]) + ", no rebalancing",
            s["right"],
            f"after step {r['first_rebalance_step']}",
        ),
        ("equal split " + str(r["equal"]) + ", no rebalancing", s["wrong"], "same steps"),
        (f"equal split, rebalance every {a['every']}", s["wrong+rb"], "same steps"),
        (
            f"right split, node0 throttled to {a['throttle_quota']} core at step "
            f"{a['throttle_step']}, no rebalancing",
            s["throttled"],
            f"after step {a['throttle_step'] + a['every']}",
        ),
        ("the same, rebalance every " + str(a["every"]), s["throttled+rb"], "same steps"),
    ]
    lines = [
        "# Online rebalancing on the emulated cluster",
        "",
        f"Generated by `benchmarks/rebalance.py` on {r['machine']} ({r['date']}; load average "
        f"{r['load_avg']:.1f} at the end: other work shared the machine). node0: core 0; node1: "
        f"core 1 at a 0.5-core quota. bert-{a['preset']}, vocab {a['vocab_size']}, seq "
        f"{a['seq_len']}, fp32, global batch {a['global_batch']}, {a['steps']} steps, DDP on gloo.",
        "",
        "| run | samples/s | measured over |",
        "|---|---:|---|",
        *[f"| {label} | {value:.1f} | {window} |" for label, value, window in rows],
        "",
        f"Equal start with rebalancing vs the right split: {s['wrong+rb'] / s['right']:.1%} of "
        f"its samples/s after the first rebalance (goal: within 5%); vs staying equal: "
        f"{s['wrong+rb'] / s['wrong']:.2f}x. Throttled node0: rebalanced "
        f"{s['throttled+rb'] / s['throttled']:.2f}x the unbalanced run.",
        "",
        f"Final weights, equal split with vs without rebalancing (same steps, fp32): max |dw| = "
        f"{r['weights_max_abs_diff']:.2e} (bound 1e-5).",
        "",
        "Rebalance events (step: old -> new shares, expected gain):",
        "",
    ]
    for label, events in r["rebalances"].items():
        for e in events:
            lines.append(
                f"- {label}, step {e['step']}: {e['old_shares']} -> {e['new_shares']} "
                f"({e['expected_gain']:.0%})"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
