"""The built-in GPU table: flexible names, precision sets, helpful errors."""

from __future__ import annotations

import pytest

from hetlm.cluster.hardware import CPU, GPUS, known_names, lookup_gpu, normalize_name
from hetlm.errors import HetlmError


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("V100-32GB", "V100-32GB"),
        ("v100_32gb", "V100-32GB"),
        ("Tesla V100-SXM2-32GB", "V100-32GB"),
        ("V100 16GB", "V100-16GB"),
        ("A6000", "RTX-A6000"),
        ("RTX A6000", "RTX-A6000"),
        ("NVIDIA RTX A6000", "RTX-A6000"),
        ("rtx_a6000", "RTX-A6000"),
        ("NVIDIA GeForce RTX 3090", "RTX-3090"),
        ("4090", "RTX-4090"),
        ("RTX 6000 Ada Generation", "RTX-6000-Ada"),
        ("NVIDIA A100-SXM4-80GB", "A100-80GB"),
        ("a100_40gb", "A100-40GB"),
        ("NVIDIA H100 80GB HBM3", "H100"),
        ("h200", "H200"),
        ("Tesla T4", "T4"),
        ("A10", "A10"),
        ("L40S", "L40S"),
        ("CPU", "cpu"),
    ],
)
def test_lookup_accepts_common_spellings(name: str, expected: str) -> None:
    assert lookup_gpu(name).name == expected


def test_every_table_entry_finds_itself() -> None:
    for gpu in (*GPUS, CPU):
        assert lookup_gpu(gpu.name) is gpu
        assert normalize_name(gpu.name)


def test_precision_sets_follow_the_architectures() -> None:
    assert lookup_gpu("V100-32GB").precisions == {"fp32", "fp16"}
    assert lookup_gpu("T4").precisions == {"fp32", "fp16", "int8"}
    for ampere in ("A100-40GB", "A100-80GB", "A10", "RTX-A6000", "RTX-3090"):
        gpu = lookup_gpu(ampere)
        assert {"fp32", "fp16", "bf16"} <= gpu.precisions and "fp8" not in gpu.precisions
        assert gpu.compute_capability >= (8, 0)
    for ada_or_hopper in ("RTX-4090", "RTX-6000-Ada", "L40S", "H100", "H200"):
        assert {"fp32", "fp16", "bf16", "fp8", "int8"} <= lookup_gpu(ada_or_hopper).precisions
    assert not lookup_gpu("V100-16GB").supports("bf16")
    assert CPU.precisions == {"fp32", "bf16"}


def test_datasheet_numbers() -> None:
    v100, a100, h100 = lookup_gpu("V100-32GB"), lookup_gpu("A100-80GB"), lookup_gpu("H100")
    assert (v100.peak("fp32"), v100.peak("fp16")) == (15.7, 125.0)
    assert (a100.peak("bf16"), a100.peak("tf32")) == (312.0, 156.0)
    assert h100.peak("bf16") == pytest.approx(989.4) and h100.peak("fp8") == pytest.approx(1978.9)
    assert lookup_gpu("H200").memory_gib > 2 * lookup_gpu("A100-40GB").memory_gib > 79
    for gpu in GPUS:  # dense 16-bit tensor math is always faster than fp32 CUDA cores
        assert gpu.peak("fp16") > gpu.peak("fp32") > 0


def test_unknown_name_lists_known_and_mentions_memory() -> None:
    with pytest.raises(HetlmError) as info:
        lookup_gpu("V200")
    message = str(info.value)
    assert "V200" in message and "memory_gib" in message
    assert all(name in message for name in known_names())
    assert "\n" not in message


def test_ambiguous_name_asks_which() -> None:
    with pytest.raises(HetlmError, match="V100-16GB or V100-32GB"):
        lookup_gpu("V100")


def test_missing_precision_is_an_error() -> None:
    with pytest.raises(HetlmError, match="V100-32GB does not support bf16"):
        lookup_gpu("V100-32GB").peak("bf16")
