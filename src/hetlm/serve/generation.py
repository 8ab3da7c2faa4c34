"""Loading a chat model and streaming its replies.

The prompt is built by :func:`hetlm.sft.masking.prompt_ids` with the template recorded when the
model was trained (``hetlm_template.json`` in the adapter or model folder; otherwise ``auto``):
a model answers well only in the format it was tuned on, token for token.

Generation runs ``model.generate`` in a worker thread with a ``TextIteratorStreamer``; the
caller iterates text pieces as they are decoded. One lock per engine lets one generation run at
a time: a second request waits instead of doubling the memory and halving both speeds, and a
cancelled reply (client gone, Stop pressed) stops at the next token.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from hetlm.errors import HetlmError
from hetlm.sft.data import Message, RowError, check_turn_order
from hetlm.sft.masking import prompt_ids
from hetlm.sft.templates import PromptTemplate, load_saved_template, resolve_template


@dataclass(frozen=True)
class GenerationSettings:
    """Sampling settings; ``temperature == 0`` means greedy decoding.

    Only temperature and top-p shape the distribution (top-k is switched off), as in the
    OpenAI API, so the same numbers mean the same thing in the UI and the API.
    """

    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 256
    seed: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.temperature <= 2:
            raise HetlmError(f"temperature must be in [0, 2], got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise HetlmError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise HetlmError(f"max new tokens must be at least 1, got {self.max_new_tokens}")

    def generate_kwargs(self) -> dict[str, Any]:
        if self.temperature == 0:
            return {"do_sample": False, "max_new_tokens": self.max_new_tokens}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p,
                "top_k": 0, "max_new_tokens": self.max_new_tokens}


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


class _Cancel(StoppingCriteria):
    """A stopping criterion that ends generation when ``event`` is set."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool,
                          device=input_ids.device)


class Generation:
    """One streamed reply. Iterate for text pieces; afterwards ``completion_tokens`` and
    ``finish_reason`` ("stop": an end-of-sequence token; "length": max new tokens reached)
    are set. ``cancel()`` stops it early (safe from any thread)."""

    def __init__(self, engine: ChatEngine, ids: list[int], settings: GenerationSettings):
        self.engine = engine
        self.settings = settings
        self.prompt_tokens = len(ids)
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self._cancelled = threading.Event()
        self._streamer = TextIteratorStreamer(engine.tokenizer, skip_prompt=True,
                                              skip_special_tokens=True)
        self._stopping = StoppingCriteriaList([_Cancel(self._cancelled)])
        self._thread = threading.Thread(target=self._run, args=(ids,), daemon=True,
                                        name="hetlm-generate")
        self._thread.start()

    def _run(self, ids: list[int]) -> None:
        engine = self.engine
        try:
            with engine.lock, torch.inference_mode():
                if self._cancelled.is_set():
                    self.finish_reason = "cancelled"
                    return
                if self.settings.seed is not None:
                    torch.manual_seed(self.settings.seed)
                input_ids = torch.tensor([ids], dtype=torch.long, device=engine.device)
                output = engine.model.generate(
                    input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                    streamer=self._streamer, stopping_criteria=self._stopping,
                    eos_token_id=engine.eos_token_ids, pad_token_id=engine.pad_token_id,
                    **self.settings.generate_kwargs())
            new = output[0, len(ids):].tolist()
            self.completion_tokens = len(new)
            if self._cancelled.is_set():
                self.finish_reason = "cancelled"
            elif new and new[-1] in engine.eos_token_ids:
                self.finish_reason = "stop"
            else:
                self.finish_reason = "length" if len(new) >= self.settings.max_new_tokens \
                    else "stop"
        except BaseException as exc:  # re-raised in the consuming thread
            self.error = exc
        finally:
            if self.error is not None or self.finish_reason == "cancelled":
                self._streamer.on_finalized_text("", stream_end=True)

    def __iter__(self) -> Iterator[str]:
        for piece in self._streamer:
            if piece:
                yield piece
        self._thread.join()
        if self.error is not None:
            raise self.error

    def text(self) -> str:
        """Wait for the whole reply."""
        return "".join(self)

    def cancel(self) -> None:
        self._cancelled.set()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)


class ChatEngine:
    """A causal LM, its tokenizer and its prompt template, ready to answer conversations."""

    def __init__(self, model: Any, tokenizer: Any, template: PromptTemplate | None = None, *,
                 name: str = "hetlm") -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.template = template or resolve_template("auto", tokenizer)
        self.name = name
        self.lock = threading.Lock()
        # Stop at the model's end tokens and at the tokenizer's EOS, which SFT appends after
        # every response (the two differ in some checkpoints).
        configured = model.generation_config.eos_token_id
        configured = configured if isinstance(configured, (list, tuple)) else [configured]
        self.eos_token_ids: list[int] = list(dict.fromkeys(
            e for e in (*configured, tokenizer.eos_token_id) if e is not None))
        if not self.eos_token_ids:
            raise HetlmError("neither the model's generation config nor the tokenizer names an "
                             "end-of-sequence token, so replies could not stop")
        pad = tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else self.eos_token_ids[0]
        self.context_length: int | None = getattr(model.config, "max_position_embeddings", None)

    @property
    def device(self) -> Any:
        return self.model.device

    def encode(self, messages: Sequence[Message]) -> list[int]:
        """Prompt ids for the conversation (ending with a user turn), as in training."""
        return prompt_ids(normalize_conversation(messages), self.tokenizer, self.template)

    def stream(self, messages: Sequence[Message] | None = None,
               settings: GenerationSettings | None = None, *,
               ids: list[int] | None = None) -> Generation:
        """Start generating a reply; iterate the result for text pieces."""
        settings = settings or GenerationSettings()
        if ids is None:
            if messages is None:
                raise ValueError("stream() needs messages or ids")
            ids = self.encode(messages)
        if self.context_length and len(ids) >= self.context_length:
            raise HetlmError(f"the conversation is {len(ids)} tokens, at or over the model's "
                             f"context of {self.context_length}: shorten it")
        if self.context_length:
            room = self.context_length - len(ids)
            if settings.max_new_tokens > room:
                settings = GenerationSettings(settings.temperature, settings.top_p, room,
                                              settings.seed)
        return Generation(self, ids, settings)

    def reply(self, messages: Sequence[Message], settings: GenerationSettings | None = None
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
        raise HetlmError(f"8-bit and 4-bit loading need bitsandbytes and accelerate ({exc.name} "
                         "is missing): pip install 'hetlm[quant]'") from exc
    from transformers import BitsAndBytesConfig

    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    # NF4 weights with bf16 compute: the QLoRA recipe (V100s lack bf16: fp16 compute there).
    bf16 = not torch.cuda.is_available() or torch.cuda.is_bf16_supported()
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_compute_dtype=torch.bfloat16 if bf16 else torch.float16)


def load_chat_model(model_dir: str | Path, adapter_dir: str | Path | None = None, *,
                    load_in_8bit: bool = False, load_in_4bit: bool = False,
                    template: str | Path | None = None, device: str | None = None,
                    name: str | None = None) -> ChatEngine:
    """A :class:`ChatEngine` for a saved causal LM, optionally with a LoRA adapter on top and
    quantized by bitsandbytes (the ``quant`` extra).

    ``template`` overrides the template recorded with the adapter or model (``auto`` when none
    is recorded). ``device`` defaults to CUDA when available.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hetlm.sft.export import check_adapter_dir, check_model_dir, import_peft, tokenizer_dir

    model_path = check_model_dir(model_dir)
    adapter_path = check_adapter_dir(adapter_dir) if adapter_dir is not None else None
    quantization = _quantization_config(load_in_8bit, load_in_4bit)
    peft = import_peft() if adapter_path is not None else None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir(model_path, adapter_path))
    kwargs: dict[str, Any] = {"dtype": "auto"}
    if quantization is not None:
        kwargs.update(quantization_config=quantization, device_map={"": device})
    model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    if quantization is None:
        model = model.to(device)
    if peft is not None:
        model = peft.PeftModel.from_pretrained(model, adapter_path)

    if template is None:
        saved = [load_saved_template(d, tokenizer) for d in (adapter_path, model_path) if d]
        chosen = next((t for t in saved if t is not None), None)
    else:
        chosen = resolve_template(template, tokenizer)
    label = name or (adapter_path or model_path).resolve().name
    return ChatEngine(model, tokenizer, chosen, name=label)
