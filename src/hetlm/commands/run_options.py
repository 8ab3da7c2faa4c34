"""What ``hetlm pretrain`` and ``hetlm sft`` share: the run options, the local multi-node
launch (checked before any agent starts), and the end-of-run message."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """config, --resume [PATH], --overwrite, --extend, --stop-at-step, --local-nodes,
    --nproc-per-node, --max-restarts, --plan, --quiet, --help-config."""
    parser.add_argument("config", nargs="?", help="run configuration (YAML)")
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="PATH",
        help="continue this run from its newest complete checkpoint in "
        "run.output_dir, or from the checkpoint folder PATH",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the run already in run.output_dir (checkpoints, metrics, "
        "model) and start again; without it a fresh start there is refused",
    )
    parser.add_argument(
        "--extend",
        choices=("continue", "restart"),
        default=None,
        help="on --resume with a changed train.max_steps: 'continue' decays the "
        "lr from its current value to 0 at the new max_steps, 'restart' "
        "warms up again and decays from that step (docs/FAULTS.md)",
    )
    parser.add_argument(
        "--stop-at-step",
        type=int,
        default=None,
        metavar="N",
        help="checkpoint and stop at step N (e.g. before a Slurm time limit); "
        "continue later with --resume",
    )
    parser.add_argument(
        "--local-nodes",
        type=int,
        default=0,
        metavar="N",
        help="emulate N nodes on this machine (N torchrun agents on 127.0.0.1, gloo)",
    )
    parser.add_argument(
        "--nproc-per-node",
        type=int,
        default=1,
        metavar="K",
        help="ranks per emulated node (with --local-nodes)",
    )
    parser.add_argument(
        "--max-restarts",
        type=int,
        default=0,
        metavar="K",
        help="(with --local-nodes) restart the whole job up to K times after a "
        "rank fails; it resumes from the latest good checkpoint by itself "
        "(default 0: a failure ends the run; see docs/FAULTS.md)",
    )
    parser.add_argument(
        "--elastic",
        action="store_true",
        help="elastic membership (sets train.elastic): when nodes leave or join "
        "(torchrun --nnodes MIN:MAX), re-split the same global batch over the "
        "ranks present and resume from the newest checkpoint; with --local-nodes, "
        "the emulated nodes form an elastic job (docs/ELASTIC.md)",
    )
    parser.add_argument(
        "--min-nodes",
        type=int,
        default=None,
        metavar="M",
        help="(with --local-nodes N --elastic) the fewest nodes the job continues on (default 1)",
    )
    parser.add_argument(
        "--plan",
        default=None,
        metavar="PLAN.yaml",
        help="a plan from `hetlm plan`: per-rank shares and precision (overrides train.plan)",
    )
    parser.add_argument("--quiet", action="store_true", help="do not print the summary at the end")
    parser.add_argument(
        "--help-config",
        action="store_true",
        help="list every config key, its default and the defaults per model "
        "type and size, with their sources; with CONFIG, also that config's "
        "hyper-parameters as resolved; then exit",
    )


def launch_local(
    command: str, args: argparse.Namespace, config: Any, precheck: Callable[[], None]
) -> int:
    """Run ``hetlm <command>`` on ``--local-nodes`` torchrun agents here, after checking what can
    be checked first (topology, then ``precheck``: a missing dataset, quantization support)."""
    from hetlm.errors import HetlmError
    from hetlm.launch.local import run_local_nodes

    if args.local_nodes < 1 or args.nproc_per_node < 1:
        raise HetlmError("--local-nodes and --nproc-per-node must be >= 1")
    if args.max_restarts < 0:
        raise HetlmError("--max-restarts must be >= 0")
    nodes, per_node = args.local_nodes, args.nproc_per_node
    node_of_rank = [r // per_node for r in range(nodes * per_node)]
    names = emulated_node_names(config, nodes)
    if args.elastic:
        min_nodes = 1 if args.min_nodes is None else args.min_nodes
        if not 1 <= min_nodes <= nodes:
            raise HetlmError(f"--min-nodes {min_nodes}: give 1 to --local-nodes ({nodes})")
        from hetlm.train.membership import elastic_split, emulated_devices

        # the split on every node, and on the fewest: errors before any launch
        for count in sorted({nodes, min_nodes}):
            devices = emulated_devices(names[:count], per_node)
            elastic_split(config, devices, [d.rank // per_node for d in devices])
    else:
        if args.min_nodes is not None:
            raise HetlmError("--min-nodes is for an elastic job: add --elastic")
        config.batch_split(nodes * per_node, node_of_rank)  # topology errors before any launch
    precheck()
    from hetlm.train.run_dir import plan_start

    # refuse another run's folder before any agent starts (the run itself deletes, not this)
    plan_start(config.run.output_dir, resume=args.resume, overwrite=args.overwrite)
    forwarded = [command, args.config] + (
        ["--resume"]
        if args.resume is True
        else ["--resume", str(args.resume)]
        if args.resume
        else []
    )
    forwarded += ["--overwrite"] if args.overwrite else []
    forwarded += ["--extend", args.extend] if args.extend else []
    forwarded += ["--quiet"] if args.quiet else []
    forwarded += ["--plan", args.plan] if args.plan else []
    forwarded += ["--elastic"] if args.elastic else []
    if args.stop_at_step:
        forwarded += ["--stop-at-step", str(args.stop_at_step)]
    started = time.time()
    if args.elastic:
        from hetlm.launch.local import run_local_elastic

        code = run_local_elastic(
            forwarded,
            nodes=nodes,
            min_nodes=min_nodes,
            nproc_per_node=per_node,
            max_restarts=args.max_restarts or 3,
            node_names=names,
        )
    else:
        code = run_local_nodes(
            forwarded,
            nodes=nodes,
            nproc_per_node=per_node,
            max_restarts=args.max_restarts,
            node_names=names,
        )
    if code != 0:
        report_heartbeats(config.run.output_dir, nodes * per_node, since=started)
    return code


def apply_run_options(args: argparse.Namespace, config: Any) -> None:
    """What the command line overrides in the config: --plan and --elastic."""
    from hetlm.errors import HetlmError

    if args.plan:
        config.train.plan = args.plan
    if args.elastic:
        config.train.elastic = True
    if args.min_nodes is not None and not (args.local_nodes and args.elastic):
        raise HetlmError(
            "--min-nodes is for an emulated elastic job (--local-nodes N --elastic); under "
            "torchrun give --nnodes MIN:MAX"
        )


def launched_split(config: Any, args: argparse.Namespace):
    """The split of the global batch on all ``--local-nodes`` (elastic: re-derived for them)."""
    world, per_node = args.local_nodes * args.nproc_per_node, args.nproc_per_node
    node_of_rank = [r // per_node for r in range(world)]
    if not config.train.elastic:
        return config.batch_split(world, node_of_rank)
    from hetlm.train.membership import elastic_split, emulated_devices

    devices = emulated_devices(emulated_node_names(config, args.local_nodes), per_node)
    return elastic_split(config, devices, node_of_rank).split


def check_engine_settings(config: Any, args: argparse.Namespace) -> None:
    """What every rank would refuse of the engine settings, before any agent starts: an engine
    that cannot run the requested ZeRO stage, options the engine would ignore. Resolved from the
    config (or plan) and the launched split; the devices are checked by the ranks themselves."""
    from hetlm.train.engine import check_options
    from hetlm.train.run_plan import resolve_plan
    from hetlm.train.trainer import engine_options

    split = launched_split(config, args)
    plan_file = config.load_plan() if config.train.plan is not None else None
    plan = resolve_plan(
        requested_precision=config.train.precision,
        engine=config.train.engine,
        zero_stage=config.train.zero_stage,
        split=split,
        devices=[],
        plan_file=plan_file,
        plan_path=str(config.train.plan),
    )
    check_options(engine_options(config, plan, 0))


def emulated_node_names(config: Any, nodes: int) -> list[str]:
    """The emulated nodes' names: the plan's first ``nodes`` node names when a plan is given
    (so that an elastic job finds their rows), else node0, node1, ..."""
    if config.train.plan is not None:
        names = [n.name for n in config.load_plan().nodes]
        if len(names) >= nodes:
            return names[:nodes]
    return [f"node{i}" for i in range(nodes)]


def report_heartbeats(output_dir, world_size: int, since: float) -> None:
    """After a failed run, where each rank was last seen (when the ranks could not say it
    themselves, e.g. an NCCL watchdog ended them)."""
    from hetlm.train.heartbeat import describe, read_all

    records = read_all(output_dir, world_size)
    if any(r is not None and r["time"] >= since for r in records):
        print(
            "hetlm: last heartbeats: "
            + "; ".join(f"rank {r}: {describe(h)}" for r, h in enumerate(records)),
            file=sys.stderr,
        )


@dataclass(frozen=True)
class TrainingCommand:
    """What differs between ``hetlm pretrain`` and ``hetlm sft``; :func:`run_training_command`
    is the rest. The callables import their modules only when called, so ``hetlm --help``
    stays fast."""

    name: str
    config_help: Callable[[], str]
    load_config: Callable[[str], Any]
    precheck: Callable[[Any, argparse.Namespace], None]  # before a --local-nodes launch
    train: Callable[..., dict[str, Any]]  # (config, resume=, overwrite=, extend=, stop_at_step=)
    format_summary: Callable[[dict[str, Any]], str]


def run_training_command(command: TrainingCommand, args: argparse.Namespace) -> int:
    """``--help-config``, or one rank's run (under torchrun), or a ``--local-nodes`` launch."""
    from hetlm.config import resolved_help
    from hetlm.errors import HetlmError

    fix_resume_argument(args)
    if args.help_config:
        print(command.config_help())
        if args.config:
            print("\n" + resolved_help(command.load_config(args.config)))
        return 0
    if not args.config:
        raise HetlmError(
            f"give a config file: hetlm {command.name} CONFIG.yaml (see --help-config)"
        )
    config = command.load_config(args.config)
    apply_run_options(args, config)
    if args.local_nodes:
        return launch_local(command.name, args, config, lambda: command.precheck(config, args))
    summary = command.train(
        config,
        resume=args.resume,
        overwrite=args.overwrite,
        extend=args.extend,
        stop_at_step=args.stop_at_step,
    )
    print_result(summary, args, command.format_summary)
    return 0


def fix_resume_argument(args: argparse.Namespace) -> None:
    """``hetlm pretrain --resume run.yaml`` (the config right after a bare --resume): argparse
    takes the config for the checkpoint PATH; give it back to the config. ``--extend`` without
    ``--resume`` is refused (there is no schedule to extend)."""
    from hetlm.errors import HetlmError

    resume = args.resume
    if args.config is None and isinstance(resume, str) and resume.endswith((".yaml", ".yml")):
        args.config, args.resume = resume, True
    if args.extend and not args.resume:
        raise HetlmError(
            f"--extend {args.extend} reshapes the lr schedule of a resumed run: add --resume"
        )


def print_result(
    summary: dict[str, Any],
    args: argparse.Namespace,
    format_summary: Callable[[dict[str, Any]], str],
) -> None:
    """Rank 0 prints the summary, or where a run stopped early and how to continue."""
    if int(os.environ.get("RANK", "0")) != 0 or args.quiet:
        return
    if "stopped_at" in summary:
        print(
            f"stopped at step {summary['stopped_at']}; checkpoint "
            f"{summary['last_checkpoint']}; continue with --resume"
        )
    else:
        print(format_summary(summary))


def steps_line(summary: dict[str, Any]) -> str:
    """The summary's first line: steps, global batch, micro-batches per rank, precision, engine."""
    engine = summary.get("engine", "single")
    if summary.get("zero_stage"):
        engine += f", ZeRO-{summary['zero_stage']}"
    return (
        f"steps            {summary['steps']} (global batch {summary['global_batch']}, "
        f"micro-batches per rank {summary['micro_batches']}, {summary['precision']}, "
        f"{engine})"
    )


def tokens_line(summary: dict[str, Any]) -> str:
    per_rank = ", ".join(
        f"rank {i}: {t:,.0f}" for i, t in enumerate(summary["tokens_per_s_per_rank"])
    )
    return f"tokens/s         {summary['tokens_per_s']:,.0f} total ({per_rank})"


def membership_lines(summary: dict[str, Any]) -> list[str]:
    """A summary line when nodes left or joined during the run (train.elastic), else none."""
    changes = summary.get("membership") or []
    if not changes:
        return []
    parts = []
    for c in changes:
        who = "; ".join(
            f"{word} {', '.join(c[key])}"
            for word, key in (("left", "left"), ("joined", "joined"))
            if c.get(key)
        )
        parts.append(
            f"{c['world_size_before']} -> {c['world_size']} ranks at step {c['step']}"
            + (f" ({who})" if who else "")
        )
    return [f"membership       {'; '.join(parts)}"]
