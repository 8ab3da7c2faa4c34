"""Loading a chat model and streaming its replies.

The prompt is built by :func:`hetlm.chat.prompt.prompt_ids` with the template recorded when the
model was trained (``hetlm_template.json`` in the adapter or model folder; otherwise ``auto``):
a model answers well only in the format it was tuned on, token for token.

Generation runs in the engine's :class:`~hetlm.serve.batching.BatchScheduler`: one worker thread
answers the requests waiting together with one batched ``model.generate`` call (at most
``max_batch`` rows; ``max_batch=1`` serves them one at a time), and the caller iterates text
pieces as they are decoded. A cancelled reply (client gone, Stop pressed) stops at the next
token, without stopping the other rows of its batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from hetlm.chat.messages import Message, RowError, check_turn_order
from hetlm.chat.prompt import prompt_ids
from hetlm.chat.templates import PromptTemplate, load_saved_template, resolve_template
from hetlm.cluster.precision import cuda_precisions
from hetlm.errors import HetlmError
from hetlm.serve.batching import BatchScheduler, Generation
from hetlm.train.devices import default_device


@dataclass(frozen=True)
class GenerationSettings:
    """Sampling settings; ``temperature == 0`` means greedy decoding.

    Only temperature and top-p shape the distribution (top-k is switched off), as in the
    OpenAI API, so the same numbers mean the same thing in the UI and the API. ``stop``: up to
    four strings that end the reply where they first appear (not included in it).
    """

    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 256
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 0 <= self.temperature <= 2:
            raise HetlmError(f"temperature must be in [0, 2], got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise HetlmError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise HetlmError(f"max new tokens must be at least 1, got {self.max_new_tokens}")
        if len(self.stop) > 4 or not all(isinstance(s, str) and s for s in self.stop):
            raise HetlmError(f"stop must be up to 4 non-empty strings, got {list(self.stop)}")

    def generate_kwargs(self) -> dict[str, Any]:
        if self.temperature == 0:
            return {"do_sample": False, "max_new_tokens": self.max_new_tokens}
        return {
            "do_sample": True,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": 0,
            "max_new_tokens": self.max_new_tokens,
        }


def normalize_conversation(messages: Sequence[Message]) -> list[Message]:
    """Merge consecutive turns of one role and check the order (system, user, assistant, ...,
    user), raising HetlmError; clients (UIs, API callers) send looser shapes than training
    data, and templates need strict alternation."""
    merged: list[Message] = []
    for message in messages:
        if merged and merged[-1].role == message.role:
            merged[-1] = Message(message.role, f"{merged[-1].content}\n\n{message.content}")
        else:
            merged.append(message)
    try:
        check_turn_order(merged, generation=True)
    except RowError as exc:
        raise HetlmError(str(exc)) from exc
    return merged


class ChatEngine:
    """A causal LM, its tokenizer and its prompt template, ready to answer conversations.

    ``max_batch``, ``max_queue`` and ``batch_wait`` size its
    :class:`~hetlm.serve.batching.BatchScheduler` (``hetlm serve --max-batch/--max-queue``).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        template: PromptTemplate | None = None,
        *,
        name: str = "hetlm",
        max_batch: int = 8,
        max_queue: int = 64,
        batch_wait: float = 0.01,
    ) -> None:
        from hetlm.serve.model_source import check_causal_lm

        check_causal_lm(model.config, name)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.template = template or resolve_template("auto", tokenizer)
        self.name = name
        self.scheduler = BatchScheduler(
            self, max_batch=max_batch, max_queue=max_queue, batch_wait=batch_wait
        )
        # Stop at the model's end tokens and at the tokenizer's EOS, which SFT appends after
        # every response (the two differ in some checkpoints).
        configured = model.generation_config.eos_token_id
        configured = configured if isinstance(configured, (list, tuple)) else [configured]
        self.eos_token_ids: list[int] = list(
            dict.fromkeys(e for e in (*configured, tokenizer.eos_token_id) if e is not None)
        )
        if not self.eos_token_ids:
            raise HetlmError(
                "neither the model's generation config nor the tokenizer names an "
                "end-of-sequence token, so replies could not stop"
            )
        pad = tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else self.eos_token_ids[0]
        self.context_length: int | None = getattr(model.config, "max_position_embeddings", None)

    @property
    def device(self) -> Any:
        return self.model.device

    def encode(self, messages: Sequence[Message]) -> list[int]:
        """Prompt ids for the conversation (ending with a user turn), as in training."""
        return prompt_ids(normalize_conversation(messages), self.tokenizer, self.template)

    def encode_text(self, prompt: str) -> list[int]:
        """Ids of a plain-text prompt (``/v1/completions``): the tokenizer's own special
        tokens (a BOS for LLaMA-style ones), no template."""
        return list(self.tokenizer(prompt)["input_ids"])

    def stream(
        self,
        messages: Sequence[Message] | None = None,
        settings: GenerationSettings | None = None,
        *,
        ids: list[int] | None = None,
    ) -> Generation:
        """Queue a reply; iterate the result for text pieces. Raises
        :class:`~hetlm.serve.batching.QueueFull` when the queue is at its limit."""
        settings = settings or GenerationSettings()
        if ids is None:
            if messages is None:
                raise ValueError("stream() needs messages or ids")
            ids = self.encode(messages)
        if not ids:
            raise HetlmError("the prompt is empty (no tokens): give some text")
        if self.context_length and len(ids) >= self.context_length:
            raise HetlmError(
                f"the conversation is {len(ids)} tokens, at or over the model's "
                f"context of {self.context_length}: shorten it"
            )
        if self.context_length:
            room = self.context_length - len(ids)
            if settings.max_new_tokens > room:
                settings = replace(settings, max_new_tokens=room)
        return self.scheduler.submit(Generation(ids, settings))

    def close(self) -> None:
        """Stop the generation worker (before the process exits)."""
        self.scheduler.close()

    def reply(
        self, messages: Sequence[Message], settings: GenerationSettings | None = None
    ) -> tuple[str, Generation]:
        """The whole reply, and the finished generation (token counts, finish reason)."""
        generation = self.stream(messages, settings)
        return generation.text(), generation


# ---------------------------------------------------------------- loading


def _quantization_config(load_in_8bit: bool, load_in_4bit: bool) -> Any:
    if load_in_8bit and load_in_4bit:
        raise HetlmError("choose one of --load-in-8bit and --load-in-4bit")
    if not (load_in_8bit or load_in_4bit):
        return None
    try:
        import accelerate  # noqa: F401  (transformers needs it to place quantized weights)
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise HetlmError(
            f"8-bit and 4-bit loading need bitsandbytes and accelerate ({exc.name} "
            "is missing): pip install 'hetlm[quant]'"
        ) from exc
    from transformers import BitsAndBytesConfig

    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    # NF4 weights with bf16 compute: the QLoRA recipe (V100s lack bf16: fp16 compute there).
    bf16 = not torch.cuda.is_available() or "bf16" in cuda_precisions(
        torch.cuda.get_device_capability()
    )  # by compute capability: a V100's bf16 is emulated
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16 if bf16 else torch.float16,
    )


def load_chat_model(
    model_dir: str | Path,
    adapter_dir: str | Path | None = None,
    *,
    load_in_8bit: bool = False,
    load_in_4bit: bool = False,
    template: str | Path | None = None,
    device: str | None = None,
    name: str | None = None,
    max_batch: int = 8,
    max_queue: int = 64,
    batch_wait: float = 0.01,
) -> ChatEngine:
    """A :class:`ChatEngine` for a saved causal LM (a local folder or a hub name, see
    :mod:`hetlm.serve.model_source`), optionally with a LoRA adapter on top and quantized by
    bitsandbytes (the ``quant`` extra).

    ``template`` overrides the template recorded with the adapter or model (``auto`` when none
    is recorded). ``device`` defaults to CUDA when available. ``max_batch``, ``max_queue`` and
    ``batch_wait`` size the engine's batch scheduler.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from hetlm.chat.templates import TEMPLATE_FILE
    from hetlm.serve.model_source import (
        check_causal_lm,
        hub_error,
        hub_file,
        resolve_model_source,
    )
    from hetlm.sft.export import check_adapter_dir, has_tokenizer, import_peft, tokenizer_dir

    source = resolve_model_source(model_dir)
    adapter_path = check_adapter_dir(adapter_dir) if adapter_dir is not None else None
    quantization = _quantization_config(load_in_8bit, load_in_4bit)
    peft = import_peft() if adapter_path is not None else None
    device = device or default_device()
    label = name or (adapter_path.resolve().name if adapter_path else source.label)

    try:
        config = AutoConfig.from_pretrained(source.location)
    except Exception as exc:  # a hub name that is not there, or not in the offline cache
        if source.local:
            raise HetlmError(
                f"cannot read {source.location}/config.json: {' '.join(str(exc).split())[:300]}"
            ) from exc
        raise hub_error(source, exc) from exc
    check_causal_lm(config, label)

    if source.local:
        tokenizer_from: str | Path = tokenizer_dir(Path(source.location), adapter_path)
    else:
        tokenizer_from = (
            adapter_path if adapter_path and has_tokenizer(adapter_path) else source.location
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
        kwargs: dict[str, Any] = {"dtype": "auto"}
        if quantization is not None:
            kwargs.update(quantization_config=quantization, device_map={"": device})
        model = AutoModelForCausalLM.from_pretrained(source.location, **kwargs)
    except HetlmError:
        raise
    except OSError as exc:
        if source.local:
            raise
        raise hub_error(source, exc) from exc
    if quantization is None:
        model = model.to(device)
    if peft is not None:
        model = peft.PeftModel.from_pretrained(model, adapter_path)

    if template is None:
        saved = []
        if adapter_path is not None:
            saved.append(load_saved_template(adapter_path, tokenizer))
        model_record = hub_file(source, TEMPLATE_FILE)
        if model_record is not None:
            saved.append(load_saved_template(model_record.parent, tokenizer))
        chosen = next((t for t in saved if t is not None), None)
    else:
        chosen = resolve_template(template, tokenizer)
    return ChatEngine(
        model,
        tokenizer,
        chosen,
        name=label,
        max_batch=max_batch,
        max_queue=max_queue,
        batch_wait=batch_wait,
    )
