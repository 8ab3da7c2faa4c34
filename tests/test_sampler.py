"""The heterogeneous sampler: coverage, no overlap, determinism, shares, resume."""

import numpy as np
import pytest

from hetlm.data.sampler import HeterogeneousBatchSampler
from hetlm.errors import HetlmError
from hetlm.topology import BatchSplit


def _samplers(n, split, seed=0):
    return [HeterogeneousBatchSampler(n, split, r, seed) for r in range(split.world_size)]


def _epoch_indices(samplers):
    used = []
    steps = samplers[0].steps_per_epoch
    for _ in range(steps):
        for s in samplers:
            batch = s.next_step()
            used.extend(np.concatenate(batch.micro_batches).tolist())
    return used


@pytest.mark.parametrize("micro", [[3, 5], [2, 2], [1, 2, 5], [8]])
def test_each_index_once_per_epoch_and_tail_reported(micro):
    n = 103
    split = BatchSplit.from_micro_batches(8 if sum(micro) != 4 else 8, micro)
    samplers = _samplers(n, split)
    used = _epoch_indices(samplers)
    assert len(used) == len(set(used)) == (n // 8) * 8
    assert samplers[0].tail_size == n % 8
    assert set(range(n)) - set(used) and len(set(range(n)) - set(used)) == n % 8


def test_global_batch_is_independent_of_the_split():
    n = 64
    one = _samplers(n, BatchSplit.from_micro_batches(8, [8]))
    two = _samplers(n, BatchSplit.from_micro_batches(8, [3, 5]))
    four = _samplers(n, BatchSplit.from_micro_batches(8, [2, 2]))
    for _ in range(20):  # crosses an epoch boundary
        ref = np.concatenate(one[0].next_step().micro_batches).tolist()
        got2 = [i for s in two for i in np.concatenate(s.next_step().micro_batches).tolist()]
        got4 = [i for s in four for i in np.concatenate(s.next_step().micro_batches).tolist()]
        assert ref == got2 == got4


def test_requested_shares_and_equal_micro_steps():
    split = BatchSplit.from_micro_batches(26, [8, 5])  # 2 micro-steps
    assert split.micro_steps == 2
    a, b = _samplers(100, split)
    sa, sb = a.next_step(), b.next_step()
    assert [len(m) for m in sa.micro_batches] == [8, 8]
    assert [len(m) for m in sb.micro_batches] == [5, 5]


def test_deterministic_per_seed_and_epoch():
    split = BatchSplit.from_micro_batches(8, [3, 5])
    a = HeterogeneousBatchSampler(50, split, 1, seed=7)
    b = HeterogeneousBatchSampler(50, split, 1, seed=7)
    c = HeterogeneousBatchSampler(50, split, 1, seed=8)
    seq_a = [np.concatenate(a.next_step().micro_batches).tolist() for _ in range(12)]
    seq_b = [np.concatenate(b.next_step().micro_batches).tolist() for _ in range(12)]
    seq_c = [np.concatenate(c.next_step().micro_batches).tolist() for _ in range(12)]
    assert seq_a == seq_b != seq_c
    # epochs differ in order
    assert a.global_batch(0, 0).tolist() != a.global_batch(1, 0).tolist()


def test_resume_jumps_to_the_same_batch():
    split = BatchSplit.from_micro_batches(8, [3, 5])
    straight = HeterogeneousBatchSampler(50, split, 0, seed=3)
    for _ in range(9):
        straight.next_step()
    state = straight.state_dict()
    assert state["epoch"] == 1 and state["step_in_epoch"] == 3
    resumed = HeterogeneousBatchSampler(50, split, 0, seed=3)
    resumed.load_state_dict(state)
    for _ in range(5):
        assert [m.tolist() for m in resumed.next_step().micro_batches] == [
            m.tolist() for m in straight.next_step().micro_batches
        ]


def test_resume_with_another_split_same_global_batch_continues_the_data():
    old = _samplers(40, BatchSplit.from_micro_batches(8, [3, 5]))
    for _ in range(3):
        for s in old:
            s.next_step()
    new = _samplers(40, BatchSplit.from_micro_batches(8, [2, 2]))
    for s in new:
        s.load_state_dict(old[0].state_dict())
    expected = old[0].global_batch(0, 3).tolist()
    got = [i for s in new for i in np.concatenate(s.next_step().micro_batches).tolist()]
    assert got == expected


def test_resume_refuses_another_global_batch():
    s = HeterogeneousBatchSampler(40, BatchSplit.from_micro_batches(8, [8]), 0)
    state = s.state_dict()
    other = HeterogeneousBatchSampler(40, BatchSplit.from_micro_batches(16, [8]), 0)
    with pytest.raises(HetlmError, match="global_batch"):
        other.load_state_dict(state)


def test_too_small_dataset_and_bad_rank():
    split = BatchSplit.from_micro_batches(8, [3, 5])
    with pytest.raises(HetlmError, match="fewer than one global batch"):
        HeterogeneousBatchSampler(5, split, 0)
    with pytest.raises(HetlmError, match="outside"):
        HeterogeneousBatchSampler(50, split, 2)


def test_batch_split_errors():
    with pytest.raises(HetlmError, match="cannot make the global batch"):
        BatchSplit.from_micro_batches(10, [3, 5])
    with pytest.raises(HetlmError, match="2 ranks but 3 were launched"):
        BatchSplit.from_micro_batches(8, [3, 5]).check_world(3)
    with pytest.raises(HetlmError, match="sum to"):
        BatchSplit(8, 1, (3, 4))
