"""benchmarks/gpu_wheels.py: the wheels carried to a CUDA machine install as pip expects them."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import zipfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_wheels.py"


def gpu_wheels():
    spec = importlib.util.spec_from_file_location("gpu_wheels", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_wheel(path: Path) -> Path:
    files = {
        "pkg/__init__.py": b"x = 1\n",
        "pkg/libpkg_cpu.so": b"cpu" * 10,
        "pkg/libpkg_cuda128.so": b"big" * 1000,
        "pkg/libpkg_cuda130.so": b"cu130" * 10,
        "pkg/librocm/readme.txt": b"not a library\n",
        "pkg-1.0.dist-info/METADATA": b"Name: pkg\nVersion: 1.0\n",
    }
    with zipfile.ZipFile(path, "w") as wheel:
        for name, data in files.items():
            wheel.writestr(name, data)
        wheel.writestr(
            "pkg-1.0.dist-info/RECORD",
            "".join(f"{name},,\n" for name in files) + "pkg-1.0.dist-info/RECORD,,\n",
        )
    return path


def test_trimming_keeps_the_named_libraries_and_a_record_that_matches(tmp_path) -> None:
    module = gpu_wheels()
    out = tmp_path / "out"
    out.mkdir()
    wheel = fake_wheel(tmp_path / "pkg-1.0-py3-none-any.whl")
    trimmed = module.trim_native_libraries(wheel, out, ("libpkg_cuda130.so", "libpkg_cpu.so"))
    with zipfile.ZipFile(trimmed) as z:
        names = set(z.namelist())
        assert "pkg/libpkg_cuda128.so" not in names
        assert {"pkg/libpkg_cuda130.so", "pkg/libpkg_cpu.so", "pkg/librocm/readme.txt"} <= names
        record = z.read("pkg-1.0.dist-info/RECORD").decode().splitlines()
        listed = {line.split(",")[0]: line for line in record}
        assert set(listed) == names  # every file, and only those, with its hash and size
        data = z.read("pkg/libpkg_cuda130.so")
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        assert listed["pkg/libpkg_cuda130.so"] == f"pkg/libpkg_cuda130.so,sha256={digest},50"


def test_a_cuda_build_the_wheel_lacks_is_a_one_line_error(tmp_path) -> None:
    module = gpu_wheels()
    wheel = fake_wheel(tmp_path / "pkg-1.0-py3-none-any.whl")
    with pytest.raises(SystemExit, match=r"has no libpkg_cuda999\.so \(it has: libpkg_cpu\.so"):
        module.trim_native_libraries(wheel, tmp_path, ("libpkg_cuda999.so",))


def test_wheel_names_are_matched_as_pip_normalises_them() -> None:
    module = gpu_wheels()
    name = "pydantic_core-2.50.5-cp312-cp312-manylinux2014_x86_64.whl"
    assert module.wheel_name(Path(name)) == "pydantic_core"
    assert module.wheel_name(Path("typing_extensions-4.16.0-py3-none-any.whl")) in module.KEEP
