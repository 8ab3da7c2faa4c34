"""Emulated nodes on one Linux machine with cgroup v1: own cores, a CPU quota, a memory cap.

A slower GPU is emulated honestly by a CFS quota (``cpu.cfs_quota_us / cpu.cfs_period_us = 0.5``
runs a rank at half a core's speed), a smaller one by a memory cap (``memory.limit_in_bytes``:
past it the kernel reclaims and then kills, as a GPU raises out-of-memory), and separate
machines by disjoint cpusets. Needs root and cgroup v1 controllers mounted at
``/sys/fs/cgroup/{cpu,cpuset,memory}``.

``python benchmarks/emulation/cgroups.py exec GROUP -- COMMAND...`` moves itself into ``GROUP`` under
every controller that has it and then execs ``COMMAND``, so a command prefix puts a process (and
its children) in an emulated node: ``NodeCgroup.prefix()`` is that prefix, usable as
``hetlm.launch.local.run_local_nodes(..., rank_prefixes=...)``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
CONTROLLERS = ("cpu", "cpuset", "memory")
DEFAULT_PERIOD_US = 100_000


def available() -> str | None:
    """None if cgroup v1 nodes can be made here, else why not (for a one-line message)."""
    if os.geteuid() != 0:
        return "needs root (cgroup v1 directories are writable by root only)"
    missing = [c for c in CONTROLLERS if not (ROOT / c / "cgroup.procs").is_file()]
    if missing:
        return f"cgroup v1 controllers {missing} are not mounted under {ROOT}"
    return None


@dataclass
class NodeCgroup:
    """One emulated node: ``name`` is a path below each controller's root (``hetlm-emu/node1``)."""

    name: str
    cpus: str | None = None  # cpuset, e.g. "1"
    cpu_quota: float | None = None  # cores' worth of CPU time, e.g. 0.5
    memory_bytes: int | None = None
    cpu_shares: int | None = None  # weight against other groups on the same cores (1024 = one task)

    def path(self, controller: str) -> Path:
        return ROOT / controller / self.name

    def create(self) -> NodeCgroup:
        for controller in CONTROLLERS:
            directory = self.path(controller)
            for level in reversed((directory, *directory.parents)):
                if level == ROOT / controller or ROOT / controller not in level.parents:
                    continue
                if not level.exists():
                    level.mkdir()
                    if controller == "cpuset":  # a new cpuset starts empty: inherit, then narrow
                        for key in ("cpuset.cpus", "cpuset.mems"):
                            _write(level / key, (level.parent / key).read_text().strip())
                if controller == "cpu" and self.cpu_shares is not None and level != directory:
                    # Weights compete between siblings: the parent must carry the weight
                    # against the machine's other tasks, not only the leaf.
                    current = _read_int(level / "cpu.shares") or 0
                    _write(level / "cpu.shares", str(max(current, 2 * self.cpu_shares)))
        if self.cpus is not None:
            _write(self.path("cpuset") / "cpuset.cpus", self.cpus)
        period = DEFAULT_PERIOD_US
        _write(self.path("cpu") / "cpu.cfs_period_us", str(period))
        quota = -1 if self.cpu_quota is None else int(self.cpu_quota * period)
        _write(self.path("cpu") / "cpu.cfs_quota_us", str(quota))
        if self.cpu_shares is not None:
            _write(self.path("cpu") / "cpu.shares", str(self.cpu_shares))
        if self.memory_bytes is not None:
            _write(self.path("memory") / "memory.limit_in_bytes", str(self.memory_bytes))
            memsw = self.path("memory") / "memory.memsw.limit_in_bytes"
            if memsw.exists():  # no swapping past the cap either: a GPU has no swap
                with contextlib.suppress(OSError):
                    _write(memsw, str(self.memory_bytes))
        return self

    def prefix(self) -> list[str]:
        """A command prefix that runs the rest of the command inside this node."""
        return [sys.executable, str(Path(__file__).resolve()), "exec", self.name, "--"]

    # ---- measurements

    def reset_stats(self) -> None:
        """Start a new measurement: the memory peak and the count of limit hits back to 0."""
        for key in ("memory.max_usage_in_bytes", "memory.failcnt"):
            with contextlib.suppress(OSError):
                _write(self.path("memory") / key, "0")

    def max_memory_bytes(self) -> int | None:
        return _read_int(self.path("memory") / "memory.max_usage_in_bytes")

    def anon_memory_bytes(self) -> int | None:
        """Anonymous memory charged now (``rss`` of ``memory.stat``): tensors, heaps; unlike
        ``max_usage_in_bytes`` it leaves out the page cache that the kernel can drop."""
        try:
            text = (self.path("memory") / "memory.stat").read_text()
        except OSError:
            return None
        stats = dict(line.split() for line in text.splitlines() if line)
        return int(stats.get("total_rss", stats.get("rss", 0)))

    def oom_kills(self) -> int:
        """Processes of this group the kernel's OOM killer has killed since it was created."""
        try:
            text = (self.path("memory") / "memory.oom_control").read_text()
        except OSError:
            return 0
        stats = dict(line.split() for line in text.splitlines() if line)
        return int(stats.get("oom_kill", 0))

    def memory_failcnt(self) -> int | None:
        return _read_int(self.path("memory") / "memory.failcnt")

    def cpu_stat(self) -> dict[str, int]:
        """``nr_periods``, ``nr_throttled``, ``throttled_time`` (ns) of the CPU quota."""
        try:
            text = (self.path("cpu") / "cpu.stat").read_text()
        except OSError:
            return {}
        return {k: int(v) for k, v in (line.split() for line in text.splitlines() if line)}

    def pids(self) -> list[int]:
        pids: set[int] = set()
        for controller in CONTROLLERS:
            with contextlib.suppress(OSError):
                text = (self.path(controller) / "cgroup.procs").read_text()
                pids.update(int(p) for p in text.split())
        return sorted(pids)

    # ---- clean-up

    def destroy(self, kill_timeout_s: float = 10.0) -> None:
        """Stop what still runs in the node (only processes we put there), remove its cgroups."""
        deadline = time.time() + kill_timeout_s
        sig = signal.SIGTERM
        while self.pids() and time.time() < deadline + 5:
            for pid in self.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            time.sleep(0.2)
            if time.time() > deadline:
                sig = signal.SIGKILL
        for controller in CONTROLLERS:
            with contextlib.suppress(FileNotFoundError):
                _rmdir_retry(self.path(controller))


def remove_parent(name: str) -> None:
    """Remove an (empty) parent group such as ``hetlm-emu`` under every controller."""
    for controller in CONTROLLERS:
        with contextlib.suppress(FileNotFoundError, OSError):
            _rmdir_retry(ROOT / controller / name)


def join(name: str, pid: int = 0) -> None:
    """Move ``pid`` (0: this process) into ``name`` under every controller that has it."""
    pid = pid or os.getpid()
    joined = False
    for controller in CONTROLLERS:
        procs = ROOT / controller / name / "cgroup.procs"
        if procs.is_file():
            _write(procs, str(pid))
            joined = True
    if not joined:
        raise SystemExit(f"emulation/cgroups.py: no cgroup {name!r} under {ROOT}")


def _rmdir_retry(path: Path, tries: int = 50) -> None:
    for _ in range(tries):
        try:
            path.rmdir()
            return
        except OSError as exc:  # EBUSY while the last task is being reaped
            if isinstance(exc, FileNotFoundError):
                raise
            time.sleep(0.1)
    path.rmdir()


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def main(argv: list[str] | None = None) -> int:
    """``exec GROUP -- COMMAND...``: join GROUP, then become COMMAND."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 4 or argv[0] != "exec" or argv[2] != "--":
        print(
            "usage: python benchmarks/emulation/cgroups.py exec GROUP -- COMMAND [ARGS...]",
            file=sys.stderr,
        )
        return 2
    join(argv[1])
    os.execvp(argv[3], argv[3:])
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main())
