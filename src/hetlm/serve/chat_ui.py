"""``hetlm chat``: a gradio web chat that streams the model's replies.

It listens on 127.0.0.1 unless told otherwise, and makes no public gradio share link unless
``share=True``: a lab's model (and whatever people type into it) should not be reachable from
the internet by default. Sliders set temperature, top-p and max new tokens per message; an
optional system prompt replaces the template's preamble.

gradio 6 names the API endpoint after the handler function, so the chat is ``/respond``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from hetlm.chat.messages import Message
from hetlm.errors import HetlmError
from hetlm.serve.generation import ChatEngine, GenerationSettings

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def import_gradio():
    """gradio, or a HetlmError naming the extra (and never gradio's analytics calls)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio
    except ImportError as exc:
        raise HetlmError("the web chat needs gradio: pip install 'hetlm[chat]'") from exc
    return gradio


def text_of(content: Any) -> str:
    """The text of a gradio chat message's content (a string, or gradio 6's list of parts);
    files and components are left out, since the model reads text only."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or "")
    if isinstance(content, (list, tuple)):
        return "".join(text_of(part) for part in content)
    return ""


def history_messages(history: list[Any], system: str = "") -> list[Message]:
    """gradio's OpenAI-style history as :class:`Message` objects (empty turns skipped)."""
    messages = [Message("system", system)] if system.strip() else []
    for item in history or []:
        role = item.get("role") if isinstance(item, dict) else getattr(item, "role", None)
        content = item.get("content") if isinstance(item, dict) else getattr(item, "content", "")
        text = text_of(content)
        if role in ("user", "assistant") and text.strip():
            messages.append(Message(role, text))
    return messages


def build_chat_ui(
    engine: ChatEngine, defaults: GenerationSettings | None = None, *, title: str | None = None
) -> Any:
    """The gradio ``ChatInterface`` (not launched)."""
    gr = import_gradio()
    defaults = defaults or GenerationSettings()
    max_tokens = max(defaults.max_new_tokens, 2048)
    if engine.context_length:
        max_tokens = min(max_tokens, engine.context_length)

    def respond(
        message: str,
        history: list[Any],
        system: str,
        temperature: float,
        top_p: float,
        max_new_tokens: float,
    ) -> Iterator[str]:
        """Stream the reply: gradio shows each yielded text in place of the previous one."""
        if not (message or "").strip():
            yield ""
            return
        turns = [*history_messages(history, system), Message("user", message)]
        try:
            settings = GenerationSettings(
                float(temperature), max(float(top_p), 1e-3), int(max_new_tokens)
            )
            generation = engine.stream(turns, settings)
        except HetlmError as exc:
            raise gr.Error(str(exc)) from exc
        text = ""
        try:
            for piece in generation:
                text += piece
                yield text
        finally:  # Stop pressed or the page closed: free the model for the next user
            generation.cancel()

    return gr.ChatInterface(
        respond,
        title=title or f"hetlm chat: {engine.name}",
        additional_inputs=[
            gr.Textbox(value="", label="System prompt (empty: the template's default)"),
            gr.Slider(
                0.0, 2.0, value=defaults.temperature, step=0.05, label="Temperature (0 = greedy)"
            ),
            gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.05, label="Top-p"),
            gr.Slider(
                1,
                max_tokens,
                value=min(defaults.max_new_tokens, max_tokens),
                step=1,
                label="Max new tokens",
            ),
        ],
        additional_inputs_accordion="Generation settings",
        analytics_enabled=False,
        save_history=False,
        fill_height=True,
    )


def launch_chat_ui(
    engine: ChatEngine,
    *,
    host: str = "127.0.0.1",
    port: int = 7860,
    share: bool = False,
    defaults: GenerationSettings | None = None,
    block: bool = True,
) -> Any:
    """Start the web chat; with ``block=False`` return the running app (``.close()`` stops
    it), for tests and notebooks."""
    ui = build_chat_ui(engine, defaults)
    if host not in LOOPBACK:
        print(
            f"hetlm chat: listening on {host}: anyone who can reach this machine can use the "
            "model (use --host 127.0.0.1 to keep it local)"
        )
    ui.queue(default_concurrency_limit=engine.scheduler.max_batch)  # answered in batches
    ui.launch(
        server_name=host,
        server_port=port,
        share=share,
        inbrowser=False,
        prevent_thread_lock=not block,
        quiet=not block,
        footer_links=["api"],
        ssr_mode=False,
    )
    return ui
