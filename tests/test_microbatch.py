"""Every micro-batch the loop trains on has the MicroBatch interface, and ``num_tokens`` means
the same in each: real (non-padding) input tokens, the tokens of ``tokens_per_s``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hetlm.data.microbatch import MicroBatch

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
META = {
    "seq_len": 8,
    "vocab_size": 50,
    "special_token_ids": {"pad": PAD, "unk": UNK, "cls": CLS, "sep": SEP, "mask": MASK},
}
# three rows, the last two padded at the end: 8 + 6 + 4 = 18 real tokens of 24
ROWS = [
    [CLS, 10, 11, 12, 13, 14, 15, SEP],
    [CLS, 20, 21, 22, 23, SEP, PAD, PAD],
    [CLS, 30, 31, SEP, PAD, PAD, PAD, PAD],
]
REAL = 18


def _split():
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": ROWS})


@pytest.mark.parametrize("kind", ["mlm", "electra", "clm"])
def test_packed_readers_count_real_tokens(kind):
    from hetlm.data.readers import PackedCLMData, PackedElectraData, PackedMLMData

    if kind == "clm":
        data = PackedCLMData(_split(), META)
    else:
        cls = PackedMLMData if kind == "mlm" else PackedElectraData
        data = cls(_split(), META, mlm_probability=0.15, seed=0)
    batch = data.batch(np.arange(3), 0)
    assert isinstance(batch, MicroBatch)
    assert len(batch) == 3 and batch.num_tokens == REAL
    assert all(isinstance(v, torch.Tensor) for v in batch.model_inputs().values())
    assert all(c > 0 for c in batch.counts)


def test_mlm_collator_without_pad_id_counts_every_position():
    """None: the rows hold no padding (hetlm prepare's packed rows), as before."""
    from hetlm.data.collators import MLMCollator

    collator = MLMCollator(seq_len=8, vocab_size=50, mask_id=MASK, special_ids=[0, 1, 2, 3, 4])
    batch = collator(np.array(ROWS[:1]), np.arange(1), 0)
    assert batch.num_tokens == 8


def test_sft_batch_counts_real_tokens():
    from hetlm.sft.collator import SFTCollator
    from hetlm.sft.masking import IGNORE_INDEX, TokenizedExample

    examples = [
        TokenizedExample(index=i, input_ids=[5] * n, labels=[IGNORE_INDEX] * 2 + [5] * (n - 2))
        for i, n in enumerate((8, 6, 4))
    ]
    batch = SFTCollator(PAD)(examples)
    assert isinstance(batch, MicroBatch)
    assert len(batch) == 3 and batch.num_tokens == REAL and batch.padded_tokens == 24
