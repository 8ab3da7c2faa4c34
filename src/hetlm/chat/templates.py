"""Prompt templates: a conversation as text segments, each marked prompt or response.

The loss must fall on the response tokens only, *exactly*. Rendering the whole conversation to
one string and searching for the response in its tokens is fragile (a token can straddle the
boundary, the response text can occur in the prompt). So a template renders **segments**: runs
of text that are either prompt or response. :mod:`hetlm.chat.prompt` tokenizes each segment on
its own and concatenates the ids, so the boundary is known by construction, and generation
builds its prompt ids the same way, so training and serving see identical token sequences.

Two kinds of template:

- :class:`ChatTemplate`: the tokenizer's own ``chat_template`` (``apply_chat_template``).
  Segments come from rendering growing prefixes of the conversation; the template must extend
  its own earlier renderings (most do; one that rewrites earlier turns is refused);
- :class:`TextTemplate`: a plain-text instruction format, by default the Japanese Alpaca style
  (``ja-alpaca``), or any format from a JSON file with the same fields.

``resolve_template("auto", tokenizer)`` takes the chat template when the tokenizer has one and
``ja-alpaca`` otherwise. The choice is saved next to a trained model (:func:`save_template`), so
``hetlm chat`` and ``hetlm serve`` format conversations the way the model was trained.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Protocol

from hetlm.chat.messages import Message
from hetlm.errors import HetlmError

TEMPLATE_FILE = "hetlm_template.json"


@dataclass(frozen=True)
class Segment:
    """A run of text that is all prompt or all response.

    ``eos``: append the tokenizer's end-of-sequence id after this text (for responses, so the
    model learns to stop), as an id rather than as text, which some tokenizers would split.
    """

    text: str
    response: bool = False
    eos: bool = False


class PromptTemplate(Protocol):
    """What masking and generation need from a template."""

    name: str

    def segments(
        self, messages: Sequence[Message], context: str = "", *, generation: bool = False
    ) -> list[Segment]:
        """The conversation as segments. For training ``messages`` ends with the assistant's
        response; with ``generation=True`` it ends with a user turn and the segments end with
        the prompt that the model continues."""
        ...

    def record(self) -> dict[str, Any]:
        """A JSON-able description, saved with a trained model."""
        ...


# ---------------------------------------------------------------- plain-text templates


@dataclass(frozen=True)
class TextTemplate:
    """A plain-text instruction format, with ``{content}`` / ``{system}`` placeholders.

    Rendered (``ja-alpaca``, one turn with an input)::

        {system_with_input}\\n\\n### 指示:\\n{instruction}\\n\\n### 入力:\\n{input}\\n\\n### 応答:\\n{output}<eos>

    Later turns follow the end of the previous response as
    ``{turn_separator}{user_format}{assistant_prefix}``. An explicit system message replaces the
    default preamble; an empty preamble leaves the system part out.
    """

    name: str
    system: str = ""
    system_with_input: str = ""
    system_format: str = "{system}\n\n"
    user_format: str = "{content}\n"
    input_format: str = "{content}\n"
    assistant_prefix: str = ""
    turn_separator: str = "\n"

    def __post_init__(self) -> None:
        for field_name, placeholder in (
            ("system_format", "{system}"),
            ("user_format", "{content}"),
            ("input_format", "{content}"),
        ):
            if placeholder not in getattr(self, field_name):
                raise HetlmError(f"template {self.name!r}: {field_name} must contain {placeholder}")

    def segments(
        self, messages: Sequence[Message], context: str = "", *, generation: bool = False
    ) -> list[Segment]:
        turns = list(messages)
        system = (
            turns.pop(0).content
            if turns and turns[0].role == "system"
            else (
                self.system_with_input
                if context.strip() and self.system_with_input
                else self.system
            )
        )
        prompt = self.system_format.replace("{system}", system) if system else ""
        out: list[Segment] = []
        first_user = True
        for message in turns:
            if message.role == "user":
                if out:
                    prompt += self.turn_separator
                prompt += self.user_format.replace("{content}", message.content)
                if first_user and context.strip():
                    prompt += self.input_format.replace("{content}", context)
                first_user = False
                prompt += self.assistant_prefix
            else:
                out.append(Segment(prompt))
                out.append(Segment(message.content, response=True, eos=True))
                prompt = ""
        if prompt:
            out.append(Segment(prompt))
        if not generation and (not out or not out[-1].response):
            raise HetlmError(
                f"template {self.name!r}: a training conversation must end with "
                "an assistant message"
            )
        return out

    def record(self) -> dict[str, Any]:
        return {"type": "text", **asdict(self)}

    @classmethod
    def from_file(cls, path: str | Path) -> TextTemplate:
        """Read a template from JSON with this class's fields (unknown keys are refused)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise HetlmError(f"cannot read the template file {path}: {exc}") from exc
        return cls.from_record(data, where=str(path))

    @classmethod
    def from_record(cls, data: Any, *, where: str) -> TextTemplate:
        if not isinstance(data, dict):
            raise HetlmError(f"{where}: a template is a JSON object")
        data = {k: v for k, v in data.items() if k != "type"}
        data.setdefault("name", Path(where).stem)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise HetlmError(f"{where}: unknown template keys {unknown}; known: {sorted(known)}")
        bad = sorted(k for k, v in data.items() if not isinstance(v, str))
        if bad:
            raise HetlmError(f"{where}: template values must be strings: {bad}")
        return cls(**data)


JA_ALPACA = TextTemplate(
    name="ja-alpaca",
    system="以下は、タスクを説明する指示です。要求を適切に満たす応答を書きなさい。",
    system_with_input="以下は、タスクを説明する指示と、文脈のある入力の組み合わせです。"
    "要求を適切に満たす応答を書きなさい。",
    system_format="{system}\n\n",
    user_format="### 指示:\n{content}\n\n",
    input_format="### 入力:\n{content}\n\n",
    assistant_prefix="### 応答:\n",
    turn_separator="\n\n",
)

# A short conversational format (the style of rinna's Japanese chat models): less prompt
# overhead per turn than ja-alpaca, for multi-turn data.
JA_CHAT = TextTemplate(
    name="ja-chat",
    system="",
    system_format="{system}\n",
    user_format="ユーザー: {content}\n",
    input_format="{content}\n",
    assistant_prefix="システム: ",
    turn_separator="\n",
)

BUILTIN_TEMPLATES: dict[str, TextTemplate] = {t.name: t for t in (JA_ALPACA, JA_CHAT)}


# ---------------------------------------------------------------- the tokenizer's chat template


class ChatTemplate:
    """The tokenizer's ``chat_template``, cut into segments by rendering growing prefixes.

    For each assistant turn k: ``render(turns[:k], add_generation_prompt=True)`` ends where the
    response starts, ``render(turns[:k+1])`` where it (and its end-of-turn marker) ends; the
    difference is the response segment. The instruction shape's ``input`` is appended to the
    first user message after a blank line.
    """

    name = "chat"

    def __init__(self, tokenizer: Any):
        if not getattr(tokenizer, "chat_template", None):
            raise HetlmError(
                "the tokenizer has no chat_template; use a text template "
                f"({', '.join(BUILTIN_TEMPLATES)}) or a template file"
            )
        self.tokenizer = tokenizer
        self.eos_text = tokenizer.eos_token or ""

    def _render(self, turns: list[dict[str, str]], add_generation_prompt: bool) -> str:
        text = self.tokenizer.apply_chat_template(
            turns, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        if not isinstance(text, str):
            raise TypeError(f"apply_chat_template returned {type(text).__name__}, not text")
        return text

    def _extend(self, done: str, rendered: str) -> str:
        if not rendered.startswith(done):
            raise HetlmError(
                "the tokenizer's chat template does not render a conversation as an extension "
                "of its earlier turns, so the response tokens cannot be found exactly; use a "
                f"text template ({', '.join(BUILTIN_TEMPLATES)}) or a template file instead"
            )
        return rendered[len(done) :]

    def segments(
        self, messages: Sequence[Message], context: str = "", *, generation: bool = False
    ) -> list[Segment]:
        turns = [{"role": m.role, "content": m.content} for m in messages]
        if context.strip():
            first = next(i for i, t in enumerate(turns) if t["role"] == "user")
            turns[first] = {"role": "user", "content": f"{turns[first]['content']}\n\n{context}"}
        out: list[Segment] = []
        done = ""
        for k, turn in enumerate(turns):
            if turn["role"] != "assistant":
                continue
            prompt = self._render(turns[:k], add_generation_prompt=True)
            full = self._render(turns[: k + 1], add_generation_prompt=False)
            out.append(Segment(self._extend(done, prompt)))
            response = self._extend(prompt, full)
            has_eos = bool(self.eos_text) and self.eos_text in response
            out.append(Segment(response, response=True, eos=not has_eos))
            done = full
        if generation:
            out.append(Segment(self._extend(done, self._render(turns, True))))
        return [s for s in out if s.text or s.eos]

    def record(self) -> dict[str, Any]:
        return {"type": "chat"}


# ---------------------------------------------------------------- choosing and saving


def resolve_template(spec: str | Path | None, tokenizer: Any) -> PromptTemplate:
    """``auto`` (or None): the chat template if the tokenizer has one, else ``ja-alpaca``;
    ``chat``; a built-in name; or a path to a JSON template file."""
    name = "auto" if spec is None else str(spec)
    if name == "auto":
        return ChatTemplate(tokenizer) if getattr(tokenizer, "chat_template", None) else JA_ALPACA
    if name == "chat":
        return ChatTemplate(tokenizer)
    if name in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[name]
    path = Path(name)
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise HetlmError(f"template file {path} does not exist")
        return TextTemplate.from_file(path)
    raise HetlmError(
        f"unknown template {name!r}: use auto, chat, "
        f"{', '.join(BUILTIN_TEMPLATES)} or a path to a JSON template file"
    )


def save_template(template: PromptTemplate, directory: str | Path) -> Path:
    """Record the template beside a model or adapter, for :func:`load_saved_template`."""
    path = Path(directory) / TEMPLATE_FILE
    path.write_text(
        json.dumps(template.record(), ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
    )
    return path


def load_saved_template(directory: str | Path, tokenizer: Any) -> PromptTemplate | None:
    """The template recorded in ``directory``, or None if it has no record."""
    path = Path(directory) / TEMPLATE_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise HetlmError(f"{path}: not valid JSON ({exc})") from exc
    if isinstance(data, dict) and data.get("type") == "chat":
        return ChatTemplate(tokenizer)
    return TextTemplate.from_record(data, where=str(path))
