"""One rank's training step, measured: peak memory and samples/s at a given micro-batch.

The step is hetlm's own objective, so the numbers are the ones a run will see: ``SparseMaskedLM``
(vocabulary logits only at the ~15% masked slots, a fixed number of slots per sequence) around a
``*ForMaskedLM`` model built from its config, AdamW with hetlm's parameter groups, gradient
clipping, autocast in the chosen precision, and the model wrapped in DDP over a one-rank process
group so that DDP's gradient buckets are part of the measured peak as they are in training.

Peak memory is ``torch.cuda.max_memory_reserved`` on a GPU (what the caching allocator took from
the device) and on a CPU the process's peak anonymous memory (peak resident set ``VmHWM``,
reset through ``/proc/self/clear_refs``, less its file-backed pages): the whole process,
interpreter and heaps included, because that whole is what a memory limit (a cgroup, the
machine's RAM) constrains, but not the clean library and data pages the kernel can drop.

On a CPU the measurement runs in a subprocess (``python -m hetlm.probe.worker SPEC``) that
answers one JSON line per request on stdout, so a size that exceeds a cgroup limit kills only
the worker, and a fresh worker gives a peak undisturbed by the allocator's memory retained from
an earlier, larger size.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

#: Marks the worker's answers on stdout (libraries may print there too).
PREFIX = "HETLM-PROBE "
MLM_SLOTS_FRACTION = 0.15


@dataclass
class Measurement:
    """What one micro-batch size gave: did it fit, its peak memory, its step times."""

    micro_batch: int
    fits: bool
    peak_bytes: int | None = None
    step_s: list[float] = field(default_factory=list)
    note: str | None = None  # "out of memory", "killed (cgroup memory limit?)", ...

    @property
    def samples_per_s(self) -> float | None:
        """Samples per second from the median step time (robust to a busy neighbour)."""
        if not self.step_s:
            return None
        times = sorted(self.step_s)
        mid = len(times) // 2
        median = times[mid] if len(times) % 2 else (times[mid - 1] + times[mid]) / 2
        return self.micro_batch / median if median > 0 else None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["samples_per_s"] = self.samples_per_s
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Measurement:
        return cls(
            micro_batch=int(data["micro_batch"]),
            fits=bool(data["fits"]),
            peak_bytes=data.get("peak_bytes"),
            step_s=list(data.get("step_s") or []),
            note=data.get("note"),
        )


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def peak_anon_bytes() -> int:
    """Peak anonymous memory of this process since the last reset: the peak resident set less
    the file-backed and shared pages resident now (libraries, memory-mapped data). Those pages
    are clean and the kernel drops them under pressure; anonymous memory (tensors, heaps) is
    what runs out. File pages settle after the first step, so "now" stands for "at the peak"."""
    return _status_bytes("VmHWM") - _status_bytes("RssFile") - _status_bytes("RssShmem")


def can_reset_peak_rss() -> bool:
    return os.access("/proc/self/clear_refs", os.W_OK) and Path("/proc/self/status").is_file()


def reset_peak_rss() -> None:
    """Set VmHWM back to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class StepRunner:
    """A model in the training run's own engine, precision and optimizer on one device (DDP over
    a process group of one, so its gradient buckets count); ``measure(b)`` times the training
    run's own ``train_step`` (``hetlm.train.trainer``) at micro-batch b: what is probed is what
    training does (autocast, loss scaling, clipping, the fused AdamW on CUDA)."""

    def __init__(
        self,
        config: Any,
        seq_len: int,
        precision: str,
        device: str = "cpu",
        threads: int | None = None,
        ddp: bool = True,
        seed: int = 0,
    ) -> None:
        import torch
        from transformers import AutoModelForMaskedLM

        from hetlm.models.masked_lm import SparseMaskedLM
        from hetlm.train.distributed import DistContext
        from hetlm.train.engine import Engine, EngineOptions
        from hetlm.train.precision import Precision

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.seq_len = seq_len
        self.precision = Precision(precision, self.device)
        self.vocab_size = int(config.vocab_size)
        torch.manual_seed(seed)
        module = SparseMaskedLM(AutoModelForMaskedLM.from_config(config))
        module.train()
        self.n_params = sum(p.numel() for p in module.parameters())
        self.ctx = DistContext(0, 1, 0, 0, self.device)
        self.process_group = False
        if ddp:
            self._init_process_group()
            from hetlm.train.engines.ddp import DDPEngine

            self.engine: Engine = DDPEngine(module, self.ctx, self.precision, EngineOptions())
        else:
            self.engine = Engine(module, self.ctx, self.precision, EngineOptions(name="single"))
        self.optimizer = self.engine.build_optimizer(
            lr=1e-4, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-6
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda _step: 1.0)
        self.slots = max(1, math.ceil(seq_len * MLM_SLOTS_FRACTION))
        self.generator = torch.Generator().manual_seed(seed)

    def _init_process_group(self) -> None:
        """A process group of one for DDP (its buckets are part of a real run's memory)."""
        import torch.distributed as dist

        if not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
            self.process_group = True

    def close(self) -> None:
        import torch.distributed as dist

        if self.process_group and dist.is_initialized():
            dist.destroy_process_group()

    def batch(self, size: int):
        """Random tokens with ``slots`` masked positions per row, every slot a target: the
        micro-batch the MLM collator makes (``hetlm.data.collators.MLMBatch``)."""
        from hetlm.data.collators import MLMBatch

        torch, g = self.torch, self.generator
        ids = torch.randint(5, self.vocab_size, (size, self.seq_len), generator=g)
        positions = torch.rand(size, self.seq_len, generator=g).argsort(dim=1)[:, : self.slots]
        positions = positions.sort(dim=1).values
        labels = ids.gather(1, positions)
        return MLMBatch(
            ids.to(self.device),
            positions.to(self.device),
            labels.to(self.device),
            num_targets=size * self.slots,
            num_tokens=size * self.seq_len,
        )

    def step(self, batch) -> None:
        """One optimizer step of the training run (``train_step``), clipping at 1.0."""
        from hetlm.train.trainer import train_step

        train_step(
            self.engine, self.precision, self.optimizer, self.scheduler, self.ctx, [batch], 1.0
        )

    def _sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def measure(self, size: int, warmup: int = 1, steps: int = 1) -> Measurement:
        """Run ``warmup`` + ``steps`` steps at micro-batch ``size``; time the last ``steps``.

        On a GPU an out-of-memory error is caught and reported as "does not fit"; on a CPU a
        size over the memory limit is found by comparing the peak with the limit (or the
        kernel kills the worker, which the parent reports).
        """
        torch = self.torch
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        elif can_reset_peak_rss():
            reset_peak_rss()
        times: list[float] = []
        try:
            batch = self.batch(size)
            for i in range(warmup + steps):
                self._sync()
                started = time.perf_counter()
                self.step(batch)
                self._sync()
                if i >= warmup:
                    times.append(time.perf_counter() - started)
            del batch
        except torch.cuda.OutOfMemoryError:
            self._recover()
            return Measurement(size, fits=False, note="out of memory")
        peak = int(torch.cuda.max_memory_reserved(self.device)) if cuda else peak_anon_bytes()
        return Measurement(size, fits=True, peak_bytes=peak, step_s=times)

    def _recover(self) -> None:
        """After a CUDA OOM: drop partial gradients and cached blocks before the next try."""
        import gc

        self.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        self.torch.cuda.empty_cache()


def _answer(data: dict[str, Any]) -> None:
    sys.stdout.write(PREFIX + json.dumps(data) + "\n")
    sys.stdout.flush()


def resolve_model(spec: dict[str, Any]) -> tuple[Any, str]:
    """(transformers config, name) for the probe spec's model, checked for what probe runs."""
    from hetlm.errors import HetlmError
    from hetlm.models.spec import resolve_model as resolve

    config, name = resolve(spec["model"], int(spec["vocab_size"]), int(spec["seq_len"]))
    if getattr(config, "model_type", None) not in ("bert", "roberta"):
        raise HetlmError(
            f"hetlm probe measures the masked-LM step of BERT/RoBERTa models, not "
            f"{getattr(config, 'model_type', None)!r}"
        )
    return config, name


def model_info(config: Any, name: str) -> dict[str, Any]:
    from hetlm.cluster.memory import ModelShape

    shape = ModelShape.from_config(config, name=name)
    return {
        "name": name,
        "model_type": shape.model_type,
        "n_params": shape.n_params,
        "hidden_size": shape.hidden_size,
        "num_layers": shape.num_layers,
        "num_heads": shape.num_heads,
        "vocab_size": shape.vocab_size,
    }


def planner_cap(
    config: Any, memory_bytes: float, seq_len: int, precision: str, is_cpu: bool
) -> int:
    """What ``hetlm plan``'s memory model allows on this much memory, to compare with."""
    from hetlm.cluster.memory import MemoryModel, ModelShape, max_micro_batch

    return max_micro_batch(
        memory_bytes,
        ModelShape.from_config(config),
        seq_len,
        precision,
        model=MemoryModel.for_device(is_cpu),
    )


def main(argv: list[str] | None = None) -> int:
    """Serve measurements: the spec (JSON) in argv, then one request per stdin line.

    The parent (``hetlm probe``) never imports torch on a CPU probe, so that inside a memory
    cgroup the worker has nearly all of the limit to itself.
    """
    from hetlm.errors import HetlmError

    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(argv[0])
    # A training rank reads its packed data through `datasets` (pyarrow): ~90 MB of resident
    # memory that the probe must not hand to the micro-batch.
    import datasets  # noqa: F401

    try:
        config, name = resolve_model(spec)
        runner = StepRunner(
            config,
            spec["seq_len"],
            spec["precision"],
            spec.get("device", "cpu"),
            spec.get("threads"),
            spec.get("ddp", True),
        )
        cap = (
            planner_cap(
                config, spec["memory_bytes"], spec["seq_len"], spec["precision"], is_cpu=True
            )
            if spec.get("memory_bytes")
            else None
        )
    except HetlmError as exc:
        _answer({"error": str(exc)})
        return 2
    _answer(
        {
            "ready": True,
            "model": model_info(config, name),
            "planner_cap": cap,
            "rss_bytes": _status_bytes("VmRSS"),
            "threads": runner.torch.get_num_threads(),
            "torch": str(runner.torch.__version__),
        }
    )
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("quit"):
            break
        result = runner.measure(
            int(request["micro_batch"]), int(request.get("warmup", 1)), int(request.get("steps", 1))
        )
        _answer(result.to_dict())
    runner.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
