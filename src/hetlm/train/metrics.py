"""Run metrics: a JSON Lines file (every step), TensorBoard scalars, a progress bar, a plot.

Only rank 0 writes. The JSONL file is appended to, so a resumed run continues the same file;
each record carries the step, so a step logged twice (a crash after logging, before the
checkpoint) can be recognised by its ``resumed_from`` marker and the repeated step number.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsLogger:
    def __init__(self, output_dir: Path, *, total_steps: int, start_step: int, enabled: bool,
                 log_every: int) -> None:
        self.enabled = enabled
        self.log_every = log_every
        self.path = Path(output_dir) / "metrics.jsonl"
        self._bar = None
        self._tb = None
        if not enabled:
            return
        from tqdm.auto import tqdm

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")
        self._bar = tqdm(total=total_steps, initial=start_step, desc="pretrain", unit="step",
                         dynamic_ncols=True, disable=None)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))
        except ImportError:  # tensorboard is a dependency; tolerate a trimmed install
            self._tb = None

    def event(self, **fields: Any) -> None:
        """A non-step record (start, resume, eval, end)."""
        if self.enabled:
            self._file.write(json.dumps(fields, ensure_ascii=False) + "\n")
            self._file.flush()

    def step(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        step = record["step"]
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            if step % self.log_every == 0:
                self._bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}",
                                      tok_s=f"{record['tokens_per_s']:.0f}")
        if self._tb is not None and (step % self.log_every == 0 or step == 1):
            for key in ("loss", "lr", "grad_norm", "tokens_per_s", "samples_per_s", "step_time_s"):
                if record.get(key) is not None:
                    self._tb.add_scalar(f"train/{key}", record[key], step)

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self._tb is not None:
            self._tb.add_scalar(tag, value, step)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        self._file.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not Path(path).is_file():
        return []
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()
            if line.strip()]


def plot_loss(metrics_path: Path, out_png: Path) -> Path | None:
    """Training loss per step and held-out loss at each evaluation, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = {r["step"]: r["loss"] for r in records if r.get("event") is None and "loss" in r}
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("event") == "eval"]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = sorted(train)
    ax.plot(steps, [train[s] for s in steps], label="train MLM loss (global batch)", lw=1)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="held-out MLM loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / masked token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
