"""The merged export has what vLLM needs: config, safetensors, tokenizer and a chat template
that renders the conversation as the model was trained (the text template as Jinja)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from _sft_fixtures import tiny_chat_model

from hetlm.chat.messages import Message
from hetlm.chat.prompt import prompt_ids
from hetlm.chat.templates import BUILTIN_TEMPLATES, JA_ALPACA, TextTemplate, save_template
from hetlm.sft.vllm_export import CHAT_TEMPLATE_FILE, chat_template_jinja, vllm_missing

CONVERSATION = (
    Message("system", "簡潔に答えて。"),
    Message("user", "こんにちは"),
    Message("assistant", "こんにちは。"),
    Message("user", "富士山の高さは？"),
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_chat_model(tmp_path_factory.getbasetemp() / "sft")


@pytest.fixture(scope="module")
def merged(model_dir, tmp_path_factory) -> Path:
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from hetlm.cli import main

    model = peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir),
        peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]),
    )
    adapter = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(adapter)
    save_template(JA_ALPACA, adapter)
    output = tmp_path_factory.mktemp("export") / "merged"
    assert (
        main(
            [
                "export",
                "--merge",
                "--base",
                str(model_dir),
                "--adapter",
                str(adapter),
                "--output",
                str(output),
            ]
        )
        == 0
    )
    return output


def test_merged_folder_has_everything_vllm_loads(merged):
    assert vllm_missing(merged) == []
    assert (merged / "config.json").is_file() and list(merged.glob("*.safetensors"))
    assert (merged / "tokenizer.json").is_file() and (merged / "tokenizer_config.json").is_file()


def test_merged_chat_template_renders_the_training_prompt(merged):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged)  # as vLLM loads it
    assert tokenizer.chat_template
    turns = [{"role": m.role, "content": m.content} for m in CONVERSATION]
    rendered = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    segments = JA_ALPACA.segments(CONVERSATION, generation=True)
    expected = tokenizer.bos_token + "".join(
        s.text + (tokenizer.eos_token if s.eos else "") for s in segments
    )
    assert rendered == expected
    # One user turn: the rendered prompt tokenizes (no extra special tokens, as vLLM's chat
    # endpoint does) to exactly the ids hetlm generates from.
    single = [Message("user", "日本の首都はどこですか？")]
    ids = tokenizer(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": single[0].content}],
            tokenize=False,
            add_generation_prompt=True,
        ),
        add_special_tokens=False,
    )["input_ids"]
    assert ids == prompt_ids(single, tokenizer, JA_ALPACA)


@pytest.mark.parametrize(
    "template",
    [
        *BUILTIN_TEMPLATES.values(),
        TextTemplate(
            name="odd",
            system='引用 "x" と \\ バックスラッシュ',
            system_format="<<{system}>>{system}\n",
            user_format="Q\t{content}\n",
            assistant_prefix="A: ",
            turn_separator="\n---\n",
        ),
    ],
)
def test_text_templates_as_jinja_render_the_same_text(model_dir, template):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = chat_template_jinja(template, bos=False)
    for conversation in (
        CONVERSATION,
        CONVERSATION[1:],
        (Message("system", ""), *CONVERSATION[1:]),
    ):
        turns = [{"role": m.role, "content": m.content} for m in conversation]
        rendered = tokenizer.apply_chat_template(turns, tokenize=False)
        expected = "".join(
            s.text + (tokenizer.eos_token if s.eos else "")
            for s in template.segments(conversation, generation=True)
        )
        assert rendered == expected


def test_a_folder_without_chat_template_is_reported(merged, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(merged, copy)
    (copy / CHAT_TEMPLATE_FILE).unlink(missing_ok=True)
    config = copy / "tokenizer_config.json"
    data = json.loads(config.read_text(encoding="utf-8"))
    data.pop("chat_template", None)
    config.write_text(json.dumps(data), encoding="utf-8")
    for weights in copy.glob("*.safetensors"):
        weights.unlink()
    missing = vllm_missing(copy)
    assert any("chat template" in m for m in missing)
    assert "safetensors weights" in missing
