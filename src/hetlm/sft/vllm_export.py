"""What a merged model folder needs so that vLLM (or any OpenAI-compatible server built on
transformers' files) serves it as hetlm trained it.

vLLM loads ``config.json`` (with ``architectures``), safetensors weights and the tokenizer
files, and formats ``/v1/chat/completions`` requests with the tokenizer's **chat template**
(``chat_template`` in ``tokenizer_config.json``, or ``chat_template.jinja``). A model tuned with
a plain-text template (``ja-alpaca``, ``ja-chat``, a JSON file) has no chat template of its
own, and the tokenizer's, if any, is not the format it learned; so the merge writes the
training template as Jinja (:func:`chat_template_jinja`), and :func:`vllm_missing` checks the
folder.

The Jinja renders the same *text* as :meth:`TextTemplate.segments` (BOS as ``bos_token`` where
the tokenizer adds one, EOS as ``eos_token`` after each answer). hetlm tokenizes each segment on
its own, a server tokenizes the rendered string at once: for the generation prompt of a single
user turn that is one segment, the same ids; across earlier answers a subword merge at a
segment boundary can differ, as with any server.
"""

from __future__ import annotations

import json
from pathlib import Path

from hetlm.chat.templates import TextTemplate

CHAT_TEMPLATE_FILE = "chat_template.jinja"


def _literal(text: str) -> str:
    """``text`` as a Jinja string literal (double-quoted; Jinja unescapes ``\\n``, ``\\"``)."""
    escaped = (
        text.replace("\\", "\\\\")
        .replace('"', '\\"')
        .replace("\n", "\\n")
        .replace("\r", "\\r")
        .replace("\t", "\\t")
    )
    return f'"{escaped}"'


def _text(text: str) -> str:
    """Fixed text as Jinja output."""
    return "{{ " + _literal(text) + " }}" if text else ""


def _format(fmt: str, placeholder: str, variable: str) -> str:
    """A template field like ``### 指示:\\n{content}\\n\\n`` as Jinja output."""
    parts = fmt.split(placeholder)
    out = []
    for i, part in enumerate(parts):
        out.append(_text(part))
        if i < len(parts) - 1:
            out.append("{{ " + variable + " }}")
    return "".join(out)


def chat_template_jinja(template: TextTemplate, *, bos: bool) -> str:
    """A transformers/vLLM chat template rendering conversations as ``template`` does (the
    generation prompt is always there: the template's assistant prefix follows each user
    turn). ``bos``: start with ``bos_token`` (the tokenizer adds a BOS in hetlm's prompts)."""
    return "".join(
        [
            "{%- set ns = namespace(answered=false) -%}",
            "{{ bos_token }}" if bos else "",
            "{%- if messages and messages[0]['role'] == 'system' -%}",
            "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}",
            "{%- else -%}",
            "{%- set system = " + _literal(template.system) + " -%}{%- set turns = messages -%}",
            "{%- endif -%}",
            "{%- if system -%}",
            _format(template.system_format, "{system}", "system"),
            "{%- endif -%}",
            "{%- for message in turns -%}",
            "{%- if message['role'] == 'user' -%}",
            "{%- if ns.answered -%}",
            _text(template.turn_separator),
            "{%- endif -%}",
            _format(template.user_format, "{content}", "message['content']"),
            _text(template.assistant_prefix),
            "{%- elif message['role'] == 'assistant' -%}",
            "{{ message['content'] }}{{ eos_token }}{%- set ns.answered = true -%}",
            "{%- endif -%}",
            "{%- endfor -%}",
        ]
    )


def has_chat_template(folder: str | Path) -> bool:
    """Whether the tokenizer files in ``folder`` carry a chat template."""
    folder = Path(folder)
    if (folder / CHAT_TEMPLATE_FILE).is_file():
        return True
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return False
    try:
        return bool(json.loads(config.read_text(encoding="utf-8")).get("chat_template"))
    except (OSError, json.JSONDecodeError):
        return False


def vllm_missing(folder: str | Path) -> list[str]:
    """What ``folder`` lacks for vLLM (empty when it has everything): config.json with the
    architecture, safetensors weights, tokenizer files, a chat template."""
    folder = Path(folder)
    missing = []
    config = folder / "config.json"
    try:
        architectures = json.loads(config.read_text(encoding="utf-8")).get("architectures")
    except (OSError, json.JSONDecodeError):
        missing.append("config.json")
    else:
        if not architectures:
            missing.append("config.json 'architectures'")
    if not list(folder.glob("*.safetensors")):
        missing.append("safetensors weights")
    if not ((folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file()):
        missing.append("tokenizer files (tokenizer.json or tokenizer.model)")
    if not (folder / "tokenizer_config.json").is_file():
        missing.append("tokenizer_config.json")
    if not has_chat_template(folder):
        missing.append(
            f"a chat template ({CHAT_TEMPLATE_FILE} or tokenizer_config.json 'chat_template')"
        )
    return missing
