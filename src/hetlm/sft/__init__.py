"""Supervised fine-tuning (instruction tuning) inputs: data, label masking, batches, export.

- :mod:`hetlm.sft.data`: instruction / chat JSON Lines (or a ``datasets`` name) into
  :class:`~hetlm.sft.data.Example` objects, with every bad row reported by file and line;
- :mod:`hetlm.sft.masking`: a conversation's template segments (:mod:`hetlm.chat`, shared with
  serving) into ``input_ids`` + ``labels`` (loss on the response only, exactly), with a
  truncation policy that never cuts a response silently;
- :mod:`hetlm.sft.collator`: padded micro-batches with ``num_targets`` for the token-exact loss,
  length grouping, and the summed next-token loss;
- :mod:`hetlm.sft.export`: merging a LoRA adapter into its base model.

The training loop itself lives in :mod:`hetlm.train`.
"""
