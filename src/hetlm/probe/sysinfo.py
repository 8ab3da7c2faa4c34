"""What this process may use: its memory limit (cgroup or RAM), its CPUs, the CPU's name.

The probe searches for the largest micro-batch under a memory limit. On a real GPU that limit is
the device; on a CPU rank it is what the kernel will let the process have, which inside a
container or an emulated node is the cgroup's limit, not the machine's RAM.
"""

from __future__ import annotations

import os
from pathlib import Path

#: cgroup v1 reports "no limit" as a huge page-aligned number (2^63 - 4096 on x86-64).
_UNLIMITED = 2**60
CGROUP_ROOT = Path("/sys/fs/cgroup")


def _cgroup_paths() -> dict[str, str]:
    """Controller -> path of this process's cgroup (``""`` key: the cgroup v2 unified path)."""
    paths: dict[str, str] = {}
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return paths
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        for controller in parts[1].split(","):
            paths[controller] = parts[2]
    return paths


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def cgroup_memory_limit() -> tuple[int, str] | None:
    """The tightest memory limit on this process's cgroup and its ancestors, with the path.

    cgroup v1 (``memory.limit_in_bytes``) and v2 (``memory.max``); ``None`` when unlimited.
    Limits are hierarchical, so a parent's smaller limit wins.
    """
    paths = _cgroup_paths()
    candidates: list[tuple[Path, str]] = []
    if "memory" in paths:
        candidates.append((CGROUP_ROOT / "memory", paths["memory"]))
    if "" in paths:
        candidates.append((CGROUP_ROOT, paths[""]))
    best: tuple[int, str] | None = None
    for root, rel in candidates:
        name = "memory.limit_in_bytes" if root.name == "memory" else "memory.max"
        rel_path = Path(rel.lstrip("/"))
        for level in (rel_path, *rel_path.parents):
            value = _read_int(root / level / name)
            if value is not None and value < _UNLIMITED and (best is None or value < best[0]):
                best = (value, "/" + str(level).removeprefix("."))
    return best


def total_ram_bytes() -> int:
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def default_memory_limit(ram_fraction: float = 0.9) -> tuple[int, str]:
    """(bytes, where it came from): the cgroup limit if one is set, else RAM x ``ram_fraction``."""
    limit = cgroup_memory_limit()
    if limit is not None:
        return limit[0], f"cgroup {limit[1]}"
    return int(total_ram_bytes() * ram_fraction), f"{ram_fraction:g} x RAM"


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask: a cpuset cgroup or ``taskset``)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpu_quota() -> float | None:
    """CPUs' worth of time the CFS quota allows (0.5 = half a core), or ``None`` if unlimited."""
    paths = _cgroup_paths()
    rel = paths.get("cpu") or paths.get("cpu,cpuacct")
    if rel is None:
        return None
    base = CGROUP_ROOT / "cpu" / rel.lstrip("/")
    quota, period = _read_int(base / "cpu.cfs_quota_us"), _read_int(base / "cpu.cfs_period_us")
    if quota is None or period is None or quota <= 0 or period <= 0:
        return None
    return quota / period


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "cpu"


def cgroup_memory_usage(path: str) -> int | None:
    """Anonymous memory charged to the memory cgroup at ``path`` (v1 ``memory.stat`` total_rss,
    v2 ``anon``): what its processes hold. Page cache is left out: the kernel drops it first
    when the limit is reached, so it does not take memory away from a new process."""
    rel = path.lstrip("/")
    for stat_file, key in (
        (CGROUP_ROOT / "memory" / rel / "memory.stat", "total_rss"),
        (CGROUP_ROOT / rel / "memory.stat", "anon"),
    ):
        try:
            lines = stat_file.read_text().splitlines()
        except OSError:
            continue
        stats = dict(line.split(maxsplit=1) for line in lines if " " in line)
        if key in stats:
            return int(stats[key])
    return None
