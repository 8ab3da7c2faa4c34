"""``hetlm probe``: the largest micro-batch that fits a device, and its samples/s, for the plan.

The planner's memory model is an estimate and its speeds are peaks times an assumed efficiency;
a probe replaces both with measurements of the real step on the real device (see
:mod:`hetlm.probe.worker` for what exactly runs and how memory is measured).

* **CUDA**: try sizes until one runs out of memory. Doubling from 1 finds a bracket, bisection
  the largest size that fits; after an ``OutOfMemoryError`` the cache is emptied before the
  next try. ``--memory-gib`` below the device's size is enforced with
  ``torch.cuda.set_per_process_memory_fraction`` (emulates a smaller GPU).
* **CPU**: nothing raises when RAM runs out (the kernel kills the process, or it swaps), so the
  search compares the measured peak anonymous memory of a worker process (its peak resident set
  less the clean file pages the kernel can drop) with the limit (by default the cgroup's memory
  limit, else 0.9 x RAM) less a reserve (10% by default). Peaks at two small sizes give a line
  ``peak(b) = a + k b``; its prediction is then measured and the line refitted until the
  largest size that fits and the next one up are both measured, one under and one over the
  limit. A worker killed by a cgroup's limit counts as "over".

The probe file (YAML) holds ``samples_per_s``: one number per device, which the cluster file's
``nodes.N.samples_per_s: probe.yaml`` reads, plus what was measured (``devices``) for people.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hetlm.errors import HetlmError
from hetlm.probe.worker import PREFIX, Measurement

GIB = 2**30
FORMAT = "hetlm-probe/1"
DEFAULT_MAX_BATCH = 1024
#: Default headroom, the same 10% that ``hetlm plan`` keeps (``--memory-fraction 0.9``): the probe
#: runs a few steps of one rank alone; a training rank also holds its peers' communication
#: buffers (gloo/NCCL), its data pipeline and a long run's allocator growth. Measured on
#: bert-small (docs/EMULATED_CLUSTER.md): a gloo DDP rank held 60-90 MB more than the probe.
DEFAULT_RESERVE_FRACTION = 0.10

Progress = Callable[[str], None]


# --------------------------------------------------------------------------- the two searches


def search_by_trying(fits: Callable[[int], bool], max_batch: int) -> int:
    """Largest ``b`` in ``[1, max_batch]`` with ``fits(b)`` (monotone); 0 if not even 1 fits.

    Doubling finds a bracket (last size that fit, first that did not), bisection closes it:
    about 2 log2(answer) tries.
    """
    if max_batch < 1 or not fits(1):
        return 0
    lo, hi = 1, None
    while hi is None:
        nxt = min(lo * 2, max_batch)
        if nxt == lo:
            return lo
        if fits(nxt):
            lo = nxt
        else:
            hi = nxt
    return _bisect(lo, hi, fits)


def search_by_fit(
    peak_of: Callable[[int], int | None],
    budget: float,
    max_batch: int,
    start: tuple[int, int] = (2, 8),
    max_rounds: int = 10,
) -> int:
    """Largest ``b <= max_batch`` whose measured peak is at most ``budget`` (0: none fits).

    ``peak_of(b)`` measures; ``None`` means the attempt died (a cgroup OOM kill): over budget.
    Peaks grow linearly in ``b`` (activations per sample), so two points predict the answer; each
    prediction is measured and the line refitted through the two largest sizes that fit. It ends
    with the answer measured under the budget and answer + 1 measured over it (or max_batch).
    """
    peaks: dict[int, int | None] = {}

    def fits(b: int) -> bool:
        if b not in peaks:
            peaks[b] = peak_of(b)
        value = peaks[b]
        return value is not None and value <= budget

    b1 = max(1, min(start[0], max_batch))
    if not fits(b1):
        return search_by_trying(fits, b1 - 1) if b1 > 1 else 0
    lo, hi = b1, None
    b2 = min(start[1], max_batch)
    if b2 > b1:
        if fits(b2):
            lo = b2
        else:
            hi = b2
    bisect_next = False
    for _ in range(max_rounds):
        if (hi is not None and hi - lo <= 1) or (hi is None and lo >= max_batch):
            return lo
        under = sorted(b for b, p in peaks.items() if p is not None and p <= budget)
        # The widest baseline gives the least noisy slope (the peaks are linear in b).
        slope = 0.0
        if len(under) >= 2:
            first, last = peaks[under[0]] or 0, peaks[under[-1]] or 0
            slope = (last - first) / (under[-1] - under[0])
        if hi is not None and (bisect_next or slope <= 0):
            guess = (lo + hi) // 2
        elif slope > 0:
            guess = lo + int((budget - peaks[lo]) // slope)  # type: ignore[operator]
        else:
            guess = lo * 2
        guess = max(lo + 1, min(guess, hi - 1 if hi is not None else max_batch))
        width = hi - lo if hi is not None else None
        if fits(guess):
            lo = guess
        else:
            hi = guess
        # Safeguard (as in Dekker's method): a guess that did not halve the bracket is
        # followed by a bisection step, so noisy peaks cannot make the search crawl.
        bisect_next = not bisect_next and width is not None and (hi - lo) > width / 2
    # Out of rounds (noisy peaks): close the bracket by bisection.
    return lo if hi is None else _bisect(lo, hi, fits)


# --------------------------------------------------------------------------- results


@dataclass
class DeviceProbe:
    """The result for one device."""

    device: str
    name: str
    memory_bytes: int
    memory_source: str
    reserve_bytes: int
    max_micro_batch: int
    peak_bytes: int | None
    samples_per_s: float
    method: str
    measured: list[Measurement] = field(default_factory=list)
    planner_cap: int | None = None  # what the memory model predicts for this memory
    threads: int | None = None
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "device": self.device,
            "name": self.name,
            "memory_gib": _gib(self.memory_bytes),
            "memory_source": self.memory_source,
            "reserve_gib": _gib(self.reserve_bytes),
            "max_micro_batch": self.max_micro_batch,
            "peak_memory_gib": _gib(self.peak_bytes),
            "samples_per_s": round(self.samples_per_s, 4),
            "method": self.method,
            "planner_memory_model_cap": self.planner_cap,
        }
        if self.threads is not None:
            data["threads"] = self.threads
        if self.note:
            data["note"] = self.note
        data["measured"] = [
            {
                "micro_batch": m.micro_batch,
                "fits": m.fits,
                "peak_memory_gib": _gib(m.peak_bytes),
                "samples_per_s": None if m.samples_per_s is None else round(m.samples_per_s, 4),
                **({"note": m.note} if m.note else {}),
            }
            for m in self.measured
        ]
        return data


@dataclass
class ProbeResult:
    model: dict[str, Any]
    seq_len: int
    precision: str
    devices: list[DeviceProbe]
    torch_version: str | None = None

    @property
    def samples_per_s(self) -> list[float]:
        return [round(d.samples_per_s, 4) for d in self.devices]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "samples_per_s": self.samples_per_s,
            "max_micro_batch": [d.max_micro_batch for d in self.devices],
            "model": self.model,
            "seq_len": self.seq_len,
            "precision": self.precision,
            "host": socket.gethostname(),
            "torch": self.torch_version,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "devices": [d.to_dict() for d in self.devices],
        }

    def save(self, path: str | Path) -> Path:
        """Write the probe file atomically (a half-written file must not reach the planner)."""
        import yaml

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        header = (
            "# written by `hetlm probe`; a cluster file reads `samples_per_s` from it "
            "(nodes.N.samples_per_s: <this file>)\n"
        )
        text = header + yaml.safe_dump(self.to_dict(), sort_keys=False, width=100)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
        return path

    def format_table(self) -> str:
        lines = [
            f"{'device':<10} {'memory GiB':>10} {'max micro-batch':>15} {'peak GiB':>9} "
            f"{'samples/s':>10}  name"
        ]
        for d in self.devices:
            peak = f"{d.peak_bytes / GIB:.2f}" if d.peak_bytes else "-"
            lines.append(
                f"{d.device:<10} {d.memory_bytes / GIB:>10.2f} {d.max_micro_batch:>15} "
                f"{peak:>9} {d.samples_per_s:>10.2f}  {d.name}"
            )
        return "\n".join(lines)


def _gib(value: int | float | None) -> float | None:
    return None if value is None else round(value / GIB, 4)


# --------------------------------------------------------------------------- CPU: a worker process


class WorkerSession:
    """A worker subprocess (:mod:`hetlm.probe.worker`) answering measurements; restarted when
    asked or killed."""

    def __init__(self, spec: dict[str, Any], env: dict[str, str] | None = None) -> None:
        self.spec = spec
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.largest = 0  # largest size measured by the current process
        self.ready: dict[str, Any] = {}  # the worker's first answer: model, threads, torch
        self._stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed by close())

    def _start(self) -> None:
        self.close()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hetlm.probe.worker", json.dumps(self.spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env=self.env,
        )
        self.largest = 0
        ready = self._read()
        if ready is None:
            code = self.proc.wait()
            if code == -9:
                raise HetlmError(
                    "the probe worker was killed while building the model: the "
                    "model and optimizer alone exceed the memory limit"
                )
            raise HetlmError(f"the probe worker failed (exit {code}): {self._stderr_tail()}")
        if "error" in ready:
            self.proc.wait()
            raise HetlmError(ready["error"])
        self.ready = ready

    def _read(self) -> dict[str, Any] | None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(PREFIX):
                return json.loads(line[len(PREFIX) :])
        return None

    def _stderr_tail(self, chars: int = 1500) -> str:
        self._stderr.seek(0)
        text = self._stderr.read().strip()
        return text[-chars:].replace("\n", " | ") or "no output"

    def measure(self, size: int, warmup: int, steps: int, fresh: bool = False) -> Measurement:
        if fresh or self.proc is None or self.proc.poll() is not None:
            self._start()
        assert self.proc is not None and self.proc.stdin is not None
        try:
            self.proc.stdin.write(
                json.dumps({"micro_batch": size, "warmup": warmup, "steps": steps}) + "\n"
            )
            self.proc.stdin.flush()
            answer = self._read()
        except BrokenPipeError:
            answer = None
        if answer is not None:
            self.largest = max(self.largest, size)
            return Measurement.from_dict(answer)
        code = self.proc.wait()
        self.proc = None
        if code == -9:  # SIGKILL: the kernel's OOM killer (a cgroup limit) took it
            return Measurement(size, fits=False, note="killed by the kernel (memory limit)")
        raise HetlmError(
            f"the probe worker failed at micro-batch {size} (exit {code}): {self._stderr_tail()}"
        )

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(json.dumps({"quit": True}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __del__(self) -> None:
        self._stderr.close()


def probe_cpu(
    spec: dict[str, Any],
    memory_bytes: int,
    memory_source: str,
    reserve_bytes: int,
    max_batch: int,
    warmup: int,
    steps: int,
    progress: Progress,
) -> tuple[DeviceProbe, dict[str, Any]]:
    """Fit-and-verify search against ``memory_bytes - reserve_bytes`` of peak anonymous memory;
    returns the result and the worker's description of itself (model, threads, torch)."""
    from hetlm.probe.sysinfo import cpu_name, cpu_quota, usable_cpus
    from hetlm.probe.worker import can_reset_peak_rss

    budget = memory_bytes - reserve_bytes
    session = WorkerSession(spec)
    measured: list[Measurement] = []
    per_size_process = not can_reset_peak_rss()

    def measure(size: int, warmup: int, steps: int) -> Measurement:
        """Measure in the running worker. glibc keeps memory freed by an earlier, larger size,
        which can only inflate a smaller size's peak: a "fits" stands, an "over" is measured
        again in a fresh worker. Without clear_refs every size needs a fresh worker."""
        dirty = session.largest > size
        result = session.measure(size, warmup, steps, fresh=per_size_process)
        if dirty and not _fits(result, budget):
            result = session.measure(size, warmup, steps, fresh=True)
        if result.fits and not _fits(result, budget):
            result.fits, result.note = False, "peak over the memory limit"
        measured.append(result)
        peak = f"{result.peak_bytes / GIB:.3f} GiB" if result.peak_bytes else result.note
        progress(
            f"  micro-batch {size:>5}: peak {peak} -> {'fits' if result.fits else 'over'} "
            f"(limit {budget / GIB:.3f} GiB)"
        )
        return result

    def peak_of(size: int) -> int | None:
        result = measure(size, warmup=1, steps=1)
        return result.peak_bytes if result.peak_bytes is not None else None

    try:
        cap = search_by_fit(peak_of, budget, max_batch)
        timed = None
        while cap > 0:
            progress(f"  timing micro-batch {cap}: {warmup} warm-up + {steps} timed steps")
            timed = measure(cap, warmup=warmup, steps=steps)
            if timed.fits:
                break
            cap -= 1  # more steps grew the peak past the limit: one sample less
        if cap == 0 or timed is None:
            first = measured[0]
            need = f"{first.peak_bytes / GIB:.2f} GiB" if first.peak_bytes else "more"
            raise HetlmError(
                f"not even a micro-batch of 1 fits: it needs {need}, the limit is "
                f"{budget / GIB:.2f} GiB ({memory_source}); give more memory "
                "(--memory-gib), a smaller model or a shorter --seq-len"
            )
    finally:
        session.close()
    quota = cpu_quota()
    threads = session.ready.get("threads") or usable_cpus()
    name = f"{cpu_name()} ({threads} thread{'s' if threads > 1 else ''}"
    name += f", CPU quota {quota:g} cores)" if quota else ")"
    result = DeviceProbe(
        device="cpu",
        name=name,
        memory_bytes=memory_bytes,
        memory_source=memory_source,
        reserve_bytes=reserve_bytes,
        max_micro_batch=cap,
        peak_bytes=timed.peak_bytes,
        samples_per_s=timed.samples_per_s or 0.0,
        method="peak anonymous memory of a worker process: linear fit, verified by measurement",
        measured=measured,
        threads=threads,
        planner_cap=session.ready.get("planner_cap"),
        note=f"reached --max-batch {max_batch}: more may fit" if cap >= max_batch else None,
    )
    return result, session.ready


def _fits(result: Measurement, budget: float) -> bool:
    return result.fits and result.peak_bytes is not None and result.peak_bytes <= budget


# --------------------------------------------------------------------------- CUDA: try until OOM


def probe_cuda(
    spec: dict[str, Any],
    config: Any,
    index: int,
    memory_bytes: int | None,
    reserve_bytes: int | None,
    max_batch: int,
    warmup: int,
    steps: int,
    progress: Progress,
) -> DeviceProbe:
    """Out-of-memory search on ``cuda:index``, optionally under a smaller memory limit."""
    import torch

    from hetlm.probe.worker import StepRunner

    props = torch.cuda.get_device_properties(index)
    total = int(props.total_memory)
    limit = min(memory_bytes, total) if memory_bytes else total
    source = "--memory-gib" if memory_bytes and memory_bytes < total else "device"
    if reserve_bytes is None:
        reserve_bytes = int(DEFAULT_RESERVE_FRACTION * limit)
    budget = limit - reserve_bytes
    if budget < total:
        torch.cuda.set_per_process_memory_fraction(max(0.0, budget / total), index)
    runner = StepRunner(
        config,
        spec["seq_len"],
        spec["precision"],
        device=f"cuda:{index}",
        ddp=spec.get("ddp", True),
    )
    measured: list[Measurement] = []

    def fits(size: int) -> bool:
        result = runner.measure(size, warmup=1, steps=1)
        measured.append(result)
        peak = f"{result.peak_bytes / GIB:.2f} GiB" if result.peak_bytes else result.note
        progress(f"  micro-batch {size:>5}: {peak} -> {'fits' if result.fits else 'over'}")
        return result.fits

    try:
        cap = search_by_trying(fits, max_batch)
        if cap == 0:
            raise HetlmError(
                f"not even a micro-batch of 1 fits on cuda:{index} "
                f"({budget / GIB:.2f} GiB usable): use a smaller model, a shorter "
                "--seq-len or ZeRO (hetlm plan --zero)"
            )
        progress(f"  timing micro-batch {cap}: {warmup} warm-up + {steps} timed steps")
        timed = runner.measure(cap, warmup=warmup, steps=steps)
        while not timed.fits and cap > 1:  # rare: fragmentation after the search
            cap -= 1
            timed = runner.measure(cap, warmup=warmup, steps=steps)
    finally:
        runner.close()
        if budget < total:
            torch.cuda.set_per_process_memory_fraction(1.0, index)
    return DeviceProbe(
        device=f"cuda:{index}",
        name=props.name,
        memory_bytes=limit,
        memory_source=source,
        reserve_bytes=reserve_bytes,
        max_micro_batch=cap,
        peak_bytes=timed.peak_bytes,
        samples_per_s=timed.samples_per_s or 0.0,
        method="out-of-memory search (doubling, then bisection)",
        measured=measured + [timed],
        note=f"reached --max-batch {max_batch}: more may fit" if cap >= max_batch else None,
    )


# --------------------------------------------------------------------------- the whole probe


def resolve_precision(requested: str, device: str) -> str:
    """The precision this node's probe measures, by the job's rule (``hetlm.cluster.precision``):
    auto is bf16 on CPUs and on GPUs of compute capability >= 8.0, else fp16."""
    from hetlm.cluster.precision import (
        CPU_AUTO_PRECISIONS,
        DeviceSupport,
        choose_job_precision,
        cuda_precisions,
    )

    if device == "cpu":
        if requested == "fp16":
            raise HetlmError("fp16 needs a CUDA GPU (on CPU use bf16 or fp32): set --precision")
        support = DeviceSupport("this CPU", CPU_AUTO_PRECISIONS)
    else:
        import torch

        support = DeviceSupport(
            torch.cuda.get_device_name(), cuda_precisions(torch.cuda.get_device_capability())
        )
    return choose_job_precision(requested, [support], option="--precision")


def default_cpu_memory() -> tuple[int, str]:
    """The cgroup's limit less the memory its processes (this one included) already hold, else
    0.9 x RAM. The probe's worker then has what a rank alone in that cgroup would have, or less.
    """
    from hetlm.probe.sysinfo import cgroup_memory_limit, cgroup_memory_usage, total_ram_bytes

    limit = cgroup_memory_limit()
    if limit is None:
        return int(total_ram_bytes() * 0.9), "0.9 x RAM"
    used = cgroup_memory_usage(limit[1]) or 0
    return limit[0] - used, (
        f"cgroup {limit[1]}: limit {limit[0] / GIB:.3f} GiB - "
        f"{used / GIB:.3f} GiB held by its processes"
    )


def run_probe(
    model: str,
    seq_len: int,
    *,
    vocab_size: int = 32000,
    precision: str = "auto",
    device: str = "auto",
    memory_gib: float | None = None,
    reserve_gib: float | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    warmup: int = 1,
    steps: int = 3,
    threads: int | None = None,
    ddp: bool = True,
    progress: Progress | None = None,
) -> ProbeResult:
    """Probe this node's devices: every visible GPU (``device="cuda"``) or the CPU.

    ``model`` is a preset (``bert-small``) or a Hugging Face config directory, as for
    ``hetlm plan``. On a CPU this process stays free of torch: a worker process measures.
    """
    from hetlm.probe.sysinfo import usable_cpus

    progress = progress or (lambda message: None)
    devices = _devices(device)
    kind = "cpu" if devices == ["cpu"] else "cuda"
    precision = resolve_precision(precision, kind)
    spec: dict[str, Any] = {
        "model": model,
        "vocab_size": vocab_size,
        "seq_len": seq_len,
        "precision": precision,
        "ddp": ddp,
    }
    reserve = None if reserve_gib is None else int(reserve_gib * GIB)
    memory = int(memory_gib * GIB) if memory_gib else None
    results: list[DeviceProbe] = []
    if kind == "cpu":
        source = "--memory-gib"
        if memory is None:
            memory, source = default_cpu_memory()
        if reserve is None:
            reserve = int(DEFAULT_RESERVE_FRACTION * memory)
        spec.update(
            threads=threads or int(os.environ.get("OMP_NUM_THREADS") or 0) or usable_cpus(),
            memory_bytes=memory,
        )
        progress(f"probing cpu: {model}, seq {seq_len}, {precision}, memory {source}")
        result, ready = probe_cpu(spec, memory, source, reserve, max_batch, warmup, steps, progress)
        return ProbeResult(
            model=ready["model"],
            seq_len=seq_len,
            precision=precision,
            devices=[result],
            torch_version=ready.get("torch"),
        )
    import torch

    from hetlm.probe.worker import model_info, planner_cap, resolve_model

    config, name = resolve_model(spec)
    for dev in devices:
        progress(f"probing {dev}: {name}, seq {seq_len}, {precision}")
        result = probe_cuda(
            spec,
            config,
            int(dev.split(":")[1]),
            memory,
            reserve,
            max_batch,
            warmup,
            steps,
            progress,
        )
        result.planner_cap = planner_cap(
            config, result.memory_bytes, seq_len, precision, is_cpu=False
        )
        results.append(result)
    return ProbeResult(
        model=model_info(config, name),
        seq_len=seq_len,
        precision=precision,
        devices=results,
        torch_version=str(torch.__version__),
    )


def _visible_gpus() -> int:
    """CUDA devices, counted in a subprocess so that a CPU probe's parent never loads torch."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return 0
    out = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    try:
        return int(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return 0


def _devices(device: str) -> list[str]:
    """``auto``: every visible GPU, else the CPU; ``cuda``; ``cuda:1``; ``cuda:0,cuda:2``."""
    if device == "cpu":
        return ["cpu"]
    count = _visible_gpus()
    if device == "auto":
        return [f"cuda:{i}" for i in range(count)] if count else ["cpu"]
    if device == "cuda":
        if not count:
            raise HetlmError("--device cuda: no CUDA GPU is visible; use --device cpu")
        return [f"cuda:{i}" for i in range(count)]
    names = [d.strip() for d in device.split(",") if d.strip()]
    for name in names:
        if not (name.startswith("cuda:") and name[5:].isdigit() and int(name[5:]) < count):
            raise HetlmError(
                f"--device {name!r}: give cpu, cuda, auto or cuda:N with N < "
                f"{count} (the visible GPUs)"
            )
    return names


def _bisect(lo: int, hi: int, fits) -> int:
    """Largest size in [lo, hi) that fits, given that ``lo`` fits and ``hi`` does not."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo
