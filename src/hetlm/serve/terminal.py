"""``hetlm chat --cli``: a chat in the terminal, reading lines from stdin.

Each line is a user turn; the reply streams to stdout as it is generated. The conversation is
kept (multi-turn) until ``/reset``; ``/exit`` or end of input quits. The ``あなた>`` prompt is
printed only when stdin is a terminal, so piped use (``echo 質問 | hetlm chat --cli``) prints
nothing but the replies, one per line.
"""

from __future__ import annotations

import sys
from typing import TextIO

from hetlm.chat.messages import Message
from hetlm.errors import HetlmError
from hetlm.serve.generation import ChatEngine, GenerationSettings

HELP = "/exit で終了、/reset で会話をリセット (end with /exit or Ctrl-D; /reset clears history)"


def run_terminal_chat(
    engine: ChatEngine,
    settings: GenerationSettings,
    *,
    system: str | None = None,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
) -> int:
    """Chat until /exit or end of input; returns the number of replies given."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    interactive = stdin.isatty()
    history: list[Message] = [Message("system", system)] if system else []
    replies = 0
    if interactive:
        print(HELP, file=stdout)
    while True:
        if interactive:
            print("あなた> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:  # EOF
            break
        text = line.strip()
        if text == "/exit":
            break
        if text == "/reset":
            history = history[:1] if system else []
            continue
        if not text:
            continue
        turn = [*history, Message("user", text)]
        try:
            generation = engine.stream(turn, settings)
        except HetlmError as exc:
            print(f"[{exc}]", file=stdout, flush=True)
            continue
        pieces = []
        for piece in generation:
            pieces.append(piece)
            stdout.write(piece)
            stdout.flush()
        stdout.write("\n")
        stdout.flush()
        history = [*turn, Message("assistant", "".join(pieces))]
        replies += 1
    return replies
