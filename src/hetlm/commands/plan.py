"""`hetlm plan`: turn a cluster file, a model and a global batch into a plan and launch lines.

Prints the per-rank table and predicted throughput, writes the plan (YAML) that `hetlm pretrain
--plan` (or `hetlm sft --plan`, with `--task sft` / `--sft-config`) checks itself against, prints
one torchrun command per node and writes a Slurm script next to the plan. `--fits` prints what
LoRA/QLoRA tuning and serving fit on common GPUs instead.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from hetlm.commands.model_args import add_model_arguments, model_spec
from hetlm.errors import HetlmError
from hetlm.models.spec import resolve_model


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="plan per-rank micro-batches, precision and ZeRO stage for a cluster",
        description="Plan a data-parallel run on mixed GPUs: per-rank shares of the global batch "
        "(speed decides, memory caps), precision, ZeRO stage and engine; writes the "
        "plan file, torchrun lines and a Slurm script.",
    )
    parser.add_argument("cluster", nargs="?", help="cluster description YAML (see docs/PLANNER.md)")
    add_model_arguments(parser, default_preset=None)
    parser.add_argument("--global-batch", type=int, help="samples per optimizer step")
    parser.add_argument(
        "--seq-len",
        "--max-length",
        type=int,
        dest="seq_len",
        help="tokens per sample (sft: data.max_length)",
    )
    sft = parser.add_argument_group(
        "hetlm sft (LoRA/QLoRA)", "plan instruction tuning: a frozen base, trained adapters"
    )
    sft.add_argument("--task", choices=["pretrain", "sft"], default="pretrain")
    sft.add_argument(
        "--sft-config",
        metavar="SFT.yaml",
        help="read model, lora, quantization, max_length, global batch, precision and engine "
        "from an `hetlm sft` config (implies --task sft; other options override it)",
    )
    sft.add_argument("--lora-r", type=int, default=None, help="adapter rank (default 16)")
    sft.add_argument(
        "--lora-targets",
        default=None,
        help="all-linear (default) or module names, e.g. q_proj,v_proj",
    )
    sft.add_argument("--lora-dropout", type=float, default=None, help="default 0.05")
    sft.add_argument(
        "--quantization",
        choices=["none", "8bit", "4bit"],
        default=None,
        help="how the frozen base is loaded (default none)",
    )
    sft.add_argument(
        "--base-dtype",
        choices=["fp32", "16bit"],
        default=None,
        help="a non-quantized base: fp32 under autocast or 16-bit (default: what hetlm sft "
        "does there: 16-bit on GPUs training in bf16, else fp32)",
    )
    sft.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="recompute each layer's activations in the backward",
    )
    sft.add_argument(
        "--fits",
        action="store_true",
        help="print what LoRA/QLoRA tuning and serving of LLaMA 1B/7B/13B fit on T4, V100, "
        "A6000 and A100 (at --max-length, default 512, and --lora-r) and exit",
    )
    parser.add_argument(
        "--vocab-size", type=int, default=32000, help="vocabulary size for presets (default 32000)"
    )
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    parser.add_argument(
        "--zero",
        default="auto",
        choices=["auto", "0", "1", "2", "3"],
        help="ZeRO stage (auto: DDP if the model states fit comfortably)",
    )
    parser.add_argument(
        "--engine", default="auto", choices=["auto", "ddp", "zero1", "fsdp2", "deepspeed"]
    )
    parser.add_argument(
        "--memory-fraction",
        type=float,
        default=0.9,
        help="part of each device's memory to plan for (default 0.9)",
    )
    parser.add_argument(
        "--efficiency",
        type=float,
        default=0.4,
        help="achieved/peak FLOP/s where no measured speed is given (default 0.4)",
    )
    parser.add_argument(
        "--output", default="plan.yaml", help="plan file to write (default plan.yaml)"
    )
    parser.add_argument(
        "--config",
        default="CONFIG.yaml",
        help="run config shown in the launch lines (default CONFIG.yaml)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="optimizer steps of the run, to report its duration and GPU-days",
    )
    parser.add_argument("--master-port", type=int, default=29500)
    slurm = parser.add_argument_group(
        "Slurm script", "override the cluster file's slurm: section (docs/PLANNER.md)"
    )
    slurm.add_argument("--slurm-partition", help="#SBATCH --partition")
    slurm.add_argument("--slurm-time", help="#SBATCH --time, e.g. 2-00:00:00 or 12:00:00")
    slurm.add_argument("--slurm-account", help="#SBATCH --account")
    slurm.add_argument(
        "--slurm-cpus-per-gpu",
        type=int,
        help="CPU cores per GPU for each node's torchrun (default 4)",
    )
    slurm.add_argument(
        "--slurm-env",
        action="append",
        default=[],
        metavar="LINE",
        help='a shell line run before the launch, e.g. "source '
        "/nfs/envs/hetlm/bin/activate\" (repeatable; after the file's slurm.env)",
    )
    parser.set_defaults(func=run)


def slurm_options(cluster: Any, args: argparse.Namespace) -> Any:
    """The cluster file's ``slurm:`` section with the ``--slurm-*`` flags on top."""
    from hetlm.cluster.spec import check_slurm_time
    from hetlm.launch.scripts import SlurmOptions

    spec = cluster.slurm
    time = spec.time
    if args.slurm_time:
        try:
            time = check_slurm_time(args.slurm_time)
        except ValueError as exc:
            raise HetlmError(f"--slurm-time: {exc}") from None
    if args.slurm_cpus_per_gpu is not None and args.slurm_cpus_per_gpu < 1:
        raise HetlmError("--slurm-cpus-per-gpu must be a positive integer")
    return SlurmOptions(
        partition=args.slurm_partition or spec.partition,
        time=time,
        account=args.slurm_account or spec.account,
        cpus_per_gpu=args.slurm_cpus_per_gpu or spec.cpus_per_gpu,
        env=(*spec.env, *args.slurm_env),
    )


def run(args: argparse.Namespace) -> int:
    from hetlm.cluster.planner import make_plan
    from hetlm.cluster.spec import load_cluster
    from hetlm.launch.scripts import (
        placeholders,
        slurm_name,
        slurm_script,
        torchrun_commands,
    )

    if args.fits:
        return print_fits(args)
    lora, task = None, args.task
    if args.sft_config:
        task = "sft"
        _fill_from_sft_config(args)
    missing = [
        flag
        for flag, value in (
            ("CLUSTER", args.cluster),
            ("--global-batch", args.global_batch),
            ("--seq-len" if task == "pretrain" else "--max-length", args.seq_len),
        )
        if value is None
    ]
    if missing:
        raise HetlmError(
            f"hetlm plan needs {', '.join(missing)} (or --sft-config for an sft run, or --fits)"
        )
    if args.global_batch < 1 or args.seq_len < 1:
        raise HetlmError("--global-batch and --seq-len must be positive integers")
    if args.steps is not None and args.steps < 1:
        raise HetlmError("--steps must be a positive integer")
    cluster = load_cluster(args.cluster)
    if task == "sft":
        lora = lora_spec(args, sft_base_dtype(cluster, args.precision))
    elif any(
        getattr(args, k) is not None
        for k in ("lora_r", "lora_targets", "quantization", "base_dtype", "gradient_checkpointing")
    ):
        raise HetlmError("the LoRA options plan an sft run: add --task sft")
    spec = model_spec(args, None)
    slurm = slurm_options(cluster, args)
    config, name = resolve_model(spec, args.vocab_size, args.seq_len)
    plan = make_plan(
        cluster,
        config,
        args.global_batch,
        args.seq_len,
        precision=args.precision,
        zero_stage=args.zero,
        engine=args.engine,
        memory_fraction=args.memory_fraction,
        efficiency=args.efficiency,
        model_name=name,
        lora=lora,
    )
    print(plan.format_table())
    if args.steps:
        days = args.steps * plan.step_s / 86400
        print(
            f"{args.steps:,} steps: {days:.2f} days wall-clock = {days * plan.world_size:.1f} "
            f"GPU-days on these {plan.world_size} devices"
        )

    plan_path = plan.save(args.output)
    slurm_path = plan_path.with_suffix(".sbatch")
    slurm_path.write_text(
        slurm_script(plan, args.config, args.output, master_port=args.master_port, options=slurm),
        encoding="utf-8",
    )
    print(f"\nplan written to {plan_path}; Slurm script written to {slurm_path}")
    print("launch (one command per node, from the same directory on a shared file system):")
    for i, command in enumerate(
        torchrun_commands(plan, args.config, args.output, args.master_port)
    ):
        print(f"  [{plan.nodes[i].name}] {command}")
    unnamed = [node.name for i, node in enumerate(plan.nodes) if slurm_name(plan, i) is None]
    if unnamed:
        print(
            f"Slurm script: no host name for {', '.join(unnamed)} (an IP address cannot go in "
            "--nodelist): add hostname: to those nodes in the cluster file and re-plan"
        )
    missing = placeholders(plan)
    if missing:
        print(
            f"FILL IN: replace {', '.join(missing)} with the node host names, or add host: to "
            "the nodes in the cluster file and re-plan"
        )
    return 0


def sft_base_dtype(cluster: Any, precision: str) -> str:
    """How ``hetlm sft`` will hold a non-quantized base on this cluster, as the memory model
    names it (``16bit`` / ``fp32``); the rule: ``hetlm.cluster.precision.frozen_base_precision``."""
    from hetlm.cluster.memory_lora import DEFAULT_BASE_DTYPE
    from hetlm.cluster.planner import choose_precision
    from hetlm.cluster.precision import frozen_base_precision

    on_gpus = all(not d.gpu.is_cpu for node in cluster.nodes for d in node.devices)
    held = frozen_base_precision(on_gpus, choose_precision(cluster, precision))
    return "16bit" if held == "bf16" else DEFAULT_BASE_DTYPE


def lora_spec(args: argparse.Namespace, default_base_dtype: str = "fp32"):
    """The LoRA settings of an sft plan from the options (defaults: hetlm sft's)."""
    from hetlm.cluster.memory_lora import LoraSpec

    targets = args.lora_targets or "all-linear"
    modules = (
        None
        if targets == "all-linear"
        else tuple(t.strip() for t in targets.split(",") if t.strip())
    )
    dropout = 0.05 if args.lora_dropout is None else args.lora_dropout
    return LoraSpec(
        r=16 if args.lora_r is None else args.lora_r,
        target_modules=modules,
        quantization=args.quantization or "none",
        base_dtype=args.base_dtype or default_base_dtype,
        gradient_checkpointing=bool(args.gradient_checkpointing),
        lora_dropout=dropout > 0,
    )


def _fill_from_sft_config(args: argparse.Namespace) -> None:
    """Options not given on the command line, from an `hetlm sft` config."""
    from hetlm.sft.config import load_sft_config

    cfg = load_sft_config(args.sft_config)
    model, lora, train = cfg.model, cfg.lora, cfg.train
    if args.model is None and args.preset is None and args.model_type is None:
        if model.init_from is not None:
            args.model = model.init_from
        else:
            args.model_type, args.preset = "llama", model.preset
            if model.tokenizer and (Path(model.tokenizer) / "tokenizer.json").is_file():
                from transformers import AutoTokenizer

                args.vocab_size = len(AutoTokenizer.from_pretrained(model.tokenizer))
    defaults = {
        "global_batch": train.global_batch,
        "seq_len": cfg.data.max_length,
        "lora_r": lora.r,
        "lora_targets": lora.target_modules
        if isinstance(lora.target_modules, str)
        else ",".join(lora.target_modules),
        "lora_dropout": lora.dropout,
        "quantization": model.quantization,
        "gradient_checkpointing": model.gradient_checkpointing,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.precision == "auto" and train.precision != "auto":
        args.precision = train.precision
    if args.engine == "auto" and train.engine != "auto":
        args.engine = train.engine
    if args.zero == "auto" and train.zero_stage != "auto":
        args.zero = str(train.zero_stage)


def print_fits(args: argparse.Namespace) -> int:
    from hetlm.cluster.fits import fits, format_fits

    max_length = args.seq_len or 512
    r = 16 if args.lora_r is None else args.lora_r
    if max_length < 1 or r < 1:
        raise HetlmError("--max-length and --lora-r must be positive integers")
    print(format_fits(fits(max_length=max_length, r=r), max_length=max_length, r=r))
    return 0
