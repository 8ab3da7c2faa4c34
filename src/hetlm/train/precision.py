"""Mixed precision: autocast, scaled backward and the optimizer step, behind one object.

``auto`` resolves to bf16 where the device supports it (CUDA compute capability >= 8.0, or a
CPU, where bf16 autocast runs on AMX ~1.4x faster than fp32), fp16 with dynamic loss scaling on
older GPUs such as the V100, fp32 otherwise. fp16 is refused on CPU (autocast there is no faster
and GradScaler is CUDA-only).
"""

from __future__ import annotations

import contextlib

import torch

from hetlm.errors import HetlmError


def resolve_precision(requested: str, device: torch.device) -> str:
    if device.type == "cuda":
        bf16_ok = torch.cuda.is_bf16_supported()
        if requested == "auto":
            return "bf16" if bf16_ok else "fp16"
        if requested == "bf16" and not bf16_ok:
            raise HetlmError(f"{torch.cuda.get_device_name(device)} has no bf16: use precision "
                             "fp16 or auto")
        return requested
    if requested == "auto":
        return "bf16"
    if requested == "fp16":
        raise HetlmError("fp16 needs a CUDA GPU (on CPU use bf16 or fp32): set train.precision")
    return requested


class Precision:
    def __init__(self, name: str, device: torch.device) -> None:
        self.name = name
        self.device = device
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(name)
        self.scaler = torch.amp.GradScaler("cuda") if name == "fp16" else None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Before clipping: gradients back to their true scale."""
        if self.scaler:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Steps the optimizer; returns False when fp16 overflow made the scaler skip it.

        The scaler's inf check reads gradients that DDP has already all-reduced, so every rank
        sees the same overflow and skips together.
        """
        if not self.scaler:
            optimizer.step()
            return True
        scale_before = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        return self.scaler.get_scale() >= scale_before

    def state_dict(self) -> dict:
        return {"name": self.name, "scaler": self.scaler.state_dict() if self.scaler else None}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
