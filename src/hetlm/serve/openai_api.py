"""``hetlm serve``: an OpenAI-compatible HTTP API for a trained chat model (FastAPI + uvicorn).

Implemented: ``GET /health``, ``GET /v1/models``, ``GET /v1/models/{id}``,
``POST /v1/chat/completions`` and ``POST /v1/completions`` (a prompt string or a list of them,
one choice each), with and without ``stream: true``. ``temperature``, ``top_p``, ``max_tokens``
(or ``max_completion_tokens``), ``stop`` (up to 4 strings) and ``seed`` are honoured; the
non-streaming response has ``usage``, and a stream sends it in a last chunk when
``stream_options.include_usage`` is set, as OpenAI does. Streams are server-sent events in
OpenAI's chunk format, ending with ``data: [DONE]``.

Every error is OpenAI's JSON shape (``{"error": {"message", "type", "param", "code"}}``) with the
matching HTTP status (400 bad request, 404 unknown model or path, 500 generation failure, 503
queue full), so clients raise their usual exceptions. Parameters this server cannot honour
(``n`` > 1, ``tools``, ``logprobs``, ``echo``, ``best_of``, ``suffix``) are refused with a 400
rather than silently ignored; other fields (``user``, penalties, metadata) are ignored, as
harmless.

Concurrent requests are answered together: the engine's
:class:`~hetlm.serve.batching.BatchScheduler` runs the requests waiting at a moment as one
batched ``generate`` call (at most ``--max-batch`` rows); at most ``--max-queue`` more may wait,
beyond that a request gets 503 ``server_overloaded`` at once. A client that disconnects
mid-stream cancels its generation.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the endpoints' annotations
# (``request: Request``, imported lazily inside create_app) at definition time.
import json
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

from hetlm.chat.messages import Message
from hetlm.errors import HetlmError
from hetlm.serve.batching import QueueFull
from hetlm.serve.generation import ChatEngine, Generation, GenerationSettings


def import_server():
    """(fastapi, uvicorn), or a HetlmError naming the extra."""
    try:
        import fastapi
        import uvicorn
    except ImportError as exc:
        raise HetlmError(
            "hetlm serve needs fastapi and uvicorn: pip install 'hetlm[chat]'"
        ) from exc
    return fastapi, uvicorn


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": type, "param": param, "code": code}}


def _content_text(content: Any, index: int) -> str:
    """A message's text: a string, or a list of ``{"type": "text", "text": ...}`` parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise APIError(
                400,
                f"messages[{index}]: only text content is supported",
                param=f"messages[{index}].content",
            )
        texts.append(part["text"])
    return "".join(texts)


def _request_models() -> tuple[Any, Any]:
    """The pydantic request models (defined lazily: pydantic comes with the chat extra)."""
    from pydantic import BaseModel, ConfigDict, Field

    class ChatMessageIn(BaseModel):
        model_config = ConfigDict(extra="ignore")
        role: Literal["system", "developer", "user", "assistant"]
        content: str | list[dict[str, Any]] | None = None

    class StreamOptions(BaseModel):
        model_config = ConfigDict(extra="ignore")
        include_usage: bool = False

    class Sampling(BaseModel):
        model_config = ConfigDict(extra="ignore")
        model: str
        temperature: float | None = Field(None, ge=0, le=2)
        top_p: float | None = Field(None, gt=0, le=1)
        max_tokens: int | None = Field(None, ge=1)
        stream: bool = False
        stream_options: StreamOptions | None = None
        seed: int | None = None
        n: int | None = None
        stop: str | list[str] | None = None

    class ChatCompletionRequest(Sampling):
        messages: list[ChatMessageIn] = Field(min_length=1)
        max_completion_tokens: int | None = Field(None, ge=1)
        tools: list[Any] | None = None
        logprobs: bool | None = None

    class CompletionRequest(Sampling):
        prompt: str | list[str] | list[int] | list[list[int]]
        logprobs: int | None = None
        echo: bool | None = None
        best_of: int | None = None
        suffix: str | None = None

    return ChatCompletionRequest, CompletionRequest


def create_app(
    engine: ChatEngine, *, model_name: str | None = None, defaults: GenerationSettings | None = None
) -> Any:
    """The FastAPI application serving ``engine`` as model ``model_name``; ``defaults`` fill
    in the settings a request leaves out."""
    fastapi, _ = import_server()
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import ValidationError
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    name = model_name or engine.name
    defaults = defaults or GenerationSettings()
    created = int(time.time())
    chat_request, completion_request = _request_models()
    app = fastapi.FastAPI(title=f"hetlm: {name}", docs_url=None, redoc_url=None)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg", exc))
        return JSONResponse(APIError(400, message, param=param).body, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        return JSONResponse(
            APIError(
                exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code
            ).body,
            status_code=exc.status_code,
        )

    def model_card() -> dict[str, Any]:
        return {"id": name, "object": "model", "created": created, "owned_by": "hetlm"}

    async def parse(request: Request, model: Any) -> Any:
        try:
            payload = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise APIError(400, f"the request body is not valid JSON: {exc}") from exc
        try:
            body = model.model_validate(payload)
        except ValidationError as exc:
            raise RequestValidationError(exc.errors()) from exc
        if body.model != name:
            raise _unknown_model(body.model, name)
        return body

    def settings_of(body: Any, max_tokens: int | None) -> GenerationSettings:
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        try:
            return GenerationSettings(
                temperature=defaults.temperature if body.temperature is None else body.temperature,
                top_p=defaults.top_p if body.top_p is None else body.top_p,
                max_new_tokens=max_tokens or defaults.max_new_tokens,
                seed=body.seed,
                stop=stop,
            )
        except HetlmError as exc:
            raise APIError(400, str(exc), param="stop" if "stop" in str(exc) else None) from exc

    def start(ids: list[int], settings: GenerationSettings, param: str) -> Generation:
        if engine.context_length and len(ids) >= engine.context_length:
            raise APIError(
                400,
                f"the {param} is {len(ids)} tokens, at or over this model's "
                f"context of {engine.context_length} tokens",
                param=param,
                code="context_length_exceeded",
            )
        try:
            return engine.stream(settings=settings, ids=ids)
        except QueueFull as exc:
            raise APIError(503, str(exc), type="server_error", code="server_overloaded") from exc
        except HetlmError as exc:
            raise APIError(400, str(exc), param=param) from exc

    @app.get("/health")
    async def health() -> dict[str, Any]:
        scheduler = engine.scheduler
        return {
            "status": "ok",
            "model": name,
            "running": scheduler.running,
            "waiting": scheduler.waiting,
            "max_batch": scheduler.max_batch,
            "max_queue": scheduler.max_queue,
            "batches": scheduler.batches_run,
            "requests": scheduler.requests_run,
        }

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        if model_id != name:
            raise _unknown_model(model_id, name)
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body = await parse(request, chat_request)
        _refuse_unsupported(body, ("tools", "logprobs"))
        messages = [
            Message("system" if m.role == "developer" else m.role, _content_text(m.content, i))
            for i, m in enumerate(body.messages)
        ]
        settings = settings_of(body, body.max_completion_tokens or body.max_tokens)
        try:
            ids = engine.encode(messages)
        except HetlmError as exc:
            raise APIError(400, str(exc), param="messages") from exc
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        generation = start(ids, settings, "messages")
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                _chat_events(generation, completion_id, name, include_usage, run_in_threadpool),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        text = await _finish(generation, run_in_threadpool)
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": generation.finish_reason,
                }
            ],
            "usage": _usage([generation]),
        }

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await parse(request, completion_request)
        _refuse_unsupported(body, ("logprobs", "echo", "suffix"))
        if body.best_of not in (None, 1):
            raise APIError(400, "only best_of=1 is supported", param="best_of")
        prompts = _prompt_ids(body.prompt, engine)
        settings = settings_of(body, body.max_tokens)
        generations: list[Generation] = []
        try:
            for ids in prompts:
                generations.append(start(ids, settings, "prompt"))
        except APIError:
            for generation in generations:
                generation.cancel()
            raise
        completion_id = f"cmpl-{uuid.uuid4().hex}"
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                _completion_events(
                    generations, completion_id, name, include_usage, run_in_threadpool
                ),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        texts = []
        try:
            for generation in generations:
                texts.append(await _finish(generation, run_in_threadpool))
        finally:
            for generation in generations:
                generation.cancel()
        return {
            "id": completion_id,
            "object": "text_completion",
            "created": int(time.time()),
            "model": name,
            "choices": [
                {
                    "index": i,
                    "text": text,
                    "logprobs": None,
                    "finish_reason": generation.finish_reason,
                }
                for i, (text, generation) in enumerate(zip(texts, generations, strict=True))
            ],
            "usage": _usage(generations),
        }

    return app


def _prompt_ids(prompt: Any, engine: ChatEngine) -> list[list[int]]:
    """The ``prompt`` field (a string, a list of strings, token ids, or a list of those) as
    one id list per choice."""
    if isinstance(prompt, str):
        prompts: list[Any] = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [list(prompt)]
    else:
        prompts = list(prompt)
    if not prompts:
        raise APIError(400, "prompt is an empty list: give at least one prompt", param="prompt")
    vocab = len(engine.tokenizer)
    out = []
    for i, item in enumerate(prompts):
        ids = engine.encode_text(item) if isinstance(item, str) else list(item)
        if not ids:
            raise APIError(400, f"prompt[{i}] is empty", param="prompt")
        if any(not 0 <= t < vocab for t in ids):
            raise APIError(
                400,
                f"prompt[{i}] has token ids outside the vocabulary (0..{vocab - 1})",
                param="prompt",
            )
        out.append(ids)
    return out


async def _finish(generation: Generation, run_in_threadpool: Any) -> str:
    """The whole reply of a non-streaming request (a 500 if generation failed)."""
    try:
        return await run_in_threadpool(generation.text)
    except Exception as exc:
        raise APIError(500, f"generation failed: {exc}", type="server_error") from exc
    finally:
        generation.cancel()


def _unknown_model(requested: str, served: str) -> APIError:
    return APIError(
        404,
        f"The model '{requested}' does not exist; this server serves '{served}'",
        param="model",
        code="model_not_found",
    )


def _refuse_unsupported(body: Any, fields: tuple[str, ...]) -> None:
    if body.n not in (None, 1):
        raise APIError(400, "only n=1 is supported", param="n")
    for field in fields:
        if getattr(body, field, None):
            raise APIError(400, f"{field} is not supported by this server", param=field)


def _usage(generations: list[Generation]) -> dict[str, int]:
    prompt = sum(g.prompt_tokens for g in generations)
    completion = sum(g.completion_tokens for g in generations)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _pieces(generation: Generation, run_in_threadpool: Any) -> AsyncIterator[str]:
    """The generation's text pieces, read in a worker thread so the event loop stays free."""
    done = object()
    pieces = iter(generation)
    while True:
        piece = await run_in_threadpool(next, pieces, done)
        if piece is done:
            return
        yield piece


async def _chat_events(
    generation: Generation,
    completion_id: str,
    model: str,
    include_usage: bool,
    run_in_threadpool: Any,
) -> AsyncIterator[str]:
    """The reply as OpenAI chunks; the generation is cancelled if the client goes away."""
    created = int(time.time())

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            ],
        }
        if include_usage:
            data["usage"] = None
        return data

    try:
        yield _sse(chunk({"role": "assistant", "content": ""}))
        try:
            async for piece in _pieces(generation, run_in_threadpool):
                yield _sse(chunk({"content": piece}))
        except Exception as exc:
            yield _sse(APIError(500, f"generation failed: {exc}", type="server_error").body)
        else:
            yield _sse(chunk({}, generation.finish_reason))
            if include_usage:
                yield _sse(
                    {
                        "id": completion_id,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": model,
                        "choices": [],
                        "usage": _usage([generation]),
                    }
                )
        yield "data: [DONE]\n\n"
    finally:
        generation.cancel()


async def _completion_events(
    generations: list[Generation],
    completion_id: str,
    model: str,
    include_usage: bool,
    run_in_threadpool: Any,
) -> AsyncIterator[str]:
    """``text_completion`` chunks, choice after choice (they generate together in a batch)."""
    created = int(time.time())

    def chunk(index: int, text: str, finish_reason: str | None = None) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [
                {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
            ],
        }
        if include_usage:
            data["usage"] = None
        return data

    try:
        for index, generation in enumerate(generations):
            try:
                async for piece in _pieces(generation, run_in_threadpool):
                    yield _sse(chunk(index, piece))
            except Exception as exc:
                yield _sse(APIError(500, f"generation failed: {exc}", type="server_error").body)
                break
            yield _sse(chunk(index, "", generation.finish_reason))
        else:
            if include_usage:
                yield _sse(
                    {
                        "id": completion_id,
                        "object": "text_completion",
                        "created": created,
                        "model": model,
                        "choices": [],
                        "usage": _usage(generations),
                    }
                )
        yield "data: [DONE]\n\n"
    finally:
        for generation in generations:
            generation.cancel()


# ---------------------------------------------------------------- running


@dataclass
class RunningServer:
    """A uvicorn server in a background thread (for tests and notebooks)."""

    url: str
    server: Any
    thread: threading.Thread

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


def start_server(
    app: Any, *, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0
) -> RunningServer:
    """Start ``app`` on ``host:port`` (0: a free port) in a thread; return once it listens."""
    _, uvicorn = import_server()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="hetlm-serve"
    )
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise HetlmError(f"the API server did not start on {host}:{bound}")
        time.sleep(0.02)
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    return RunningServer(f"http://{shown}:{bound}", server, thread)


def serve_forever(
    engine: ChatEngine,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    model_name: str | None = None,
    defaults: GenerationSettings | None = None,
) -> None:
    """Run the API in the foreground until interrupted (``hetlm serve``)."""
    _, uvicorn = import_server()
    app = create_app(engine, model_name=model_name, defaults=defaults)
    try:
        uvicorn.run(app, host=host, port=port, log_level="info")
    except OSError as exc:
        raise HetlmError(f"cannot listen on {host}:{port}: {exc}") from exc
