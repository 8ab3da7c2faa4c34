"""The GPU speed-ups keep the invariants: prefetching and torch.compile change no result.

Prefetching builds step t+1 in a thread while step t runs; what a step gets must still be a pure
function of the sampler's position, the sampler's state must advance only when a step is taken,
and a prefetched step must be dropped when a resume or rollback moves the sampler. Compiling the
blocks must keep split invariance and exact resume (checked on CPU, where inductor compiles
C++; the GPU check measures the speed).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _dist import final_weights, max_abs_diff, run_ranks, run_single
from conftest import tiny_config

from hetlm.data.prefetch import StepPrefetcher, pin_batch
from hetlm.data.sampler import HeterogeneousBatchSampler
from hetlm.topology import BatchSplit


def _sampler(rank: int = 1) -> HeterogeneousBatchSampler:
    return HeterogeneousBatchSampler(23, BatchSplit.from_micro_batches(8, [3, 5]), rank, seed=7)


def test_prefetched_steps_are_the_sampler_steps_across_epochs():
    plain, ahead = _sampler(), _sampler()
    built: list[tuple[int, int]] = []

    def build(batch):
        built.append((batch.epoch, batch.step_in_epoch))
        return [ids * 10 for ids in batch.micro_batches]

    prefetcher = StepPrefetcher(ahead, build)
    try:
        for _ in range(7):  # 2 steps an epoch (23 // 8): crosses three epoch boundaries
            expected = plain.next_step()
            batch, micro = prefetcher.next()
            assert (batch.epoch, batch.step_in_epoch) == (expected.epoch, expected.step_in_epoch)
            assert all(
                np.array_equal(m, e * 10)
                for m, e in zip(micro, expected.micro_batches, strict=True)
            )
            assert ahead.state_dict() == plain.state_dict()  # advanced by the step taken only
        prefetcher._pending[1].result()  # the thread has built the step after them
        assert built[-1] == (3, 1) and len(built) == 8  # one step ahead, none skipped
        # a resume (or rollback) moves the sampler: the prefetched step is dropped, not used
        state = plain.state_dict() | {"epoch": 0, "step_in_epoch": 1}
        plain.load_state_dict(state)
        ahead.load_state_dict(state)
        batch, _ = prefetcher.next()
        assert (batch.epoch, batch.step_in_epoch) == (0, 1) == (plain.next_step().epoch, 1)
    finally:
        prefetcher.close()


def test_pin_batch_pins_every_tensor_field_and_keeps_the_rest(monkeypatch):
    from hetlm.data.collators import MLMBatch

    pinned = []

    def pin_memory(self):  # a CPU-only torch cannot pin: record the calls instead
        pinned.append(self)
        return self.clone()

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    ids = torch.ones(2, 4, dtype=torch.long)
    batch = MLMBatch(
        ids, torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 1, dtype=torch.long), 2, 8
    )
    out = pin_batch(batch)
    assert len(pinned) == 3 and out.input_ids is not ids and torch.equal(out.input_ids, ids)
    assert (out.num_targets, out.num_tokens) == (2, 8)
    assert pin_batch([1, 2]) == [1, 2]


@pytest.mark.timeout(600)
def test_compiled_blocks_keep_split_invariance_and_exact_resume(tiny_packed, tmp_path):
    reference = tmp_path / "eager"
    run_single(tiny_config(tiny_packed, reference, max_steps=4, compile=False, prefetch=False))
    split = tiny_config(
        tiny_packed, tmp_path / "split", max_steps=4, compile=True, micro_batch={"per_rank": [3, 5]}
    )
    run_ranks(split, world=2, timeout_s=300)
    diff = max_abs_diff(final_weights(reference), final_weights(tmp_path / "split"))
    assert diff <= 1e-5, f"compiled [3, 5] vs eager 8: {diff:.2e}"
    straight = tiny_config(tiny_packed, tmp_path / "straight", max_steps=4, compile=True)
    run_single(straight)
    stopped = tiny_config(
        tiny_packed, tmp_path / "stopped", max_steps=4, compile=True, save_steps=2
    )
    run_single(stopped, stop_at_step=2)
    run_single(stopped, resume=True)
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "stopped")
    assert all(torch.equal(a[k], b[k]) for k in a), f"max diff {max_abs_diff(a, b):.2e}"
    # the checkpointed and saved names are the eager model's (nn.Module.compile, in place)
    assert set(a) == set(final_weights(reference))


def test_target_index_selects_what_the_boolean_mask_selected():
    """The causal-LM heads gather the predicting positions from an index built on the CPU;
    the loss and accuracy equal those of the boolean mask (which would sync a GPU)."""
    from hetlm.models.causal_head import FusedSparseCausalLM
    from hetlm.models.causal_lm import IGNORE_INDEX, SparseCausalLM, target_index
    from hetlm.models.presets import model_config

    torch.manual_seed(0)
    labels = torch.randint(5, 100, (3, 9))
    labels[0, :4] = IGNORE_INDEX  # a prompt
    labels[2, 6:] = IGNORE_INDEX  # padding
    index = target_index(labels)
    keep = labels[:, 1:] != IGNORE_INDEX
    assert len(index) == int(keep.sum())
    assert torch.equal(labels.reshape(-1)[index + 1], labels[:, 1:][keep])
    from transformers import AutoModelForCausalLM

    config = model_config(
        "llama", "tiny", vocab_size=100, max_position_embeddings=64, pad_token_id=0
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    for objective in (SparseCausalLM(model), FusedSparseCausalLM(model, chunk=4)):
        with torch.no_grad():
            by_mask = objective(labels.clamp(min=0), labels)
            by_index = objective(labels.clamp(min=0), labels, target_index=index)
        assert torch.allclose(by_mask[0], by_index[0], rtol=1e-6) and by_mask[1] == by_index[1]
