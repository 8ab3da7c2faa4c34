"""The gradio chat page, driven in headless Chromium: a message in, a streamed reply out.

Chromium is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: JSON
messages ending in NUL on file descriptors 3 and 4), which needs no websocket library, no
chromedriver and no network. The test skips only where no Chromium binary is found.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from typing import Any

import pytest
from _sft_fixtures import CHAT_PAIRS, tiny_chat_model

from hetlm.chat.messages import Message
from hetlm.serve.chat_ui import history_messages, text_of
from hetlm.serve.generation import GenerationSettings, load_chat_model

QUESTION, ANSWER = CHAT_PAIRS[0]
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    explicit = os.environ.get("HETLM_CHROMIUM")
    if explicit:
        return explicit
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


class DevTools:
    """A minimal Chrome DevTools Protocol client over ``--remote-debugging-pipe``."""

    def __init__(self, executable: str):
        self.profile = tempfile.mkdtemp(prefix="hetlm-chromium-")
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        args = [
            executable,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--disable-dev-shm-usage",
            f"--user-data-dir={self.profile}",
            "--remote-debugging-pipe",
            "about:blank",
        ]
        # Chromium reads commands on fd 3 and writes replies on fd 4: move the pipe ends there.
        script = (
            f'exec "$@" 3<&{to_chrome_r} 4>&{from_chrome_w} {to_chrome_r}<&- {from_chrome_w}>&-'
        )
        self.proc = subprocess.Popen(
            ["bash", "-c", script, "bash", *args],
            pass_fds=(to_chrome_r, from_chrome_w),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._last_id = 0
        self._replies: dict[int, dict[str, Any]] = {}
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        buffer = b""
        while data := os.read(self._from_chrome, 65536):
            buffer += data
            while b"\0" in buffer:
                raw, buffer = buffer.split(b"\0", 1)
                message = json.loads(raw)
                if "id" in message:  # a reply (events are not needed here)
                    with self._cond:
                        self._replies[message["id"]] = message
                        self._cond.notify_all()

    def call(
        self,
        method: str,
        params: dict | None = None,
        session: str | None = None,
        timeout: float = 15.0,
    ) -> dict[str, Any]:
        self._last_id += 1
        message_id = self._last_id
        message: dict[str, Any] = {"id": message_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        with self._cond:
            if not self._cond.wait_for(lambda: message_id in self._replies, timeout):
                raise TimeoutError(f"Chromium did not answer {method} in {timeout} s")
            reply = self._replies.pop(message_id)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def open_page(self, url: str) -> str:
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})
        self.call("Page.navigate", {"url": url}, session["sessionId"])
        return session["sessionId"]

    def evaluate(self, session: str, expression: str) -> Any:
        result = self.call(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True}, session
        )
        return result["result"].get("value")

    def close(self) -> None:
        with contextlib.suppress(TimeoutError, RuntimeError, OSError):
            self.call("Browser.close", timeout=5)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_chrome)
        shutil.rmtree(self.profile, ignore_errors=True)


def wait_for(predicate, timeout: float, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gradio_history_is_read_as_text_messages():
    history = [
        {"role": "user", "content": "こんにちは"},
        {
            "role": "assistant",
            "content": [{"type": "text", "text": "はい、"}, {"type": "text", "text": "どうぞ。"}],
        },
        {"role": "user", "content": {"path": "/tmp/image.png"}},  # files are skipped
        {"role": "assistant", "content": ""},
    ]
    assert history_messages(history, system="丁寧に") == [
        Message("system", "丁寧に"),
        Message("user", "こんにちは"),
        Message("assistant", "はい、どうぞ。"),
    ]
    assert text_of(None) == ""


def test_gradio_page_in_headless_chromium_shows_a_streamed_reply(tmp_path_factory):
    pytest.importorskip("gradio", reason="the web chat needs gradio (hetlm[chat])")
    chromium = find_chromium()
    if chromium is None:
        pytest.skip(
            f"no Chromium found (looked for {', '.join(BROWSERS)} on PATH and "
            "$HETLM_CHROMIUM); install it with: apt-get install -y chromium"
        )
    from hetlm.serve.chat_ui import launch_chat_ui

    engine = load_chat_model(tiny_chat_model(tmp_path_factory.getbasetemp() / "sft"), device="cpu")
    # The tiny model writes its ~20 tokens in milliseconds; 60 ms per forward pass makes the
    # stream slow enough for the page to show it growing.
    slow = engine.model.register_forward_pre_hook(lambda *args: time.sleep(0.06))
    port = free_port()
    ui = launch_chat_ui(
        engine,
        port=port,
        block=False,
        defaults=GenerationSettings(temperature=0.0, max_new_tokens=48),
    )
    browser = DevTools(chromium)
    try:
        assert ui.share is False and ui.server_name == "127.0.0.1"
        page = browser.open_page(f"http://127.0.0.1:{port}/")
        assert wait_for(
            lambda: browser.evaluate(page, "!!document.querySelector('textarea')"), timeout=20
        ), "the chat page did not load"
        browser.evaluate(page, "document.querySelector('textarea').focus()")
        browser.call("Input.insertText", {"text": QUESTION}, page)
        for kind in ("keyDown", "keyUp"):
            browser.call(
                "Input.dispatchKeyEvent",
                {
                    "type": kind,
                    "key": "Enter",
                    "code": "Enter",
                    "windowsVirtualKeyCode": 13,
                    **({"text": "\r"} if kind == "keyDown" else {}),
                },
                page,
            )
        reply_js = (
            "(() => { const m = document.querySelectorAll('[data-testid=\"bot\"]');"
            " return m.length ? m[m.length - 1].innerText.trim() : ''; })()"
        )
        seen: list[str] = []
        deadline = time.monotonic() + 25
        while time.monotonic() < deadline:
            text = browser.evaluate(page, reply_js) or ""
            if text and (not seen or seen[-1] != text):
                seen.append(text)
            if text == ANSWER:
                break
            time.sleep(0.02)
    finally:
        browser.close()
        ui.close()
        slow.remove()
    assert seen and seen[-1] == ANSWER, f"the page showed {seen!r}"
    partial = seen[:-1]
    assert len(partial) >= 2, f"the reply appeared at once, not streamed: {seen!r}"
    assert all(ANSWER.startswith(p) and len(p) < len(ANSWER) for p in partial)
    assert [len(p) for p in partial] == sorted(len(p) for p in partial)
