"""The one rule for a job's training precision, used by the planner, the probe and training.

A job trains in one precision on every rank: the fp16 overflow check is a collective, so a rank in
fp16 beside a rank in bf16 would wait for a partner that never comes. ``auto`` therefore means
"what every device supports": bf16 if all of them do, else fp16 with dynamic loss scaling, else
fp32. An explicit request is checked against every device, and a device that lacks it is named.

bf16 support is decided from the CUDA compute capability (>= 8.0, Ampere or newer), not from
``torch.cuda.is_bf16_supported()``: since torch 2.3 that call's default
(``including_emulation=True``) answers True on a V100, whose bf16 is emulated and slow (torch
2.13 still does). fp16 tensor cores exist from compute capability 7.0 (V100, T4); Pascal (6.x)
runs fp16 too, without them. A CPU trains in bf16 (autocast on AMX/AVX512-BF16) or fp32; fp16 on a
CPU is allowed when asked for, only to test the overflow logic without a GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from hetlm.errors import HetlmError

TRAINING_PRECISIONS = ("fp32", "fp16", "bf16")
BF16_MIN_CAPABILITY = (8, 0)
FP16_MIN_CAPABILITY = (6, 0)
#: What ``auto`` tries, best first.
AUTO_ORDER = ("bf16", "fp16", "fp32")


def cuda_precisions(capability: tuple[int, int]) -> frozenset[str]:
    """Precisions a CUDA device of this compute capability trains in natively."""
    found = {"fp32"}
    if tuple(capability) >= FP16_MIN_CAPABILITY:
        found.add("fp16")
    if tuple(capability) >= BF16_MIN_CAPABILITY:
        found.add("bf16")
    return frozenset(found)


CPU_PRECISIONS = frozenset({"bf16", "fp16", "fp32"})
#: What ``auto`` may pick on a CPU (fp16 there is only for tests: never chosen by itself).
CPU_AUTO_PRECISIONS = frozenset({"bf16", "fp32"})


@dataclass(frozen=True)
class DeviceSupport:
    """One device (or one kind of device) as far as precision is concerned.

    ``label`` names it in an error ("rank 1 (Tesla V100-SXM2-32GB, compute capability 7.0) on
    node2"); ``auto`` is the subset ``auto`` may choose (a CPU's excludes fp16)."""

    label: str
    precisions: frozenset[str]
    auto: frozenset[str] | None = None

    @property
    def auto_precisions(self) -> frozenset[str]:
        return self.precisions if self.auto is None else self.auto


def choose_job_precision(
    requested: str, devices: Sequence[DeviceSupport], *, option: str = "train.precision"
) -> str:
    """The precision of the whole job, or a HetlmError naming the devices that cannot run it.

    ``option`` is how the user sets it (``train.precision`` in a config, ``--precision`` on
    the planner's command line), so the fix in the message can be typed as it is."""
    if requested == "auto":
        for precision in AUTO_ORDER:
            if all(precision in d.auto_precisions for d in devices):
                return precision
        return "fp32"
    if requested not in TRAINING_PRECISIONS:
        raise HetlmError(
            f"{option} must be auto, {', '.join(TRAINING_PRECISIONS)}, not {requested!r}"
        )
    lacking = [d.label for d in devices if requested not in d.precisions]
    if lacking:
        hint = (
            " (bf16 needs compute capability >= 8.0, Ampere or newer)"
            if requested == "bf16"
            else ""
        )
        alternative = (
            "fp16"
            if requested == "bf16" and all("fp16" in d.precisions for d in devices)
            else "auto"
        )
        raise HetlmError(
            f"precision {requested} is not supported by {'; '.join(lacking)}{hint}: "
            f"use {option} {alternative} or fp32"
        )
    return requested


def frozen_base_precision(on_gpu: bool, precision: str) -> str:
    """How a frozen base (LoRA, not quantized) holds its weights: ``bf16`` on GPUs when the job
    trains in bf16 (half the memory: a 13B base takes 26 GB instead of 52, and no per-step cast
    of every weight under autocast), ``fp32`` otherwise (on a CPU the tests compare splits at
    fp32 tolerances). The one rule for ``hetlm sft``, which loads the base so
    (``hetlm.sft.train.frozen_base_dtype``), and ``hetlm plan --task sft``, which sizes it so.
    The LoRA weights stay fp32 either way (peft keeps adapters in fp32)."""
    return "bf16" if on_gpu and precision == "bf16" else "fp32"
