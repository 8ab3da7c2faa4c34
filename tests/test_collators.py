"""MLM masking is a pure function of (seed, epoch, sample index) with BERT's 80/10/10."""

import numpy as np

from hetlm.data.collators import MLMCollator

SPECIAL = [0, 1, 2, 3, 4]


def _collator(seed=0):
    return MLMCollator(seq_len=64, vocab_size=500, mask_id=4, special_ids=SPECIAL, seed=seed)


def _rows(n=6, seq=64):
    rng = np.random.default_rng(0)
    rows = rng.integers(5, 500, size=(n, seq))
    rows[:, 0], rows[:, -1], rows[:, 30] = 2, 3, 3
    return rows


def test_masking_depends_only_on_seed_epoch_index():
    rows, idx = _rows(), np.array([10, 11, 12, 13, 14, 15])
    whole = _collator()(rows, idx, epoch=0)
    parts = [_collator()(rows[a:b], idx[a:b], epoch=0) for a, b in [(0, 1), (1, 4), (4, 6)]]
    assert np.array_equal(
        whole.input_ids.numpy(), np.concatenate([p.input_ids.numpy() for p in parts])
    )
    assert np.array_equal(
        whole.masked_labels.numpy(), np.concatenate([p.masked_labels.numpy() for p in parts])
    )
    # reversed order in the batch: each sample masked the same way
    rev = _collator()(rows[::-1], idx[::-1], epoch=0)
    assert np.array_equal(rev.input_ids.numpy()[::-1], whole.input_ids.numpy())
    other_epoch = _collator()(rows, idx, epoch=1)
    other_seed = _collator(seed=1)(rows, idx, epoch=0)
    assert not np.array_equal(other_epoch.input_ids.numpy(), whole.input_ids.numpy())
    assert not np.array_equal(other_seed.input_ids.numpy(), whole.input_ids.numpy())


def test_specials_never_masked_labels_match_and_shapes_fixed():
    rows, idx = _rows(), np.arange(6)
    batch = _collator()(rows, idx, epoch=0)
    pos, lab = batch.masked_positions.numpy(), batch.masked_labels.numpy()
    assert batch.masked_positions.shape == (6, 10)  # ceil(64 * 0.15)
    for r in range(6):
        real = lab[r] != -100
        assert not np.isin(rows[r, pos[r, real]], SPECIAL).any()
        assert np.array_equal(lab[r, real], rows[r, pos[r, real]])
        assert len(set(pos[r, real])) == real.sum()
    assert batch.num_targets == int((lab != -100).sum())
    unmasked = np.ones_like(rows, dtype=bool)
    for r in range(6):
        unmasked[r, pos[r, lab[r] != -100]] = False
    assert np.array_equal(batch.input_ids.numpy()[unmasked], rows[unmasked])


def test_80_10_10_proportions():
    rows = np.tile(_rows(1, 128), (400, 1))
    col = MLMCollator(seq_len=128, vocab_size=500, mask_id=4, special_ids=SPECIAL)
    batch = col(rows, np.arange(400), epoch=0)
    ids, pos, lab = (
        batch.input_ids.numpy(),
        batch.masked_positions.numpy(),
        batch.masked_labels.numpy(),
    )
    real = lab != -100
    chosen = np.take_along_axis(ids, pos, 1)[real]
    original = lab[real]
    mask_frac = (chosen == 4).mean()
    kept_frac = (chosen == original).mean()
    assert 0.77 < mask_frac < 0.83
    assert 0.08 < kept_frac < 0.12 + 0.01  # random replacements can hit the original token
    candidates = 128 - 3
    assert abs(real.sum(1).mean() - round(candidates * 0.15)) < 1e-9
