"""The files a user writes or edits (run configs, cluster files, plans): reading their YAML and
reporting what pydantic finds wrong in them, each as one line.

``read_yaml``: missing, a folder, not UTF-8, malformed at a line and column, or empty; ``what``
names the file ("config file", "cluster file", "plan file") and the hints say how to fix a
missing file and a malformed one. ``format_validation_error``: every complaint as
``field.path: message``, joined by ``; ``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from hetlm.errors import HetlmError


def read_yaml(
    path: str | Path, what: str, *, missing_fix: str, syntax_fix: str, allow_empty: bool = True
) -> Any:
    """The parsed file, or a one-line HetlmError saying what is wrong and how to fix it."""
    import yaml

    path = Path(path)
    if not path.is_file():
        state = "is a directory" if path.is_dir() else "does not exist"
        raise HetlmError(f"{what} {path} {state}: {missing_fix}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise HetlmError(f"{what} {path} is not UTF-8 text: save it as UTF-8") from None
    except OSError as exc:
        raise HetlmError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        raise HetlmError(
            f"{what} {path} is not valid YAML{where}: {problem}: {syntax_fix}"
        ) from None
    if data is None and not allow_empty:
        raise HetlmError(f"{what} {path} is empty: {missing_fix}")
    return data


# pydantic names union members in error locations (``tflops.float``, ``tflops.dict[...]``) and
# validator functions (``function-after[...]``): not part of the path the user wrote.
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _is_tag(part: object) -> bool:
    return isinstance(part, str) and (
        "[" in part or part in _TYPE_TAGS or part.startswith("function-")
    )


def format_validation_error(exc: ValidationError, what: str, *, keys_help: str) -> str:
    """All of pydantic's complaints as one line: ``WHAT: field.path: message; ...``.

    ``keys_help`` says where the valid keys are listed (for an unknown key, usually a typo)."""
    problems: list[str] = []
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"] if not _is_tag(p)) or "(top level)"
        path = path if path.isprintable() else repr(path)  # a key with a newline stays one line
        kind = err["type"]
        if kind == "extra_forbidden":
            message = f"unknown key (check its spelling; see {keys_help})"
        elif kind == "missing":
            message = "required key is missing"
        else:
            message = " ".join(str(err["msg"]).removeprefix("Value error, ").split())
            value = err.get("input")
            if kind != "value_error" and isinstance(value, str | int | float | bool):
                message += f" (got {value!r})"
        problem = f"{path}: {message}"
        if problem not in problems:
            problems.append(problem)
    return f"{what}: " + "; ".join(problems)
