"""A tiny Japanese byte-level BPE tokenizer and a tiny instruction-tuned LLaMA for the tests.

Built once per test session (a few seconds) into a folder cached at module level, since three
test modules use it. The tokenizer adds BOS like LLaMA's and has EOS and PAD. The model (hidden
32, 2 layers) is instruction-tuned on :data:`CHAT_PAIRS` with hetlm's own masking, collator and
summed loss until it answers them word for word (greedy): so serving tests can check the exact
reply, which holds only if serving builds the prompt token for token as training did.
"""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOLLY = REPO / "data" / "instruct_dolly_ja" / "databricks-dolly-15k-ja_v0_every3rd.jsonl"
VOCAB_SIZE = 1200
CHAT_PAIRS = [
    ("こんにちは", "こんにちは！何かお手伝いできることはありますか？"),
    ("日本の首都はどこですか？", "日本の首都は東京です。"),
    ("富士山の高さは？", "富士山の高さは3776メートルです。"),
]
_CACHE: dict[str, Path] = {}


def dolly_rows(count: int, start: int = 0) -> list[dict]:
    """Rows ``start .. start+count`` of the shipped dolly-ja sample."""
    rows = []
    with DOLLY.open(encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i >= start + count:
                break
            if i >= start:
                rows.append(json.loads(line))
    return rows


def build_tokenizer(directory: Path):
    """Byte-level BPE (no unknown tokens, any text) trained on 400 dolly-ja rows."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [f"{r['instruction']}\n{r['input']}\n{r['output']}" for r in dolly_rows(400)]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=256,
    )
    tokenizer.save_pretrained(directory)
    return tokenizer


def build_model(tokenizer, seed: int = 0):
    """A random tiny LLaMA sized for the tokenizer (not saved)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def memorize(model, tokenizer, pairs=CHAT_PAIRS, steps: int = 150) -> float:
    """Overfit the model on the pairs (ja-alpaca template, response-only loss); final loss."""
    import torch

    from hetlm.chat.messages import Message
    from hetlm.chat.templates import JA_ALPACA
    from hetlm.sft.collator import SFTCollator, summed_next_token_loss
    from hetlm.sft.data import Example
    from hetlm.sft.masking import tokenize_examples

    examples = [
        Example((Message("user", q), Message("assistant", a)), index=i)
        for i, (q, a) in enumerate(pairs)
    ]
    tokenized, _ = tokenize_examples(examples, tokenizer, JA_ALPACA, max_length=256)
    batch = SFTCollator(tokenizer.pad_token_id)(tokenized)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: more threads only contend (2 cores, busy CI)
    try:
        model.train()
        for _ in range(steps):
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            loss = summed_next_token_loss(logits, batch.labels) / batch.num_targets
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
        model.eval()
    return float(loss.detach())


def tiny_chat_model(root: Path) -> Path:
    """A folder with the tiny instruction-tuned LlamaForCausalLM and its tokenizer (built once),
    with the ja-alpaca template recorded as hetlm_template.json."""
    if "model" not in _CACHE:
        from hetlm.chat.templates import JA_ALPACA, save_template

        directory = root / "tiny-llama"
        directory.mkdir(parents=True, exist_ok=True)
        tokenizer = build_tokenizer(directory)
        model = build_model(tokenizer)
        memorize(model, tokenizer)
        model.save_pretrained(directory)
        save_template(JA_ALPACA, directory)
        _CACHE["model"] = directory
    return _CACHE["model"]
