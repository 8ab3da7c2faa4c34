"""One GPU check: what issue 11 asks of hetlm on a CUDA GPU, measured in at most 8 minutes.

On one CUDA machine with no internet and nothing but this checkout and its dependencies:

    python benchmarks/gpu_check.py            # writes benchmarks/results/gpu.{md,json}
    python benchmarks/gpu_check.py --dry-run  # the same code on CPU, tiny shapes, ~1 minute

Parts (each ok / failed with its last error line / skipped with the reason; one failing part
never hides the others):

  env        GPU name, compute capability, memory, versions, missing modules
  demo       ``hetlm demo`` with few steps, as a subprocess: exit code, summary, wall time
  mlm        BERT-base vs the HF Trainer (benchmarks/bench_vs_hf_trainer.py) at seq 128 and 512:
             tokens/s, ratio, MFU (6·N·tokens/s over the GPU's dense bf16 peak), peak memory
  sft        LoRA SFT of the ``1b`` shape vs Trainer + PEFT (benchmarks/bench_sft_vs_hf_trainer.py)
             and a plain PyTorch + peft loop on the same tokens, without padding
  qlora      ``hetlm sft`` with a 4-bit and an 8-bit base (bitsandbytes), the adapter loaded by
             plain peft, a few tokens generated
  fp16       a small BERT with ``train.precision: fp16`` (loss scaling): loss down, few skips
  multirank  2 ranks on NCCL (2+ GPUs) and 2 emulated nodes on one GPU (``--local-nodes 2``)

Each part runs in its own process with a time budget (unused time passes on to the next part);
a part still running at its deadline is stopped (with everything under it) and reported as
failed with what it measured so far. Logs of every part are under ``<out>/gpu_check_logs/``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import io
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CORPUS = ROOT / "data" / "general_aozora" / "aozora_soseki_akutagawa.jsonl"
sys.path.insert(0, str(ROOT / "src"))  # this checkout's hetlm, installed or not

PARTS = ("env", "demo", "mlm", "sft", "qlora", "fp16", "multirank", "learning", "domain")
NEEDS_CUDA = ("qlora", "multirank")
# The wheel a machine without internet needs for QLoRA (built by benchmarks/gpu_wheels.py).
BNB_WHEEL = "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl"
# Modules hetlm or the Trainer comparisons import that a bare GPU image may lack.
OPTIONAL_MODULES = (
    "datasets",
    "pydantic",
    "pydantic_core",
    "annotated_types",
    "typing_inspection",
    "dill",
    "multiprocess",
    "xxhash",
    "pandas",
    "fsspec",
    "bitsandbytes",
)
# What every part imports: one that is installed but fails to import (a carried datasets beside
# an older pyarrow, say) is named in part 1 with its error, instead of failing each part later.
REQUIRED_MODULES = ("datasets", "pydantic", "hetlm.cli")
MIB = 2**20


# ------------------------------------------------------------------ settings


@dataclass(frozen=True)
class Settings:
    """The shapes and budgets of one check; GPU and DRY_RUN below are the only two."""

    dry_run: bool
    budget_s: float  # the whole check
    part_budget_s: dict[str, float]  # each part's share (unused time passes on)
    corpus_docs: int | None  # None: the whole Aozora corpus; else a cut for speed
    vocab_size: int
    demo_args: list[str]
    mlm_preset: str
    mlm_shapes: list[tuple[int, int]]  # (seq_len, batch)
    mlm_warmup: int
    mlm_steps: int  # timed steps after the warm-up
    sft_preset: str
    sft_examples: int
    sft_text_rows: int | None  # dolly rows the SFT tokenizer learns from
    sft_max_length: int
    sft_warmup: int
    sft_steps: int
    qlora_steps: int
    new_tokens: int
    small_preset: str  # fp16 and multi-rank runs
    small_seq: int
    small_batch: int
    fp16_steps: int
    multirank_steps: int
    learning_args: list[str]  # benchmarks/learning_check.py (issue 13's learning check)
    domain_args: list[str]  # hetlm demo domain (issue 13's domain adaptation, GPU variant)


# The domain experiment's GPU variant: the CPU variant's models (docs/EVAL.md) with four times
# its batch, sized (by estimate: not yet run on a GPU) for the 90 s this part gets on an H200.
DOMAIN_GPU_ARGS = [
    "--model",
    "llama",
    "--preset",
    "mini",
    "--batch-size",
    "64",
    "--steps",
    "1000",
    "--continue-steps",
    "500",
    "--max-train-examples",
    "1000",
    "--epochs",
    "2",
    "--seeds",
    "0,1,2",
]

GPU = Settings(
    dry_run=False,
    budget_s=560.0,
    part_budget_s={
        "env": 15,
        "demo": 70,
        "mlm": 100,
        "sft": 120,
        "qlora": 60,
        "fp16": 25,
        "multirank": 35,
        "learning": 45,
        "domain": 90,
    },
    corpus_docs=None,
    vocab_size=32000,
    demo_args=["--steps", "30"],
    mlm_preset="base",
    mlm_shapes=[(128, 256), (512, 64)],
    mlm_warmup=5,
    mlm_steps=40,
    sft_preset="1b",
    sft_examples=1000,
    sft_text_rows=None,
    sft_max_length=512,
    sft_warmup=3,
    sft_steps=10,
    qlora_steps=4,
    new_tokens=8,
    small_preset="small",
    small_seq=128,
    small_batch=32,
    fp16_steps=30,
    multirank_steps=10,
    learning_args=["--device", "cuda", "--model", "deberta-v2", "--steps", "1000"],
    domain_args=DOMAIN_GPU_ARGS,
)

DRY_RUN = Settings(
    dry_run=True,
    budget_s=600.0,  # ~1 minute on an idle machine; the rest is for a busy CI
    part_budget_s={
        "env": 40,
        "demo": 160,
        "mlm": 100,
        "sft": 160,
        "qlora": 10,
        "fp16": 100,
        "multirank": 10,
        "learning": 120,
        "domain": 120,
    },
    corpus_docs=8,
    vocab_size=3000,
    demo_args=[
        "--steps",
        "3",
        "--preset",
        "tiny",
        "--seq-len",
        "32",
        "--vocab-size",
        "3000",
        "--micro-batches",
        "2,2",
    ],
    mlm_preset="tiny",
    mlm_shapes=[(32, 4)],
    mlm_warmup=1,
    mlm_steps=2,
    sft_preset="tiny",
    sft_examples=120,
    sft_text_rows=200,
    sft_max_length=128,
    sft_warmup=1,
    sft_steps=2,
    qlora_steps=2,
    new_tokens=4,
    small_preset="tiny",
    small_seq=32,
    small_batch=4,
    fp16_steps=8,
    multirank_steps=3,
    learning_args=["--dry-run"],
    domain_args=["--quick", "--threads", "1"],
)


# ------------------------------------------------------------------ one part, in its own process


class Skipped(Exception):
    """A part (or one measurement of it) that cannot run here; the message says why."""


class PartFailed(Exception):
    """A part ran but missed what it checks (e.g. the fp16 loss did not go down)."""


def last_error_line(exc: BaseException) -> str:
    """The exception's last message line, named by its type unless it is our own verdict."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    if isinstance(exc, PartFailed) and lines:
        return lines[-1]
    return f"{type(exc).__name__}: {lines[-1]}" if lines else type(exc).__name__


@dataclass
class PartContext:
    """What a part function gets: settings, folders, its deadline, and a result dict that is
    saved after every measurement (so a part stopped at its deadline keeps what it measured)."""

    name: str
    settings: Settings
    out: Path
    cache: Path
    deadline: float
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def result_file(self) -> Path:
        return self.out / "gpu_check_logs" / f"{self.name}.json"

    def time_left(self) -> float:
        return self.deadline - time.time()

    def save(self) -> None:
        tmp = self.result_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.result, indent=1, default=str))
        os.replace(tmp, self.result_file)

    def put(self, key: str, value: Any) -> None:
        self.result[key] = value
        self.save()

    def measure(
        self, key: str, fn: Callable[[], dict[str, Any]], *, needs_s: float = 0.0
    ) -> dict[str, Any]:
        """Run one measurement; its failure or skip is recorded under ``key``, not raised."""
        if self.time_left() < needs_s:
            entry = {
                "status": "skipped",
                "reason": f"time budget spent ({self.time_left():.0f} s "
                f"left, needs ~{needs_s:.0f} s)",
            }
        else:
            try:
                entry = {"status": "ok", **fn()}
            except Skipped as exc:
                entry = {"status": "skipped", "reason": str(exc)}
            except Exception as exc:  # one measurement failing must not hide the others
                traceback.print_exc()
                entry = {"status": "failed", "error": last_error_line(exc)}
        print(
            f"[{self.name}] {key}: {entry['status']} "
            f"{entry.get('error') or entry.get('reason') or ''}",
            flush=True,
        )
        self.put(key, entry)
        return entry


def first_failure(result: dict[str, Any], where: str = "") -> str | None:
    """ "key.key: error" of the first measurement (at any depth) that failed, or None."""
    for key, value in result.items():
        if isinstance(value, dict):
            if value.get("status") == "failed":
                return f"{where}{key}: {value.get('error')}"
            found = first_failure(value, f"{where}{key}.")
            if found:
                return found
    return None


def child_main(name: str, settings: Settings, out: Path, cache: Path, deadline: float) -> None:
    ctx = PartContext(name, settings, out, cache, deadline)
    ctx.put("status", "running")
    started = time.time()
    try:
        PART_FUNCTIONS[name](ctx)
        failed = first_failure(ctx.result)
        if failed:
            ctx.result.update(status="failed", error=failed)
        else:
            ctx.result["status"] = "ok"
    except Skipped as exc:
        ctx.result.update(status="skipped", reason=str(exc))
    except Exception as exc:
        traceback.print_exc()
        ctx.result.update(status="failed", error=last_error_line(exc))
    ctx.result["wall_s"] = time.time() - started
    ctx.save()


# ------------------------------------------------------------------ helpers


def device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextlib.contextmanager
def peak_memory(record: dict[str, Any]) -> Iterator[None]:
    """``record["peak_memory_mib"]``: torch.cuda.max_memory_allocated during the block, above
    what was allocated before it (reset between systems); None on CPU."""
    import torch

    gc.collect()
    if not torch.cuda.is_available():
        record["peak_memory_mib"] = None
        yield
        return
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    yield  # (an error in the block propagates from here: nothing to record then)
    torch.cuda.synchronize()
    record["peak_memory_mib"] = (torch.cuda.max_memory_allocated() - before) / MIB


def gpu_table_entry():
    """hetlm's hardware-table entry for this device (the CPU entry on CPU), or None."""
    import torch

    from hetlm.cluster.hardware import CPU, find_gpu
    from hetlm.errors import HetlmError

    if not torch.cuda.is_available():
        return CPU
    try:
        return find_gpu(torch.cuda.get_device_name())
    except HetlmError:  # an ambiguous name (e.g. "V100" without memory)
        return None


def mfu(tokens_per_s: float, params: int) -> float | None:
    """6·N·tokens/s over the dense bf16 peak of this device (None for an unknown device)."""
    entry = gpu_table_entry()
    if entry is None or not entry.supports("bf16"):
        return None
    return 6 * params * tokens_per_s / (entry.peak("bf16") * 1e12)


def throughput(tokens: list[float], times: list[float]) -> float:
    if not times or sum(times) <= 0:
        raise PartFailed("no timed steps (raise the step count above the warm-up)")
    return sum(tokens) / sum(times)


def small_corpus(settings: Settings, cache: Path) -> Path:
    """The corpus of this check: the shipped one, or (dry run) its first works, cut short."""
    if settings.corpus_docs is None:
        return CORPUS
    path = cache / f"corpus-{settings.corpus_docs}.jsonl"
    if not path.is_file():
        with CORPUS.open(encoding="utf-8") as src:
            rows = [
                json.loads(line) for _, line in zip(range(settings.corpus_docs), src, strict=False)
            ]
        path.write_text(
            "".join(
                json.dumps({"text": r["text"][:20000]}, ensure_ascii=False) + "\n" for r in rows
            ),
            encoding="utf-8",
        )
    return path


def mlm_dataset(ctx: PartContext, seq_len: int) -> Path:
    import bench_vs_hf_trainer as mlm_bench

    return mlm_bench.prepare(
        ctx.cache / "mlm",
        seq_len,
        ctx.settings.vocab_size,
        corpus=small_corpus(ctx.settings, ctx.cache),
    )


def sft_inputs(ctx: PartContext) -> dict[str, str]:
    import bench_sft_vs_hf_trainer as sft_bench

    s = ctx.settings
    return sft_bench.prepare(
        ctx.cache / "sft",
        s.vocab_size,
        s.sft_examples,
        preset=s.sft_preset,
        corpus=small_corpus(s, ctx.cache),
        text_rows=s.sft_text_rows,
    )


def child_env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)
    return dict(
        os.environ,
        PYTHONPATH=path,
        PYTHONUNBUFFERED="1",
        HF_DATASETS_DISABLE_PROGRESS_BARS="1",
        TRANSFORMERS_VERBOSITY="error",
    )


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (torchrun agents start their own sessions, so a process
    group kill would miss them)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = (entry / "stat").read_text()
                ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    return tree


def kill_tree(pid: int) -> None:
    for p in process_tree(pid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, signal.SIGKILL)


def run_command(cmd: list[str], timeout: float, log: Any = None) -> dict[str, Any]:
    """Run ``cmd`` (stdout and stderr together) with a deadline; the whole process tree is
    killed when it passes. Returns exit code, output, wall time and whether it timed out."""
    started = time.time()
    with tempfile.TemporaryFile(mode="w+") as buffer:
        proc = subprocess.Popen(
            cmd, stdout=buffer, stderr=subprocess.STDOUT, env=child_env(), cwd=ROOT
        )
        timed_out = False
        try:
            proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            timed_out = True
            kill_tree(proc.pid)
            proc.wait()
        buffer.seek(0)
        output = buffer.read()
    if log is not None:
        log.write(f"$ {' '.join(cmd)}\n{output}\n")
        log.flush()
    return {
        "exit_code": proc.returncode,
        "output": output,
        "wall_s": time.time() - started,
        "timed_out": timed_out,
    }


def hetlm_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "hetlm.cli", *args]


def shown(cmd: list[str]) -> str:
    """``cmd`` as a user would type it: ``hetlm ...``, ``torchrun ...``."""
    if cmd[:2] != [sys.executable, "-m"]:
        return " ".join(cmd)
    program = {"hetlm.cli": "hetlm", "torch.distributed.run": "torchrun"}.get(cmd[2], cmd[2])
    return " ".join([program, *cmd[3:]])


def hetlm_lines(output: str) -> list[str]:
    """The one-line messages hetlm prints (``hetlm: ...``), in order, without repeats."""
    seen: list[str] = []
    for line in output.splitlines():
        line = line.strip()
        if line.startswith("hetlm:") and line not in seen:
            seen.append(line)
    return seen


def error_line(output: str) -> str:
    """The line that says what went wrong: hetlm's first ``hetlm: error`` line, else the last
    line naming an error (torchrun ends with a banner of ``=`` signs), else the last line."""
    lines = [line.strip() for line in output.splitlines() if any(c.isalnum() for c in line)]
    for line in lines:
        if line.startswith("hetlm: error"):
            return line
    errors = [line for line in lines if "Error" in line or "error:" in line]
    return (errors or lines or ["(no output)"])[-1]


def run_cli_here(argv: list[str]) -> None:
    """``hetlm <argv>`` in this process (so its GPU memory is measured here); a non-zero exit
    raises with the error line it printed."""
    from hetlm.cli import main as hetlm_main

    errors = Tee(sys.stderr)
    with contextlib.redirect_stderr(errors):
        code = hetlm_main(argv)
    if code != 0:
        raise PartFailed(f"hetlm {argv[0]} exited with {code}: {error_line(errors.getvalue())}")


def fresh_dir(ctx: PartContext, name: str) -> str:
    """An empty run folder ``<cache>/runs/<name>`` (a rerun must not resume the last run)."""
    path = ctx.cache / "runs" / name
    shutil.rmtree(path, ignore_errors=True)
    return str(path)


class Tee(io.StringIO):
    """Keeps what is written and passes it on (the part's log still gets it as it happens)."""

    def __init__(self, stream: Any) -> None:
        super().__init__()
        self.stream = stream

    def write(self, text: str) -> int:
        self.stream.write(text)
        return super().write(text)


def write_yaml(path: Path, config: dict[str, Any]) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    return path


def pretrain_config(
    ctx: PartContext, name: str, *, steps: int, precision: str, global_batch: int, ranks: int = 1
) -> Path:
    """A ``hetlm pretrain`` config of the small BERT on this check's packed data."""
    s = ctx.settings
    return write_yaml(
        ctx.cache / f"{name}.yaml",
        {
            "run": {"output_dir": fresh_dir(ctx, name), "seed": 0},
            "data": {"dataset": str(mlm_dataset(ctx, s.small_seq))},
            "model": {"type": "bert", "preset": s.small_preset},
            "train": {
                "global_batch": global_batch,
                "micro_batch": global_batch // ranks,
                "max_steps": steps,
                "learning_rate": 1e-3,
                "warmup_steps": max(1, steps // 10),
                "precision": precision,
                "max_eval_samples": 16,
                "logging_steps": 1,
            },
        },
    )


def run_output_dir(config_path: Path) -> Path:
    import yaml

    return Path(yaml.safe_load(config_path.read_text())["run"]["output_dir"])


# ------------------------------------------------------------------ part 1: environment


def installed_version(distribution: str) -> str | None:
    """From the package metadata, without importing it (an import can fail on its own)."""
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def import_errors(modules: tuple[str, ...]) -> list[str]:
    """'module: first line of its error' for each module that does not import."""
    import importlib

    errors = []
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as error:  # noqa: BLE001 - any failure is what the report must name
            first = (str(error).splitlines() or [""])[0]
            errors.append(f"{name}: {type(error).__name__}: {first}")
    return errors


def part_env(ctx: PartContext) -> None:
    import torch

    entry = gpu_table_entry()
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        **{
            name: installed_version(name)
            for name in (
                "transformers",
                "peft",
                "accelerate",
                "bitsandbytes",
                "datasets",
                "pydantic",
                "pyarrow",
                "fsspec",
                "huggingface-hub",
                "typing-extensions",
            )
        },
        "cuda_available": torch.cuda.is_available(),
        "device_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "missing_modules": [m for m in OPTIONAL_MODULES if importlib.util.find_spec(m) is None],
        "hardware_table_entry": entry.name if entry else None,
        "bf16_peak_tflops": entry.peak("bf16") if entry and entry.supports("bf16") else None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=torch.cuda.get_device_name(0),
            compute_capability=".".join(map(str, torch.cuda.get_device_capability(0))),
            memory_gib=props.total_memory / 2**30,
            cudnn=torch.backends.cudnn.version(),
        )
    else:
        info.update(gpu=None, compute_capability=None, memory_gib=None, cudnn=None)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    ctx.result.update(info)
    ctx.save()  # kept even if the imports below outlast the part's budget
    ctx.put("import_errors", import_errors(REQUIRED_MODULES))


# ------------------------------------------------------------------ part 2: the demo


def part_demo(ctx: PartContext) -> None:
    s = ctx.settings
    workdir = ctx.cache / "demo"
    args = ["demo", "--workdir", str(workdir), *s.demo_args]
    if s.corpus_docs is not None:
        args += ["--corpus", str(small_corpus(s, ctx.cache))]
    with (ctx.out / "gpu_check_logs" / "demo-output.log").open("w") as log:
        run = run_command(hetlm_cli(*args), ctx.time_left() - 2, log)
    output = run["output"]
    summary = output.split("=" * 72)[1].strip().splitlines() if output.count("=" * 72) >= 2 else []
    ctx.result.update(
        command="hetlm " + " ".join(args),
        exit_code=run["exit_code"],
        demo_wall_s=run["wall_s"],
        summary=summary,
        messages=hetlm_lines(output),
    )
    if run["timed_out"]:
        raise PartFailed(f"hetlm demo timed out after {run['wall_s']:.0f} s")
    if run["exit_code"] != 0:
        raise PartFailed(f"hetlm demo exited with {run['exit_code']}: {error_line(output)}")


# ------------------------------------------------------------------ part 3: MLM vs the Trainer


def count_bert_parameters(data: Path, preset: str) -> int:
    """N of 6·N·tokens/s: the unique parameters of the BERT both systems train (built on the
    meta device: no memory, no time)."""
    import torch
    from transformers import BertForMaskedLM

    from hetlm.data.packed import load_packed_dataset
    from hetlm.models.presets import bert_config

    _, meta = load_packed_dataset(data)
    config = bert_config(
        preset, vocab_size=meta["vocab_size"], pad_token_id=meta["special_token_ids"]["pad"]
    )
    with torch.device("meta"):
        model = BertForMaskedLM(config)
    return sum(p.numel() for p in model.parameters())


def mlm_system(
    ctx: PartContext, system: str, data: Path, seq_len: int, batch: int, params: int
) -> dict[str, Any]:
    import bench_vs_hf_trainer as mlm_bench

    s = ctx.settings
    ns = argparse.Namespace(
        data=str(data),
        preset=s.mlm_preset,
        batch=batch,
        steps=s.mlm_warmup + s.mlm_steps,
        precision="bf16",
        device=device().type,
        warmup=s.mlm_warmup,
        workdir=fresh_dir(ctx, f"mlm-{system}-s{seq_len}"),
    )
    record: dict[str, Any] = {}
    with peak_memory(record):
        result = (mlm_bench.run_trainer if system == "trainer" else mlm_bench.run_hetlm)(ns)
    times = result["step_times"]
    tokens_per_s = throughput([batch * seq_len] * len(times), times)
    return {
        "tokens_per_s": tokens_per_s,
        "mfu": mfu(tokens_per_s, params),
        "timed_steps": len(times),
        "loss_last": result["losses"][-1],
        **record,
    }


def mlm_shape(ctx: PartContext, seq_len: int, batch: int) -> dict[str, Any]:
    """Both systems at one sequence length; the batch is halved (for both) until it fits."""
    data = mlm_dataset(ctx, seq_len)
    params = count_bert_parameters(data, ctx.settings.mlm_preset)
    row: dict[str, Any] = {
        "seq_len": seq_len,
        "batch": batch,
        "params": params,
        "precision": "bf16",
        "out_of_memory_at": [],
    }
    while True:
        for system in ("trainer", "hetlm"):
            row[system] = mlm_system_entry(ctx, system, data, seq_len, row["batch"], params)
        if not any(row[s].get("out_of_memory") for s in ("trainer", "hetlm")) or row["batch"] == 1:
            break
        row["out_of_memory_at"].append(row["batch"])
        row["batch"] //= 2
    if row["trainer"]["status"] == row["hetlm"]["status"] == "ok":
        row["ratio"] = row["hetlm"]["tokens_per_s"] / row["trainer"]["tokens_per_s"]
    return row


def mlm_system_entry(
    ctx: PartContext, system: str, data: Path, seq_len: int, batch: int, params: int
) -> dict[str, Any]:
    """One system's numbers, or its failure (the other system's numbers still count)."""
    import torch

    try:
        return {"status": "ok", **mlm_system(ctx, system, data, seq_len, batch, params)}
    except torch.cuda.OutOfMemoryError as exc:
        gc.collect()
        torch.cuda.empty_cache()
        return {"status": "failed", "error": last_error_line(exc), "out_of_memory": True}
    except Exception as exc:
        traceback.print_exc()
        return {"status": "failed", "error": last_error_line(exc)}


def part_mlm(ctx: PartContext) -> None:
    s = ctx.settings
    needs = 10.0 if s.dry_run else 30.0
    for seq_len, batch in s.mlm_shapes:
        ctx.measure(f"seq{seq_len}", lambda q=seq_len, b=batch: mlm_shape(ctx, q, b), needs_s=needs)


# ------------------------------------------------------------------ part 4: SFT vs Trainer + PEFT


def sft_namespace(ctx: PartContext, inputs: dict[str, str], name: str) -> argparse.Namespace:
    s = ctx.settings
    return argparse.Namespace(
        base=inputs["base"],
        data=inputs["data"],
        max_length=s.sft_max_length,
        steps=s.sft_warmup + s.sft_steps,
        precision="bf16",
        device=device().type,
        workdir=fresh_dir(ctx, f"sft-{name}"),
    )


def same_tokens_batches(ns: argparse.Namespace):
    """Per step, the real tokens of hetlm's global batch (the same examples, in sampler order),
    joined and cut into 16 equal rows: 4 micro-batches of 4, no padding at all."""
    import bench_sft_vs_hf_trainer as sft_bench
    import torch

    _, examples = sft_bench.tokenized_examples(ns)
    order = sft_bench.hetlm_order(len(examples), ns.steps)
    rows, micro = sft_bench.GLOBAL_BATCH, sft_bench.MICRO_BATCH
    steps = []
    for step in range(ns.steps):
        ids = order[step * rows : (step + 1) * rows]
        flat = torch.tensor([t for i in ids for t in examples[i].input_ids])
        width = len(flat) // rows
        batch = flat[: rows * width].view(rows, width).to(device())
        steps.append(list(batch.split(micro)))
    return steps


def plain_lora_loop(ns: argparse.Namespace, warmup: int) -> dict[str, Any]:
    """The reference: AutoModelForCausalLM + peft + AdamW, fp32 base with bf16 autocast, on the
    same tokens without padding (loss on every token; the work per token is the same)."""
    import bench_sft_vs_hf_trainer as sft_bench
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    dev = device()
    steps = same_tokens_batches(ns)
    model = AutoModelForCausalLM.from_pretrained(ns.base, dtype=torch.float32).to(dev)
    model.config.use_cache = False
    lora = sft_bench.LORA
    torch.manual_seed(0)
    model = peft.get_peft_model(
        model,
        peft.LoraConfig(
            r=lora["r"],
            lora_alpha=lora["alpha"],
            lora_dropout=lora["dropout"],
            bias="none",
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        ),
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable, lr=sft_bench.HPARAMS["lr"], weight_decay=0.0, fused=dev.type == "cuda"
    )
    times, tokens, losses = [], [], []
    for micro_batches in steps:
        started = time.perf_counter()
        for ids in micro_batches:
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            (loss / len(micro_batches)).backward()
        torch.nn.utils.clip_grad_norm_(trainable, sft_bench.HPARAMS["max_grad_norm"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))  # reads the loss: the step has finished on the device
        times.append(time.perf_counter() - started)
        tokens.append(sum(ids.numel() for ids in micro_batches))
    return {
        "tokens_per_s": throughput(tokens[warmup:], times[warmup:]),
        "tokens_per_step": sum(tokens) / len(tokens),
        "loss_first": losses[0],
        "loss_last": losses[-1],
    }


def sft_system(ctx: PartContext, inputs: dict[str, str], system: str) -> dict[str, Any]:
    import bench_sft_vs_hf_trainer as sft_bench

    warmup = ctx.settings.sft_warmup
    ns = sft_namespace(ctx, inputs, system)
    record: dict[str, Any] = {}
    with peak_memory(record):
        if system == "plain":
            plain = plain_lora_loop(ns, warmup)
        elif system == "trainer":
            result = sft_bench.run_trainer(ns, "sequential")
        else:
            result = sft_bench.run_hetlm(ns, grouping=True)
    if system == "plain":
        return {**plain, **record}
    return {
        "tokens_per_s": throughput(result["real_tokens"][warmup:], result["step_times"][warmup:]),
        "padded_share": 1 - sum(result["real_tokens"]) / sum(result["padded_tokens"]),
        "loss_first": result["losses"][0],
        "loss_last": result["losses"][-1],
        **record,
    }


def part_sft(ctx: PartContext) -> None:
    s = ctx.settings
    inputs = sft_inputs(ctx)
    ctx.put(
        "setup",
        f"LLaMA {s.sft_preset} shape, LoRA r 16 all-linear, dolly-ja, max length "
        f"{s.sft_max_length}, batch 16 = 4 x 4, bf16, {s.sft_steps} timed steps "
        f"after {s.sft_warmup}",
    )
    needs = 5.0 if s.dry_run else 25.0
    for system in ("trainer", "hetlm", "plain"):
        ctx.measure(system, lambda x=system: sft_system(ctx, inputs, x), needs_s=needs)
    r = ctx.result
    if r["trainer"]["status"] == "ok" and r["hetlm"]["status"] == "ok":
        ctx.put("ratio_vs_trainer", r["hetlm"]["tokens_per_s"] / r["trainer"]["tokens_per_s"])
    if r["plain"]["status"] == "ok" and r["hetlm"]["status"] == "ok":
        ctx.put("ratio_vs_plain", r["hetlm"]["tokens_per_s"] / r["plain"]["tokens_per_s"])


# ------------------------------------------------------------------ part 5: QLoRA


def quantized_load(kind: str, where: Any = 0) -> dict[str, Any]:
    """``from_pretrained`` arguments for a base in ``kind`` (hetlm's own bitsandbytes settings)
    on device ``where``."""
    from hetlm.sft.train import bnb_config

    return {"quantization_config": bnb_config(kind), "device_map": {"": where}}


def qlora_generate(
    base: str, adapter: Path, load: dict[str, Any], new_tokens: int
) -> dict[str, Any]:
    """The adapter through plain transformers + peft on the base loaded with ``load``."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    record: dict[str, Any] = {}
    with peak_memory(record):
        model = AutoModelForCausalLM.from_pretrained(base, **load)
        model = peft.PeftModel.from_pretrained(model, str(adapter))
        tokenizer = AutoTokenizer.from_pretrained(str(adapter))
        inputs = tokenizer(
            "日本の首都はどこですか。", return_tensors="pt", return_token_type_ids=False
        ).to(model.device)
        with torch.no_grad():
            output = model.generate(
                **inputs,
                max_new_tokens=new_tokens,
                do_sample=False,
                min_new_tokens=new_tokens,
                pad_token_id=tokenizer.pad_token_id,
            )
    generated = output[0, inputs["input_ids"].shape[1] :]
    return {
        "generated_tokens": int(generated.numel()),
        "generated_text": tokenizer.decode(generated, skip_special_tokens=True),
        "inference_peak_memory_mib": record["peak_memory_mib"],
    }


def qlora_run(ctx: PartContext, inputs: dict[str, str], kind: str) -> dict[str, Any]:
    s = ctx.settings
    out = Path(fresh_dir(ctx, f"qlora-{kind}"))
    config = write_yaml(
        ctx.cache / f"qlora-{kind}.yaml",
        {
            "run": {"output_dir": str(out), "seed": 0},
            "model": {"init_from": inputs["base"], "quantization": kind},
            "data": {
                "dataset": inputs["data"],
                "template": "ja-alpaca",
                "max_length": s.sft_max_length,
                "validation_fraction": 0.0,
            },
            "lora": {"r": 16, "alpha": 32.0, "dropout": 0.0, "target_modules": "all-linear"},
            "train": {
                "global_batch": 16,
                "micro_batch": 4,
                "max_steps": s.qlora_steps,
                "learning_rate": 1e-3,
                "warmup_steps": 0,
                "precision": "bf16",
                "logging_steps": 1,
            },
        },
    )
    record: dict[str, Any] = {}
    with peak_memory(record):
        run_cli_here(["sft", str(config), "--quiet"])
    summary = json.loads((out / "summary.json").read_text())
    return {
        "train_peak_memory_mib": record["peak_memory_mib"],
        "tokens_per_s": summary["tokens_per_s"],
        "steps": summary["steps"],
        "loss_first": summary["loss_first"],
        "loss_last": summary["loss_last"],
        **qlora_generate(
            inputs["base"], Path(summary["adapter_dir"]), quantized_load(kind), s.new_tokens
        ),
    }


def part_qlora(ctx: PartContext) -> None:
    import torch

    if not torch.cuda.is_available():
        raise Skipped("needs CUDA")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise Skipped(
            f"bitsandbytes is not installed: carry {BNB_WHEEL} (`make gpu-wheels` "
            "builds it, trimmed to this CUDA) and install it (docs/GPU_CHECK.md)"
        )
    inputs = sft_inputs(ctx)
    for kind in ("4bit", "8bit"):
        ctx.measure(kind, lambda k=kind: qlora_run(ctx, inputs, k), needs_s=20.0)


# ------------------------------------------------------------------ part 6: fp16 + loss scaling


def part_fp16(ctx: PartContext) -> None:
    from hetlm.train.metrics import read_metrics

    s = ctx.settings
    config = pretrain_config(
        ctx, "fp16", steps=s.fp16_steps, precision="fp16", global_batch=s.small_batch
    )
    record: dict[str, Any] = {}
    with peak_memory(record):
        run_cli_here(["pretrain", str(config), "--quiet"])
    out = run_output_dir(config)
    summary = json.loads((out / "summary.json").read_text())
    steps = [r for r in read_metrics(out / "metrics.jsonl") if "event" not in r]
    losses = [r["loss"] for r in steps]
    k = min(3, len(losses) // 2)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    skipped = int(summary["skipped_steps"])
    ctx.result.update(
        setup=f"BERT-{s.small_preset}, seq {s.small_seq}, batch {s.small_batch}, "
        f"{s.fp16_steps} steps, precision fp16 (dynamic loss scaling)",
        precision=summary["precision"],
        steps=len(steps),
        loss_first=first,
        loss_last=last,
        skipped_steps=skipped,
        tokens_per_s=summary["tokens_per_s"],
        **record,
    )
    if summary["precision"] != "fp16":
        raise PartFailed(f"the run trained in {summary['precision']}, not fp16")
    if not last < first:
        raise PartFailed(f"the loss did not go down ({first:.3f} -> {last:.3f})")
    if skipped > max(2, len(steps) // 4):
        raise PartFailed(f"{skipped} of {len(steps)} steps skipped on overflow")


# ------------------------------------------------------------------ part 7: several ranks


def multirank_run(ctx: PartContext, name: str, command: list[str]) -> dict[str, Any]:
    """``command`` + ``pretrain CONFIG`` (+ ``--local-nodes 2`` for the emulated nodes): exit
    code, the one-line messages hetlm prints (e.g. how ranks sharing a GPU communicate), speed."""
    s = ctx.settings
    config = pretrain_config(
        ctx,
        name,
        steps=s.multirank_steps,
        precision="auto",
        global_batch=2 * s.small_batch,
        ranks=2,
    )
    cmd = [*command, "pretrain", str(config)]
    if name == "emulated_2_nodes":
        cmd += ["--local-nodes", "2"]
    with (ctx.out / "gpu_check_logs" / f"multirank-{name}.log").open("w") as log:
        run = run_command(cmd, ctx.time_left() - 2, log)
    entry: dict[str, Any] = {
        "command": shown(cmd),
        "exit_code": run["exit_code"],
        "wall_s": run["wall_s"],
        "messages": hetlm_lines(run["output"])[:6],
    }
    summary_file = run_output_dir(config) / "summary.json"
    if summary_file.is_file():
        summary = json.loads(summary_file.read_text())
        entry.update(
            tokens_per_s=summary["tokens_per_s"],
            engine=summary.get("engine"),
            precision=summary.get("precision"),
        )
    if run["timed_out"]:
        entry.update(status="failed", error=f"timed out after {run['wall_s']:.0f} s")
    elif run["exit_code"] != 0:
        entry.update(
            status="failed", error=f"exit code {run['exit_code']}: {error_line(run['output'])}"
        )
    return entry


def part_learning(ctx: PartContext) -> None:
    """Issue 13's learning check at a size this budget allows: hetlm and the Trainer on the
    same BERT, data and batches; does either leave the token-frequency plateau? (The full GPU
    run: ``python benchmarks/learning_check.py --device cuda``.)"""
    out = ctx.out / "learning"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "learning_check.py"),
        *ctx.settings.learning_args,
        "--out",
        str(out),
        "--cache",
        str(ctx.cache / "learning"),
    ]
    with (ctx.out / "gpu_check_logs" / "learning-output.log").open("w") as log:
        run = run_command(cmd, ctx.time_left() - 2, log)
    ctx.result.update(command=shown(cmd), exit_code=run["exit_code"], wall_s=run["wall_s"])
    if run["timed_out"]:
        raise PartFailed(f"the learning check timed out after {run['wall_s']:.0f} s")
    if run["exit_code"] != 0:
        raise PartFailed(
            f"the learning check exited with {run['exit_code']}: {error_line(run['output'])}"
        )
    found = sorted(out.glob("learning_check*.json"))
    if not found:
        raise PartFailed(f"the learning check wrote no JSON under {out}")
    summary = json.loads(found[-1].read_text())["summary"]
    systems = summary["systems"]
    ctx.result.update(
        baseline_accuracy=summary["baseline_accuracy"],
        hetlm_accuracy=systems["hetlm"]["final_accuracy"],
        trainer_accuracy=systems["trainer"]["final_accuracy"],
        hetlm_train_s=systems["hetlm"]["train_time_s"],
        trainer_train_s=systems["trainer"]["train_time_s"],
        both_leave_plateau=summary["both_leave_plateau"],
        within_noise=summary["within_noise"],
    )


def part_multirank(ctx: PartContext) -> None:
    import torch

    if not torch.cuda.is_available():
        raise Skipped("needs CUDA")
    gpus = torch.cuda.device_count()
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "hetlm.cli",
    ]

    def nccl() -> dict[str, Any]:
        if gpus < 2:
            raise Skipped(f"{gpus} GPU")
        return multirank_run(ctx, "nccl_2_ranks", torchrun)

    ctx.measure("nccl_2_ranks", nccl, needs_s=15.0)
    ctx.measure(
        "emulated_2_nodes",
        lambda: multirank_run(ctx, "emulated_2_nodes", hetlm_cli()),
        needs_s=15.0,
    )


def part_domain(ctx: PartContext) -> None:
    """Issue 13's domain adaptation at GPU scale: ``hetlm demo domain`` with the GPU settings;
    reports each run's held-out finance LM loss, task scores and which differences between the
    three runs are beyond the seeds' spread."""
    workdir = ctx.cache / "domain"
    args = ["demo", "domain", "--workdir", str(workdir), *ctx.settings.domain_args]
    with (ctx.out / "gpu_check_logs" / "domain-output.log").open("w") as log:
        run = run_command(hetlm_cli(*args), ctx.time_left() - 2, log)
    ctx.result.update(command="hetlm " + " ".join(args), exit_code=run["exit_code"])
    ctx.result["wall_s_demo"] = run["wall_s"]
    if run["timed_out"]:
        raise PartFailed(f"hetlm demo domain timed out after {run['wall_s']:.0f} s")
    if run["exit_code"] != 0:
        raise PartFailed(
            f"hetlm demo domain exited with {run['exit_code']}: {error_line(run['output'])}"
        )
    results = json.loads((workdir / "domain_adaptation.json").read_text(encoding="utf-8"))
    ctx.result.update(
        rows={
            row["run"]: {
                "finance_lm_loss": row["finance_mlm"]["loss"],
                "general_lm_loss": row["general_mlm"]["loss"],
                **{
                    f"{prefix}{task}_{metric}": row.get(key, {}).get(task, {}).get(metric)
                    for prefix, key in (("", "tasks"), ("probe_", "probe"))
                    for task in ("chabsa", "ews")
                    for metric in ("accuracy", "macro_f1")
                },
            }
            for row in results["rows"]
        },
        beyond_spread=[
            f"{item['protocol']} {item['task']} {item['metric']} {item['pair']} "
            f"{100 * item['difference']:+.1f}"
            for item in results["separation"]
            if item["beyond_spread"]
        ],
    )


PART_FUNCTIONS: dict[str, Callable[[PartContext], None]] = {
    "learning": part_learning,
    "domain": part_domain,
    "env": part_env,
    "demo": part_demo,
    "mlm": part_mlm,
    "sft": part_sft,
    "qlora": part_qlora,
    "fp16": part_fp16,
    "multirank": part_multirank,
}


# ------------------------------------------------------------------ the parent: parts in turn


def run_part(
    name: str, args: argparse.Namespace, settings: Settings, deadline: float, cuda: bool
) -> dict[str, Any]:
    """One part in a fresh process, stopped (with all it started) at ``deadline``."""
    if name in NEEDS_CUDA and not cuda:
        return {"status": "skipped", "reason": "needs CUDA"}
    available = deadline - time.time()
    if available < 3:
        return {"status": "skipped", "reason": "time budget spent"}
    logs = Path(args.out) / "gpu_check_logs"
    result_file = logs / f"{name}.json"
    result_file.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        __file__,
        "--child",
        name,
        "--out",
        str(args.out),
        "--cache",
        str(args.cache),
        "--deadline",
        str(deadline),
    ] + (["--dry-run"] if args.dry_run else [])
    print(f"gpu_check: {name} (budget {available:.0f} s) ...", flush=True)
    with (logs / f"{name}.log").open("w") as log:
        run = run_command(cmd, available, log)
    result = json.loads(result_file.read_text()) if result_file.is_file() else {}
    if result.get("status") in (None, "running"):  # it did not finish (a part that finished
        # but was stopped while exiting keeps its result)
        result.update(
            status="failed",
            error=(
                f"stopped at its time budget ({available:.0f} s); what it measured before is kept"
                if run["timed_out"]
                else f"exit code {run['exit_code']}: {error_line(run['output'])}"
            ),
        )
    result.setdefault("wall_s", run["wall_s"])
    print(
        f"gpu_check: {name}: {result['status']} "
        f"{result.get('error') or result.get('reason') or ''} ({run['wall_s']:.0f} s)",
        flush=True,
    )
    return result


def cuda_available(env: dict[str, Any]) -> bool:
    if env.get("status") == "ok":
        return bool(env["cuda_available"])
    import torch

    return torch.cuda.is_available()


def run_all(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    started = time.time()
    end = started + args.budget
    budgets = settings.part_budget_s
    total_budget = sum(budgets.values())
    parts: dict[str, Any] = {}
    small_corpus(settings, Path(args.cache))  # written once, before parts run side by side
    for i, name in enumerate(PARTS):
        later = sum(budgets[p] for p in PARTS[i + 1 :]) * args.budget / total_budget
        cuda = name not in NEEDS_CUDA or cuda_available(parts.get("env", {}))
        parts[name] = run_part(name, args, settings, end - later, cuda)
    return {
        "dry_run": settings.dry_run,
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)),
        "wall_s": time.time() - started,
        "budget_s": args.budget,
        "settings": asdict(settings),
        "parts": parts,
        "goals": goals(parts, settings),
    }


# ------------------------------------------------------------------ goals and the report


def goals(parts: dict[str, Any], settings: Settings) -> list[dict[str, Any]]:
    """Issue 11's goals, each with the measured value and whether it is met (None: not
    measured)."""
    rows: list[dict[str, Any]] = []
    try:
        add_goals(parts, settings, rows)
    except Exception as exc:  # a part's result in an unexpected shape: the report still goes out
        print(f"gpu_check: goals not evaluated: {last_error_line(exc)}", file=sys.stderr)
    return rows


def add_goals(parts: dict[str, Any], settings: Settings, rows: list[dict[str, Any]]) -> None:
    def add(goal: str, value: float | None, met: bool | None, unit: str = "") -> None:
        rows.append({"goal": goal, "value": value, "unit": unit, "met": met})

    mlm = parts.get("mlm", {})
    for key in (f"seq{seq_len}" for seq_len, _ in settings.mlm_shapes):
        row = mlm.get(key, {})
        ok = row.get("status") == "ok" and "ratio" in row
        value = row["hetlm"]["mfu"] if ok else None
        add(f"MLM {key}: hetlm MFU >= 45%", value, None if value is None else value >= 0.45, "%")
        ratio = row.get("ratio") if ok else None
        add(f"MLM {key}: >= 2x the Trainer", ratio, None if ratio is None else ratio >= 2, "x")
        mem = peak_ratio(row.get("hetlm"), row.get("trainer")) if ok else None
        add(f"MLM {key}: peak memory <= the Trainer's", mem, None if mem is None else mem <= 1, "x")
    sft = parts.get("sft", {})
    ratio = sft.get("ratio_vs_trainer")
    add("SFT: >= 3x Trainer + PEFT", ratio, None if ratio is None else ratio >= 3, "x")
    plain = sft.get("ratio_vs_plain")
    add("SFT: >= the plain PyTorch + peft loop", plain, None if plain is None else plain >= 1, "x")
    mem = peak_ratio(sft.get("hetlm"), sft.get("trainer"))
    add("SFT: peak memory <= Trainer + PEFT's", mem, None if mem is None else mem <= 1, "x")


def peak_ratio(mine: dict | None, theirs: dict | None) -> float | None:
    if not mine or not theirs or mine.get("status") != "ok" or theirs.get("status") != "ok":
        return None
    if mine.get("peak_memory_mib") is None or not theirs.get("peak_memory_mib"):
        return None
    return mine["peak_memory_mib"] / theirs["peak_memory_mib"]


def fmt(value: Any, spec: str = ",.0f", suffix: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:{spec}}{suffix}" if isinstance(value, int | float) else str(value)


def status_line(part: dict[str, Any]) -> str:
    status = part.get("status", "?")
    detail = part.get("error") or part.get("reason")
    return (
        f"**{status}**"
        + (f": {detail}" if detail else "")
        + (f" ({part['wall_s']:.0f} s)" if isinstance(part.get("wall_s"), int | float) else "")
    )


def md_env(env: dict[str, Any]) -> list[str]:
    if env.get("status") != "ok":
        return []
    keys = (
        "gpu",
        "compute_capability",
        "memory_gib",
        "hardware_table_entry",
        "bf16_peak_tflops",
        "torch",
        "cuda",
        "cudnn",
        "transformers",
        "peft",
        "accelerate",
        "bitsandbytes",
        "datasets",
        "pydantic",
        "python",
        "cpu_count",
        "device_count",
        "pyarrow",
        "fsspec",
        "huggingface-hub",
        "typing-extensions",
        "git_commit",
        "missing_modules",
        "import_errors",
    )

    def shown(value: Any) -> str:
        if isinstance(value, list):
            return ", ".join(value) or "none"
        return f"{value:.4g}" if isinstance(value, float) else fmt(value)

    return ["| | |", "|---|---|"] + [f"| {k} | {shown(env[k])} |" for k in keys if k in env]


def md_demo(demo: dict[str, Any]) -> list[str]:
    if "command" not in demo:
        return []
    lines = [f"`{demo['command']}`: exit code {demo['exit_code']}, {demo['demo_wall_s']:.0f} s", ""]
    lines += ["    " + line for line in demo.get("summary", [])]
    lines += [f"- {m}" for m in demo.get("messages", [])]
    return lines


def md_system_row(label: str, r: dict[str, Any], *, mfu_col: bool) -> str:
    if r.get("status") != "ok":
        return f"| {label} | {r.get('status')}: {r.get('error') or r.get('reason')} |"
    cells = [fmt(r["tokens_per_s"])]
    if mfu_col:
        cells.append(fmt(None if r.get("mfu") is None else 100 * r["mfu"], ".1f", "%"))
    cells += [fmt(r.get("peak_memory_mib")), fmt(r.get("loss_last"), ".3f")]
    return f"| {label} | " + " | ".join(cells) + " |"


def md_mlm(mlm: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for key in (k for k in mlm if k.startswith("seq")):
        row = mlm[key]
        lines += [""] if lines else []
        if row.get("status") != "ok":
            lines.append(f"{key}: {status_line(row)}")
            continue
        lines += [
            f"seq {row['seq_len']}, batch {row['batch']}, {row['precision']}, "
            f"N = {row['params'] / 1e6:.1f}M parameters; hetlm / Trainer = "
            f"**{fmt(row.get('ratio'), '.2f', 'x')}**"
            + "".join(f" (batch {b} ran out of memory)" for b in row.get("out_of_memory_at", [])),
            "",
            "| system | tokens/s | MFU | peak memory MiB | loss (last step) |",
            "|---|---:|---:|---:|---:|",
            md_system_row("HF Trainer (run_mlm recipe)", row["trainer"], mfu_col=True),
            md_system_row("hetlm", row["hetlm"], mfu_col=True),
        ]
    return lines


def md_sft(sft: dict[str, Any]) -> list[str]:
    if "setup" not in sft:
        return []
    labels = {
        "trainer": "Trainer + PEFT (hetlm's batches)",
        "hetlm": "hetlm sft",
        "plain": "plain PyTorch + peft loop, same tokens, no padding",
    }
    lines = [
        sft["setup"] + "; tokens/s counts real (non-padding) tokens",
        "",
        "| system | tokens/s | peak memory MiB | loss (last step) |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        md_system_row(label, sft[k], mfu_col=False) for k, label in labels.items() if k in sft
    ]
    lines += [
        "",
        f"hetlm / Trainer + PEFT = **{fmt(sft.get('ratio_vs_trainer'), '.2f', 'x')}**, "
        f"hetlm / plain loop = **{fmt(sft.get('ratio_vs_plain'), '.2f', 'x')}**",
    ]
    return lines


def md_qlora(qlora: dict[str, Any]) -> list[str]:
    lines = []
    for kind in ("4bit", "8bit"):
        r = qlora.get(kind)
        if not r:
            continue
        if r.get("status") != "ok":
            lines.append(f"- {kind}: {status_line(r)}")
            continue
        lines.append(
            f"- {kind}: {r['steps']} steps, {fmt(r['tokens_per_s'])} tokens/s, training "
            f"peak {fmt(r['train_peak_memory_mib'])} MiB, loss {r['loss_first']:.3f} -> "
            f"{r['loss_last']:.3f}; adapter loaded by plain peft on the {kind} base: "
            f"{r['generated_tokens']} tokens generated (peak "
            f"{fmt(r['inference_peak_memory_mib'])} MiB): {r['generated_text']!r}"
        )
    return lines


def md_fp16(fp16: dict[str, Any]) -> list[str]:
    if "setup" not in fp16:
        return []
    return [
        f"{fp16['setup']}: loss (mean of first / last 3 steps) {fp16['loss_first']:.3f} -> "
        f"{fp16['loss_last']:.3f}, {fp16['skipped_steps']} of {fp16['steps']} steps skipped "
        f"on overflow, {fmt(fp16['tokens_per_s'])} tokens/s, peak "
        f"{fmt(fp16.get('peak_memory_mib'))} MiB"
    ]


def md_multirank(multi: dict[str, Any]) -> list[str]:
    lines = []
    for key, label in (
        ("nccl_2_ranks", "2 ranks, NCCL (torchrun --nproc-per-node 2)"),
        ("emulated_2_nodes", "2 emulated nodes on one GPU (--local-nodes 2)"),
    ):
        r = multi.get(key)
        if not r:
            continue
        if r.get("status") == "skipped":
            lines.append(f"- {label}: skipped: {r['reason']}")
            continue
        head = f"- {label}: exit code {r.get('exit_code')}"
        if r.get("status") == "failed":
            head += f" (failed: {r.get('error')})"
        if "tokens_per_s" in r:
            head += f", {fmt(r['tokens_per_s'])} tokens/s ({r.get('engine')}, {r.get('precision')})"
        lines += [head, f"  - `{r.get('command')}`"]
        lines += [f"  - `{m}`" for m in r.get("messages", [])] or [
            "  - (it printed no `hetlm:` line)"
        ]
    return lines


def md_learning(learning: dict[str, Any]) -> list[str]:
    if "hetlm_accuracy" not in learning:
        return []
    return [
        f"`{learning['command']}`: held-out accuracy hetlm "
        f"{100 * learning['hetlm_accuracy']:.1f}%, Trainer "
        f"{100 * learning['trainer_accuracy']:.1f}%, most-frequent-token baseline "
        f"{100 * learning['baseline_accuracy']:.1f}% (goal: 2x); both leave the plateau: "
        f"{learning['both_leave_plateau']}; curves within noise: {learning['within_noise']}; "
        f"training {learning['hetlm_train_s']:.0f} s (hetlm) vs "
        f"{learning['trainer_train_s']:.0f} s (Trainer)."
    ]


def md_domain(domain: dict[str, Any]) -> list[str]:
    if "rows" not in domain:
        return []
    lines = [
        f"`{domain['command']}` ({domain['wall_s_demo']:.0f} s)",
        "",
        "| run | finance LM loss | general LM loss | chABSA acc | chABSA F1 | EWS acc | EWS F1 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    scores = ("chabsa_accuracy", "chabsa_macro_f1", "ews_accuracy", "ews_macro_f1")

    def percent(row: dict[str, Any], key: str) -> str:
        return fmt(None if row.get(key) is None else 100 * row[key], ".1f", "%")

    for run, row in domain["rows"].items():
        cells = [fmt(row["finance_lm_loss"], ".3f"), fmt(row["general_lm_loss"], ".3f")]
        cells += [percent(row, key) for key in scores]
        lines.append(f"| ({run}) | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Linear probe (a linear classifier on the frozen models' features):",
        "",
        "| run | chABSA acc | chABSA F1 | EWS acc | EWS F1 |",
        "|---|---:|---:|---:|---:|",
    ]
    for run, row in domain["rows"].items():
        cells = [percent(row, f"probe_{key}") for key in scores]
        lines.append(f"| ({run}) | " + " | ".join(cells) + " |")
    beyond = domain.get("beyond_spread") or ["none"]
    lines += ["", "Beyond the seeds' spread: " + "; ".join(beyond) + "."]
    return lines


def md_goals(rows: list[dict[str, Any]], dry_run: bool) -> list[str]:
    lines = ["| goal | measured | met |", "|---|---:|---|"]
    for g in rows:
        value = g["value"]
        shown = (
            "-"
            if value is None
            else (f"{100 * value:.1f}%" if g["unit"] == "%" else f"{value:.2f}x")
        )
        met = {True: "yes", False: "**no**", None: "not measured"}[g["met"]]
        lines.append(f"| {g['goal']} | {shown} | {met} |")
    if dry_run:
        lines += ["", "Dry run: tiny shapes on CPU; these numbers say nothing about the goals."]
    return lines


SECTIONS: dict[str, tuple[str, Callable[[dict[str, Any]], list[str]]]] = {
    "env": ("1. Environment", md_env),
    "demo": ("2. `hetlm demo` on this machine", md_demo),
    "mlm": ("3. Masked-LM pretraining vs the HF Trainer", md_mlm),
    "sft": ("4. LoRA SFT vs Trainer + PEFT and a plain loop", md_sft),
    "qlora": ("5. QLoRA end to end (bitsandbytes)", md_qlora),
    "fp16": ("6. fp16 with loss scaling", md_fp16),
    "multirank": ("7. Several ranks", md_multirank),
    "learning": ("8. Does it learn? (issue 13's learning check)", md_learning),
    "domain": ("9. Domain adaptation (issue 13, GPU variant)", md_domain),
}


def rendered(render: Callable[..., list[str]], *args: Any) -> list[str]:
    """A section's lines; a section that cannot be rendered says so (gpu.json has it all)."""
    try:
        return render(*args)
    except Exception as exc:
        return [f"(this section could not be rendered: {last_error_line(exc)}; see gpu.json)"]


def write_report(report: dict[str, Any], out: Path) -> Path:
    """gpu.json first (every number), then gpu.md: the goals, then one section per part."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    title = "hetlm GPU check" + (" (dry run on CPU, tiny shapes)" if report["dry_run"] else "")
    lines = [
        f"# {title}",
        "",
        f"{report['started']}, {report['wall_s']:.0f} s of a {report['budget_s']:.0f} s "
        "budget. Reproduce: `make gpu-check` (docs/GPU_CHECK.md). Every number is also in "
        "gpu.json.",
        "",
        "## Goals (issue 11)",
        "",
        *rendered(md_goals, report["goals"], report["dry_run"]),
    ]
    for name, (heading, render) in SECTIONS.items():
        part = report["parts"][name]
        lines += ["", f"## {heading}", "", status_line(part)]
        body = rendered(render, part)
        lines += [""] + body if body else []
    (out / "gpu.md").write_text("\n".join(lines) + "\n")
    return out / "gpu.md"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="the same code on CPU with tiny shapes, in about a minute",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="where gpu.md/gpu.json go (default benchmarks/results; with "
        "--dry-run a new temporary folder)",
    )
    parser.add_argument(
        "--cache",
        default=None,
        help="tokenizers, datasets and base models, kept for a rerun (default "
        "runs/gpu-check, or <out>/cache with --dry-run)",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds for the whole check (default 560; 600 with --dry-run)",
    )
    parser.add_argument("--child", choices=PARTS, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    settings = DRY_RUN if args.dry_run else GPU
    if args.out is None:
        args.out = tempfile.mkdtemp(prefix="gpu-check-") if args.dry_run else str(RESULTS)
    if args.cache is None:
        args.cache = (
            str(Path(args.out) / "cache") if args.dry_run else str(ROOT / "runs" / "gpu-check")
        )
    args.budget = args.budget or settings.budget_s
    Path(args.cache).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_check_logs").mkdir(parents=True, exist_ok=True)
    if args.child:
        child_main(args.child, settings, Path(args.out), Path(args.cache), args.deadline)
        return
    report = run_all(args, settings)
    path = write_report(report, Path(args.out))
    print(path.read_text())
    print(f"gpu_check: wrote {path} and {path.with_suffix('.json')}")


if __name__ == "__main__":
    main()
