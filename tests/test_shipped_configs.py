"""The configs in configs/: every one validates, the `hetlm plan` lines in their comments work,
and each CPU-sized variant trains 2 steps on data prepared once for this module."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch
import yaml
from _data_fixtures import (  # noqa: F401 - fixtures
    aozora_slice,
    mecab_tokenizer,
    trained_tokenizer,
)

from hetlm.cli import main
from hetlm.config import parse_config
from hetlm.sft.config import parse_sft_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
RUN_CONFIGS = sorted(CONFIGS.glob("*.yaml")) + sorted((CONFIGS / "cpu").glob("*.yaml"))
CLUSTERS = sorted((CONFIGS / "clusters").glob("*.yaml"))
CHABSA = REPO / "data" / "finance_chabsa" / "chabsa_annotations.jsonl"
DOLLY = REPO / "data" / "instruct_dolly_ja" / "databricks-dolly-15k-ja_v0_every3rd.jsonl"


def load(path: Path):
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    return parse_sft_config(raw, str(path)) if "lora" in raw else parse_config(raw, str(path))


def test_the_shipped_configs_exist():
    names = {p.stem for p in RUN_CONFIGS}
    assert {
        "bert-base-finance-scratch",
        "bert-base-finance-continued",
        "deberta-v2-base-sentencepiece",
        "llama-13b-lora",
        "llama-7b-qlora-24gb",
        "llama-1b-lora-24gb",
        "bert-tiny-finance-scratch",
        "bert-tiny-finance-continued",
        "deberta-v2-tiny-sentencepiece",
        "llama-tiny-lora",
    } <= names
    assert len(CLUSTERS) >= 3


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_validates_with_current_names(path, recwarn):
    config = load(path)
    assert config.train.learning_rate is not None and config.train.warmup_steps is not None
    assert not [w for w in recwarn if "deprecated" in str(w.message)], "uses an old name"
    if path.parent == CONFIGS and "lora" not in path.read_text(encoding="utf-8"):
        assert config.train.global_batch == 256  # the reference work's batch


@pytest.mark.parametrize("path", CLUSTERS, ids=lambda p: p.stem)
def test_every_cluster_file_loads(path):
    from hetlm.cluster.spec import load_cluster

    assert load_cluster(path).nodes


def plan_lines() -> list[tuple[str, str]]:
    lines = []
    for path in RUN_CONFIGS:
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.lstrip("# ").startswith("hetlm plan "):
                lines.append((path.stem, line.lstrip("# ")))
    return lines


@pytest.mark.parametrize(("name", "line"), plan_lines(), ids=[n for n, _ in plan_lines()])
def test_the_documented_plan_commands_work(name, line, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)  # the commands are written for the repository root
    args = shlex.split(line)[1:]
    args[args.index("--output") + 1] = str(tmp_path / "plan.yaml")
    assert main(args) == 0, capsys.readouterr().err
    assert (tmp_path / "plan.yaml").is_file()


@pytest.fixture(scope="module")
def cpu_data(tmp_path_factory, aozora_slice, mecab_tokenizer, trained_tokenizer):  # noqa: F811
    """The inputs the CPU configs' comments make, small: general (a slice of Aozora) + finance
    (chABSA sentences) packed with MeCab+WordPiece and with SentencePiece, finance alone, and
    200 dolly-ja rows."""
    from hetlm.data.prepare.pipeline import prepare_dataset

    root = tmp_path_factory.mktemp("cpu_configs")
    finance = root / "finance.jsonl"
    with CHABSA.open(encoding="utf-8") as src, finance.open("w", encoding="utf-8") as out:
        for _, line in zip(range(60), src, strict=False):
            text = "".join(s["sentence"] for s in json.loads(line)["sentences"])
            out.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    dolly = root / "dolly.jsonl"
    with DOLLY.open(encoding="utf-8") as src:
        dolly.write_text(
            "".join(line for _, line in zip(range(200), src, strict=False)), encoding="utf-8"
        )
    data = {"tok-mecab": mecab_tokenizer, "tok-sp": trained_tokenizer, "dolly": dolly}
    for name, inputs, tokenizer in (
        ("general-finance-mecab", [aozora_slice, finance], mecab_tokenizer),
        ("finance-mecab", [finance], mecab_tokenizer),
        ("general-finance-sp", [aozora_slice, finance], trained_tokenizer),
    ):
        prepare_dataset(
            inputs, tokenizer, root / name, seq_len=64, validation_fraction=0.05, workers=1
        )
        data[name] = root / name
    return data


def two_steps(path: Path, output_dir: Path, **replace) -> dict:
    """The CPU config at ``path`` with its inputs replaced and 2 steps, run in this process."""
    from hetlm.sft.train import run_sft
    from hetlm.train.pretrain import run_pretraining

    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    raw["run"]["output_dir"] = str(output_dir)
    for key, value in replace.items():
        section, name = key.split(".")
        raw[section][name] = str(value)
    raw["train"].update(max_steps=2, save_steps=0, eval_steps=0, max_eval_samples=8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: more threads only contend
    try:
        if "lora" in raw:
            return run_sft(parse_sft_config(raw, str(path)))
        return run_pretraining(parse_config(raw, str(path)))
    finally:
        torch.set_num_threads(threads)


def test_each_cpu_config_runs_two_steps(cpu_data, tmp_path):
    cpu = CONFIGS / "cpu"
    scratch = two_steps(
        cpu / "bert-tiny-finance-scratch.yaml",
        tmp_path / "scratch",
        **{"data.dataset": cpu_data["general-finance-mecab"]},
    )
    continued = two_steps(
        cpu / "bert-tiny-finance-continued.yaml",
        tmp_path / "continued",
        **{"data.dataset": cpu_data["finance-mecab"], "model.init_from": scratch["model_dir"]},
    )
    deberta = two_steps(
        cpu / "deberta-v2-tiny-sentencepiece.yaml",
        tmp_path / "deberta",
        **{"data.dataset": cpu_data["general-finance-sp"]},
    )
    lora = two_steps(
        cpu / "llama-tiny-lora.yaml",
        tmp_path / "lora",
        **{"data.dataset": cpu_data["dolly"], "model.tokenizer": cpu_data["tok-sp"]},
    )
    for summary in (scratch, continued, deberta, lora):
        assert summary["steps"] == 2 and torch.isfinite(torch.tensor(summary["loss_last"]))
    assert Path(scratch["model_dir"], "config.json").is_file()
    assert Path(tmp_path / "lora" / "adapter" / "adapter_model.safetensors").is_file()
