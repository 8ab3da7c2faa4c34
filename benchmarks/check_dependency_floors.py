"""Check that hetlm works with the lowest dependency versions pyproject.toml allows.

``make floors`` builds a throwaway virtual environment with :data:`FLOOR_PINS` (the floors of
pyproject.toml, exactly; a test keeps the two equal) and runs this script's ``smoke`` in it:

    tokenizer train -> prepare -> pretrain a tiny BERT (ZeRO-1) and a tiny LLaMA (FSDP2) -> LoRA
    SFT (2 steps, DDP) -> load every output with plain transformers / peft and generate

(every training step on two emulated nodes with different micro-batches, gloo)

Each step runs the real CLI (``python -m hetlm.cli``) in a subprocess of the venv's Python, so
what is exercised is the installed versions, not the developer's environment. Run by hand:

    python benchmarks/check_dependency_floors.py pins           # the pip requirement lines
    python benchmarks/check_dependency_floors.py smoke --workdir /tmp/floors

torch is installed first, as the Makefile does: ``make floors`` keeps the project's pinned CPU
build, ``make floors FLOOR_TORCH=torch==2.7.0`` checks torch's floor (``TORCH_FLOOR``; the PyPI
wheel is a CUDA build, which runs this on a CPU as well). torch 2.6.0 fails here: FSDP2 on CPU
ranks calls ``torch.cpu.Stream.record_event``, which 2.6 lacks, so the floor is 2.7.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: pyproject.toml's floors for the core dependencies (tests/test_dependency_floors.py checks that
#: they are equal). Versions that exist and resolve together: transformers 5.0 needs tokenizers
#: >= 0.22 and huggingface-hub >= 1.3, and the first tokenizers that accepts hub 1.x is 0.22.1;
#: transformers needs safetensors >= 0.4.3, datasets needs tqdm >= 4.66.3; hetlm's packed
#: schema uses datasets.List (new in datasets 4.0). numpy 1.26 installs
#: but breaks `hetlm prepare`: pip picks the newest pyarrow for datasets, which needs numpy >= 2
#: at import time; matplotlib 3.8.4 is the first 3.8 built against numpy 2.
FLOOR_PINS: dict[str, str] = {
    "transformers": "5.0.0",
    "tokenizers": "0.22.1",
    "huggingface-hub": "1.3.0",
    "datasets": "4.0.0",
    "peft": "0.13.0",
    "pydantic": "2.6.0",
    "sentencepiece": "0.2.0",
    "protobuf": "4.21.0",
    "safetensors": "0.4.3",
    "pyyaml": "6.0",
    "numpy": "2.0.0",
    "tqdm": "4.66.3",
    "tensorboard": "2.15.0",
    "matplotlib": "3.8.4",
}
#: Installed for the floor run but not hetlm's own dependencies: the lowest that the floors above
#: accept (transformers 5.0 needs hub >= 1.3).
TRANSITIVE = ("huggingface-hub",)
TORCH_FLOOR = "2.7.0"
CORPUS = REPO / "data" / "general_aozora" / "aozora_soseki_akutagawa.jsonl"
DOLLY = REPO / "data" / "instruct_dolly_ja" / "databricks-dolly-15k-ja_v0_every3rd.jsonl"


def pins() -> list[str]:
    return [f"{name}=={version}" for name, version in FLOOR_PINS.items()]


# --------------------------------------------------------------------------- smoke steps


def _hetlm(workdir: Path, *args: str) -> None:
    """One CLI call in this interpreter's environment; its output goes to a log file."""
    log = workdir / "logs" / f"{len(list((workdir / 'logs').glob('*.log'))):02d}-{args[0]}.log"
    env = dict(
        os.environ, PYTHONPATH=str(REPO / "src"), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false"
    )
    started = time.perf_counter()
    with log.open("w", encoding="utf-8") as out:
        result = subprocess.run(
            [sys.executable, "-m", "hetlm.cli", *args],
            cwd=workdir,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            check=False,
        )
    took = time.perf_counter() - started
    if result.returncode != 0:
        tail = log.read_text(encoding="utf-8").strip().splitlines()[-25:]
        raise SystemExit(
            f"FAILED: hetlm {' '.join(args)} (exit {result.returncode}, {took:.0f}s)"
            f"\n" + "\n".join(tail)
        )
    print(f"ok   hetlm {' '.join(args)}  ({took:.0f}s)", flush=True)


def _write_yaml(path: Path, data: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def _instructions(workdir: Path, count: int = 64) -> Path:
    path = workdir / "instructions.jsonl"
    with DOLLY.open(encoding="utf-8") as f, path.open("w", encoding="utf-8") as out:
        for _, line in zip(range(count), f, strict=False):
            out.write(line)
    return path


#: The engines the floor run exercises, on two emulated nodes with different micro-batches:
#: torch's ZeroRedundancyOptimizer for BERT, FSDP2 (``fully_shard``, public from torch 2.6) for
#: LLaMA; LoRA SFT runs on DDP.
ENGINES = {"bert": ("zero1", 1), "llama": ("fsdp2", 3)}


def _pretrain_config(workdir: Path, model_type: str) -> Path:
    engine, stage = ENGINES[model_type]
    return _write_yaml(
        workdir / f"pretrain-{model_type}.yaml",
        {
            "run": {"output_dir": str(workdir / f"pretrain-{model_type}"), "seed": 0},
            "data": {"dataset": str(workdir / "data")},
            "model": {"type": model_type, "preset": "tiny"},
            "train": {
                "global_batch": 8,
                "micro_batch": {"per_node": [5, 3]},
                "max_steps": 3,
                "lr": 1e-3,
                "warmup_steps": 1,
                "precision": "fp32",
                "engine": engine,
                "zero_stage": stage,
                "eval_samples": 16,
                "log_every": 1,
            },
        },
    )


def _sft_config(workdir: Path, base: Path) -> Path:
    return _write_yaml(
        workdir / "sft.yaml",
        {
            "run": {"output_dir": str(workdir / "sft"), "seed": 0},
            "model": {"path": str(base)},
            "data": {
                "source": str(_instructions(workdir)),
                "template": "ja-alpaca",
                "max_length": 128,
                "validation_fraction": 0.1,
            },
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
            "train": {
                "global_batch": 6,
                "micro_batch": {"per_node": [4, 2]},
                "max_steps": 2,
                "lr": 1e-3,
                "warmup_steps": 1,
                "precision": "fp32",
                "eval_samples": 8,
                "log_every": 1,
            },
        },
    )


def _load_with_plain_libraries(workdir: Path) -> None:
    """Invariant 5: every output loads without hetlm (transformers, peft)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(workdir / "tokenizer")
    encoded = tokenizer("吾輩は猫である。", return_tensors="pt")
    assert encoded["input_ids"][0, 0].item() == tokenizer.cls_token_id
    bert = AutoModelForMaskedLM.from_pretrained(workdir / "pretrain-bert" / "model").eval()
    with torch.no_grad():
        logits = bert(**encoded).logits
    assert logits.shape[-1] == bert.config.vocab_size and torch.isfinite(logits).all()
    base_dir = workdir / "pretrain-llama" / "model"
    llama = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    tuned = PeftModel.from_pretrained(llama, workdir / "sft" / "adapter").eval()
    prompt = tokenizer("日本の首都は", return_tensors="pt", return_token_type_ids=False)
    with torch.no_grad():
        out = tuned.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]
    merged = tuned.merge_and_unload()
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    assert any((workdir / "pretrain-bert" / "tensorboard").iterdir()), "no tensorboard events"
    _plot(workdir / "logs" / "loss.png")
    print(
        "ok   plain transformers/peft: tokenizer, BERT MLM, LLaMA + LoRA adapter (generate, "
        "merge); tensorboard events; a matplotlib plot",
        flush=True,
    )


def _plot(path: Path) -> None:
    """The demos' plots go through matplotlib (Agg), which must import with the floor numpy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([0, 1, 2], [3.0, 2.0, 1.5])
    fig.savefig(path)
    plt.close(fig)
    assert path.stat().st_size > 0


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", *FLOOR_PINS):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "missing"
    return found


def smoke(workdir: Path, require_floors: bool) -> int:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "logs").mkdir(exist_ok=True)
    found = versions()
    print("versions: " + ", ".join(f"{k} {v}" for k, v in found.items()), flush=True)
    off = {k: v for k, v in found.items() if k in FLOOR_PINS and v != FLOOR_PINS[k]}
    if require_floors and off:
        raise SystemExit(
            f"not the floor set: {off} (expected {FLOOR_PINS}); build the venv with `make floors`"
        )
    started = time.perf_counter()
    _hetlm(
        workdir,
        "tokenizer",
        "train",
        str(CORPUS),
        "--output",
        "tokenizer",
        "--vocab-size",
        "4000",
        "--input-sentence-size",
        "20000",
    )
    _hetlm(
        workdir,
        "prepare",
        str(CORPUS),
        "--tokenizer",
        "tokenizer",
        "--output",
        "data",
        "--seq-len",
        "64",
        "--validation-fraction",
        "0.05",
        "--overwrite",
    )
    for model_type in ("bert", "llama"):
        _hetlm(
            workdir, "pretrain", str(_pretrain_config(workdir, model_type)), "--local-nodes", "2"
        )
    _hetlm(
        workdir,
        "sft",
        str(_sft_config(workdir, workdir / "pretrain-llama" / "model")),
        "--local-nodes",
        "2",
    )
    _load_with_plain_libraries(workdir)
    took = time.perf_counter() - started
    result = {
        "ok": True,
        "seconds": round(took, 1),
        "versions": found,
        "floor_set": not off,
        "python": sys.version.split()[0],
    }
    (workdir / "floors.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"PASSED in {took:.0f}s with " + ", ".join(f"{k} {v}" for k, v in found.items()))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("pins", help="print the floor pins, one pip requirement a line")
    run = sub.add_parser("smoke", help="run the end-to-end smoke test in this environment")
    run.add_argument("--workdir", type=Path, default=Path("runs/floors"))
    run.add_argument(
        "--require-floors",
        action="store_true",
        help="refuse to run unless the installed versions are the floor set",
    )
    args = parser.parse_args(argv)
    if args.command == "pins":
        print("\n".join(pins()))
        return 0
    return smoke(args.workdir, args.require_floors)


if __name__ == "__main__":
    sys.exit(main())
