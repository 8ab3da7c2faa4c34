"""Precision: fp16 overflow skips a step on every rank together; a NaN loss stops the run.

The multi-rank test injects an inf into *one* rank's gradient (after DDP's all-reduce, or into
that rank's FSDP shard), which is the hard case: only that rank's scaler would see it. Without
the MAX all-reduce of the found-inf flag, DDP replicas would diverge (the loop's per-step check
raises) and ZeRO-1 would hang in its parameter broadcast (the 30 s timeout fails the test).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _dist import run_ranks, run_single
from conftest import tiny_config

from hetlm.errors import HetlmError
from hetlm.train.precision import Precision

INJECT_STEP = 4
STEPS = 5


def test_fp16_scaler_skips_the_step_on_inf_in_one_process():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    precision = Precision("fp16", torch.device("cpu"))
    precision.scaler = torch.amp.GradScaler("cpu", init_scale=16.0)  # no natural overflow here
    before = [p.detach().clone() for p in model.parameters()]
    with precision.autocast():
        loss = model(torch.randn(3, 4)).float().sum()
    precision.backward(loss)
    model.bias.grad[0] = float("inf")
    precision.unscale(optimizer)
    assert precision.step(optimizer) is False
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert precision.scaler.get_scale() == 8.0  # backed off
    optimizer.zero_grad()
    with precision.autocast():
        loss = model(torch.randn(3, 4)).float().sum()
    precision.backward(loss)
    assert precision.step(optimizer) is True  # unscale is done by step when not called before
    assert not torch.equal(before[0], model.weight)


def inject_inf_on_rank_1() -> None:
    """(worker setup) An inf in rank 1's own gradient at step INJECT_STEP; replicas dumped."""
    import torch.distributed as dist

    from hetlm.train import trainer
    from hetlm.train.precision import Precision as P

    original_unscale, calls = P.unscale, {"n": 0}

    def unscale(self, optimizer):
        calls["n"] += 1
        if calls["n"] == INJECT_STEP and dist.get_rank() == 1:
            param = next(
                p for g in optimizer.param_groups for p in g["params"] if p.grad is not None
            )
            grad = param.grad.to_local() if hasattr(param.grad, "to_local") else param.grad
            grad.view(-1)[0] = float("inf")
        original_unscale(self, optimizer)

    P.unscale = unscale
    original_final = trainer.Trainer.run

    def run(self, stop_at_step=None):
        summary = original_final(self, stop_at_step)
        if self.engine.name in ("ddp", "zero1"):  # replicated weights: each rank has a copy
            torch.save(
                self.engine.unwrapped.state_dict(), self.output_dir / f"replica-{self.ctx.rank}.pt"
            )
        return summary

    trainer.Trainer.run = run


@pytest.mark.parametrize(
    "engine",
    [{"engine": "ddp"}, {"engine": "zero1"}, {"engine": "fsdp2", "zero_stage": 3}],
    ids=["ddp", "zero1", "fsdp2-stage3"],
)
def test_fp16_overflow_on_one_rank_skips_the_step_on_every_rank(engine, tiny_packed, tmp_path):
    config = tiny_config(
        tiny_packed,
        tmp_path,
        max_steps=STEPS,
        precision="fp16",
        micro_batch={"per_rank": [3, 5]},
        **engine,
    )
    run_ranks(config, world=2, setup="test_precision.inject_inf_on_rank_1", timeout_s=30)
    # The loop raises if the ranks' `stepped` flags ever differ: finishing means they agreed.
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "event" not in r]
    skipped = [r["step"] for r in steps if r["skipped"]]
    print(f"{engine}: skipped steps {skipped}")
    assert INJECT_STEP in skipped
    assert steps[INJECT_STEP - 2]["skipped"] is False  # the step before had stepped: no backlog
    assert steps[-1]["skipped_steps"] == len(skipped)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["skipped_steps"] == len(skipped) and len(skipped) < STEPS
    replicas = sorted(Path(tmp_path).glob("replica-*.pt"))
    if engine["engine"] in ("ddp", "zero1"):
        a, b = (torch.load(p) for p in replicas)
        assert all(torch.equal(a[k], b[k]) for k in a), "the ranks' weights diverged"


def test_nan_loss_under_fp32_stops_naming_the_last_checkpoint(tiny_packed, tmp_path, monkeypatch):
    from hetlm.models.masked_lm import SparseMaskedLM

    original, calls = SparseMaskedLM.forward, {"n": 0}

    def forward(self, *args, **kwargs):
        loss_sum, correct = original(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 3:  # one micro-step per step: step 3
                loss_sum = loss_sum * float("nan")
        return loss_sum, correct

    monkeypatch.setattr(SparseMaskedLM, "forward", forward)
    config = tiny_config(tiny_packed, tmp_path, max_steps=5, save_steps=1, save_total_limit=5)
    with pytest.raises(
        HetlmError,
        match=r"loss became nan at step 3; last good checkpoint: "
        r"\S*step-00000002; resume from it",
    ):
        run_single(config)
    assert not (tmp_path / "checkpoints" / "step-00000003").exists()
