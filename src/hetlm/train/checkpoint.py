"""Checkpoints: written atomically, verified on load, the last K kept.

Layout of ``<output_dir>/checkpoints/step-00000100/``: the model as ``save_pretrained`` writes
it (safetensors + config.json, so ``transformers`` can load any checkpoint), ``optimizer.pt``,
``scheduler.pt``, ``precision.pt``, ``rng.pt`` (every rank's RNG states), ``trainer_state.json``
(step, sampler position, what the run was trained on, the run id and the lr schedule) and ``manifest.json`` (size and sha256 of
every file), written last.

The model and the full optimizer state are gathered to rank 0, which writes them; engines with
per-rank state (DeepSpeed) add their own files under a subfolder, written by every rank into the
same ``.tmp-`` directory (``prepare`` -> per-rank files -> ``commit``). The directory is renamed
into place once complete, so a crash mid-write never destroys the previous checkpoint. A
directory without a valid manifest is not a checkpoint. Every rank reads the checkpoint on
resume, so for multi-node runs ``output_dir`` must be on a shared filesystem (checked at start-up).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hetlm.errors import HetlmError, HetlmWarning
from hetlm.train import faults

MANIFEST = "manifest.json"
STEP_DIR = re.compile(r"^step-(\d+)$")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path) -> None:
    """Every file under ``directory`` (subfolders too), by its relative path."""
    files = {
        p.relative_to(directory).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    (directory / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def verify_manifest(directory: Path) -> str | None:
    """None when the checkpoint is complete and intact, else what is wrong with it."""
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return "no manifest (an interrupted write?)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError):
        return "unreadable manifest"
    for name, meta in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != meta["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {meta['bytes']}"
        if _sha256(path) != meta["sha256"]:
            return f"{name} does not match its checksum"
    return None


def load_model_weights(model: nn.Module, directory: Path) -> None:
    """Load safetensors weights saved by ``save_pretrained`` into an existing model; a model
    saved as several parts (ELECTRA's ``artifact_subdirs``) loads each part from its folder."""
    from safetensors.torch import load_file

    parts = getattr(model, "artifact_subdirs", ())
    if parts:
        for part in parts:
            load_model_weights(getattr(model, part), directory / part)
        return
    state = load_file(str(directory / "model.safetensors"))
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1].strip()
        raise HetlmError(
            f"checkpoint {directory} does not match the model ({first}): resume "
            "with the model config it was trained with"
        ) from None
    loaded_ptrs = {p.data_ptr() for name, p in model.state_dict().items() if name in state}
    own = model.state_dict()
    untied = [k for k in result.missing_keys if own[k].data_ptr() not in loaded_ptrs]
    if untied or result.unexpected_keys:
        raise HetlmError(
            f"checkpoint {directory} does not match the model (missing {untied[:3]}, unexpected "
            f"{result.unexpected_keys[:3]}): resume with the model config it was trained with"
        )


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a (nested) state: about what ``torch.save`` writes for it."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def directory_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def _is_write_failure(exc: BaseException) -> bool:
    """A failed write, however the library reports it: OSError, torch.save's RuntimeError
    ("... file write failed", "[enforce fail at inline_container.cc] unexpected pos" on a full
    disk), safetensors' SafetensorError ("I/O error: No space left on
    device (os error 28)")."""
    if isinstance(exc, OSError):
        return True
    text = str(exc).lower()
    return any(
        key in text
        for key in (
            "no space left",
            "os error",
            "i/o error",
            "permission denied",
            "disk quota",
            "read-only file",
            "inline_container",
            "unexpected pos",
        )
    ) or ("write" in text and "fail" in text)


@contextlib.contextmanager
def _write_errors(
    final: Path,
    needed_bytes: Callable[[], int] | None = None,
    previous: Path | None = None,
    staging: Path | None = None,
) -> Iterator[None]:
    """An OSError (or torch.save's failed write) while writing becomes a one-line HetlmError
    that says how much space the checkpoint needs and how much is free; the previous
    checkpoint stays. The size is estimated only on failure: by ``needed_bytes()``, else by
    the previous checkpoint's size."""
    try:
        yield
    except Exception as exc:
        if not _is_write_failure(exc):
            raise
        reason = (exc.strerror or str(exc)) if isinstance(exc, OSError) else str(exc)
        reason = " ".join(str(reason).split())[:200]
        if staging is not None:  # removed first: the space free is then what a retry has
            shutil.rmtree(staging, ignore_errors=True)
        space = ""
        try:
            free = shutil.disk_usage(final.parent).free
            needed = (
                needed_bytes()
                if needed_bytes is not None
                else directory_bytes(previous)
                if previous is not None
                else 0
            )
            need = f"about {human_bytes(needed)}" if needed else "an unknown amount"
            space = f"; it needs {need}, {human_bytes(free)} is free on {final.parent}"
        except OSError:
            pass
        kept = (
            f"the previous checkpoint {previous} is intact"
            if previous is not None
            else "no earlier checkpoint exists"
        )
        raise HetlmError(
            f"could not write checkpoint {final} ({reason}){space}; {kept}: free space or fix "
            "permissions, then resume (--resume)"
        ) from None


class CheckpointManager:
    def __init__(self, root: Path, keep_last: int, run_id: str | None = None) -> None:
        """``run_id``: the run whose checkpoints ``keep_last`` counts and prunes (another run's
        left in the folder are never pruned in its place; ones without a run id count as this
        run's; None: every checkpoint)."""
        self.root = Path(root)
        self.keep_last = keep_last
        self.run_id = run_id

    def step_dir(self, step: int) -> Path:
        return self.root / f"step-{step:08d}"

    def complete_checkpoints(self) -> list[tuple[int, Path]]:
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.iterdir():
            match = STEP_DIR.match(path.name)
            if match and path.is_dir() and (path / MANIFEST).is_file():
                found.append((int(match.group(1)), path))
        return sorted(found)

    def latest_valid(self, accept: Callable[[Path], bool] | None = None) -> Path | None:
        """Newest checkpoint whose files match their manifest; broken ones are skipped.
        ``accept``: only checkpoints it accepts count (e.g. those of one run id)."""
        for _step, path in reversed(self.complete_checkpoints()):
            if accept is not None and not accept(path):
                continue
            problem = verify_manifest(path)
            if problem is None:
                return path
            warnings.warn(f"skipping checkpoint {path}: {problem}", HetlmWarning, stacklevel=2)
        return None

    def staging_dir(self, step: int) -> Path:
        return self.root / f".tmp-{self.step_dir(step).name}"

    def previous(self, step: int) -> Path | None:
        """The newest complete checkpoint before ``step`` (what a failed write leaves)."""
        done = [path for s, path in self.complete_checkpoints() if s < step]
        return done[-1] if done else None

    def prepare(self, step: int) -> Path:
        """(rank 0) An empty staging directory for checkpoint ``step``."""
        tmp = self.staging_dir(step)
        with _write_errors(self.step_dir(step), previous=self.previous(step)):
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        return tmp

    def commit(
        self,
        step: int,
        *,
        model: nn.Module,
        model_state: dict[str, torch.Tensor] | None,
        states: dict[str, Any],
        trainer_state: dict[str, Any],
    ) -> Path:
        """(rank 0) Write the model and states into the staging directory, then rename it.

        ``model`` gives ``save_pretrained`` (its config and class); ``model_state`` the weights
        (gathered by the engine; None: the model's own). ``states`` maps file stem -> object.
        """
        final, tmp = self.step_dir(step), self.staging_dir(step)

        def needed() -> int:
            return tensor_bytes(model_state or dict(model.state_dict())) + tensor_bytes(states)

        try:
            with _write_errors(final, needed, self.previous(step), staging=tmp):
                faults.on_checkpoint_write(step, "begin")
                # save_pretrained empties the dict it is given: pass a copy.
                model.save_pretrained(
                    tmp,
                    safe_serialization=True,
                    state_dict=dict(model_state) if model_state else None,
                )
                faults.on_checkpoint_write(step, "model")
                for stem, obj in states.items():
                    torch.save(obj, tmp / f"{stem}.pt")
                (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
                write_manifest(tmp)
        except HetlmError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        self._prune()
        return final

    def save(
        self,
        step: int,
        *,
        model: nn.Module,
        states: dict[str, Any],
        trainer_state: dict[str, Any],
        model_state: dict[str, torch.Tensor] | None = None,
    ) -> Path:
        """Write one checkpoint (rank 0 only, no per-rank files): prepare + commit."""
        self.prepare(step)
        return self.commit(
            step, model=model, model_state=model_state, states=states, trainer_state=trainer_state
        )

    def _prune(self) -> None:
        complete = self.complete_checkpoints()
        if self.run_id is not None:
            complete = [(s, p) for s, p in complete if self._run_id_of(p) in (None, self.run_id)]
        for _step, path in complete[: -self.keep_last]:
            shutil.rmtree(path, ignore_errors=True)

    @staticmethod
    def _run_id_of(path: Path) -> str | None:
        try:
            return json.loads((path / "trainer_state.json").read_text()).get("run_id")
        except (OSError, ValueError):
            return None

    @staticmethod
    def load_trainer_state(directory: Path) -> dict[str, Any]:
        return json.loads((directory / "trainer_state.json").read_text())

    @staticmethod
    def load_states(directory: Path) -> dict[str, Any]:
        states = {
            p.stem: torch.load(p, map_location="cpu", weights_only=False)
            for p in directory.glob("*.pt")
        }
        states["trainer_state"] = json.loads((directory / "trainer_state.json").read_text())
        return states
