"""``hetlm pretrain`` from the command line: two emulated nodes, artifacts, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from conftest import tiny_config

from hetlm.cli import main


def _write(tmp_path, config: dict, name="run.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


def test_two_emulated_nodes_train_and_save_a_transformers_model(tiny_packed, tmp_path):
    config = tiny_config(
        tiny_packed,
        tmp_path / "run",
        max_steps=8,
        micro_batch={"per_node": [3, 5]},
        save_steps=4,
        eval_steps=4,
    )
    path = _write(tmp_path, config)
    result = subprocess.run(
        [sys.executable, "-m", "hetlm.cli", "pretrain", str(path), "--local-nodes", "2"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "held-out MLM" in result.stdout and "rank 1" in result.stdout
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "event" not in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    assert all(len(r["tokens_per_s_per_rank"]) == 2 for r in steps)
    start = next(r for r in records if r.get("event") == "start")
    assert start["shares"] == [3, 5] and start["world_size"] == 2
    assert (run / "loss.png").stat().st_size > 1000
    assert any((run / "tensorboard").iterdir())

    from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline

    model = AutoModelForMaskedLM.from_pretrained(run / "model")
    tokenizer = AutoTokenizer.from_pretrained(run / "model")
    assert model.config.vocab_size == len(tokenizer)
    encoded = tokenizer("吾輩は猫である。", "名前はまだ無い。")
    assert "token_type_ids" in encoded and 1 in encoded["token_type_ids"]
    fill = pipeline("fill-mask", model=str(run / "model"), device="cpu")
    predictions = fill(f"吾輩は{tokenizer.mask_token}である。", top_k=3)
    assert len(predictions) == 3 and all("token_str" in p for p in predictions)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c["train"].update(lr_rate=1), "train.lr_rate: unknown key"),
        (
            lambda c: c["train"].update(global_batch=10, micro_batch={"per_node": [3, 5]}),
            "cannot make the global batch 10",
        ),
        (
            lambda c: c["train"].update(micro_batch={"per_node": [2, 3, 3]}),
            "per_node has 3 entries but 2 nodes",
        ),
        (lambda c: c["data"].update(dataset="/nonexistent/data"), "/nonexistent/data"),
        (lambda c: c["train"].update(max_steps=-1), "train.max_steps"),
        (
            lambda c: c["train"].update(engine="ddp", zero_stage=2),
            "engine ddp cannot run ZeRO stage 2",
        ),
        (
            lambda c: c["train"].update(engine="fsdp2", grad_compression="bf16"),
            "grad_compression applies to the ddp and zero1 engines only",
        ),
    ],
)
def test_bad_config_is_one_line_error_before_launch(change, message, tiny_packed, tmp_path, capsys):
    config = tiny_config(tiny_packed, tmp_path / "run", micro_batch={"per_node": [3, 5]})
    change(config)
    code = main(["pretrain", str(_write(tmp_path, config)), "--local-nodes", "2"])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # nothing started


def test_malformed_yaml_names_the_line(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("run:\n  output_dir: x\ntrain: [unclosed\n")
    assert main(["pretrain", str(path)]) == 2
    assert "line" in capsys.readouterr().err


def test_topology_mismatch_under_torchrun(tiny_packed, tmp_path):
    config = tiny_config(tiny_packed, tmp_path / "run", micro_batch={"per_rank": [3, 2, 3]})
    path = _write(tmp_path, config)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node=2",
            "-m",
            "hetlm.cli",
            "pretrain",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "per_rank has 3 entries but 2 ranks were launched" in result.stderr


def test_help_config_lists_every_key_with_each_commands_defaults(capsys):
    assert main(["pretrain", "--help-config"]) == 0
    pretrain = capsys.readouterr().out
    assert "  init_from: None" in pretrain and "  mlm_probability: None" in pretrain
    assert main(["sft", "--help-config"]) == 0
    sft = capsys.readouterr().out
    assert "lora:" in sft and "mlm_probability" not in sft and "(LoRA)" in sft
