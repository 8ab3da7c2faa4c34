"""The chat format, shared by instruction tuning (:mod:`hetlm.sft`) and serving (:mod:`hetlm.serve`).

- :mod:`hetlm.chat.messages`: :class:`~hetlm.chat.messages.Message`, roles and turn order;
- :mod:`hetlm.chat.templates`: a conversation as text segments, each known to be prompt or
  response (the tokenizer's chat template, or a Japanese instruction template), saved next to a
  trained model;
- :mod:`hetlm.chat.prompt`: segments into token ids, identically for training and generation.
"""
