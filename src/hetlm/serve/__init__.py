"""Using a trained causal LM: streaming generation, a chat UI, an OpenAI-compatible API.

- :mod:`hetlm.serve.generation`: :func:`load_chat_model` (base model, optional LoRA adapter,
  optional 8/4-bit) and :class:`ChatEngine`, which formats a conversation with the template the
  model was trained with and streams the reply;
- :mod:`hetlm.serve.batching`: the scheduler that answers concurrent requests with one batched
  ``generate`` call (per-row settings, stops and cancellation; a bounded queue);
- :mod:`hetlm.serve.model_source`: a local folder or a hub name (never a hub lookup for a
  local-looking path), and the refusal of masked LMs;
- :mod:`hetlm.serve.terminal`: ``hetlm chat --cli``;
- :mod:`hetlm.serve.chat_ui`: ``hetlm chat`` (gradio);
- :mod:`hetlm.serve.openai_api`: ``hetlm serve`` (FastAPI + uvicorn).

gradio, FastAPI and uvicorn are the ``chat`` extra and are imported only by the modules that
need them.
"""
