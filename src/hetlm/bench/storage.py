"""Storage and data-loader benchmarks: ``hetlm bench io`` and ``hetlm bench data``.

``bench io PATH``: can this filesystem feed training? Sequential write of ``--size-mib`` in 1 MiB
blocks, fsync included in the time, then a sequential read of the same file *from the device*,
not the page cache. The cache is emptied by the first of these that works, and the result says
which: ``drop_caches`` (root: ``sync; echo 1 > /proc/sys/vm/drop_caches``, the whole machine),
``O_DIRECT`` (reads bypass the cache; not on tmpfs), ``fadvise`` (``POSIX_FADV_DONTNEED`` on the
file, honoured by local filesystems; NFS clients may keep pages). On tmpfs the "device" is memory.

``bench data DATASET``: random-access read rate of a packed dataset through the loader training
uses (``datasets`` ``with_format("numpy")``, a random batch of indices per step, as
``hetlm.data.readers.PackedMLMData`` reads it), with and without MLM masking, next to the
samples/s that training at ``--tokens-per-s`` needs. ``--cold`` evicts the dataset's files from
the page cache first (same methods as above).

``register_io(bench_subparsers)`` / ``register_data(bench_subparsers)`` add the two commands to
``hetlm bench``.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import time
from pathlib import Path
from typing import Any

from hetlm.errors import HetlmError

BLOCK = 1 << 20


# ---------------------------------------------------------------- page cache


def _drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return True
    except OSError:
        return False


def _fadvise_dontneed(path: Path) -> bool:
    if not hasattr(os, "posix_fadvise"):
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def evict(paths: list[Path]) -> str:
    """Empty the page cache of ``paths``; return the method that worked ("none" if none)."""
    if _drop_caches():
        return "drop_caches"
    if paths and all(_fadvise_dontneed(p) for p in paths):
        return "fadvise"
    return "none"


def filesystem_of(path: Path) -> str:
    """The filesystem type holding ``path`` (from /proc/mounts: the longest matching mount)."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return "unknown"
    target, best = str(path.resolve()), ("", "unknown")
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        inside = target == parts[1] or target.startswith(parts[1].rstrip("/") + "/")
        if inside and len(parts[1]) > len(best[0]):
            best = (parts[1], parts[2])
    return best[1]


# ---------------------------------------------------------------- bench io


def bench_io(path: str | Path, size_mib: int = 64) -> dict[str, Any]:
    """Sequential write (fsync) and uncached sequential read of a ``size_mib`` file."""
    if size_mib < 1:
        raise HetlmError(f"--size-mib must be at least 1, got {size_mib}")
    where = Path(path)
    if where.is_dir():
        target = where / f".hetlm-bench-io-{os.getpid()}"
    elif where.parent.is_dir() and not where.exists():
        target = where
    else:
        raise HetlmError(f"{where} is neither a folder nor a new file in an existing folder")
    block = os.urandom(BLOCK)  # incompressible
    try:
        started = time.perf_counter()
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            for _ in range(size_mib):
                os.write(fd, block)
            os.fsync(fd)
        finally:
            os.close(fd)
        write_s = time.perf_counter() - started
        method = "drop_caches" if _drop_caches() else None
        read_s, method = _timed_read(target, size_mib, method)
    except OSError as exc:
        raise HetlmError(f"bench io on {where} failed: {exc}") from exc
    finally:
        target.unlink(missing_ok=True)
    mb = size_mib * BLOCK / 1e6
    return {
        "path": str(where),
        "filesystem": filesystem_of(where),
        "size_mib": size_mib,
        "write_mb_s": round(mb / write_s, 1),
        "read_mb_s": round(mb / read_s, 1),
        "read_uncached_by": method,
    }


def _timed_read(target: Path, size_mib: int, method: str | None) -> tuple[float, str]:
    """Read the file in 1 MiB blocks; O_DIRECT when the cache could not be dropped."""
    if method is None and hasattr(os, "O_DIRECT"):
        try:
            fd = os.open(target, os.O_RDONLY | os.O_DIRECT)
        except OSError:
            fd = -1
        if fd >= 0:
            buffer = mmap.mmap(-1, BLOCK)  # page-aligned, as O_DIRECT requires
            try:
                started = time.perf_counter()
                while os.readv(fd, [buffer]) > 0:
                    pass
                return time.perf_counter() - started, "O_DIRECT"
            except OSError:
                pass
            finally:
                os.close(fd)
                buffer.close()
    if method is None:
        method = (
            "fadvise" if _fadvise_dontneed(target) else "none (page cache: read is a memory rate)"
        )
    started = time.perf_counter()
    with target.open("rb", buffering=0) as f:
        while f.read(BLOCK):
            pass
    return time.perf_counter() - started, method


def format_io(result: dict[str, Any]) -> str:
    return (
        f"{result['path']} ({result['filesystem']}): {result['size_mib']} MiB in 1 MiB blocks"
        f"\n  write + fsync  {result['write_mb_s']:,.1f} MB/s"
        f"\n  read           {result['read_mb_s']:,.1f} MB/s (uncached by "
        f"{result['read_uncached_by']})"
    )


# ---------------------------------------------------------------- bench data


def bench_data(
    dataset: str | Path,
    *,
    batch: int = 16,
    seconds: float = 5.0,
    tokens_per_s: float | None = None,
    split: str = "train",
    cold: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Random batches read for ``seconds`` (then as long again with MLM masking)."""
    import numpy as np

    from hetlm.data.collators import MLMCollator
    from hetlm.data.packed import load_packed_dataset

    if batch < 1 or seconds <= 0:
        raise HetlmError("--batch must be >= 1 and --seconds > 0")
    data, meta = load_packed_dataset(dataset)
    if split not in data:
        raise HetlmError(f"dataset {dataset} has no split {split!r}")
    files = [Path(f["filename"]) for f in data[split].cache_files]
    method = evict(files) if cold else "warm (not evicted)"
    rows = data[split].with_format("numpy")
    seq_len = int(meta["seq_len"])
    special = meta["special_token_ids"]
    collator = MLMCollator(
        seq_len=seq_len,
        vocab_size=int(meta["vocab_size"]),
        mask_id=special["mask"],
        special_ids=list(special.values()),
    )
    rng = np.random.default_rng(seed)
    n = len(rows)

    def run(collate: bool) -> tuple[int, float]:
        samples, started = 0, time.perf_counter()
        step = 0
        while time.perf_counter() - started < seconds:
            indices = rng.integers(0, n, size=batch)
            ids = np.asarray(rows[indices.tolist()]["input_ids"])
            if collate:
                collator(ids, indices, epoch=0)
            samples += len(ids)
            step += 1
        return samples, time.perf_counter() - started

    read_samples, read_s = run(False)
    collate_samples, collate_s = run(True)
    row_bytes = seq_len * 4
    result = {
        "dataset": str(dataset),
        "split": split,
        "rows": n,
        "seq_len": seq_len,
        "batch": batch,
        "seconds": seconds,
        "cache": method,
        "filesystem": filesystem_of(Path(dataset)),
        "read_samples_s": round(read_samples / read_s, 1),
        "read_mb_s": round(read_samples * row_bytes / read_s / 1e6, 2),
        "read_and_mask_samples_s": round(collate_samples / collate_s, 1),
    }
    if tokens_per_s:
        needed = tokens_per_s / seq_len
        result.update(
            needed_samples_s=round(needed, 1),
            needed_mb_s=round(needed * row_bytes / 1e6, 2),
            headroom=round(result["read_and_mask_samples_s"] / needed, 1),
        )
    return result


def format_data(result: dict[str, Any]) -> str:
    text = (
        f"{result['dataset']} [{result['split']}] ({result['filesystem']}, "
        f"{result['cache']}): {result['rows']:,} rows of {result['seq_len']} tokens, random "
        f"batches of {result['batch']}"
        f"\n  read           {result['read_samples_s']:,.0f} samples/s "
        f"({result['read_mb_s']:,.1f} MB/s)"
        f"\n  read + mask    {result['read_and_mask_samples_s']:,.0f} samples/s"
    )
    if "needed_samples_s" in result:
        text += (
            f"\n  training needs {result['needed_samples_s']:,.0f} samples/s "
            f"({result['needed_mb_s']:,.2f} MB/s): headroom {result['headroom']}x"
        )
    return text


# ---------------------------------------------------------------- commands


def register_io(bench_subparsers: Any) -> None:
    """Add ``io`` to ``hetlm bench``."""
    parser = bench_subparsers.add_parser(
        "io",
        help="sequential write/read MB/s of a filesystem (page cache emptied)",
        description="Write --size-mib MiB in 1 MiB blocks (with fsync), empty the page cache "
        "(drop_caches as root, else O_DIRECT, else fadvise; the method is "
        "reported) and read it back sequentially.",
    )
    parser.add_argument("path", metavar="PATH", help="a folder on the filesystem to measure")
    parser.add_argument("--size-mib", type=int, default=64, help="file size (default 64)")
    parser.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    parser.set_defaults(func=run_io)


def register_data(bench_subparsers: Any) -> None:
    """Add ``data`` to ``hetlm bench``."""
    parser = bench_subparsers.add_parser(
        "data",
        help="random-access samples/s of a packed dataset vs what training needs",
        description="Read random batches of a packed dataset through the training loader "
        "(datasets, numpy format) for --seconds, then again with MLM masking, and "
        "compare with the rate that --tokens-per-s needs.",
    )
    parser.add_argument("dataset", metavar="DATASET", help="folder from `hetlm prepare`")
    parser.add_argument("--batch", type=int, default=16, help="samples per read (default 16)")
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement (default 5)")
    parser.add_argument(
        "--tokens-per-s",
        type=float,
        default=None,
        metavar="N",
        help="training throughput to compare with (all ranks reading here)",
    )
    parser.add_argument("--split", default="train", choices=("train", "validation"))
    parser.add_argument(
        "--cold", action="store_true", help="evict the dataset from the page cache first"
    )
    parser.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    parser.set_defaults(func=run_data)


def _write_json(path: str | None, result: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


def run_io(args: argparse.Namespace) -> int:
    result = bench_io(args.path, args.size_mib)
    print(format_io(result))
    _write_json(args.json, result)
    return 0


def run_data(args: argparse.Namespace) -> int:
    result = bench_data(
        args.dataset,
        batch=args.batch,
        seconds=args.seconds,
        tokens_per_s=args.tokens_per_s,
        split=args.split,
        cold=args.cold,
    )
    print(format_data(result))
    _write_json(args.json, result)
    return 0
