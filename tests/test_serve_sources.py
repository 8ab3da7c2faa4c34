"""Where ``hetlm chat``/``serve`` take a model from: hub names (offline, from a fake HF cache),
local-looking paths that must never reach the hub, and masked LMs that cannot chat."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _sft_fixtures import CHAT_PAIRS, build_tokenizer, tiny_chat_model

from hetlm.errors import HetlmError
from hetlm.models.source import looks_local
from hetlm.serve.generation import load_chat_model
from hetlm.serve.model_source import resolve_model_source

QUESTION, ANSWER = CHAT_PAIRS[1]
REVISION = "0123456789abcdef0123456789abcdef01234567"


def fake_hub_cache(hf_home: Path, repo_id: str, folder: Path) -> None:
    """``folder``'s files as the hub cache holds a downloaded repo: HF_HOME/hub/
    models--org--name/snapshots/<rev>/..., with refs/main naming the revision."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / REVISION
    shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)


def run_cli(args: list[str], env: dict[str, str], stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hetlm.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
    )


def test_chat_loads_a_hub_name_offline_from_the_cache(tmp_path_factory, tmp_path):
    model_dir = tiny_chat_model(tmp_path_factory.getbasetemp() / "sft")
    hf_home = tmp_path / "hf-home"
    fake_hub_cache(hf_home, "hetlm-test/tiny-chat-ja", model_dir)
    # HF_HUB_CACHE too, in case the calling environment sets it (it overrides HF_HOME).
    env = {"HF_HOME": str(hf_home), "HF_HUB_CACHE": str(hf_home / "hub"), "HF_HUB_OFFLINE": "1"}
    result = run_cli(
        [
            "chat",
            "--model",
            "hetlm-test/tiny-chat-ja",
            "--cli",
            "--temperature",
            "0",
            "--device",
            "cpu",
        ],
        env,
        stdin=f"{QUESTION}\n/exit\n",
    )
    # The exact answer also shows that the template recorded in the repo was used.
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{ANSWER}\n"
    # A name that is not in the cache: one line saying where it was looked for.
    missing = run_cli(["serve", "--model", "hetlm-test/not-there", "--device", "cpu"], env)
    assert missing.returncode == 2
    lines = missing.stderr.strip().splitlines()
    assert len(lines) == 1 and "hetlm-test/not-there" in lines[0]
    assert "HF_HUB_OFFLINE" in lines[0] and "Traceback" not in missing.stderr


@pytest.mark.parametrize(
    "spec",
    [
        "runs/sft-typo/model",
        "./nothing-here",
        "../nothing-here",
        "/no/such/model/dir",
        "~/no-such-hetlm-model",
        "existing-parent/typo",
        "a/b/c",
    ],
)
def test_a_missing_local_looking_path_never_goes_to_the_hub(spec, tmp_path, monkeypatch, capsys):
    import huggingface_hub
    import transformers

    from hetlm.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "existing-parent").mkdir()
    asked: list[str] = []

    def no_hub(*args, **kwargs):
        asked.append(str(args[:1]))
        raise AssertionError("went to the hub")

    for owner, attr in (
        (transformers.AutoConfig, "from_pretrained"),
        (transformers.AutoTokenizer, "from_pretrained"),
        (transformers.AutoModelForCausalLM, "from_pretrained"),
        (huggingface_hub, "hf_hub_download"),
    ):
        monkeypatch.setattr(owner, attr, no_hub)
    assert looks_local(spec)
    for command in ("chat", "serve"):
        args = [command, "--model", spec, "--device", "cpu"] + (
            ["--cli"] if command == "chat" else []
        )
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "no such folder" in err and spec in err, err
    assert asked == []


def test_hub_ids_are_not_local_looking(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("rinna/japanese-gpt2-small", "gpt2", "cyberagent/open-calm-small"):
        assert not looks_local(name)
        source = resolve_model_source(name)
        assert (source.location, source.local) == (name, False)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    from transformers import BertConfig, BertForMaskedLM

    directory = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = build_tokenizer(directory)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
    )
    BertForMaskedLM(config).save_pretrained(directory)
    return directory


def test_a_masked_lm_is_refused_as_not_a_causal_lm(bert_dir, capsys):
    from hetlm.cli import main

    with pytest.raises(
        HetlmError,
        match=r"this is a masked LM \(BertForMaskedLM\), not a "
        r"causal LM: ",
    ):
        load_chat_model(bert_dir, device="cpu")
    for command in (["chat", "--cli"], ["serve"]):
        assert main([*command, "--model", str(bert_dir), "--device", "cpu"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1
        assert "this is a masked LM (BertForMaskedLM), not a causal LM" in err
        assert "end-of-sequence" not in err
