"""Concurrent requests served together, /v1/completions and /health (official openai client).

The tiny model answers CHAT_PAIRS word for word (greedy), so a batched reply is checked
exactly; for prompts it never saw, the batched greedy reply is checked against the same engine
answering one request at a time.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from _sft_fixtures import CHAT_PAIRS, dolly_rows, tiny_chat_model

from hetlm.chat.messages import Message
from hetlm.serve.generation import ChatEngine, GenerationSettings, load_chat_model

GREEDY = GenerationSettings(temperature=0.0, max_new_tokens=48)
pytest.importorskip("fastapi", reason="hetlm serve needs fastapi (hetlm[chat])")
pytest.importorskip("uvicorn", reason="hetlm serve needs uvicorn (hetlm[chat])")
openai = pytest.importorskip("openai", reason="the API tests use the openai client")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_chat_model(tmp_path_factory.getbasetemp() / "sft")


@pytest.fixture(scope="module")
def engine(model_dir) -> ChatEngine:
    # A long collection window, so that requests sent together surely share a batch.
    return load_chat_model(model_dir, device="cpu", max_batch=8, max_queue=16, batch_wait=0.5)


@pytest.fixture(scope="module")
def api(engine):
    from hetlm.serve.openai_api import create_app, start_server

    server = start_server(create_app(engine, model_name="tiny-ja", defaults=GREEDY))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(api):
    return openai.OpenAI(base_url=f"{api.url}/v1", api_key="unused", timeout=60, max_retries=0)


def prompt_text(engine: ChatEngine, question: str) -> str:
    """The chat prompt as plain text (without the BOS that the tokenizer adds again)."""
    ids = engine.encode([Message("user", question)])
    return engine.tokenizer.decode(ids[1:])


def test_concurrent_chat_requests_are_batched_and_answered_exactly(client, engine, model_dir):
    unseen = [row["instruction"] for row in dolly_rows(5, start=500)]
    questions = [q for q, _ in CHAT_PAIRS] + unseen  # 8 requests
    sequential = load_chat_model(model_dir, device="cpu", max_batch=1)
    expected = [
        sequential.reply([Message("user", q)], GenerationSettings(0.0, 1.0, 24))[0]
        for q in questions
    ]
    assert expected[:3] == [a for _, a in CHAT_PAIRS]
    assert list(sequential.scheduler.batch_sizes) == [1] * len(questions)
    before = len(engine.scheduler.batch_sizes)

    def ask(question: str) -> tuple[str, str]:
        reply = client.chat.completions.create(
            model="tiny-ja",
            messages=[{"role": "user", "content": question}],
            temperature=0,
            max_tokens=24,
        )
        return reply.choices[0].message.content, reply.choices[0].finish_reason

    with ThreadPoolExecutor(len(questions)) as pool:
        answers = list(pool.map(ask, questions))
    assert [text for text, _ in answers] == expected
    assert [reason for _, reason in answers[:3]] == ["stop"] * 3
    batches = list(engine.scheduler.batch_sizes)[before:]
    assert sum(batches) == len(questions) and max(batches) > 1, batches


def test_rows_of_one_batch_keep_their_own_settings(engine):
    """Greedy next to sampled, different max_new_tokens and a stop string, in one batch."""
    question, answer = CHAT_PAIRS[1]
    ids = engine.encode([Message("user", question)])
    before = len(engine.scheduler.batch_sizes)
    rows = [
        engine.stream(ids=ids, settings=s)
        for s in (
            GenerationSettings(0.0, 1.0, 48),
            GenerationSettings(1.5, 0.9, 48),
            GenerationSettings(0.0, 1.0, 3),
            GenerationSettings(0.0, 1.0, 48, stop=("東京",)),
        )
    ]
    texts = [row.text() for row in rows]
    assert list(engine.scheduler.batch_sizes)[before:] == [4]
    assert texts[0] == answer and rows[0].finish_reason == "stop"
    tokens = engine.tokenizer(answer, add_special_tokens=False)["input_ids"]
    assert texts[2] == engine.tokenizer.decode(tokens[:3]) and rows[2].finish_reason == "length"
    assert texts[3] == answer[: answer.index("東京")] and rows[3].finish_reason == "stop"
    assert rows[1].completion_tokens >= 1


def test_completions_endpoint_with_a_prompt_list_stop_and_stream(client, engine):
    prompts = [prompt_text(engine, q) for q, _ in CHAT_PAIRS[:2]]
    reply = client.completions.create(model="tiny-ja", prompt=prompts, temperature=0, max_tokens=48)
    assert reply.object == "text_completion"
    assert [c.text for c in reply.choices] == [a for _, a in CHAT_PAIRS[:2]]
    assert [c.index for c in reply.choices] == [0, 1]
    assert [c.finish_reason for c in reply.choices] == ["stop", "stop"]
    prompt_tokens = sum(len(engine.encode_text(p)) for p in prompts)
    assert reply.usage.prompt_tokens == prompt_tokens
    _, answer = CHAT_PAIRS[1]
    stopped = client.completions.create(
        model="tiny-ja", prompt=prompts[1], temperature=0, stop=["東京"], max_tokens=48
    )
    assert stopped.choices[0].text == answer[: answer.index("東京")]
    assert stopped.choices[0].finish_reason == "stop"
    short = client.completions.create(model="tiny-ja", prompt=prompts[1], max_tokens=2)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2
    chunks = list(
        client.completions.create(
            model="tiny-ja", prompt=prompts[1], temperature=0, max_tokens=48, stream=True
        )
    )
    pieces = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
    assert "".join(pieces) == answer and len(pieces) > 3
    assert chunks[-1].choices[0].finish_reason == "stop"
    with pytest.raises(openai.BadRequestError, match="only n=1"):
        client.completions.create(model="tiny-ja", prompt="x", n=2)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-3.5-turbo-instruct", prompt="x")


def test_health_names_the_model_and_its_limits(api):
    import httpx

    health = httpx.get(f"{api.url}/health", timeout=10)
    assert health.status_code == 200
    body = health.json()
    assert body["requests"] >= body["batches"] >= 0
    assert body | {"running": 0, "waiting": 0, "batches": 0, "requests": 0} == {
        "status": "ok",
        "model": "tiny-ja",
        "running": 0,
        "waiting": 0,
        "max_batch": 8,
        "max_queue": 16,
        "batches": 0,
        "requests": 0,
    }


def test_a_full_queue_is_refused_with_503_and_says_which_limit(model_dir):
    from hetlm.serve.openai_api import create_app, start_server

    engine = load_chat_model(model_dir, device="cpu", max_batch=1, max_queue=1, batch_wait=0)
    slow = engine.model.register_forward_pre_hook(lambda *args: time.sleep(0.05))
    server = start_server(create_app(engine, model_name="tiny-ja", defaults=GREEDY))
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=60, max_retries=0)
    question = [{"role": "user", "content": CHAT_PAIRS[1][0]}]
    try:
        running = client.chat.completions.create(
            model="tiny-ja", messages=question, stream=True, max_tokens=48, temperature=0
        )
        first = next(iter(running))  # the first request is generating now
        assert first.choices[0].delta.role == "assistant"
        deadline = time.monotonic() + 10
        while engine.scheduler.running != 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        waiting = threading.Thread(
            target=client.chat.completions.create,
            kwargs={"model": "tiny-ja", "messages": question, "max_tokens": 2},
        )
        waiting.start()
        while engine.scheduler.waiting != 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(openai.InternalServerError, match="--max-queue 1") as info:
            client.chat.completions.create(model="tiny-ja", messages=question, max_tokens=2)
        assert info.value.status_code == 503
        assert info.value.body["code"] == "server_overloaded"
        running.close()
        waiting.join(30)
    finally:
        server.stop()
        slow.remove()
