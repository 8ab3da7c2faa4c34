"""Online rebalancing: new shares from measured speeds, the same model as without it.

The arithmetic is the planner's (shares proportional to speed, capped by memory, one number of
micro-steps); the tests here check the decision (hysteresis, caps, the sum) and, on two gloo
ranks where rank 1 is made slow, that the rebalanced run trains exactly the model of a run
without rebalancing, and resumes on the split it had rebalanced to.
"""

from __future__ import annotations

import json
import os
import time

import pytest
from _dist import final_weights, max_abs_diff, run_ranks, run_single
from conftest import tiny_config

from hetlm.errors import HetlmError
from hetlm.topology import BatchSplit
from hetlm.train.rebalance import Rebalancer, check_rebalance, predicted_step_s


def test_a_wrong_equal_split_moves_to_the_speeds():
    rebalancer = Rebalancer(every=10, caps=[16, 16])
    rebalancer.observe([8, 8], [1.0, 2.0])  # rank 1 runs at half the speed
    rebalancer.observe([8, 8], [1.0, 2.0])
    decision = rebalancer.propose(BatchSplit(24, 1, (12, 12)))
    assert decision is not None
    assert decision.new.shares == (16, 8) and sum(decision.new.shares) == 24
    assert decision.speeds == (8.0, 4.0)
    # 12 samples at 4/s = 3 s before; 16 at 8/s = 8 at 4/s = 2 s after: a third shorter
    assert decision.expected_gain == pytest.approx(1 / 3)
    assert decision.event()["old_shares"] == [12, 12]


def test_caps_bound_the_fast_rank_and_may_add_micro_steps():
    rebalancer = Rebalancer(every=1, caps=[10, 4])
    rebalancer.observe([6, 6], [1.0, 6.0])  # 6x faster: would take 10.3 of 12
    decision = rebalancer.propose(BatchSplit(12, 1, (6, 6)))
    assert decision is not None and decision.new.shares == (10, 2)  # 10 is rank 0's cap
    tight = Rebalancer(every=1, caps=[4, 4])
    tight.observe([6, 6], [1.0, 3.0])
    more = tight.propose(BatchSplit(12, 2, (6, 6)))
    assert more is not None and more.new.micro_steps == 2 and max(more.new.shares) <= 8
    assert all(s <= 2 * cap for s, cap in zip(more.new.shares, [4, 4], strict=True))


def test_hysteresis_keeps_the_split_on_small_or_no_gain():
    rebalancer = Rebalancer(every=5, caps=[16, 16], min_gain=0.05)
    rebalancer.observe([12, 12], [1.0, 1.04])  # 4% apart: noise
    assert rebalancer.propose(BatchSplit(24, 1, (12, 12))) is None
    assert rebalancer.propose(BatchSplit(24, 1, (12, 12))) is None  # empty window: nothing
    assert rebalancer.due(10) and not rebalancer.due(11)
    assert predicted_step_s(BatchSplit(24, 1, (16, 8)), [8.0, 4.0]) == 2.0


def test_settings_that_cannot_rebalance_are_refused():
    check_rebalance(0, "fsdp2", None, 2)  # off: nothing to check
    with pytest.raises(HetlmError, match="use train.engine ddp or zero1"):
        check_rebalance(10, "fsdp2", [8, 8], 2)
    with pytest.raises(HetlmError, match="give train.max_micro_batch"):
        check_rebalance(10, "ddp", None, 2)
    with pytest.raises(HetlmError, match="has 3 entries but 2 ranks"):
        check_rebalance(10, "ddp", [8, 8, 8], 2)


def slow_rank_1() -> None:
    """(worker setup) rank 1's forward takes 30 ms longer: it is the slow node."""
    if os.environ["RANK"] != "1":
        return
    from hetlm.models.masked_lm import SparseMaskedLM

    original = SparseMaskedLM.forward

    def forward(self, *args, **kwargs):
        if self.training:
            time.sleep(0.03)
        return original(self, *args, **kwargs)

    SparseMaskedLM.forward = forward


def test_rebalanced_run_trains_the_same_model_and_resumes_on_its_split(tiny_packed, tmp_path):
    reference = tmp_path / "one"
    run_single(tiny_config(tiny_packed, reference, max_steps=6))
    config = tiny_config(
        tiny_packed,
        tmp_path / "rebalanced",
        max_steps=6,
        micro_batch={"per_rank": [4, 4]},
        rebalance=2,
        max_micro_batch=8,
        save_steps=4,
    )
    run_ranks(config, world=2, setup="test_rebalance.slow_rank_1", stop_at_step=4, timeout_s=60)
    records = [
        json.loads(line)
        for line in (tmp_path / "rebalanced" / "metrics.jsonl").read_text().splitlines()
    ]
    events = [r for r in records if r.get("event") == "rebalance"]
    assert events and events[0]["step"] == 2 and events[0]["old_shares"] == [4, 4]
    moved = events[-1]["new_shares"]
    assert moved[0] > moved[1] and sum(moved) == 8  # samples went to the fast rank
    steps = [r for r in records if "event" not in r]
    assert steps[-1]["compute_s_per_rank"][1] > steps[-1]["compute_s_per_rank"][0]
    state = json.loads(
        (
            tmp_path / "rebalanced" / "checkpoints" / "step-00000004" / "trainer_state.json"
        ).read_text()
    )
    assert state["shares"] == moved
    run_ranks(config, world=2, setup="test_rebalance.slow_rank_1", resume=True, timeout_s=60)
    records = [
        json.loads(line)
        for line in (tmp_path / "rebalanced" / "metrics.jsonl").read_text().splitlines()
    ]
    resumed = next(r for r in records if r.get("event") == "resume")
    assert resumed["shares"] == moved  # continued on the rebalanced split
    diff = max_abs_diff(final_weights(reference), final_weights(tmp_path / "rebalanced"))
    assert diff <= 1e-5, f"rebalanced vs one process: {diff:.2e}"
