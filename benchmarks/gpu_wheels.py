"""Wheels for a CUDA machine without internet: what its Python lacks to run the GPU check.

    python benchmarks/gpu_wheels.py                 # = make gpu-wheels: Python 3.12, CUDA 13.0

Run where pip can download. ``datasets`` and ``pydantic`` are resolved together with their
dependencies for the target Python, so that exact pins (pydantic -> pydantic-core) agree; only the
packages a CUDA image with torch/transformers/peft lacks are kept (``KEEP``: pandas, pyarrow,
fsspec, xxhash... are there). ``bitsandbytes`` (QLoRA) comes without dependencies (torch, numpy and
packaging are there) and is trimmed to the native library of the target's CUDA: the published
wheel carries one per CUDA and ROCm version, 43 MB of which the machine loads 4, and the device
tool carries at most 64 MiB, checkout included. Writes into ``.whl/`` (git-ignored) and prints
what would travel, so that the limit is seen here, not after a refused call.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What a CUDA image with torch, transformers, peft, pyarrow, pandas and fsspec lacks (docs/
# GPU_CHECK.md; typing-extensions because pydantic needs a newer one than such images carry).
KEEP = (
    "datasets",
    "dill",
    "multiprocess",
    "pydantic",
    "pydantic_core",
    "annotated_types",
    "typing_inspection",
    "typing_extensions",
)
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (28, 27, 24, 17)] + ["manylinux2014_x86_64"]
CARRY_LIMIT = 64 * 2**20


def pip_download(names: list[str], dest: Path, python_version: str, *, deps: bool) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "-d", str(dest)]
    cmd += ["--only-binary=:all:", "--python-version", python_version, "--implementation", "cp"]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    if not deps:
        cmd.append("--no-deps")
    subprocess.run(cmd + names, check=True)


def wheel_name(path: Path) -> str:
    """The distribution part of a wheel's file name, normalised as wheels write it."""
    return re.sub(r"[-_.]+", "_", path.name.split("-")[0]).lower()


def record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def trim_native_libraries(wheel: Path, out: Path, keep: tuple[str, ...]) -> Path:
    """A copy of ``wheel`` in ``out`` without the native libraries (``lib*.so``) not named in
    ``keep``, its RECORD rewritten to match, so that pip installs it as it is."""
    target = out / wheel.name
    with zipfile.ZipFile(wheel) as src:
        names = src.namelist()
        libraries = [n for n in names if re.search(r"/lib[^/]*\.so$", n)]
        absent = set(keep) - {Path(n).name for n in libraries}
        if absent:
            found = ", ".join(sorted(Path(n).name for n in libraries)) or "none"
            raise SystemExit(f"{wheel.name} has no {', '.join(sorted(absent))} (it has: {found})")
        dropped = {n for n in libraries if Path(n).name not in keep}
        record = next(n for n in names if n.endswith(".dist-info/RECORD"))
        with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as dst:
            lines = []
            for name in names:
                if name in dropped or name == record:
                    continue
                data = src.read(name)
                dst.writestr(src.getinfo(name), data)
                lines.append(record_line(name, data))
            lines.append(f"{record},,")
            dst.writestr(record, "\n".join(lines) + "\n")
    return target


def tracked_bytes() -> int:
    """What the checkout itself adds to a device call (tracked files)."""
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    return sum(
        (ROOT / f.decode()).stat().st_size for f in files if f and (ROOT / f.decode()).is_file()
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python-version", default="3.12", help="the GPU machine's (3.12)")
    parser.add_argument("--cuda", default="130", help="torch.version.cuda without the dot")
    parser.add_argument("--out", type=Path, default=ROOT / ".whl")
    parser.add_argument(
        "--datasets",
        default="datasets",
        help="the datasets requirement: the newest by default (5.2 needs pyarrow >= 24); "
        "'datasets==4.0.0', hetlm's floor, makes do with pyarrow >= 15",
    )
    parser.add_argument("--no-bitsandbytes", action="store_true", help="skip QLoRA's wheel")
    args = parser.parse_args()

    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        resolved = Path(tmp) / "resolved"
        pip_download([args.datasets, "pydantic"], resolved, args.python_version, deps=True)
        kept = [w for w in resolved.glob("*.whl") if wheel_name(w) in KEEP]
        missing = set(KEEP) - {wheel_name(w) for w in kept}
        if missing:
            raise SystemExit(f"pip resolved no wheel for {', '.join(sorted(missing))}")
        for wheel in kept:
            shutil.copy2(wheel, args.out / wheel.name)
        if not args.no_bitsandbytes:
            bnb = Path(tmp) / "bnb"
            pip_download(["bitsandbytes"], bnb, args.python_version, deps=False)
            (wheel,) = bnb.glob("*.whl")
            # the CUDA build torch asks for, and the CPU one bitsandbytes loads without CUDA
            keep = (f"libbitsandbytes_cuda{args.cuda}.so", "libbitsandbytes_cpu.so")
            trim_native_libraries(wheel, args.out, keep)

    wheels = sorted(args.out.glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels)
    for wheel in wheels:
        print(f"{wheel.stat().st_size / 2**20:7.1f} MiB  {wheel.name}")
    travel = size + tracked_bytes()
    print(
        f"{size / 2**20:.1f} MiB of wheels in {args.out}; with the checkout "
        f"{travel / 2**20:.1f} MiB travel (limit {CARRY_LIMIT / 2**20:.0f} MiB)"
    )
    if travel > CARRY_LIMIT:
        raise SystemExit("over the device tool's limit: leave bitsandbytes out (--no-bitsandbytes)")


if __name__ == "__main__":
    main()
