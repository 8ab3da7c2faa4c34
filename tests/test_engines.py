"""Every engine keeps the invariants: split invariance and exact resume, on 2 gloo ranks.

Tiny BERT, fp32, dropout 0, B=8, 6 steps. One single-process reference; per engine one
module-scoped set of runs (straight, stopped at 3, resumed to 6) serves all assertions:

- split invariance: weights within 1e-5 of the reference (as tests/test_split_invariance.py),
  and the per-step gradient norms within 5e-5 relative. The norms catch what the weights cannot:
  AdamW and clipping are blind to a uniform gradient scale (a world-size or accumulation factor
  too many), the norm is not. (The gradients themselves agree; an fp32 norm over a 192k-element
  embedding gradient is off by ~4e-6 relative from its float64 value, and FSDP and DeepSpeed
  sum it in other pieces: measured up to 4.8e-6 and 8.7e-6.)
- exact resume: 6 straight == 3 + resume + 3, bitwise (every engine here: the full states are
  saved and restored exactly, and the same split reduces in the same order).

Splits: (1, 3) x 2 micro-steps (uneven shares *and* accumulation) for the sharded engines, where
accumulation is engine-specific (FSDP's set_requires_gradient_sync, DeepSpeed's boundary); zero1
uses (3, 5) (its accumulation is DDP's no_sync, covered by tests/test_split_invariance.py).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from _dist import final_weights, max_abs_diff, run_ranks, run_single
from conftest import tiny_config

from hetlm.errors import HetlmError
from hetlm.train.engine import EngineOptions, check_options, resolve_engine

TOLERANCE = 1e-5
NORM_TOLERANCE = 5e-5
STEPS = 6


HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None  # importing it takes seconds
needs_deepspeed = pytest.mark.skipif(not HAS_DEEPSPEED, reason="pip install 'hetlm[deepspeed]'")


def step_records(output_dir: Path) -> list[dict]:
    lines = (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "event" not in r]


def grad_norm_rel_diff(a: Path, b: Path) -> float:
    na = [r["grad_norm"] for r in step_records(a)]
    nb = [r["grad_norm"] for r in step_records(b)]
    assert len(na) == len(nb) == STEPS
    return max(abs(x - y) / abs(x) for x, y in zip(na, nb, strict=True))


@pytest.fixture(scope="module")
def reference(tiny_packed, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    run_single(tiny_config(tiny_packed, out, max_steps=STEPS))
    return out


ENGINES = {
    "zero1": ({"engine": "zero1"}, [3, 5]),
    "fsdp2-stage2": ({"engine": "fsdp2", "zero_stage": 2}, [1, 3]),
    "fsdp2-stage3": ({"engine": "fsdp2", "zero_stage": 3}, [1, 3]),
    "deepspeed-stage1": ({"engine": "deepspeed", "zero_stage": 1}, [1, 3]),
    "deepspeed-stage2": ({"engine": "deepspeed", "zero_stage": 2}, [1, 3]),
    "deepspeed-stage3": ({"engine": "deepspeed", "zero_stage": 3}, [1, 3]),
}
#: DeepSpeed stages 1 and 2 are checked for split invariance only (time); stage 3 resumes too.
RESUMED = {"zero1", "fsdp2-stage2", "fsdp2-stage3", "deepspeed-stage3"}


@pytest.fixture(scope="module", params=[
    pytest.param(name, marks=[needs_deepspeed] if name.startswith("deepspeed") else [])
    for name in ENGINES])
def engine_runs(request, tiny_packed, tmp_path_factory) -> dict:
    name = request.param
    settings, per_rank = ENGINES[name]
    root = tmp_path_factory.mktemp(name)

    def config(out: Path) -> dict:
        return tiny_config(tiny_packed, out, max_steps=STEPS, micro_batch={"per_rank": per_rank},
                           **settings)

    run_ranks(config(root / "straight"), world=2)
    runs = {"name": name, "straight": root / "straight"}
    if name in RESUMED:
        run_ranks(config(root / "stopped"), world=2, stop_at_step=3)
        shutil.copytree(root / "stopped", root / "at-step-3")  # for the one-process resume
        run_ranks(config(root / "stopped"), world=2, resume=True)
        runs.update(stopped=root / "stopped", at_step_3=root / "at-step-3")
    return runs


def test_split_invariance(engine_runs, reference):
    out = engine_runs["straight"]
    diff = max_abs_diff(final_weights(reference), final_weights(out))
    norms = grad_norm_rel_diff(reference, out)
    print(f"{engine_runs['name']}: max abs diff {diff:.2e}, grad-norm rel diff {norms:.2e}")
    assert diff <= TOLERANCE
    assert norms <= NORM_TOLERANCE
    summary = json.loads((out / "summary.json").read_text())
    ref_summary = json.loads((reference / "summary.json").read_text())
    assert summary["engine"] == engine_runs["name"].split("-")[0]
    # held-out evaluation (padded so every rank runs the same forwards) sees every sample once
    assert summary["eval_tokens"] == ref_summary["eval_tokens"]
    assert abs(summary["eval_loss"] - ref_summary["eval_loss"]) < 1e-4


def test_exact_resume(engine_runs):
    if "stopped" not in engine_runs:
        pytest.skip("split invariance only for this engine (test time)")
    a, b = final_weights(engine_runs["straight"]), final_weights(engine_runs["stopped"])
    diff = max_abs_diff(a, b)
    print(f"{engine_runs['name']}: resume max abs diff {diff:.2e}")
    assert all(torch.equal(a[k], b[k]) for k in a), f"max diff {diff:.2e}"
    steps = [r["step"] for r in step_records(engine_runs["stopped"])]
    assert steps == list(range(1, STEPS + 1))
    # every checkpoint's model is a plain Hugging Face folder
    from transformers import AutoModelForMaskedLM

    ckpt = engine_runs["stopped"] / "checkpoints" / f"step-{STEPS:08d}"
    loaded = AutoModelForMaskedLM.from_pretrained(ckpt).state_dict()
    assert max(float((loaded[k] - a[k]).abs().max()) for k in a) == 0.0


def test_torch_engine_checkpoint_resumes_in_one_process(engine_runs, reference, tiny_packed):
    """The full, name-keyed states of the torch engines load on any number of ranks."""
    name = engine_runs["name"]
    if "at_step_3" not in engine_runs:
        pytest.skip("no stopped run for this engine")
    config = tiny_config(tiny_packed, engine_runs["at_step_3"], max_steps=STEPS, micro_batch=8)
    if name.startswith("deepspeed"):
        with pytest.raises(HetlmError, match="same number of ranks|train.engine"):
            run_single(config, resume=True)
        return
    run_single(config, resume=True)
    diff = max_abs_diff(final_weights(reference), final_weights(engine_runs["at_step_3"]))
    print(f"{name} checkpoint resumed in one process: max abs diff {diff:.2e}")
    assert diff <= TOLERANCE


@pytest.mark.parametrize("engine,compression,tolerance", [
    ("ddp", "fp16", 1e-3), ("zero1", "bf16", 5e-3)])
def test_gradient_compression(engine, compression, tolerance, reference, tiny_packed, tmp_path):
    """16-bit all-reduce: close to the reference, but not equal (the hook really ran)."""
    config = tiny_config(tiny_packed, tmp_path, max_steps=STEPS, micro_batch={"per_rank": [3, 5]},
                         engine=engine, grad_compression=compression, bucket_cap_mb=0.05)
    run_ranks(config, world=2)
    diff = max_abs_diff(final_weights(reference), final_weights(tmp_path))
    print(f"{engine} with {compression} compression: max abs diff {diff:.2e}")
    assert 1e-6 < diff <= tolerance


# ---------------------------------------------------------------- choices and refusals


def test_engine_resolution():
    assert resolve_engine("auto", "auto") == ("ddp", 0)
    assert resolve_engine("auto", 3) == ("fsdp2", 3)
    assert resolve_engine("auto", 1) == ("zero1", 1)
    assert resolve_engine("fsdp2", "auto") == ("fsdp2", 2)
    assert resolve_engine("deepspeed", 3) == ("deepspeed", 3)
    # the plan decides what the config leaves on auto; explicit values win
    assert resolve_engine("auto", "auto", "fsdp2", 3) == ("fsdp2", 3)
    assert resolve_engine("ddp", 0, "fsdp2", 3) == ("ddp", 0)
    with pytest.raises(HetlmError, match="engine fsdp2 cannot run ZeRO stage 1.*train.engine: zero1"):
        resolve_engine("fsdp2", 1)
    with pytest.raises(HetlmError, match="engine zero1 cannot run ZeRO stage 2"):
        resolve_engine("auto", 2, "zero1", 1)
    with pytest.raises(HetlmError, match="train.engine must be"):
        resolve_engine("megatron", "auto")


def test_options_the_engine_would_ignore_are_refused():
    check_options(EngineOptions(name="zero1", grad_compression="bf16", bucket_cap_mb=10))
    with pytest.raises(HetlmError, match="grad_compression applies to the ddp and zero1"):
        check_options(EngineOptions(name="fsdp2", zero_stage=2, grad_compression="fp16"))
    with pytest.raises(HetlmError, match="bucket_cap_mb"):
        check_options(EngineOptions(name="deepspeed", bucket_cap_mb=5))
    with pytest.raises(HetlmError, match="train.engine: deepspeed"):
        check_options(EngineOptions(name="ddp", deepspeed_config=Path("ds.json")))


def test_config_rejects_unknown_engine_and_stage(tiny_packed, tmp_path):
    from hetlm.config import parse_config

    with pytest.raises(HetlmError, match="train.engine"):
        parse_config(tiny_config(tiny_packed, tmp_path, engine="zero4"))
    with pytest.raises(HetlmError, match="train.zero_stage"):
        parse_config(tiny_config(tiny_packed, tmp_path, zero_stage=4))


def test_deepspeed_config_per_rank(tmp_path):
    """Each rank's own batch keys satisfy DeepSpeed's assertion; clipping is always explicit."""
    from hetlm.train.engines.deepspeed import deepspeed_config

    opts = EngineOptions(name="deepspeed", zero_stage=2, max_grad_norm=None, micro_steps=2,
                         micro_batch=3)
    config = deepspeed_config(opts, "bf16", world_size=2)
    assert config["train_batch_size"] == 3 * 2 * 2
    assert config["gradient_clipping"] == 0.0  # not DeepSpeed's default 1.0
    assert config["zero_optimization"]["stage"] == 2
    assert config["bf16"]["enabled"] and not config["fp16"]["enabled"]
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"stage": 2, "overlap_comm": False},
                                "train_batch_size": 999}))
    config = deepspeed_config(EngineOptions(name="deepspeed", zero_stage=2, deepspeed_config=user,
                                            max_grad_norm=1.0, micro_batch=5), "fp32", 2)
    assert config["zero_optimization"] == {"stage": 2, "overlap_comm": False}
    assert config["train_batch_size"] == 10 and config["gradient_clipping"] == 1.0
    for bad, match in (({"gradient_clipping": 0.5}, "train.max_grad_norm"),
                       ({"zero_optimization": {"stage": 3}}, "train.zero_stage"),
                       ({"optimizer": {"type": "Adam"}}, "own AdamW"),
                       ({"fp16": {"enabled": True}}, "train.precision: fp16")):
        user.write_text(json.dumps(bad))
        with pytest.raises(HetlmError, match=match):
            deepspeed_config(EngineOptions(name="deepspeed", zero_stage=2, deepspeed_config=user,
                                           max_grad_norm=1.0), "fp32", 2)


def test_missing_deepspeed_is_a_clear_error(monkeypatch):
    import sys

    from hetlm.train.engines.deepspeed import import_deepspeed

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed -> ImportError
    with pytest.raises(HetlmError, match=r"pip install 'hetlm\[deepspeed\]'"):
        import_deepspeed()
