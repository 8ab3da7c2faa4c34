"""Built-in table of accelerators: memory, peak dense throughput and precisions.

The planner needs three facts per device: how much memory it has (caps the micro-batch), how fast
it is in the chosen precision (decides its share of the global batch when no measured speed is
given) and which precisions it can train in (decides fp16 vs bf16 for the whole cluster).

Numbers are NVIDIA datasheet / architecture-whitepaper peaks for *dense* math (no 2:4 sparsity),
SXM variants where a card comes in several (V100, A100, H100, H200). Tensor-core 16-bit numbers
are with fp32 accumulation, which is what training uses: GeForce cards (RTX 3090/4090) run that
at half their fp16-accumulate rate, so their fp16/bf16 figures here are half the marketing peak.
``fp32`` is the CUDA-core rate: PyTorch does not use TF32 for matmuls unless asked
(``torch.backends.cuda.matmul.allow_tf32``), so fp32 training is planned at that rate.
Memory is the total a process sees (nvidia-smi's MiB / 1024), a little under the marketing "GB".

Peaks are only a prior: measured samples/s from ``hetlm probe`` (``samples_per_s`` in the cluster
file) replace them wherever given.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from hetlm.errors import HetlmError

ALL_PRECISIONS = ("fp32", "tf32", "fp16", "bf16", "fp8", "int8")


@dataclass(frozen=True)
class GpuModel:
    """One kind of device. ``peak_tflops`` has a key for every precision the device supports."""

    name: str
    memory_gib: float
    peak_tflops: dict[str, float]
    compute_capability: tuple[int, int] | None = None  # None: CPU or a custom device
    is_cpu: bool = False
    aliases: tuple[str, ...] = field(default=(), compare=False, repr=False)

    @property
    def precisions(self) -> frozenset[str]:
        return frozenset(self.peak_tflops)

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * 2**30)

    def supports(self, precision: str) -> bool:
        return precision in self.peak_tflops

    def peak(self, precision: str) -> float:
        """Peak dense TFLOP/s in ``precision``; HetlmError if the device lacks it."""
        try:
            return self.peak_tflops[precision]
        except KeyError:
            raise HetlmError(
                f"{self.name} does not support {precision} (it supports "
                f"{', '.join(p for p in ALL_PRECISIONS if p in self.peak_tflops)}): "
                "choose another precision"
            ) from None

    def describe(self) -> str:
        cc = (
            f", compute capability {self.compute_capability[0]}.{self.compute_capability[1]}"
            if self.compute_capability
            else ""
        )
        return f"{self.name} ({self.memory_gib:g} GiB{cc})"


def _gpu(
    name: str, memory_gib: float, cc: tuple[int, int], aliases: tuple[str, ...], **peaks: float
) -> GpuModel:
    return GpuModel(
        name=name,
        memory_gib=memory_gib,
        peak_tflops=dict(peaks),
        compute_capability=cc,
        aliases=aliases,
    )


# A table reads best as one row per entry.
# fmt: off
_VOLTA = {"fp32": 15.7, "fp16": 125.0}  # V100 SXM2; no bf16, no int8 tensor cores
_A100 = {"fp32": 19.5, "tf32": 156.0, "fp16": 312.0, "bf16": 312.0, "int8": 624.0}
_HOPPER = {"fp32": 67.0, "tf32": 494.7, "fp16": 989.4, "bf16": 989.4, "fp8": 1978.9,
           "int8": 1978.9}  # H100 SXM and H200 share the same compute

GPUS: tuple[GpuModel, ...] = (
    _gpu("V100-16GB", 15.78, (7, 0), ("v10016gb", "v10016g", "v10016"), **_VOLTA),
    _gpu("V100-32GB", 31.75, (7, 0), ("v10032gb", "v10032g", "v10032"), **_VOLTA),
    _gpu("T4", 15.0, (7, 5), ("t4", "t416gb"), fp32=8.1, fp16=65.0, int8=130.0),
    _gpu("A10", 22.49, (8, 6), ("a10", "a1024gb"),
         fp32=31.2, tf32=62.5, fp16=125.0, bf16=125.0, int8=250.0),
    _gpu("RTX-3090", 24.0, (8, 6), ("3090", "rtx3090"),
         fp32=35.6, tf32=35.6, fp16=71.0, bf16=71.0, int8=284.0),
    _gpu("RTX-4090", 23.99, (8, 9), ("4090", "rtx4090"),
         fp32=82.6, tf32=82.6, fp16=165.2, bf16=165.2, fp8=330.3, int8=660.6),
    _gpu("RTX-A6000", 47.99, (8, 6), ("a6000", "rtxa6000", "a600048gb"),
         fp32=38.7, tf32=77.4, fp16=154.8, bf16=154.8, int8=309.7),
    _gpu("RTX-6000-Ada", 47.99, (8, 9), ("6000ada", "rtx6000ada", "6000adageneration"),
         fp32=91.1, tf32=182.1, fp16=364.2, bf16=364.2, fp8=728.5, int8=728.5),
    _gpu("L40S", 44.99, (8, 9), ("l40s", "l40s48gb"),
         fp32=91.6, tf32=183.0, fp16=362.05, bf16=362.05, fp8=733.0, int8=733.0),
    _gpu("A100-40GB", 40.0, (8, 0), ("a10040gb", "a10040g", "a10040"), **_A100),
    _gpu("A100-80GB", 80.0, (8, 0), ("a10080gb", "a10080g", "a10080"), **_A100),
    _gpu("H100", 79.65, (9, 0), ("h100", "h10080gb", "h10080g", "h10080"), **_HOPPER),
    _gpu("H200", 140.4, (9, 0), ("h200", "h200141gb", "h200141g", "h200141"), **_HOPPER),
)
# fmt: on

#: A CPU rank: bf16 autocast on CPUs with AMX/AVX512-BF16, fp32 otherwise. The peaks are those of a
#: few server cores (measured ~0.2 TFLOP/s achieved bf16 on 2 EPYC cores); use ``memory_gib`` and
#: measured ``samples_per_s`` in the cluster file for real planning. Memory defaults to the
#: planning machine's RAM (see ``host_memory_gib``).
CPU = GpuModel(
    name="cpu",
    memory_gib=0.0,
    peak_tflops={"fp32": 0.35, "bf16": 0.5},
    compute_capability=None,
    is_cpu=True,
    aliases=("cpu",),
)

# Words that vendors and nvidia-smi put in names but that do not tell models apart.
# fmt: off
_NOISE = {"nvidia", "tesla", "geforce", "quadro", "rtx", "sxm", "sxm2", "sxm4", "sxm5", "pcie",
          "hbm2", "hbm2e", "hbm3", "hbm3e", "nvl", "gpu"}
# fmt: on
# Names that match several table entries: the user has to say which.
_AMBIGUOUS = {"v100": ("V100-16GB", "V100-32GB"), "a100": ("A100-40GB", "A100-80GB")}


def normalize_name(name: str) -> str:
    """Lower-case alphanumerics without vendor words: "NVIDIA RTX A6000" -> "a6000"."""
    words = re.split(r"[^a-z0-9]+", name.lower())
    kept = [w for w in words if w and w not in _NOISE]
    return "".join(kept)


def _index() -> dict[str, GpuModel]:
    table: dict[str, GpuModel] = {}
    for gpu in (*GPUS, CPU):
        table[normalize_name(gpu.name)] = gpu
        for alias in gpu.aliases:
            table[alias] = gpu
    return table


_BY_KEY = _index()


def known_names() -> list[str]:
    return [gpu.name for gpu in GPUS] + [CPU.name]


def find_gpu(name: str) -> GpuModel | None:
    """The table entry for ``name`` (flexible spelling), or None; ambiguous names raise."""
    key = normalize_name(name)
    if key in _AMBIGUOUS:
        choices = " or ".join(_AMBIGUOUS[key])
        raise HetlmError(f"GPU model {name!r} is ambiguous: write {choices}")
    return _BY_KEY.get(key)


def lookup_gpu(name: str) -> GpuModel:
    """The table entry for ``name``; unknown names raise a HetlmError that lists the known ones."""
    gpu = find_gpu(name)
    if gpu is None:
        raise HetlmError(
            f"unknown GPU model {name!r}: known models are {', '.join(known_names())}; "
            "for another device give memory_gib and tflops (and precisions) instead of a model"
        )
    return gpu


def host_memory_gib() -> float:
    """Total RAM of this machine in GiB (the default memory of a ``cpu`` device)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 16.0
