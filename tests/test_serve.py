"""Generation, the OpenAI-compatible server (official openai client), and ``hetlm chat --cli``.

The tiny model was instruction-tuned on CHAT_PAIRS (tests/_sft_fixtures.py): its greedy reply
is word for word the trained answer only if serving builds the prompt exactly as training did.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _sft_fixtures import CHAT_PAIRS, tiny_chat_model

from hetlm.chat.messages import Message
from hetlm.errors import HetlmError
from hetlm.serve.generation import ChatEngine, GenerationSettings, load_chat_model

QUESTION, ANSWER = CHAT_PAIRS[1]
GREEDY = GenerationSettings(temperature=0.0, max_new_tokens=48)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_chat_model(tmp_path_factory.getbasetemp() / "sft")


@pytest.fixture(scope="module")
def engine(model_dir) -> ChatEngine:
    return load_chat_model(model_dir, device="cpu")


# ---------------------------------------------------------------- generation


def test_engine_streams_the_trained_reply_with_the_training_template(engine):
    assert engine.template.name == "ja-alpaca"  # from hetlm_template.json beside the model
    for question, answer in CHAT_PAIRS:
        generation = engine.stream([Message("user", question)], GREEDY)
        pieces = list(generation)
        assert "".join(pieces) == answer
        assert len(pieces) > 3  # streamed, not in one piece
        assert generation.finish_reason == "stop"
        assert (
            generation.completion_tokens
            == len(engine.tokenizer(answer, add_special_tokens=False)["input_ids"]) + 1
        )  # + EOS


def test_serving_prompt_is_the_training_prompt_token_for_token(engine):
    from hetlm.chat.templates import resolve_template
    from hetlm.sft.data import Example
    from hetlm.sft.masking import IGNORE_INDEX, SFTTokenizer

    turns = (
        Message("system", "簡潔に答えてください。"),
        Message("user", "こんにちは"),
        Message("assistant", "こんにちは。"),
        Message("user", "富士山の高さは？"),
        Message("assistant", "3776メートルです。"),
    )
    for template in ("ja-alpaca", "ja-chat"):
        engine.template = resolve_template(template, engine.tokenizer)
        try:
            trained = SFTTokenizer(engine.tokenizer, engine.template, max_length=4096)(
                Example(turns)
            )
            response = engine.tokenizer("3776メートルです。", add_special_tokens=False)[
                "input_ids"
            ] + [engine.tokenizer.eos_token_id]
            served = engine.encode(turns[:-1])
        finally:
            engine.template = resolve_template("ja-alpaca", engine.tokenizer)
        assert trained.input_ids == served + response
        assert trained.labels[len(served) :] == response
        assert trained.labels[len(served) - 1] == IGNORE_INDEX


def test_max_new_tokens_and_sampling_settings_are_honoured(engine):
    short = engine.stream([Message("user", QUESTION)], GenerationSettings(0.0, 1.0, 3))
    assert short.text() == engine.tokenizer.decode(
        engine.tokenizer(ANSWER, add_special_tokens=False)["input_ids"][:3]
    )
    assert (short.finish_reason, short.completion_tokens) == ("length", 3)
    sampled = [
        engine.reply([Message("user", QUESTION)], GenerationSettings(2.0, 1.0, 12, seed=seed))[0]
        for seed in (1, 1, 2)
    ]
    assert sampled[0] == sampled[1]  # a seed makes sampling repeatable
    with pytest.raises(HetlmError, match="temperature"):
        GenerationSettings(temperature=3.0)


def test_quantized_loading_without_bitsandbytes_names_the_extra(model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    with pytest.raises(HetlmError, match=r"hetlm\[quant\]"):
        load_chat_model(model_dir, load_in_8bit=True)
    with pytest.raises(HetlmError, match="one of"):
        load_chat_model(model_dir, load_in_8bit=True, load_in_4bit=True)


def test_adapter_is_applied_and_its_template_used(model_dir, tmp_path):
    peft = pytest.importorskip("peft", reason="adapters need peft (hetlm[chat])")
    from transformers import AutoModelForCausalLM

    from hetlm.chat.templates import JA_CHAT, resolve_template, save_template

    model = peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir),
        peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]),
    )
    model.save_pretrained(tmp_path / "adapter")
    save_template(JA_CHAT, tmp_path / "adapter")
    engine = load_chat_model(model_dir, tmp_path / "adapter", device="cpu")
    assert isinstance(engine.model, peft.PeftModel)
    assert engine.template.name == "ja-chat" and engine.name == "adapter"
    ids = engine.encode([Message("user", "こんにちは")])
    assert engine.tokenizer.decode(ids).endswith("ユーザー: こんにちは\nシステム: ")
    # LoRA B starts at zero, so the adapted model is the base: with the base's template it
    # gives the trained answer, through peft's generate.
    engine.template = resolve_template("ja-alpaca", engine.tokenizer)
    assert engine.reply([Message("user", QUESTION)], GREEDY)[0] == ANSWER


# ---------------------------------------------------------------- OpenAI-compatible API


@pytest.fixture(scope="module")
def api(engine):
    pytest.importorskip("fastapi", reason="hetlm serve needs fastapi (hetlm[chat])")
    pytest.importorskip("uvicorn", reason="hetlm serve needs uvicorn (hetlm[chat])")
    from hetlm.serve.openai_api import create_app, start_server

    server = start_server(create_app(engine, model_name="tiny-ja", defaults=GREEDY))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(api):
    openai = pytest.importorskip("openai", reason="the API test uses the openai client")
    return openai.OpenAI(base_url=f"{api.url}/v1", api_key="unused", timeout=30, max_retries=0)


def test_openai_client_lists_the_model(client):
    assert [m.id for m in client.models.list().data] == ["tiny-ja"]
    assert client.models.retrieve("tiny-ja").owned_by == "hetlm"


def test_openai_client_chat_completion(client, engine):
    messages = [{"role": "user", "content": QUESTION}]
    response = client.chat.completions.create(model="tiny-ja", messages=messages, temperature=0)
    choice = response.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == ANSWER
    assert choice.finish_reason == "stop"
    prompt_tokens = len(engine.encode([Message("user", QUESTION)]))
    assert response.usage.prompt_tokens == prompt_tokens
    assert (
        response.usage.completion_tokens
        == len(engine.tokenizer(ANSWER, add_special_tokens=False)["input_ids"]) + 1
    )
    assert response.usage.total_tokens == prompt_tokens + response.usage.completion_tokens
    short = client.chat.completions.create(
        model="tiny-ja", messages=messages, temperature=0, max_tokens=2
    )
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2


def test_openai_client_streaming(client, engine):
    stream = client.chat.completions.create(
        model="tiny-ja",
        messages=[
            {
                "role": "system",
                "content": "以下は、タスクを説明する指示です。要求を適切に満たす応答を書きなさい。",
            },
            {"role": "user", "content": QUESTION},
        ],
        temperature=0,
        top_p=1.0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    content = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    assert "".join(content) == ANSWER and len(content) > 3
    assert chunks[0].choices[0].delta.role == "assistant"
    finishing = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishing[-1] == "stop" and not any(finishing[:-1])
    assert chunks[-1].choices == []  # include_usage: a last chunk with the usage only
    assert (
        chunks[-1].usage.completion_tokens
        == len(engine.tokenizer(ANSWER, add_special_tokens=False)["input_ids"]) + 1
    )


def test_stream_is_server_sent_events_ending_with_done(api):
    import httpx

    body = {
        "model": "tiny-ja",
        "messages": [{"role": "user", "content": QUESTION}],
        "stream": True,
        "temperature": 0,
    }
    with httpx.stream("POST", f"{api.url}/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]" and '"object": "chat.completion.chunk"' in lines[0]


def test_errors_have_openai_shape_and_status(client, api):
    import httpx
    import openai

    user = [{"role": "user", "content": "こんにちは"}]
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=user)
    assert info.value.body["code"] == "model_not_found" and info.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny-ja", messages=user, temperature=2.5)
    assert info.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError, match="only n=1"):
        client.chat.completions.create(model="tiny-ja", messages=user, n=2)
    with pytest.raises(openai.BadRequestError, match="must end with a user message"):
        client.chat.completions.create(
            model="tiny-ja", messages=[*user, {"role": "assistant", "content": "はい"}]
        )
    bad_json = httpx.post(f"{api.url}/v1/chat/completions", content=b"{oops", timeout=10)
    assert (
        bad_json.status_code == 400 and bad_json.json()["error"]["type"] == "invalid_request_error"
    )
    missing = httpx.get(f"{api.url}/v1/nothing", timeout=10)
    assert missing.status_code == 404 and set(missing.json()["error"]) == {
        "message",
        "type",
        "param",
        "code",
    }


# ---------------------------------------------------------------- hetlm chat --cli


def test_cli_chat_answers_a_prompt_from_stdin(model_dir):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "hetlm.cli",
            "chat",
            "--model",
            str(model_dir),
            "--cli",
            "--temperature",
            "0",
            "--device",
            "cpu",
        ],
        input=f"{QUESTION}\n/exit\nこれは読まれない\n",
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{ANSWER}\n"


def test_cli_reports_a_missing_model_in_one_line(tmp_path):
    from hetlm.cli import main

    assert main(["chat", "--model", str(tmp_path), "--cli"]) == 2


def test_serve_command_answers_on_its_port(model_dir):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn", reason="hetlm serve needs uvicorn (hetlm[chat])")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hetlm.cli",
            "serve",
            "--model",
            str(model_dir),
            "--port",
            str(port),
            "--model-name",
            "tiny-ja",
            "--temperature",
            "0",
            "--device",
            "cpu",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        url = f"http://127.0.0.1:{port}/v1"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and server.poll() is None:
            try:
                models = httpx.get(f"{url}/models", timeout=2).json()
                break
            except httpx.TransportError:
                time.sleep(0.2)
        else:
            output = server.stdout.read() if server.poll() is not None else "(still running)"
            pytest.fail(f"hetlm serve did not answer on port {port}: {output}")
        assert models["data"][0]["id"] == "tiny-ja"
        reply = httpx.post(
            f"{url}/chat/completions",
            timeout=30,
            json={"model": "tiny-ja", "messages": [{"role": "user", "content": QUESTION}]},
        ).json()
        assert reply["choices"][0]["message"]["content"] == ANSWER  # --temperature 0 default
    finally:
        server.terminate()
        server.wait(15)
