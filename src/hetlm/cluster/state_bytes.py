"""The units both memory models count in (full training: ``memory.py``; LoRA/QLoRA:
``memory_lora.py``): bytes per activation element, and a rank's model-state bytes."""

from __future__ import annotations

from dataclasses import dataclass

from hetlm.errors import HetlmError


def bytes_per_element(precision: str) -> int:
    """Activation element size: 4 for fp32, 2 for fp16/bf16 autocast."""
    if precision == "fp32":
        return 4
    if precision in ("fp16", "bf16"):
        return 2
    raise HetlmError(f"hetlm trains in fp32, fp16 or bf16, not {precision!r}: choose one of those")


@dataclass(frozen=True)
class StateBytes:
    """Per-rank bytes of the model states; ``working`` exists only during forward/backward."""

    params: float
    grads: float
    optimizer: float
    working: float = 0.0

    @property
    def persistent(self) -> float:
        return self.params + self.grads + self.optimizer

    @property
    def total(self) -> float:
        return self.persistent + self.working
