"""Whole-word masking: only whole words, ~15% of tokens within the slots, pure per sample."""

from __future__ import annotations

import numpy as np
import pytest

from hetlm.data.collators import MLMCollator, continuation_mask

SPECIAL = [0, 1, 2, 3, 4]
VOCAB = 400
CONTINUATION = np.zeros(VOCAB, dtype=bool)
CONTINUATION[200:] = True  # ids 200.. are "##" pieces
SEQ = 128


def collator(seed: int = 0, seq_len: int = SEQ) -> MLMCollator:
    return MLMCollator(
        seq_len=seq_len,
        vocab_size=VOCAB,
        mask_id=4,
        special_ids=SPECIAL,
        seed=seed,
        whole_word=True,
        continuation=CONTINUATION,
    )


def make_rows(n: int, seq_len: int = SEQ, seed: int = 0) -> np.ndarray:
    """Sequences of words of 1-4 pieces, [CLS] ... [SEP] with a [SEP] inside."""
    rng = np.random.default_rng(seed)
    rows = np.empty((n, seq_len), dtype=np.int64)
    for r in range(n):
        tokens: list[int] = []
        while len(tokens) < seq_len:
            tokens.append(int(rng.integers(5, 200)))
            tokens.extend(int(x) for x in rng.integers(200, VOCAB, size=rng.integers(0, 4)))
        rows[r] = tokens[:seq_len]
        rows[r, 0], rows[r, -1], rows[r, seq_len // 2] = 2, 3, 3
    return rows


def words_of(ids: np.ndarray) -> list[list[int]]:
    """Positions of each word: a non-continuation candidate and the continuations after it."""
    words: list[list[int]] = []
    previous_candidate = False
    for position, token in enumerate(ids):
        candidate = token not in SPECIAL
        if candidate and CONTINUATION[token] and previous_candidate:
            words[-1].append(position)
        elif candidate:
            words.append([position])
        previous_candidate = candidate
    return words


def chosen_positions(batch, row: int) -> set[int]:
    labels = batch.masked_labels.numpy()[row]
    return set(batch.masked_positions.numpy()[row][labels != -100].tolist())


def test_only_whole_words_are_chosen_and_masked_alike():
    rows = make_rows(64)
    batch = collator()(rows, np.arange(64), epoch=0)
    ids = batch.input_ids.numpy()
    for r in range(64):
        chosen = chosen_positions(batch, r)
        assert chosen
        for word in words_of(rows[r]):
            inside = [p in chosen for p in word]
            assert all(inside) or not any(inside), f"row {r}: word {word} partly chosen"
            if all(inside):  # one 80/10/10 decision per word
                masked = [ids[r, p] == 4 for p in word]
                assert all(masked) or not any(masked)
                kept = [ids[r, p] == rows[r, p] for p in word]
                if not any(masked):
                    assert all(kept) or all(ids[r, p] >= 5 for p in word)
        # labels are the original tokens; nothing outside the chosen positions changed
        labels = batch.masked_labels.numpy()[r]
        positions = batch.masked_positions.numpy()[r]
        real = labels != -100
        assert np.array_equal(labels[real], rows[r, positions[real]])
        untouched = np.ones(SEQ, dtype=bool)
        untouched[list(chosen)] = False
        assert np.array_equal(ids[r, untouched], rows[r, untouched])


def test_count_is_about_15_percent_and_within_the_slots():
    rows = make_rows(300, seed=1)
    col = collator()
    batch = col(rows, np.arange(300), epoch=3)
    counts = (batch.masked_labels.numpy() != -100).sum(axis=1)
    candidates = SEQ - 3
    target = round(candidates * 0.15)
    assert batch.masked_positions.shape == (300, col.slots)
    assert counts.max() <= min(target, col.slots)
    assert 0.95 * target <= counts.mean() <= target  # whole words rarely leave a gap
    assert batch.num_targets == int(counts.sum())


def test_word_level_80_10_10():
    rows = make_rows(400, seed=2)
    batch = collator()(rows, np.arange(400), epoch=0)
    ids = batch.input_ids.numpy()
    masked = kept = total = 0
    for r in range(400):
        chosen = chosen_positions(batch, r)
        for word in words_of(rows[r]):
            if word[0] in chosen:
                total += 1
                masked += ids[r, word[0]] == 4
                kept += all(ids[r, p] == rows[r, p] for p in word)
    assert 0.76 < masked / total < 0.84
    assert 0.07 < kept / total < 0.14


def test_pure_function_of_seed_epoch_index():
    rows, idx = make_rows(6), np.array([10, 11, 12, 13, 14, 15])
    whole = collator()(rows, idx, epoch=0)
    parts = [collator()(rows[a:b], idx[a:b], epoch=0) for a, b in [(0, 1), (1, 4), (4, 6)]]
    for name in ("input_ids", "masked_positions", "masked_labels"):
        joined = np.concatenate([getattr(p, name).numpy() for p in parts])
        assert np.array_equal(getattr(whole, name).numpy(), joined)
    again = collator()(rows, idx, epoch=0)
    assert np.array_equal(again.input_ids.numpy(), whole.input_ids.numpy())
    assert not np.array_equal(
        collator()(rows, idx, epoch=1).input_ids.numpy(), whole.input_ids.numpy()
    )
    assert not np.array_equal(
        collator(seed=1)(rows, idx, epoch=0).input_ids.numpy(), whole.input_ids.numpy()
    )


def test_continuation_after_a_special_token_starts_a_word():
    ids = np.array([2, 250, 251, 10, 3, 260, 11, 3])  # "##" pieces right after [CLS] and [SEP]
    assert words_of(ids) == [[1, 2], [3], [5], [6]]
    col = MLMCollator(
        seq_len=8,
        vocab_size=VOCAB,
        mask_id=4,
        special_ids=SPECIAL,
        mlm_probability=0.5,
        whole_word=True,
        continuation=CONTINUATION,
    )
    for index in range(50):
        batch = col(ids[None], np.array([index]), epoch=0)
        chosen = chosen_positions(batch, 0)
        assert chosen and not chosen & {0, 4, 7}
        assert ({1, 2} <= chosen) or not ({1, 2} & chosen)


def test_continuation_mask_from_metadata_and_errors():
    meta = {"vocab_size": 10, "continuation_token_ids": [7, 9]}
    assert continuation_mask(meta).tolist() == [False] * 7 + [True, False, True]
    assert continuation_mask({"vocab_size": 10, "continuation_token_ids": None}) is None
    with pytest.raises(ValueError, match="continuation"):
        MLMCollator(seq_len=8, vocab_size=10, mask_id=4, special_ids=SPECIAL, whole_word=True)
    with pytest.raises(ValueError, match="one entry per token"):
        MLMCollator(
            seq_len=8,
            vocab_size=10,
            mask_id=4,
            special_ids=SPECIAL,
            whole_word=True,
            continuation=np.zeros(5, dtype=bool),
        )
