"""Defaults from the literature per model type and size, the one vocabulary of names (old
spellings accepted with one deprecation line), the schedules, and ``--help-config``."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from hetlm.cli import build_parser, main
from hetlm.config import parse_config
from hetlm.errors import HetlmError, HetlmWarning
from hetlm.hparams import PRETRAIN_RECIPES, RECIPE_COLUMNS, recipe_cells, recipe_rows
from hetlm.models.presets import presets_for
from hetlm.sft.config import parse_sft_config
from hetlm.train.optim import lr_factor

REPO = Path(__file__).resolve().parents[1]


def pretrain_raw(model: dict, max_steps: int = 1000, **train) -> dict:
    return {
        "run": {"output_dir": "out"},
        "data": {"dataset": "data"},
        "model": model,
        "train": {"global_batch": 8, "micro_batch": 8, "max_steps": max_steps, **train},
    }


def sft_raw(max_steps: int = 1000, **train) -> dict:
    return {
        "run": {"output_dir": "out"},
        "model": {"init_from": "base"},
        "data": {"dataset": "rows.jsonl"},
        "train": {"global_batch": 8, "micro_batch": 8, "max_steps": max_steps, **train},
    }


# What the papers say, written out independently of hetlm/hparams.py:
# (type, preset, max_steps) -> lr, warm-up steps, schedule, beta2, eps, weight decay, clipping,
# dropout, MLM probability.
PAPERS = [
    # BERT App. A.2: 1e-4, 10k warm-up, linear, 0.9/0.999, wd 0.01, dropout 0.1; code: eps 1e-6,
    # clip 1.0
    ("bert", "base", 1_000_000, 1e-4, 10_000, "linear", 0.999, 1e-6, 0.01, 1.0, 0.1, 0.15),
    ("bert", "large", 1_000_000, 1e-4, 10_000, "linear", 0.999, 1e-6, 0.01, 1.0, 0.1, 0.15),
    # small shapes: ELECTRA-Small's 5e-4; warm-up capped at 10% of a short run
    ("bert", "small", 2_000, 5e-4, 200, "linear", 0.999, 1e-6, 0.01, 1.0, 0.1, 0.15),
    ("bert", "tiny", 2, 5e-4, 1, "linear", 0.999, 1e-6, 0.01, 1.0, 0.1, 0.15),  # never 0
    # RoBERTa Table 9: 6e-4 / 4e-4, 24k / 30k warm-up, beta2 0.98, eps 1e-6, no clipping
    ("roberta", "base", 500_000, 6e-4, 24_000, "linear", 0.98, 1e-6, 0.01, 0.0, 0.1, 0.15),
    ("roberta", "large", 500_000, 4e-4, 30_000, "linear", 0.98, 1e-6, 0.01, 0.0, 0.1, 0.15),
    # ELECTRA Table 6: 5e-4 / 2e-4 / 2e-4, 10k warm-up, mask 15% / 15% / 25%
    ("electra", "small", 1_000_000, 5e-4, 10_000, "linear", 0.999, 1e-6, 0.01, 1.0, 0.1, 0.15),
    ("electra", "base", 766_000, 2e-4, 10_000, "linear", 0.999, 1e-6, 0.01, 1.0, 0.1, 0.15),
    ("electra", "large", 400_000, 2e-4, 10_000, "linear", 0.999, 1e-6, 0.01, 1.0, 0.1, 0.25),
    # DeBERTa Table 8: 2e-4, 10k warm-up, linear, 0.9/0.999, eps 1e-6, clip 1.0
    ("deberta-v2", "base", 1_000_000, 2e-4, 10_000, "linear", 0.999, 1e-6, 0.01, 1.0, 0.1, 0.15),
    # Llama 2: 3e-4, 2000 warm-up, cosine to 10%, 0.9/0.95, eps 1e-5, wd 0.1, clip 1.0
    ("llama", "7b", 500_000, 3e-4, 2_000, "cosine_with_min_lr", 0.95, 1e-5, 0.1, 1.0, 0.0, None),
    ("llama", "13b", 500_000, 3e-4, 2_000, "cosine_with_min_lr", 0.95, 1e-5, 0.1, 1.0, 0.0, None),
    # TinyLlama: 4e-4; GPT-3 125M: 6e-4, eps 1e-8
    ("llama", "1b", 1_000_000, 4e-4, 2_000, "cosine_with_min_lr", 0.95, 1e-8, 0.1, 1.0, 0.0, None),
    ("llama", "small", 5_000, 6e-4, 500, "cosine_with_min_lr", 0.95, 1e-8, 0.1, 1.0, 0.0, None),
]


@pytest.mark.parametrize(
    (
        "model_type",
        "preset",
        "steps",
        "lr",
        "warmup",
        "schedule",
        "beta2",
        "eps",
        "wd",
        "clip",
        "dropout",
        "mlm",
    ),
    PAPERS,
)
def test_defaults_resolve_to_the_papers_recipe(
    model_type, preset, steps, lr, warmup, schedule, beta2, eps, wd, clip, dropout, mlm
):
    config = parse_config(pretrain_raw({"type": model_type, "preset": preset}, steps))
    t = config.train
    assert (config.learning_rate, config.warmup, t.lr_scheduler_type) == (lr, warmup, schedule)
    assert (t.adam_beta1, t.adam_beta2, t.adam_epsilon) == (0.9, beta2, eps)
    assert (t.weight_decay, t.max_grad_norm, config.model.dropout) == (wd, clip, dropout)
    assert t.mlm_probability == mlm
    assert t.min_lr_rate == (0.1 if model_type == "llama" else 0.0)
    sources = {key: source for key, _, source in config.hyperparameters()}
    assert all(sources.values()) and "train.learning_rate" in sources


def test_every_preset_has_a_recipe():
    for model_type, recipes in PRETRAIN_RECIPES.items():
        assert set(recipes) == set(presets_for(model_type)), model_type


def test_continued_pretraining_keeps_its_own_rate_and_warmup():
    config = parse_config(
        pretrain_raw({"type": "roberta", "preset": "base", "init_from": "ckpt"}, 1000)
    )
    assert (config.learning_rate, config.warmup) == (1e-4, 60)  # 6% of 1000
    assert config.train.adam_beta2 == 0.98 and config.model.dropout is None  # the checkpoint's


def test_sft_defaults_are_the_lora_recipe():
    config = parse_sft_config(sft_raw(1000))
    t = config.train
    assert (config.learning_rate, config.warmup, t.lr_scheduler_type) == (2e-4, 30, "cosine")
    assert (t.weight_decay, t.max_grad_norm, t.adam_beta2, t.adam_epsilon) == (
        0.0,
        0.3,
        0.999,
        1e-8,
    )


def test_an_explicit_value_always_wins():
    config = parse_config(
        pretrain_raw(
            {"type": "llama", "preset": "7b", "dropout": 0.05},
            1000,
            learning_rate=1e-3,
            warmup_steps=0,
            lr_scheduler_type="linear",
            adam_beta2=0.999,
            adam_epsilon=1e-6,
            weight_decay=0.0,
            max_grad_norm=0.0,
        )
    )
    t = config.train
    assert (config.learning_rate, config.warmup, t.lr_scheduler_type) == (1e-3, 0, "linear")
    assert (t.adam_beta2, t.adam_epsilon, t.weight_decay, t.max_grad_norm) == (0.999, 1e-6, 0, 0)
    assert config.model.dropout == 0.05
    sources = {key: source for key, _, source in config.hyperparameters()}
    assert sources["train.learning_rate"] == sources["train.warmup_steps"] == "set in the config"
    ratio = parse_config(pretrain_raw({"type": "bert"}, 1000, warmup_ratio=0.06))
    assert ratio.warmup == 60
    with pytest.raises(HetlmError, match="warmup_steps and train.warmup_ratio both given"):
        parse_config(pretrain_raw({"type": "bert"}, 1000, warmup_ratio=0.06, warmup_steps=5))


def _renamed(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, HetlmWarning)]


def test_old_names_are_accepted_with_one_warning_each():
    old = {
        "lr": 1e-3,
        "adam_betas": [0.9, 0.98],
        "adam_eps": 1e-8,
        "keep_last": 3,
        "checkpoint_every": 5,
        "eval_every": 7,
        "log_every": 2,
        "eval_batch": 4,
        "eval_samples": 32,
    }
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        config = parse_config(pretrain_raw({"type": "bert", "preset": "tiny"}, 100, **old))
    t = config.train
    assert (t.learning_rate, t.adam_beta1, t.adam_beta2, t.adam_epsilon) == (1e-3, 0.9, 0.98, 1e-8)
    assert (t.save_total_limit, t.save_steps, t.eval_steps, t.logging_steps) == (3, 5, 7, 2)
    assert (t.per_device_eval_batch_size, t.max_eval_samples) == (4, 32)
    messages = _renamed(record)
    assert len(messages) == len(old)
    assert "train.lr is deprecated, use train.learning_rate" in messages
    assert "train.adam_betas is deprecated, use train.adam_beta1, train.adam_beta2" in messages
    assert "train.keep_last is deprecated, use train.save_total_limit" in messages

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        sft = parse_sft_config(
            {
                "run": {"output_dir": "o"},
                "model": {"path": "base"},
                "data": {"source": "rows.jsonl"},
                "train": {"global_batch": 8, "max_steps": 3},
            }
        )
    assert (sft.model.init_from, sft.data.dataset) == ("base", "rows.jsonl")
    assert sorted(_renamed(record)) == [
        "data.source is deprecated, use data.dataset",
        "model.path is deprecated, use model.init_from",
    ]


def test_an_old_and_a_new_name_together_is_an_error():
    with pytest.raises(HetlmError, match="train.lr and train.learning_rate are the same setting"):
        parse_config(pretrain_raw({"type": "bert"}, 10, lr=1e-3, learning_rate=1e-4))


def test_other_ranks_do_not_repeat_the_warning(monkeypatch):
    for env in ({"RANK": "1"}, {"HETLM_RESTART_COUNT": "0"}):
        with monkeypatch.context() as m:
            for key, value in env.items():
                m.setenv(key, value)
            with warnings.catch_warnings(record=True) as record:
                warnings.simplefilter("always")
                parse_config(pretrain_raw({"type": "bert"}, 10, lr=1e-3))
            assert _renamed(record) == []


def test_the_cli_prints_one_deprecation_line(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text(
        yaml.safe_dump(pretrain_raw({"type": "bert", "preset": "tiny"}, 10, lr=1e-3, keep_last=1)),
        encoding="utf-8",
    )
    result = subprocess.run(
        [sys.executable, "-m", "hetlm.cli", "pretrain", str(path), "--help-config"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [
        "hetlm: warning: train.lr is deprecated, use train.learning_rate",
        "hetlm: warning: train.keep_last is deprecated, use train.save_total_limit",
    ]
    assert "train.learning_rate      0.001" in result.stdout


def test_renamed_flags():
    parser = build_parser()
    with pytest.warns(HetlmWarning, match="--lr is deprecated, use --learning-rate"):
        args = parser.parse_args(["eval", "--model", "m", "--lr", "3e-5"])
    assert args.lr == 3e-5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert parser.parse_args(["eval", "--model", "m", "--learning-rate", "2e-5"]).lr == 2e-5
        args = parser.parse_args(["demo", "domain", "--continue-learning-rate", "5e-5"])
    assert args.continue_lr == 5e-5


def test_plan_takes_model_type_and_preset(tmp_path, capsys):
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text("nodes:\n  - gpus: {model: A100-80GB, count: 2}\n")
    common = ["--global-batch", "8", "--seq-len", "512", "--output", str(tmp_path / "p.yaml")]
    assert main(["plan", str(cluster), "--model-type", "llama", "--preset", "1b", *common]) == 0
    assert "model llama-1b" in capsys.readouterr().out
    with pytest.warns(
        HetlmWarning, match="--model bert-tiny is deprecated, use --model-type bert --preset tiny"
    ):
        assert main(["plan", str(cluster), "--model", "bert-tiny", *common]) == 0
    assert main(["plan", str(cluster), "--model-type", "bert", "--preset", "7b", *common]) == 2
    assert "--preset '7b' is not a bert preset" in capsys.readouterr().err


def test_help_config_lists_the_defaults_and_their_sources(capsys):
    assert main(["pretrain", "--help-config"]) == 0
    out = capsys.readouterr().out
    for needle in (
        "learning_rate: None",
        "lr_scheduler_type: None",
        "warmup_ratio: None",
        "RoBERTa (Liu et al. 2019) Table 9",
        "Llama 2 (Touvron et al. 2023)",
        "BERT (Devlin et al. 2019) App. A.2",
        "cosine_with_min_lr (min 0.1)",
    ):
        assert needle in out, needle
    assert main(["sft", "--help-config"]) == 0
    assert "QLoRA (Dettmers et al. 2023)" in capsys.readouterr().out


def test_the_docs_table_is_the_recipes():
    """docs/CONFIG.md's defaults table has one row per recipe, with the resolved values."""
    doc = (REPO / "docs" / "CONFIG.md").read_text(encoding="utf-8")
    assert "| " + " | ".join(RECIPE_COLUMNS[:-1]) in doc
    for row in recipe_rows():
        cells = recipe_cells(*row)[:-1]
        assert "| " + " | ".join(cells) + " |" in doc, cells


@pytest.mark.parametrize("kind", ["linear", "cosine", "cosine_with_min_lr", "constant_with_warmup"])
def test_schedules_match_transformers_after_the_warmup(kind):
    import torch
    from transformers import get_scheduler

    warmup, total = 5, 40
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    extra = {"scheduler_specific_kwargs": {"min_lr_rate": 0.1}} if kind.endswith("min_lr") else {}
    scheduler = get_scheduler(
        kind, optimizer, num_warmup_steps=warmup, num_training_steps=total, **extra
    )
    for step in range(total + 1):
        if step >= warmup:
            assert math.isclose(
                lr_factor(kind, step, warmup, total, 0.1),
                optimizer.param_groups[0]["lr"],
                abs_tol=1e-9,
            ), step
        else:  # hetlm's warm-up reaches the peak one step earlier: step t runs at (t+1)/warmup
            assert lr_factor(kind, step, warmup, total, 0.1) == (step + 1) / warmup
        optimizer.step()
        scheduler.step()
