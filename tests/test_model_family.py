"""Every model type through the one training loop: presets, a step, split invariance, exact
resume, loadable artifacts; ELECTRA's per-sample generator sampling.

Cost control (CI has 2 cores): one single-process run of 4 steps per type is the reference of
both the resume and the split checks; the 2-rank runs of all new types share one pair of
spawned processes (BERT's own split and resume tests are test_split_invariance.py and
test_resume.py).
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from _dist import max_abs_diff, run_single
from conftest import tiny_config
from safetensors.torch import load_file

from hetlm.config import ModelSection, parse_config
from hetlm.models.build import build_model
from hetlm.models.presets import presets_for

TYPES = ["bert", "roberta", "deberta-v2", "electra", "llama"]
NEW_TYPES = [t for t in TYPES if t != "bert"]  # BERT: test_split_invariance / test_resume
SPECIAL = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
SPLIT_TOLERANCE = 1e-5  # as tests/test_split_invariance.py

# parameters at vocabulary 32,000 (docs/MODELS.md), millions, +-1%
EXPECTED_M = {
    ("bert", "mini"): 4.6,
    ("llama", "mini"): 8.6,
    ("bert", "base"): 110.7,
    ("bert", "large"): 336.7,
    ("roberta", "base"): 110.7,
    ("deberta-v2", "base"): 110.7,
    ("electra", "base"): 116.3,
    ("electra", "large"): 356.2,
    ("llama", "1b"): 1100.0,
    ("llama", "7b"): 6738.4,
    ("llama", "13b"): 13015.9,
}


def _config(model_type: str, dataset: Path, out: Path, **train) -> dict:
    config = tiny_config(dataset, out, max_steps=4, max_eval_samples=8, **train)
    config["model"]["type"] = model_type
    return config


def model_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """All saved weights of a model folder (ELECTRA: both parts, prefixed)."""
    model_dir = Path(model_dir)
    if (model_dir / "model.safetensors").is_file():
        return load_file(str(model_dir / "model.safetensors"))
    return {
        f"{part}.{k}": v
        for part in ("discriminator", "generator")
        for k, v in load_file(str(model_dir / part / "model.safetensors")).items()
    }


# ---------------------------------------------------------------- presets


@pytest.mark.parametrize("model_type", TYPES)
def test_every_preset_builds(model_type):
    """tiny/mini/small are built for real; the big shapes on the meta device (nothing allocated)."""
    for preset, shape in presets_for(model_type).items():
        device = "cpu" if preset in ("tiny", "mini", "small") else "meta"
        with torch.device(device):
            model = build_model(
                ModelSection(type=model_type, preset=preset),
                vocab_size=32000,
                pad_token_id=0,
                max_position_embeddings=512,
                seed=0,
                special_ids=SPECIAL,
            )
        config = model.config
        assert (config.hidden_size, config.num_hidden_layers) == (
            shape["hidden_size"],
            shape["num_hidden_layers"],
        )
        assert next(model.parameters()).device.type == device
        count = sum(p.numel() for p in model.parameters()) / 1e6
        expected = EXPECTED_M.get((model_type, preset))
        if expected is not None:
            assert abs(count - expected) <= 0.01 * expected, f"{preset}: {count:.1f}M"
    if model_type == "electra":  # the generator: a quarter of the width, same depth, shared
        with torch.device("meta"):
            model = build_model(
                ModelSection(type="electra", preset="base"),
                vocab_size=32000,
                pad_token_id=0,
                max_position_embeddings=512,
                seed=0,
            )
        gen = model.generator.config
        assert (
            gen.hidden_size,
            gen.num_attention_heads,
            gen.intermediate_size,
            gen.num_hidden_layers,
            gen.embedding_size,
        ) == (192, 3, 768, 12, 768)
        assert model.generator.electra.embeddings is model.discriminator.electra.embeddings
        assert (
            model.generator.generator_lm_head.weight
            is model.discriminator.electra.embeddings.word_embeddings.weight
        )


# ---------------------------------------------------------------- training, resume, artifacts


@pytest.fixture(scope="module")
def straight_runs(tiny_packed, tmp_path_factory):
    """Each type trained 4 steps in one process (B=8): the reference for resume and split."""
    root = tmp_path_factory.mktemp("family")
    summaries = {t: run_single(_config(t, tiny_packed, root / t)) for t in TYPES}
    return root, summaries


@pytest.mark.parametrize("model_type", TYPES)
def test_training_resume_and_artifacts(model_type, straight_runs, tiny_packed, tmp_path):
    root, summaries = straight_runs
    summary = summaries[model_type]
    assert summary["steps"] == 4 and np.isfinite(summary["loss_last"])
    reference = model_weights(root / model_type / "model")

    # exact resume: 2 steps, stop, resume to 4 == 4 straight
    config = _config(model_type, tiny_packed, tmp_path / "stopped", save_steps=2)
    run_single(config, stop_at_step=2)
    run_single(config, resume=True)
    resumed = model_weights(tmp_path / "stopped" / "model")
    assert max_abs_diff(reference, resumed) <= 1e-7

    _check_artifacts(model_type, root / model_type / "model", summary)


def _check_artifacts(model_type: str, model_dir: Path, summary: dict) -> None:
    """The saved folders load with plain transformers classes, tokenizer included."""
    import transformers

    tokenizer_dir = model_dir / ("discriminator" if model_type == "electra" else "")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = tokenizer("吾輩は猫である。", return_tensors="pt")["input_ids"]
    if model_type == "electra":
        disc = transformers.ElectraForPreTraining.from_pretrained(model_dir / "discriminator")
        gen = transformers.AutoModelForMaskedLM.from_pretrained(model_dir / "generator")
        assert type(gen).__name__ == "ElectraForMaskedLM"
        assert gen.config.hidden_size == disc.config.hidden_size // 4
        assert torch.equal(
            gen.electra.embeddings.word_embeddings.weight,
            disc.electra.embeddings.word_embeddings.weight,
        )
        assert disc(ids).logits.shape == ids.shape
        assert "eval_rtd_loss" in summary and "eval_rtd_accuracy" in summary
        return
    auto = (
        transformers.AutoModelForCausalLM
        if model_type == "llama"
        else transformers.AutoModelForMaskedLM
    )
    model = auto.from_pretrained(model_dir)
    assert model.config.model_type == model_type
    assert torch.isfinite(model(ids).logits).all()
    saved = load_file(str(model_dir / "model.safetensors"))
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in saved.items() if k in own)


# ---------------------------------------------------------------- split invariance on 2 ranks


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _many_runs_worker(rank: int, world: int, ports: list[int], configs: list[dict]) -> None:
    """One rank running several configs in turn (each its own process group): one spawn of
    interpreters for all types keeps the test cheap."""
    torch.set_num_threads(1)
    from hetlm.train import pretrain

    for port, config in zip(ports, configs, strict=True):
        os.environ.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_RANK="0",
            GROUP_RANK=str(rank),
            OMP_NUM_THREADS="1",
        )
        pretrain.run_pretraining(parse_config(config))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as tests/_dist.py: no interpreter teardown of gloo threads


def test_split_invariance_of_every_new_type(straight_runs, tiny_packed, tmp_path):
    root, _ = straight_runs
    configs = [
        _config(t, tiny_packed, tmp_path / t, micro_batch={"per_rank": [3, 5]}, dist_timeout_s=60)
        for t in NEW_TYPES
    ]
    mp.spawn(
        _many_runs_worker, args=(2, [_free_port() for _ in configs], configs), nprocs=2, join=True
    )
    for model_type in NEW_TYPES:
        reference = model_weights(root / model_type / "model")
        diff = max_abs_diff(reference, model_weights(tmp_path / model_type / "model"))
        print(f"{model_type}: split (3, 5) vs one process: max abs diff {diff:.2e}")
        assert diff <= SPLIT_TOLERANCE, f"{model_type}: {diff:.2e}"


# ---------------------------------------------------------------- ELECTRA sampling


def test_electra_samples_are_seeded_per_sample(tiny_packed, tmp_path):
    from hetlm.data.packed import load_packed_dataset
    from hetlm.data.readers import special_ids
    from hetlm.models.electra import gumbel_sample
    from hetlm.train.objectives import build_data, objective_module

    config = parse_config(_config("electra", tiny_packed, tmp_path))
    dataset, meta = load_packed_dataset(tiny_packed)
    data = build_data(config, dataset["train"], meta)
    model = build_model(
        config.model,
        vocab_size=int(meta["vocab_size"]),
        pad_token_id=special_ids(meta)["pad"],
        max_position_embeddings=512,
        seed=0,
    )
    objective = objective_module(config, model).eval()

    def replaced(indices: list[int], epoch: int = 0) -> dict[int, torch.Tensor]:
        batch = data.batch(np.array(indices), epoch)
        with torch.no_grad():
            _, ids, labels = objective.generate(**batch.model_inputs())
        assert labels.sum() > 0  # the untrained generator replaces some tokens
        return dict(zip(indices, ids, strict=True))

    a, b = replaced([5, 7]), replaced([7, 3, 5])
    assert torch.equal(a[7], b[7]) and torch.equal(a[5], b[5])  # other batch, other row
    assert not torch.equal(a[7], replaced([7], epoch=1)[7])  # other epoch

    # the sampler alone: the seed decides, not the row; other seeds give other tokens
    logits = torch.randn(1, 6, 3000).expand(3, -1, -1)
    tokens = gumbel_sample(logits, torch.tensor([11, 12, 11]))
    assert torch.equal(tokens[0], tokens[2]) and not torch.equal(tokens[0], tokens[1])
    many = gumbel_sample(torch.zeros(64, 1, 4), torch.arange(64))  # uniform logits
    assert set(many.flatten().tolist()) == {0, 1, 2, 3}
