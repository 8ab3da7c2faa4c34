"""pyproject.toml's dependency floors are exactly what `make floors` installs and smoke-tests.

The floor run itself (benchmarks/check_dependency_floors.py in a throwaway venv) installs other
versions, so it is not part of the test suite; this keeps its pins and the declared ranges from
drifting apart.
"""

from __future__ import annotations

import importlib.util
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]


def _script():
    path = REPO / "benchmarks" / "check_dependency_floors.py"
    spec = importlib.util.spec_from_file_location("check_dependency_floors", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _floors() -> dict[str, Version]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    floors = {}
    for line in project["dependencies"]:
        req = Requirement(line)
        lows = [Version(s.version) for s in req.specifier if s.operator == ">="]
        assert len(lows) == 1, f"{line}: every dependency needs exactly one >= floor"
        floors[req.name.lower()] = lows[0]
    return floors


def test_every_floor_is_the_version_the_smoke_script_pins():
    script, floors = _script(), _floors()
    torch_floor = floors.pop("torch")
    assert torch_floor == Version(script.TORCH_FLOOR)
    pinned = {name.lower(): Version(v) for name, v in script.FLOOR_PINS.items()}
    transitive = {name.lower() for name in script.TRANSITIVE}
    assert set(pinned) - transitive == set(floors), "pins and pyproject list other packages"
    for name, floor in floors.items():
        assert pinned[name] == floor, f"{name}: pyproject floor {floor}, script pins {pinned[name]}"


def test_pins_are_pip_requirement_lines():
    lines = _script().pins()
    assert all(Requirement(line).specifier and "==" in line for line in lines)
    assert any(line.startswith("transformers==5.") for line in lines)
