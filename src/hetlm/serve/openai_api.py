"""``hetlm serve``: an OpenAI-compatible HTTP API for a trained chat model (FastAPI + uvicorn).

Implemented: ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/chat/completions`` with
and without ``stream: true``. ``temperature``, ``top_p``, ``max_tokens`` (or
``max_completion_tokens``) and ``seed`` are honoured; the non-streaming response has ``usage``,
and a stream sends it in a last chunk when ``stream_options.include_usage`` is set, as OpenAI
does. Streams are server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``.

Every error is OpenAI's JSON shape (``{"error": {"message", "type", "param", "code"}}``) with the
matching HTTP status (400 bad request, 404 unknown model or path, 500 generation failure), so
clients raise their usual exceptions. Parameters this server cannot honour (``n`` > 1, ``stop``,
``tools``, ``logprobs``) are refused with a 400 rather than silently ignored; other fields
(``user``, penalties, metadata) are ignored, as harmless.

One model, one generation at a time (:class:`~hetlm.serve.generation.ChatEngine` holds a lock);
a client that disconnects mid-stream cancels its generation.
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

from hetlm.errors import HetlmError
from hetlm.serve.generation import ChatEngine, Generation, GenerationSettings
from hetlm.sft.data import Message


def import_server():
    """(fastapi, uvicorn), or a HetlmError naming the extra."""
    try:
        import fastapi
        import uvicorn
    except ImportError as exc:
        raise HetlmError("hetlm serve needs fastapi and uvicorn: pip install 'hetlm[chat]'") \
            from exc
    return fastapi, uvicorn


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
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
            raise APIError(400, f"messages[{index}]: only text content is supported",
                           param=f"messages[{index}].content")
        texts.append(part["text"])
    return "".join(texts)


def _request_model():
    """The pydantic request model (defined lazily: pydantic comes with the chat extra)."""
    from pydantic import BaseModel, ConfigDict, Field

    class ChatMessageIn(BaseModel):
        model_config = ConfigDict(extra="ignore")
        role: Literal["system", "developer", "user", "assistant"]
        content: str | list[dict[str, Any]] | None = None

    class StreamOptions(BaseModel):
        model_config = ConfigDict(extra="ignore")
        include_usage: bool = False

    class ChatCompletionRequest(BaseModel):
        model_config = ConfigDict(extra="ignore")
        model: str
        messages: list[ChatMessageIn] = Field(min_length=1)
        temperature: float | None = Field(None, ge=0, le=2)
        top_p: float | None = Field(None, gt=0, le=1)
        max_tokens: int | None = Field(None, ge=1)
        max_completion_tokens: int | None = Field(None, ge=1)
        stream: bool = False
        stream_options: StreamOptions | None = None
        seed: int | None = None
        n: int | None = None
        stop: str | list[str] | None = None
        tools: list[Any] | None = None
        logprobs: bool | None = None

    return ChatCompletionRequest


def create_app(engine: ChatEngine, *, model_name: str | None = None,
               defaults: GenerationSettings | None = None) -> Any:
    """The FastAPI application serving ``engine`` as model ``model_name``; ``defaults`` fill
    in the settings a request leaves out."""
    fastapi, _ = import_server()
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    name = model_name or engine.name
    defaults = defaults or GenerationSettings()
    created = int(time.time())
    request_model = _request_model()
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
        return JSONResponse(APIError(exc.status_code, f"{request.method} {request.url.path}: "
                                     f"{exc.detail}", code=code).body,
                            status_code=exc.status_code)

    def model_card() -> dict[str, Any]:
        return {"id": name, "object": "model", "created": created, "owned_by": "hetlm"}

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
        try:
            payload = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise APIError(400, f"the request body is not valid JSON: {exc}") from exc
        from pydantic import ValidationError

        try:
            body = request_model.model_validate(payload)
        except ValidationError as exc:
            raise RequestValidationError(exc.errors()) from exc
        if body.model != name:
            raise _unknown_model(body.model, name)
        _refuse_unsupported(body)
        messages = [Message("system" if m.role == "developer" else m.role,
                            _content_text(m.content, i)) for i, m in enumerate(body.messages)]
        try:
            settings = GenerationSettings(
                temperature=defaults.temperature if body.temperature is None
                else body.temperature,
                top_p=defaults.top_p if body.top_p is None else body.top_p,
                max_new_tokens=body.max_completion_tokens or body.max_tokens
                or defaults.max_new_tokens,
                seed=body.seed)
            ids = engine.encode(messages)
        except HetlmError as exc:
            raise APIError(400, str(exc), param="messages") from exc
        if engine.context_length and len(ids) >= engine.context_length:
            raise APIError(400, f"the messages are {len(ids)} tokens, at or over this model's "
                           f"context of {engine.context_length} tokens",
                           param="messages", code="context_length_exceeded")
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        generation = engine.stream(settings=settings, ids=ids)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                _events(generation, completion_id, name, include_usage, run_in_threadpool),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            text = await run_in_threadpool(generation.text)
        except Exception as exc:
            raise APIError(500, f"generation failed: {exc}", type="server_error") from exc
        finally:
            generation.cancel()
        return {
            "id": completion_id, "object": "chat.completion", "created": int(time.time()),
            "model": name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": generation.finish_reason}],
            "usage": _usage(generation),
        }

    return app


def _unknown_model(requested: str, served: str) -> APIError:
    return APIError(404, f"The model '{requested}' does not exist; this server serves "
                    f"'{served}'", param="model", code="model_not_found")


def _refuse_unsupported(body: Any) -> None:
    if body.n not in (None, 1):
        raise APIError(400, "only n=1 is supported", param="n")
    if body.stop:
        raise APIError(400, "stop sequences are not supported by this server", param="stop")
    if body.tools:
        raise APIError(400, "tools are not supported by this server", param="tools")
    if body.logprobs:
        raise APIError(400, "logprobs are not supported by this server", param="logprobs")


def _usage(generation: Generation) -> dict[str, int]:
    return {"prompt_tokens": generation.prompt_tokens,
            "completion_tokens": generation.completion_tokens,
            "total_tokens": generation.prompt_tokens + generation.completion_tokens}


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _events(generation: Generation, completion_id: str, model: str, include_usage: bool,
                  run_in_threadpool: Any) -> AsyncIterator[str]:
    """The reply as OpenAI chunks; the generation is cancelled if the client goes away."""
    created = int(time.time())

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": completion_id, "object": "chat.completion.chunk", "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None,
                         "finish_reason": finish_reason}]}
        if include_usage:
            data["usage"] = None
        return data

    done = object()
    pieces = iter(generation)
    try:
        yield _sse(chunk({"role": "assistant", "content": ""}))
        while True:
            try:
                piece = await run_in_threadpool(next, pieces, done)
            except Exception as exc:
                yield _sse(APIError(500, f"generation failed: {exc}", type="server_error").body)
                break
            if piece is done:
                yield _sse(chunk({}, generation.finish_reason))
                if include_usage:
                    yield _sse({"id": completion_id, "object": "chat.completion.chunk",
                                "created": created, "model": model, "choices": [],
                                "usage": _usage(generation)})
                break
            yield _sse(chunk({"content": piece}))
        yield "data: [DONE]\n\n"
    finally:
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


def start_server(app: Any, *, host: str = "127.0.0.1", port: int = 0,
                 timeout: float = 30.0) -> RunningServer:
    """Start ``app`` on ``host:port`` (0: a free port) in a thread; return once it listens."""
    _, uvicorn = import_server()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True,
                              name="hetlm-serve")
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise HetlmError(f"the API server did not start on {host}:{bound}")
        time.sleep(0.02)
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    return RunningServer(f"http://{shown}:{bound}", server, thread)


def serve_forever(engine: ChatEngine, *, host: str = "127.0.0.1", port: int = 8000,
                  model_name: str | None = None, defaults: GenerationSettings | None = None
                  ) -> None:
    """Run the API in the foreground until interrupted (``hetlm serve``)."""
    _, uvicorn = import_server()
    app = create_app(engine, model_name=model_name, defaults=defaults)
    try:
        uvicorn.run(app, host=host, port=port, log_level="info")
    except OSError as exc:
        raise HetlmError(f"cannot listen on {host}:{port}: {exc}") from exc
