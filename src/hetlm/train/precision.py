"""Mixed precision: autocast, scaled backward and the optimizer step, behind one object.

Which precision a job uses is decided once for all ranks by the run plan
(``hetlm.train.run_plan``, rule in ``hetlm.cluster.precision``): bf16 where every device has it,
fp16 with dynamic loss scaling where some do not (V100), fp32 otherwise. An explicit ``fp16``
also runs on CPU (autocast fp16 + ``torch.amp.GradScaler("cpu")``): no faster than fp32 there, and
meant for testing the overflow logic without a GPU.

fp16 overflow: the step is skipped on every rank together. The scaler's inf check reads only the
gradients a rank holds (a shard under ZeRO-1's optimizer or FSDP), and a rank could also see an
inf the others did not, so the found-inf flag is all-reduced (MAX) over the ranks before the
scaler decides. A rank that steps while another skips would desynchronise the replicas (DDP) or
hang the parameter broadcast (ZeRO-1).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist


class Precision:
    """autocast + (fp16) a GradScaler whose skip decision is shared by all ranks.

    ``autocast=False`` is for engines that cast the model themselves (DeepSpeed).
    """

    def __init__(self, name: str, device: torch.device, *, autocast: bool = True) -> None:
        self.name = name
        self.device = device
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(name) if autocast else None
        self.scaler = torch.amp.GradScaler(device.type) if name == "fp16" and autocast else None
        self._found_inf: torch.Tensor | None = None  # set by unscale, read by step

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Before clipping: gradients back to their true scale; overflow agreed by all ranks."""
        if not self.scaler:
            return
        self.scaler.unscale_(optimizer)
        # GradScaler keeps its per-optimizer found-inf tensors here (torch's ShardedGradScaler
        # all-reduces the very same ones); step() and update() read them after us.
        found = self.scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
        for flag in found.values():
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self._found_inf = sum(float(f) for f in found.values()) if found else 0.0

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Steps the optimizer; returns False when fp16 overflow made every rank skip it."""
        if not self.scaler:
            optimizer.step()
            return True
        if self._found_inf is None:
            self.unscale(optimizer)  # so that the all-reduced flag is what the scaler reads
        stepped = not self._found_inf
        self.scaler.step(optimizer)
        self.scaler.update()
        self._found_inf = None
        return stepped

    def state_dict(self) -> dict:
        return {"name": self.name, "scaler": self.scaler.state_dict() if self.scaler else None}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
