"""Instruction data, templates, response-only masking, truncation, collator, LoRA export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _sft_fixtures import build_model, dolly_rows, tiny_chat_model

from hetlm.chat.messages import Message
from hetlm.chat.prompt import prompt_ids
from hetlm.chat.templates import (
    JA_ALPACA,
    JA_CHAT,
    ChatTemplate,
    TextTemplate,
    load_saved_template,
    resolve_template,
    save_template,
)
from hetlm.errors import HetlmError
from hetlm.sft.collator import (
    SFTCollator,
    order_by_length,
    padded_tokens,
    summed_next_token_loss,
)
from hetlm.sft.data import Example, in_validation, load_examples, split_validation
from hetlm.sft.masking import IGNORE_INDEX, SFTTokenizer, tokenize_examples

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_chat_model(tmp_path_factory.getbasetemp() / "sft")


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture
def chatml_tokenizer(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    return tok


def write_jsonl(path: Path, rows: list) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)) + "\n")
    return path


def dolly_examples(count: int, start: int = 0) -> list[Example]:
    return [
        Example(
            (Message("user", r["instruction"]), Message("assistant", r["output"])),
            context=r["input"],
            index=i,
            source=f"dolly:{i}",
        )
        for i, r in enumerate(dolly_rows(count, start))
    ]


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------- reading data


def test_reads_instruction_and_chat_rows(tmp_path):
    rows = dolly_rows(3) + [
        {
            "messages": [
                {"role": "system", "content": "丁寧に答える。"},
                {"role": "user", "content": "こんにちは"},
                {"role": "assistant", "content": "こんにちは。"},
                {"role": "user", "content": "元気？"},
                {"role": "assistant", "content": "元気です。"},
            ]
        },
        {"instruction": "翻訳して", "context": "cat", "response": "猫"},  # English dolly names
    ]
    examples = load_examples(write_jsonl(tmp_path / "data.jsonl", rows))
    assert [e.index for e in examples] == [0, 1, 2, 3, 4]
    first = examples[0]
    assert first.messages == (
        Message("user", rows[0]["instruction"]),
        Message("assistant", rows[0]["output"]),
    )
    assert first.context == rows[0]["input"] and first.source.endswith("data.jsonl:1")
    assert [m.role for m in examples[3].messages] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
    ]
    assert examples[4].context == "cat" and examples[4].response == "猫"


def test_bad_rows_are_reported_with_file_and_line(tmp_path):
    good = {"instruction": "質問", "input": "", "output": "答え"}
    path = write_jsonl(
        tmp_path / "data.jsonl",
        [
            good,
            {"instruction": "質問", "input": ""},  # 2: no output
            {"instruction": "質問", "input": "", "output": "  "},  # 3: empty output
            "{not json",  # 4
            "",  # 5: blank, ignored
            {
                "messages": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]
            },  # 6: bad role
            {"messages": [{"role": "user", "content": "x"}]},  # 7: no response
            {"text": "pretraining row"},  # 8: neither shape
            good,
        ],
    )
    with pytest.raises(HetlmError) as info:
        load_examples(path)
    message = str(info.value)
    assert "\n" not in message  # the CLI prints it as one line
    assert "6 problems" in message and "2 good rows" in message
    for expected in (
        "data.jsonl:2: missing field 'output'",
        "data.jsonl:3: field 'output' is empty",
        "data.jsonl:4: invalid JSON",
        "data.jsonl:6: messages[1].role 'bot' is not one of system/user/assistant",
        "data.jsonl:7: messages must end with an assistant message",
        "data.jsonl:8: neither a 'messages' list nor an 'instruction' field",
    ):
        assert expected in message


def test_datasets_loader_gives_the_same_examples(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", dolly_rows(20))
    local = load_examples(path)
    via_datasets = load_examples("json", data_files=str(path))
    assert [(e.messages, e.context) for e in via_datasets] == [
        (e.messages, e.context) for e in local
    ]
    assert via_datasets[3].source == "json[train]:row 3"
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "q", "input": "", "output": ""}])
    with pytest.raises(HetlmError, match=r"json\[train\]:row 0: field 'output' is empty"):
        load_examples("json", data_files=str(bad))


def test_reads_a_json_array_file_like_alpaca_data_json(tmp_path):
    rows = dolly_rows(3)
    (tmp_path / "alpaca_data.json").write_text(
        json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8"
    )
    examples = load_examples(tmp_path / "alpaca_data.json")
    assert [e.response for e in examples] == [r["output"] for r in rows]
    assert examples[2].source.endswith("alpaca_data.json:item 2")


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(HetlmError, match="does not exist"):
        load_examples(tmp_path / "nope.jsonl")


def test_validation_split_is_a_pure_function_of_index_and_seed():
    examples = dolly_examples(400)
    train, validation = split_validation(examples, 0.1, seed=3)
    assert len(train) + len(validation) == 400 and 20 <= len(validation) <= 60
    assert not {e.index for e in train} & {e.index for e in validation}
    # The first 100 examples split the same way alone: membership depends on (seed, index) only.
    _, validation_prefix = split_validation(examples[:100], 0.1, seed=3)
    assert [e.index for e in validation_prefix] == [e.index for e in validation if e.index < 100]
    assert all(in_validation(e.index, 0.1, 3) for e in validation)
    _, other_seed = split_validation(examples, 0.1, seed=4)
    assert {e.index for e in other_seed} != {e.index for e in validation}


# ---------------------------------------------------------------- templates


def test_ja_alpaca_renders_the_japanese_instruction_format():
    with_input = JA_ALPACA.segments(
        (Message("user", "要約して"), Message("assistant", "要約")), "本文"
    )
    assert [s.text for s in with_input] == [
        "以下は、タスクを説明する指示と、文脈のある入力の組み合わせです。要求を適切に満たす応答を"
        "書きなさい。\n\n### 指示:\n要約して\n\n### 入力:\n本文\n\n### 応答:\n",
        "要約",
    ]
    assert [(s.response, s.eos) for s in with_input] == [(False, False), (True, True)]
    plain = JA_ALPACA.segments((Message("user", "質問"),), generation=True)
    assert plain[0].text.startswith("以下は、タスクを説明する指示です。要求を適切に満たす応答を")
    assert plain[-1].text.endswith("### 指示:\n質問\n\n### 応答:\n")


def test_template_from_file_and_saved_record(tmp_path, tokenizer, chatml_tokenizer):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"user_format": "Q: {content}\n", "assistant_prefix": "A: "}))
    mine = resolve_template(path, tokenizer)
    assert isinstance(mine, TextTemplate) and mine.name == "mine"
    assert (
        "".join(s.text for s in mine.segments((Message("user", "x"),), generation=True))
        == "Q: x\nA: "
    )
    (tmp_path / "bad.json").write_text(json.dumps({"usr_format": "{content}"}))
    with pytest.raises(HetlmError, match="unknown template keys"):
        resolve_template(tmp_path / "bad.json", tokenizer)
    assert resolve_template("auto", tokenizer) is JA_ALPACA
    assert isinstance(resolve_template("auto", chatml_tokenizer), ChatTemplate)
    assert resolve_template("ja-chat", tokenizer) is JA_CHAT
    with pytest.raises(HetlmError, match="no chat_template"):
        resolve_template("chat", tokenizer)
    save_template(mine, tmp_path)
    assert load_saved_template(tmp_path, tokenizer) == mine


# ---------------------------------------------------------------- response-only loss


@pytest.mark.parametrize("template_name", ["ja-alpaca", "ja-chat"])
def test_exactly_the_prompt_tokens_are_masked(tokenizer, template_name):
    template = resolve_template(template_name, tokenizer)
    sft = SFTTokenizer(tokenizer, template, max_length=100_000)
    for example in dolly_examples(60):
        tokenized = sft(example)
        # The prompt, built independently as generation builds it, then the response + EOS.
        prompt = prompt_ids(example.messages[:-1], tokenizer, template, context=example.context)
        response = ids_of(tokenizer, example.response) + [tokenizer.eos_token_id]
        assert tokenized.input_ids == prompt + response
        assert tokenized.labels == [IGNORE_INDEX] * len(prompt) + response
        assert tokenized.num_targets == len(response)
        assert prompt[0] == tokenizer.bos_token_id  # the tokenizer adds BOS, so templates do
    assert sft.stats.target_tokens == sum(sft(e).num_targets for e in dolly_examples(60))


def test_train_on_prompt_labels_every_predicted_token(tokenizer):
    (tokenized,), _ = tokenize_examples(
        dolly_examples(1), tokenizer, JA_ALPACA, max_length=4096, train_on_prompt=True
    )
    assert tokenized.labels[0] == IGNORE_INDEX  # never predicted: nothing comes before it
    assert tokenized.labels[1:] == tokenized.input_ids[1:]


def test_chat_template_masks_every_assistant_turn(chatml_tokenizer):
    tok = chatml_tokenizer
    example = Example(
        (
            Message("system", "丁寧に"),
            Message("user", "こんにちは"),
            Message("assistant", "こんにちは。"),
            Message("user", "元気？"),
            Message("assistant", "元気です。"),
        )
    )
    template = resolve_template("auto", tok)
    tokenized = SFTTokenizer(tok, template, max_length=4096)(example)
    runs, current = [], []
    for token, label in zip(tokenized.input_ids, tokenized.labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    runs.append(current)
    assert [tok.decode(r) for r in runs] == [
        "こんにちは。<|im_end|>\n</s>",
        "元気です。<|im_end|>\n</s>",
    ]
    # The segments, tokenized apart and joined, are the template's own rendering, token-exact.
    rendered = tok.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in example.messages], tokenize=False
    )
    assert tok.decode(tokenized.input_ids).replace("</s>", "") == rendered
    generation = prompt_ids(example.messages[:3], tok, template)
    assert tok.decode(generation).endswith("<|im_start|>assistant\n")


def test_chat_template_that_rewrites_history_is_refused(chatml_tokenizer):
    chatml_tokenizer.chat_template = (
        "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
        "{% if not add_generation_prompt %}<END>{% endif %}"
    )
    example = Example(
        (
            Message("user", "a"),
            Message("assistant", "b"),
            Message("user", "c"),
            Message("assistant", "d"),
        )
    )
    with pytest.raises(HetlmError, match="does not render a conversation as an extension"):
        SFTTokenizer(chatml_tokenizer, ChatTemplate(chatml_tokenizer), max_length=512)(example)


# ---------------------------------------------------------------- truncation


def test_truncation_never_drops_response_tokens_silently(tokenizer):
    examples = dolly_examples(300)
    for truncation in ("left", "middle"):
        for max_length in (48, 96, 200):
            kept, stats = tokenize_examples(
                examples, tokenizer, JA_ALPACA, max_length=max_length, truncation=truncation
            )
            full = {
                e.index: SFTTokenizer(tokenizer, JA_ALPACA, max_length=10**6)(e) for e in examples
            }
            assert stats.kept == len(kept) and stats.kept + stats.dropped == len(examples)
            for t in kept:
                whole = full[t.index]
                response = ids_of(tokenizer, examples[t.index].response) + [tokenizer.eos_token_id]
                assert len(t) <= max_length
                assert t.input_ids[-len(response) :] == response
                assert t.labels[-len(response) :] == response
                assert t.num_targets == len(response)
                assert t.input_ids[0] == tokenizer.bos_token_id
                if len(whole) <= max_length:
                    assert t == whole
            dropped = {e.index for e in examples} - {t.index for t in kept}
            for index in dropped:  # dropped only when the response (+ EOS + 1 token) is too long
                response = ids_of(tokenizer, examples[index].response)
                assert len(response) + 1 + 1 > max_length
            assert stats.dropped == len(dropped)
            assert stats.truncated == sum(len(full[t.index]) > max_length for t in kept)
            assert stats.prompt_tokens_removed == sum(len(full[t.index]) - len(t) for t in kept)
            assert stats.target_tokens == sum(t.num_targets for t in kept)
    assert "dropped because the response did not fit in 200 tokens" in stats.summary()


def test_left_and_middle_truncation_keep_the_right_prompt_tokens(tokenizer):
    (example,) = [e for e in dolly_examples(30) if len(e.context) > 400][:1]
    whole = SFTTokenizer(tokenizer, JA_ALPACA, max_length=10**6)(example)
    response_len = whole.num_targets
    max_length = response_len + 40
    left = SFTTokenizer(tokenizer, JA_ALPACA, max_length=max_length, truncation="left")(example)
    middle = SFTTokenizer(tokenizer, JA_ALPACA, max_length=max_length, truncation="middle")(example)
    prompt_end = len(whole) - response_len
    # left: BOS, then the last 39 prompt tokens (the end of the input and "### 応答:\n").
    assert (
        left.input_ids[:-response_len]
        == [tokenizer.bos_token_id] + whole.input_ids[prompt_end - 39 : prompt_end]
    )
    # middle: the first 20 prompt tokens (BOS + preamble) and the last 20.
    assert (
        middle.input_ids[:-response_len]
        == whole.input_ids[:20] + whole.input_ids[prompt_end - 20 : prompt_end]
    )


def test_multi_turn_truncation_counts_earlier_response_tokens(tokenizer):
    long_answer = "東京は日本の首都で、人口が多い都市です。" * 8
    example = Example(
        (
            Message("user", "東京について"),
            Message("assistant", long_answer),
            Message("user", "ありがとう"),
            Message("assistant", "どういたしまして。"),
        )
    )
    whole = SFTTokenizer(tokenizer, JA_ALPACA, max_length=10**6)(example)
    first_prompt = len(prompt_ids(example.messages[:1], tokenizer, JA_ALPACA))
    removed = first_prompt - 1 + 10  # all of the first prompt but BOS, 10 tokens of the answer
    sft = SFTTokenizer(tokenizer, JA_ALPACA, max_length=len(whole) - removed)
    cut = sft(example)
    assert sft.stats.truncated == 1
    assert sft.stats.prompt_tokens_removed == first_prompt - 1
    assert sft.stats.earlier_response_tokens_removed == 10
    assert cut.num_targets == whole.num_targets - sft.stats.earlier_response_tokens_removed
    assert "earlier assistant turns removed" in sft.stats.summary()


# ---------------------------------------------------------------- collator and loss


def test_collator_pads_and_counts_targets(tokenizer):
    kept, _ = tokenize_examples(dolly_examples(5), tokenizer, JA_ALPACA, max_length=512)
    batch = SFTCollator(tokenizer.pad_token_id, pad_to_multiple_of=8)(kept)
    assert batch.input_ids.shape[1] % 8 == 0 and batch.input_ids.shape[1] >= max(map(len, kept))
    for row, t in enumerate(kept):
        n = len(t)
        assert batch.input_ids[row, :n].tolist() == t.input_ids
        assert batch.labels[row, :n].tolist() == t.labels
        assert (batch.labels[row, n:] == IGNORE_INDEX).all()
        assert (batch.input_ids[row, n:] == tokenizer.pad_token_id).all()
        assert batch.attention_mask[row].sum() == n
    assert batch.num_targets == sum(t.num_targets for t in kept)
    assert batch.num_tokens == sum(map(len, kept)) and batch.indices == [0, 1, 2, 3, 4]


def test_summed_loss_is_a_sum_over_response_tokens_independent_of_padding(tokenizer):
    model = build_model(tokenizer).eval()
    kept, _ = tokenize_examples(dolly_examples(4), tokenizer, JA_ALPACA, max_length=256)
    collate = SFTCollator(tokenizer.pad_token_id)
    with torch.no_grad():
        batch = collate(kept)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        total = summed_next_token_loss(logits, batch.labels)
        alone = []
        for t in kept:
            one = collate([t])
            one_logits = model(input_ids=one.input_ids).logits
            alone.append(summed_next_token_loss(one_logits, one.labels))
        # The same as the library's mean over the same tokens, times their number.
        mean = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch.labels[:, 1:].reshape(-1)
        )
    assert torch.allclose(total, sum(alone), rtol=1e-5)
    assert torch.allclose(total, mean * batch.num_targets, rtol=1e-5)


def test_length_grouping_is_deterministic_and_reduces_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 500, size=1000)
    batch = rng.choice(1000, size=64, replace=False)
    ordered = order_by_length(batch, lengths)
    assert sorted(ordered.tolist()) == sorted(batch.tolist())  # same examples
    assert (np.diff(lengths[ordered]) <= 0).all()  # longest first
    assert order_by_length(batch[::-1], lengths).tolist() == ordered.tolist()  # pure
    micro = [ordered[i : i + 8] for i in range(0, 64, 8)]
    unordered = [batch[i : i + 8] for i in range(0, 64, 8)]
    assert padded_tokens(micro, lengths) < 0.8 * padded_tokens(unordered, lengths)


# ---------------------------------------------------------------- LoRA adapters and export


IDS = torch.randint(3, 1000, (2, 24), generator=torch.Generator().manual_seed(0))


def _logits(model, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def lora_adapter(model_dir, tmp_path_factory) -> tuple[Path, torch.Tensor]:
    """A LoRA adapter on every attention and MLP projection with random (non-zero) B, saved;
    and the logits of the in-memory adapted model."""
    peft = pytest.importorskip("peft", reason="the LoRA tests need peft (hetlm[chat])")
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        init_lora_weights=False,
        task_type="CAUSAL_LM",
        target_modules=[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
    )
    torch.manual_seed(1)
    model = peft.get_peft_model(base, config).eval()
    out = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(out)
    save_template(JA_ALPACA, out)
    return out, _logits(model)


def test_lora_adapter_saved_loads_in_plain_peft_with_the_same_logits(model_dir, lora_adapter):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    adapter_dir, trained_logits = lora_adapter
    assert (adapter_dir / "adapter_model.safetensors").is_file()
    base_logits = _logits(AutoModelForCausalLM.from_pretrained(model_dir))
    assert (trained_logits - base_logits).abs().max() > 1e-2  # the adapter matters
    loaded = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(model_dir), adapter_dir
    )
    torch.testing.assert_close(_logits(loaded), trained_logits, atol=1e-6, rtol=1e-6)


def test_merged_export_gives_the_same_logits_without_peft(model_dir, lora_adapter, tmp_path):
    pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from hetlm.cli import main

    adapter_dir, trained_logits = lora_adapter
    merged_dir = tmp_path / "merged"
    assert (
        main(
            [
                "export",
                "--merge",
                "--base",
                str(model_dir),
                "--adapter",
                str(adapter_dir),
                "--output",
                str(merged_dir),
            ]
        )
        == 0
    )
    assert list(merged_dir.glob("*.safetensors")) and (merged_dir / "tokenizer.json").is_file()
    assert (merged_dir / "hetlm_template.json").is_file()
    assert not (merged_dir / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert type(merged).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(_logits(merged), trained_logits, atol=1e-4, rtol=1e-4)
    # An existing output is not overwritten by accident.
    assert (
        main(
            [
                "export",
                "--merge",
                "--base",
                str(model_dir),
                "--adapter",
                str(adapter_dir),
                "--output",
                str(merged_dir),
            ]
        )
        == 2
    )
