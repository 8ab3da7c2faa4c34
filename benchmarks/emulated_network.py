"""Two emulated hosts joined by a 1 Gb/s or 10 Gb/s link: measured vs predicted step time.

Node i is a network namespace (its torchrun agent runs under ``ip netns exec``) and a cgroup
on core i (agent and rank); the namespaces are joined by a veth pair (10.77.0.1 <-> 10.77.0.2,
addresses made up here and visible nowhere else) with a token-bucket rate limit in each
direction. For a BERT-base-sized model (bert-base shape, vocab 8000, ~92M parameters: ~370 MB of
fp32 gradients per all-reduce) this measures, for each link rate:

* ``hetlm bench net`` across the link (what the ranks actually get);
* ``hetlm plan``'s predicted step time (compute from ``hetlm probe`` speeds + ring all-reduce
  of the gradients over the nominal link, no overlap assumed);
* the measured step time of DDP training with torch's default 25 MB buckets, with 100 MB
  buckets, and with fp16 gradient compression (``train.bucket_cap_mb``,
  ``train.grad_compression``).

    sudo .venv/bin/python benchmarks/emulated_network.py [--steps 8] [--rates 1,10] [--repeats 2]

Writes benchmarks/results/emulated_network.{md,json}. Namespaces and cgroups are removed at
the end, whatever happens.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import emulated_cluster as ec  # noqa: E402  (the shared helpers of the two benchmarks)

VARIANTS = {
    "DDP, 25 MB buckets": {},
    "DDP, 100 MB buckets": {"bucket_cap_mb": 100},
    "DDP, fp16 gradient compression": {"grad_compression": "fp16"},
}


def node_prefixes(pair, nodes) -> list[list[str]]:
    """Agent i (and its rank) in cgroup i, then in namespace i. In that order: ``ip netns exec``
    mounts a sysfs of the new namespace, where /sys/fs/cgroup is not mounted."""
    return [[*node.prefix(), *pair.prefix(i)] for i, node in enumerate(nodes)]


def bench_net(pair, nodes, work: Path, gbit: float, max_size: str) -> dict[str, Any]:
    from hetlm.launch.local import run_local_nodes

    prefix = work / f"net-{gbit:g}gbit"
    code = run_local_nodes(
        [
            "bench",
            "net",
            "--min-size",
            "1M",
            "--max-size",
            max_size,
            "--factor",
            "4",
            "--iters",
            "5",
            "--output",
            str(prefix),
        ],
        nodes=2,
        threads_per_rank=1,
        master_addr=pair.addresses[0],
        agent_prefixes=node_prefixes(pair, nodes),
    )
    if code != 0:
        raise SystemExit(f"hetlm bench net over {gbit:g} Gbit/s failed ({code})")
    return json.loads(prefix.with_suffix(".json").read_text())


def plan_for(work: Path, gbit: float, args: argparse.Namespace, config: Path):
    from hetlm.cluster.planner import load_plan

    cluster = {
        "nodes": [
            {
                "name": f"node{i}",
                "host": f"10.77.0.{i + 1}",
                "gpus": {"model": "cpu", "count": 1},
                "samples_per_s": f"probe-node{i}.yaml",
            }
            for i in (0, 1)
        ],
        "network": {"inter_node_gbps": gbit, "intra_node_gbps": 100},
    }
    path = work / f"cluster-{gbit:g}gbit.yaml"
    path.write_text(yaml.safe_dump(cluster, sort_keys=False))
    plan_path = work / f"plan-{gbit:g}gbit.yaml"
    result = subprocess.run(
        ec.hetlm_command(
            "plan",
            str(path),
            "--model-type",
            "bert",
            "--preset",
            "base",
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
    if result.returncode != 0:
        raise SystemExit(f"hetlm plan failed: {result.stderr}")
    return load_plan(plan_path), result.stdout


def write_config(
    work: Path, name: str, data: Path, args: argparse.Namespace, extra: dict[str, Any]
) -> Path:
    train: dict[str, Any] = {
        "global_batch": args.global_batch,
        "max_steps": args.steps,
        "learning_rate": 1e-4,
        "warmup_steps": 2,
        "precision": "bf16",
        "max_eval_samples": 8,
        "per_device_eval_batch_size": 8,
        "save_steps": 0,
        "save_total_limit": 1,
        "logging_steps": 1,
        "dist_timeout_s": 600,
        **extra,
    }
    config = {
        "run": {"output_dir": str(work / "runs" / name), "seed": 0},
        "data": {"dataset": str(data)},
        "model": {"type": "bert", "preset": "base"},
        "train": train,
    }
    path = work / f"config-{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def train(pair, nodes, config: Path, plan: Path, args: argparse.Namespace) -> dict[str, Any]:
    from hetlm.config import load_config
    from hetlm.launch.local import run_local_nodes

    out = Path(load_config(config).run.output_dir)
    if out.exists():
        shutil.rmtree(out)
    started = time.perf_counter()
    code = run_local_nodes(
        ["pretrain", str(config), "--plan", str(plan), "--quiet"],
        nodes=2,
        threads_per_rank=1,
        master_addr=pair.addresses[0],
        agent_prefixes=node_prefixes(pair, nodes),
    )
    if code != 0:
        return {"returncode": code, "wall_s": time.perf_counter() - started}
    measured = ec.read_throughput(out, args.warmup_steps)
    return {"returncode": 0, **measured, "wall_s": time.perf_counter() - started}


def render(report: dict[str, Any]) -> str:
    lines = [
        "# Emulated network: measured vs predicted step time (BERT-base shape, 2 hosts)",
        "",
        f"Generated by `benchmarks/emulated_network.py` ({report['date']}); see "
        "docs/EMULATED_CLUSTER.md. Two network namespaces joined by a veth pair with a "
        "token-bucket rate limit per direction; each rank on its own core (cgroup cpuset); "
        f"bert-base shape with vocab {report['vocab_size']} "
        f"({report['n_params']:,} parameters, {report['n_params'] * 4 / 1e6:.0f} MB of fp32 "
        f"gradients), seq {report['seq_len']}, bf16 autocast, global batch "
        f"{report['global_batch']} ({report['micro']} per rank), {report['steps']} steps of "
        f"which {report['warmup_steps']} untimed, {report['repeats']} alternating repeats. Probe: "
        f"{', '.join(f'{s:.2f}' for s in report['probe_samples_per_s'])} samples/s per node.",
        "",
        "| link | bench net peak busbw | variant | measured step s (per run) | predicted step s "
        "(compute + comm) | measured / predicted | samples/s |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for link in report["links"]:
        busbw = max(r["busbw_gbps"] for r in link["net"]["rows"])
        plan = link["plan"]
        predicted = (
            f"{plan['step_s']:.2f} ({max(plan['compute_s']):.2f} + {max(plan['comm_s']):.2f})"
        )
        for name, runs in link["runs"].items():
            good = [r for r in runs if r["returncode"] == 0]
            if not good:
                codes = ", ".join(str(r["returncode"]) for r in runs)
                lines.append(f"| {link['gbit']:g} Gb/s | | {name} | failed ({codes}) | | | |")
                continue
            steps = [r["step_s"] for r in good]
            mean = sum(steps) / len(steps)
            spread = " / ".join(f"{x:.2f}" for x in steps)
            speed = sum(r["samples_per_s"] for r in good) / len(good)
            lines.append(
                f"| {link['gbit']:g} Gb/s | {busbw * 8:.2f} Gbit/s | {name} | "
                f"{mean:.2f} ({spread}) | {predicted} | {mean / plan['step_s']:.2f} | "
                f"{speed:.2f} |"
            )
    lines += [
        "",
        "bench net (algbw = busbw for 2 ranks), GB/s:",
        "",
        "| size | " + " | ".join(f"{link['gbit']:g} Gb/s" for link in report["links"]) + " |",
        "|---:|" + "---:|" * len(report["links"]),
    ]
    sizes = [r["size_bytes"] for r in report["links"][0]["net"]["rows"]]
    for i, size in enumerate(sizes):
        cells = [f"{link['net']['rows'][i]['busbw_gbps']:.3f}" for link in report["links"]]
        lines.append(f"| {size // 2**20}M | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from emulation import cgroups, netns

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default=str(ec.ROOT / "runs" / "emulated-net"))
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--rates", default="1,10", help="link rates in Gbit/s")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--net-max-size", default="256M")
    p.add_argument("--cpu-shares", type=int, default=16384)
    p.add_argument("--output", default=str(ec.RESULTS / "emulated_network"))
    args = p.parse_args(argv)
    why = cgroups.available() or netns.available()
    if why:
        raise SystemExit(f"emulated_network: {why}")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = ec.prepare_data(ec.ROOT / "runs" / "emulated", args.vocab_size, args.seq_len)
    tag = str(os.getpid() % 100000)
    parent = f"hetlm-net-{tag}"
    nodes = [
        cgroups.NodeCgroup(f"{parent}/node{i}", cpus=str(i), cpu_shares=args.cpu_shares)
        for i in (0, 1)
    ]
    pair = netns.NetnsPair(tag)
    micro = args.global_batch // 2
    links = []
    try:
        for node in nodes:
            node.create()
        pair.create()
        print("probe: bert-base in each node", flush=True)
        probe_args = argparse.Namespace(
            preset="base", vocab_size=args.vocab_size, seq_len=args.seq_len, reserve_gib=None
        )
        probes = ec.probe_nodes(nodes, work, probe_args, extra=["--max-batch", str(micro)])
        configs = {
            name: write_config(work, f"v{i}", data, args, extra)
            for i, (name, extra) in enumerate(VARIANTS.items())
        }
        for gbit in (float(r) for r in args.rates.split(",")):
            pair.set_rate(gbit)
            print(f"link {gbit:g} Gbit/s: bench net", flush=True)
            net = bench_net(pair, nodes, work, gbit, args.net_max_size)
            plan, table = plan_for(work, gbit, args, next(iter(configs.values())))
            print(table, flush=True)
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
            for repeat in range(args.repeats):  # variants alternate: drift hits all alike
                for name, config in configs.items():
                    run = train(pair, nodes, config, work / f"plan-{gbit:g}gbit.yaml", args)
                    runs[name].append(run)
                    print(f"  {name}, repeat {repeat}: {run}", flush=True)
            links.append(
                {
                    "gbit": gbit,
                    "net": net,
                    "runs": runs,
                    "plan_table": table,
                    "plan": {
                        "step_s": plan.step_s,
                        "compute_s": [r.compute_s for r in plan.ranks],
                        "comm_s": [r.comm_s for r in plan.ranks],
                        "shares": [r.share for r in plan.ranks],
                    },
                }
            )
    finally:
        pair.destroy()
        for node in nodes:
            node.destroy()
        cgroups.remove_parent(parent)
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "vocab_size": args.vocab_size,
        "seq_len": args.seq_len,
        "global_batch": args.global_batch,
        "micro": micro,
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "repeats": args.repeats,
        "n_params": probes[0]["model"]["n_params"],
        "probe_samples_per_s": [pr["samples_per_s"][0] for pr in probes],
        "probes": probes,
        "links": links,
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    out.with_suffix(".md").write_text(render(report))
    print(render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
