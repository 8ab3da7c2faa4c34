"""The headline invariant: the model does not depend on how the global batch is split.

Tiny BERT, fp32, dropout 0, one seed, 3 optimizer steps: one process with B=8, two ranks with
micro-batches (3, 5), two ranks with (2, 2) x 2 micro-steps and three ranks with (2, 2, 4) give
the same weights. The negative check shows the test can fail: with a per-rank *mean* loss (the
reference code's bug) the (3, 5) run differs.
"""

from __future__ import annotations

import pytest
import torch
from _dist import final_weights, max_abs_diff, run_ranks, run_single
from conftest import tiny_config

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def reference(tiny_packed, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    run_single(tiny_config(tiny_packed, out))
    return final_weights(out)


@pytest.mark.parametrize("per_rank", [[3, 5], [2, 2], [2, 2, 4]], ids=["3+5", "2+2x2", "2+2+4"])
def test_split_gives_the_single_process_model(per_rank, reference, tiny_packed, tmp_path):
    config = tiny_config(tiny_packed, tmp_path, micro_batch={"per_rank": per_rank})
    run_ranks(config, world=len(per_rank))
    diff = max_abs_diff(reference, final_weights(tmp_path))
    print(f"split {per_rank}: max abs diff {diff:.2e}")
    assert diff <= TOLERANCE, f"split {per_rank}: max abs diff {diff:.2e}"
    # the run really trained: weights moved away from the initialisation
    init = tiny_config(
        tiny_packed, tmp_path / "init", max_steps=1, learning_rate=1e-12, warmup_steps=0
    )
    run_single(init)
    assert max_abs_diff(reference, final_weights(tmp_path / "init")) > 1e-3


def per_rank_mean_step(engine, precision, optimizer, scheduler, ctx, micro_batches, max_grad_norm):
    """The reference code's bug: each rank averages over its own tokens, DDP averages ranks."""
    from hetlm.train.trainer import StepResult

    n_local = sum(mb.num_targets for mb in micro_batches)
    loss_total = torch.zeros(1)
    for i, mb in enumerate(micro_batches):
        with engine.sync_gradients(i == len(micro_batches) - 1):
            loss_sum, _ = engine.module(mb.input_ids, mb.masked_positions, mb.masked_labels)
            precision.backward(loss_sum / n_local)
        loss_total += loss_sum.detach()
    grad_norm = engine.clip(max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss_total, (n_local,), (n_local * ctx.world_size,), float(grad_norm), True)


def test_per_rank_mean_loss_breaks_invariance(reference, tiny_packed, tmp_path):
    config = tiny_config(tiny_packed, tmp_path, micro_batch={"per_rank": [3, 5]})
    run_ranks(config, world=2, step_fn="test_split_invariance.per_rank_mean_step")
    diff = max_abs_diff(reference, final_weights(tmp_path))
    print(f"per-rank mean: {diff:.2e}")
    assert diff > 100 * TOLERANCE, f"per-rank mean loss should differ, got {diff:.2e}"
