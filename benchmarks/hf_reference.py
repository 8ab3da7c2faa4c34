"""The HF Trainer as every benchmark runs it: one set of ``TrainingArguments`` and one step clock.

The MLM and SFT comparisons and the learning check each set their own batch, schedule and
optimizer numbers, but everything else (log every step, never save, no reporting, no dataloader
workers, no progress bar, fp32 or bf16 on the requested device) must be the same in all of them,
or a table would compare the Trainer under one set of side settings with itself under another.
Imported by the benchmark scripts, which run with ``benchmarks/`` first on ``sys.path``.
"""

from __future__ import annotations

import time
from typing import Any


def reference_arguments(
    *,
    output_dir: str,
    batch: int,
    steps: int,
    lr: float,
    warmup_steps: int,
    weight_decay: float,
    adam_eps: float,
    max_grad_norm: float,
    precision: str,
    device: str,
    seed: int = 0,
    **extra: Any,
):
    """``TrainingArguments`` with a linear schedule and the side settings every benchmark shares;
    ``extra`` holds what one benchmark adds (accumulation, betas, a sampling strategy...)."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=batch,
        max_steps=steps,
        learning_rate=lr,
        warmup_steps=warmup_steps,
        weight_decay=weight_decay,
        adam_epsilon=adam_eps,
        max_grad_norm=max_grad_norm,
        lr_scheduler_type="linear",
        bf16=precision == "bf16",
        use_cpu=device == "cpu",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
        **extra,
    )


def step_clock():
    """A callback that records when each optimizer step ends (``perf_counter``), in ``.ends``:
    the Trainer's own timings include logging and evaluation, these are the steps alone."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_step_end(self, *_args, **_kwargs) -> None:
            self.ends.append(time.perf_counter())

        def step_times(self, skip: int = 0) -> list[float]:
            """Seconds between consecutive step ends, the first ``skip`` of them dropped
            (warm-up); the first step has no predecessor, so ``skip=k`` keeps step k+2 on."""
            gaps = [b - a for a, b in zip(self.ends, self.ends[1:], strict=False)]
            return gaps[skip:]

    return StepClock()
