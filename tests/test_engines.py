"""Every engine keeps the invariants: split invariance and exact resume, on 2 gloo ranks.

Tiny BERT, fp32, dropout 0, B=8, 6 steps. One single-process reference; per engine one set of
runs (straight, stopped at 3, resumed to 6), made once per module, serves all assertions:

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
EVAL_SAMPLES = 33


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
    run_single(tiny_config(tiny_packed, out, max_steps=STEPS, max_eval_samples=EVAL_SAMPLES))
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
RESUMED = ("zero1", "fsdp2-stage2", "fsdp2-stage3", "deepspeed-stage3")


def engine_params(names) -> list:
    return [
        pytest.param(n, marks=[needs_deepspeed] if n.startswith("deepspeed") else []) for n in names
    ]


@pytest.fixture(scope="module")
def runs(tiny_packed, tmp_path_factory):
    """``runs(name)``: that engine's runs, made once per module (straight; for the engines in
    RESUMED also stopped at 3 + resumed, and copies of the step-3 state to resume elsewhere)."""
    cache: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in cache:
            cache[name] = _run_engine(name, tiny_packed, tmp_path_factory.mktemp(name))
        return cache[name]

    return get


def _run_engine(name: str, dataset: Path, root: Path) -> dict:
    settings, per_rank = ENGINES[name]

    def config(out: Path) -> dict:
        # evaluation every 2 steps, 33 samples: ranks get 17 and 16, in batches of 16, so one
        # rank runs a stand-in batch (FSDP / ZeRO-3 must not hang, nor count it)
        return tiny_config(
            dataset,
            out,
            max_steps=STEPS,
            micro_batch={"per_rank": per_rank},
            max_eval_samples=EVAL_SAMPLES,
            eval_steps=2,
            per_device_eval_batch_size=16,
            **settings,
        )

    run_ranks(config(root / "straight"), world=2)
    result = {"straight": root / "straight"}
    if name in RESUMED:
        run_ranks(config(root / "stopped"), world=2, stop_at_step=3)
        for copy in ("at-step-3", "at-step-3-other-engine"):  # for resumes elsewhere
            shutil.copytree(root / "stopped", root / copy)
        run_ranks(config(root / "stopped"), world=2, resume=True)
        result.update(
            stopped=root / "stopped",
            at_step_3=root / "at-step-3",
            at_step_3_other=root / "at-step-3-other-engine",
        )
    return result


@pytest.mark.parametrize("name", engine_params(ENGINES))
def test_split_invariance(name, runs, reference):
    out = runs(name)["straight"]
    diff = max_abs_diff(final_weights(reference), final_weights(out))
    norms = grad_norm_rel_diff(reference, out)
    print(f"{name}: max abs diff {diff:.2e}, grad-norm rel diff {norms:.2e}")
    assert diff <= TOLERANCE
    assert norms <= NORM_TOLERANCE
    summary = json.loads((out / "summary.json").read_text())
    ref_summary = json.loads((reference / "summary.json").read_text())
    assert summary["engine"] == name.split("-")[0]
    # held-out evaluation (padded so every rank runs the same forwards) sees every sample once
    assert summary["eval_tokens"] == ref_summary["eval_tokens"]
    assert abs(summary["eval_loss"] - ref_summary["eval_loss"]) < 1e-5


@pytest.mark.parametrize("name", engine_params(RESUMED))
def test_exact_resume(name, runs):
    straight, stopped = runs(name)["straight"], runs(name)["stopped"]
    a, b = final_weights(straight), final_weights(stopped)
    diff = max_abs_diff(a, b)
    print(f"{name}: resume max abs diff {diff:.2e}")
    assert all(torch.equal(a[k], b[k]) for k in a), f"max diff {diff:.2e}"
    steps = [r["step"] for r in step_records(stopped)]
    assert steps == list(range(1, STEPS + 1))
    # every checkpoint's model is a plain Hugging Face folder
    from transformers import AutoModelForMaskedLM

    ckpt = stopped / "checkpoints" / f"step-{STEPS:08d}"
    loaded = AutoModelForMaskedLM.from_pretrained(ckpt).state_dict()
    assert max(float((loaded[k] - a[k]).abs().max()) for k in a) == 0.0


@pytest.mark.parametrize("name", engine_params(RESUMED))
def test_checkpoint_resumes_in_one_process(name, runs, reference, tiny_packed):
    """The full, name-keyed states of the torch engines load on any number of ranks;
    DeepSpeed's own files need DeepSpeed and the same ranks, and say so."""
    out = runs(name)["at_step_3"]
    config = tiny_config(tiny_packed, out, max_steps=STEPS, micro_batch=8)
    if name.startswith("deepspeed"):
        with pytest.raises(HetlmError, match="written by engine deepspeed.*train.engine"):
            run_single(config, resume=True)
        return
    run_single(config, resume=True)
    diff = max_abs_diff(final_weights(reference), final_weights(out))
    print(f"{name} checkpoint resumed in one process: max abs diff {diff:.2e}")
    assert diff <= TOLERANCE


def test_zero1_checkpoint_resumes_under_fsdp2(runs, reference, tiny_packed):
    """Numbered (DDP/ZeRO-1) optimizer states, saved by name, load into FSDP2's DTensors."""
    out = runs("zero1")["at_step_3_other"]
    run_ranks(
        tiny_config(
            tiny_packed,
            out,
            max_steps=STEPS,
            micro_batch={"per_rank": [1, 3]},
            engine="fsdp2",
            zero_stage=3,
        ),
        world=2,
        resume=True,
    )
    diff = max_abs_diff(final_weights(reference), final_weights(out))
    print(f"zero1 checkpoint resumed under fsdp2 stage 3: max abs diff {diff:.2e}")
    assert diff <= TOLERANCE


def test_optimizer_state_by_name_round_trips_and_old_numbered_states_load():
    from hetlm.config import ModelSection
    from hetlm.models.build import build_model
    from hetlm.models.masked_lm import SparseMaskedLM
    from hetlm.train.distributed import DistContext
    from hetlm.train.engines import build_engine

    ctx = DistContext(0, 1, 0, 0, torch.device("cpu"))
    engines = []
    for _ in range(2):
        model = build_model(
            ModelSection(preset="tiny"),
            vocab_size=100,
            pad_token_id=0,
            max_position_embeddings=64,
            seed=0,
        )
        engine = build_engine(SparseMaskedLM(model), ctx, "fp32", EngineOptions())
        engine.build_optimizer(lr=1e-3, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-6)
        engines.append(engine)
    first, second = engines
    loss, _ = first.module(
        torch.randint(5, 100, (2, 16)), torch.tensor([[1, 2]] * 2), torch.randint(5, 100, (2, 2))
    )
    first.backward(loss)
    first.step(1.0)
    named = first.optimizer_state_dict()
    assert "model.bert.embeddings.word_embeddings.weight" in named["state"]
    second.load_optimizer_state_dict(named)
    numbered = first.optimizer.state_dict()
    state = second.optimizer.state_dict()
    assert state["param_groups"] == numbered["param_groups"]
    assert all(
        torch.equal(state["state"][i]["exp_avg"], numbered["state"][i]["exp_avg"])
        for i in numbered["state"]
    )
    second.load_optimizer_state_dict(numbered)  # a hetlm 0.1 checkpoint
    assert torch.equal(
        second.optimizer.state_dict()["state"][0]["exp_avg_sq"], numbered["state"][0]["exp_avg_sq"]
    )


@pytest.mark.parametrize(
    "engine,compression,tolerance", [("ddp", "fp16", 1e-3), ("zero1", "bf16", 5e-3)]
)
def test_gradient_compression(engine, compression, tolerance, reference, tiny_packed, tmp_path):
    """16-bit all-reduce: close to the reference, but not equal (the hook really ran)."""
    config = tiny_config(
        tiny_packed,
        tmp_path,
        max_steps=STEPS,
        micro_batch={"per_rank": [3, 5]},
        engine=engine,
        grad_compression=compression,
        bucket_cap_mb=0.05,
    )
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
    with pytest.raises(
        HetlmError, match="engine fsdp2 cannot run ZeRO stage 1.*train.engine: zero1"
    ):
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

    opts = EngineOptions(
        name="deepspeed", zero_stage=2, max_grad_norm=None, micro_steps=2, micro_batch=3
    )
    config = deepspeed_config(opts, "bf16", world_size=2)
    assert config["train_batch_size"] == 3 * 2 * 2
    assert config["gradient_clipping"] == 0.0  # not DeepSpeed's default 1.0
    assert config["zero_optimization"]["stage"] == 2
    assert config["bf16"]["enabled"] and not config["fp16"]["enabled"]
    user = tmp_path / "ds.json"
    user.write_text(
        json.dumps(
            {"zero_optimization": {"stage": 2, "overlap_comm": False}, "train_batch_size": 999}
        )
    )
    config = deepspeed_config(
        EngineOptions(
            name="deepspeed", zero_stage=2, deepspeed_config=user, max_grad_norm=1.0, micro_batch=5
        ),
        "fp32",
        2,
    )
    assert config["zero_optimization"] == {"stage": 2, "overlap_comm": False}
    assert config["train_batch_size"] == 10 and config["gradient_clipping"] == 1.0
    for bad, match in (
        ({"gradient_clipping": 0.5}, "train.max_grad_norm"),
        ({"zero_optimization": {"stage": 3}}, "train.zero_stage"),
        ({"optimizer": {"type": "Adam"}}, "own AdamW"),
        ({"fp16": {"enabled": True}}, "train.precision: fp16"),
    ):
        user.write_text(json.dumps(bad))
        with pytest.raises(HetlmError, match=match):
            deepspeed_config(
                EngineOptions(
                    name="deepspeed", zero_stage=2, deepspeed_config=user, max_grad_norm=1.0
                ),
                "fp32",
                2,
            )


def test_missing_deepspeed_is_a_clear_error(monkeypatch):
    import sys

    from hetlm.train.engines.deepspeed import import_deepspeed

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed -> ImportError
    with pytest.raises(HetlmError, match=r"pip install 'hetlm\[deepspeed\]'"):
        import_deepspeed()
