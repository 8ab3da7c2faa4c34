"""DeepSpeed ZeRO 0/1/2/3 (optional: ``pip install hetlm[deepspeed]``; on CPU ``DS_ACCELERATOR=cpu``).

hetlm builds each rank's DeepSpeed config itself, because with heterogeneous micro-batches the
ranks' configs differ: ``train_micro_batch_size_per_gpu`` is this rank's largest micro-batch,
``gradient_accumulation_steps`` the common number of micro-steps, and ``train_batch_size`` their
product times the world size, which satisfies DeepSpeed's per-rank assertion (DeepSpeed uses
these only for that check and its sample counters; hetlm's sampler decides what each rank
reads). A user's JSON (``train.deepspeed_config``) is the base; the keys above are always set.

Exactness: the loss is already token-exact (summed / n_global * world), so ``backward`` passes
``scale_wrt_gas=False`` (DeepSpeed would divide by the accumulation steps once more) and the
accumulation boundary is set explicitly on the last micro-step. ``gradient_clipping`` is set to
``train.max_grad_norm`` (DeepSpeed's default of 1.0 would silently clip otherwise). The
optimizer is torch's AdamW with hetlm's parameter groups (``zero_allow_untested_optimizer``),
so no DeepSpeed op has to be compiled; the learning-rate schedule drives its param groups.
Precision: DeepSpeed's own ``bf16`` / ``fp16`` (16-bit model, fp32 master weights, dynamic loss
scale for fp16), not autocast, so results differ from the torch engines in mixed precision.

Checkpoints: the model is the fp32 master weights gathered (``safe_get_full_fp32_param``) into a
plain ``save_pretrained`` folder; the optimizer state is DeepSpeed's own per-rank files
(``save_checkpoint``) under ``deepspeed/`` in the checkpoint, so a DeepSpeed run resumes with
DeepSpeed on the same number of ranks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hetlm.errors import HetlmError
from hetlm.train.distributed import DistContext
from hetlm.train.engine import Engine, EngineOptions
from hetlm.train.optim import param_groups
from hetlm.train.precision import Precision

_TAG = "state"
_SUBDIR = "deepspeed"


def import_deepspeed():
    """deepspeed, on the CPU accelerator when there is no GPU; a HetlmError when missing."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as exc:
        raise HetlmError(
            f"train.engine deepspeed needs DeepSpeed ({exc}): pip install "
            "'hetlm[deepspeed]', or use engine ddp, zero1 or fsdp2"
        ) from None
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    if not torch.cuda.is_available():
        # The CPU accelerator JIT-compiles a shared-memory all-reduce op on first use (minutes
        # with a C++ compiler, an error without one); gloo does that job. DeepSpeed keeps this
        # dict for the process, so marking the op incompatible here skips the build.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def deepspeed_config(options: EngineOptions, precision: str, world_size: int) -> dict[str, Any]:
    """This rank's DeepSpeed config: the user's JSON (if any) + what hetlm must decide."""
    config: dict[str, Any] = {}
    if options.deepspeed_config is not None:
        path = Path(options.deepspeed_config)
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise HetlmError(
                f"train.deepspeed_config {path}: cannot read it as JSON ({exc}): "
                "give a DeepSpeed JSON file"
            ) from None
        for key in ("optimizer", "scheduler"):
            if key in config:
                raise HetlmError(
                    f"train.deepspeed_config {path} has an {key!r} section: hetlm "
                    f"passes its own AdamW and schedule (train.learning_rate, ...); remove it"
                )
        clip = config.get("gradient_clipping")
        if clip is not None and float(clip) != float(options.max_grad_norm or 0.0):
            raise HetlmError(
                f"train.deepspeed_config {path} sets gradient_clipping {clip} but "
                f"train.max_grad_norm is {options.max_grad_norm}: set "
                "train.max_grad_norm and remove gradient_clipping from the JSON"
            )
        stage = config.get("zero_optimization", {}).get("stage")
        if stage is not None and int(stage) != options.zero_stage:
            raise HetlmError(
                f"train.deepspeed_config {path} has zero_optimization.stage {stage} "
                f"but the run uses ZeRO stage {options.zero_stage}: set "
                "train.zero_stage (or remove the stage from the JSON)"
            )
        for key in ("fp16", "bf16"):
            if config.get(key, {}).get("enabled") and precision != key:
                raise HetlmError(
                    f"train.deepspeed_config {path} enables {key} but the run's "
                    f"precision is {precision}: set train.precision: {key}"
                )
    config.update(
        {
            "train_micro_batch_size_per_gpu": options.micro_batch,
            "gradient_accumulation_steps": options.micro_steps,
            "train_batch_size": options.micro_batch * options.micro_steps * world_size,
            "gradient_clipping": float(options.max_grad_norm or 0.0),
            "zero_allow_untested_optimizer": True,
            "steps_per_print": config.get("steps_per_print", 1 << 30),
        }
    )
    config.setdefault("zero_optimization", {})["stage"] = options.zero_stage
    config["bf16"] = {**config.get("bf16", {}), "enabled": precision == "bf16"}
    config["fp16"] = {**config.get("fp16", {}), "enabled": precision == "fp16"}
    return config


class DeepSpeedEngine(Engine):
    name = "deepspeed"

    def __init__(
        self, module: nn.Module, ctx: DistContext, precision: Precision, options: EngineOptions
    ) -> None:
        self._deepspeed = import_deepspeed()
        if precision.name == "fp16" and ctx.device.type != "cuda":
            raise HetlmError(
                "DeepSpeed's CPU accelerator has no fp16: use train.precision bf16 "
                "or fp32, or a torch engine (ddp, zero1, fsdp2) for fp16 on CPU"
            )
        super().__init__(module, ctx, precision, options)
        self._inner = self.module
        self.config = deepspeed_config(options, precision.name, ctx.world_size)
        self.loss_scale_world = ctx.world_size  # DeepSpeed averages gradients over the ranks
        self.ds = None  # DeepSpeed wants the optimizer at initialize: see build_optimizer

    @property
    def unwrapped(self) -> nn.Module:
        return self._inner

    @property
    def checkpoint_format(self) -> str:
        return "deepspeed"

    def build_optimizer(
        self, *, lr: float, weight_decay: float, betas: tuple[float, float], eps: float
    ) -> torch.optim.Optimizer:
        client = torch.optim.AdamW(
            param_groups(self._inner, weight_decay), lr=lr, betas=betas, eps=eps
        )
        self.ds, _, _, _ = self._deepspeed.initialize(
            model=self._inner, optimizer=client, config=self.config, dist_init_required=False
        )
        self.module = self.ds
        # ZeRO keeps the client's param-group dicts (with their lr) and swaps only the params:
        # the schedule set on the client reaches DeepSpeed's step.
        self.optimizer = client
        return client

    @contextlib.contextmanager
    def sync_gradients(self, is_last_micro_step: bool) -> Iterator[None]:
        self.ds.set_gradient_accumulation_boundary(is_last_micro_step)
        yield

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss, scale_wrt_gas=False)

    def step(self, max_norm: float | None) -> tuple[float, bool]:
        """DeepSpeed's step: clip (gradient_clipping), AdamW or a skip on fp16 overflow, zero."""
        grads = [p.grad for p in self._inner.parameters() if p.grad is not None]
        # ZeRO keeps gradients in its own buffers and reports the norm; a plain optimizer
        # (stage 0, fp32) does not, so measure it before the step while .grad is there.
        measured = (
            float(
                torch.linalg.vector_norm(
                    torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])
                )
            )
            if grads
            else float("nan")
        )
        self.ds.step()
        norm = self.ds.get_global_grad_norm()
        return (measured if norm is None else float(norm)), bool(self.ds.was_step_applied())

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[nn.Module]:
        self.ds.eval()
        try:
            with torch.no_grad():
                yield self.ds
        finally:
            self.ds.train()

    def model_state_dict(self) -> dict[str, torch.Tensor] | None:
        """fp32 master weights, gathered on every rank (a collective per parameter)."""
        from deepspeed.utils import safe_get_full_fp32_param

        model = self._inner.model
        full: dict[int, torch.Tensor] = {}
        for _name, param in model.named_parameters():
            value = safe_get_full_fp32_param(param)
            full[id(param)] = (param.detach() if value is None else value).float().cpu()
        if not self.ctx.is_main:
            return None
        state = {name: full[id(p)] for name, p in model.named_parameters(remove_duplicate=False)}
        persistent = set(model.state_dict())
        state.update(
            {
                name: buffer.detach().cpu()
                for name, buffer in model.named_buffers()
                if name in persistent
            }
        )
        return state

    def optimizer_state_dict(self) -> dict[str, Any] | None:
        return None  # DeepSpeed's own per-rank files: save_sharded

    def load_optimizer_state_dict(self, state: dict[str, Any]) -> None:
        raise HetlmError(
            "this checkpoint holds a torch engine's optimizer state; DeepSpeed "
            "cannot load it: resume with train.engine ddp, zero1 or fsdp2"
        )

    def save_sharded(self, directory: Path) -> None:
        self.ds.save_checkpoint(str(Path(directory) / _SUBDIR), tag=_TAG, save_latest=False)

    def load_sharded(self, directory: Path) -> None:
        path = Path(directory) / _SUBDIR
        if not (path / _TAG).is_dir():
            raise HetlmError(
                f"checkpoint {directory} has no DeepSpeed state ({path / _TAG}): "
                "resume it with the engine that wrote it"
            )
        loaded, _ = self.ds.load_checkpoint(
            str(path), tag=_TAG, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if loaded is None:
            raise HetlmError(
                f"DeepSpeed could not load {path}: resume with the same number of "
                "ranks and ZeRO stage it was written with"
            )
