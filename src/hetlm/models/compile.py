"""``torch.compile`` of the transformer blocks, in place.

Each block (every entry of the model's ``nn.ModuleList`` stacks: BERT's ``encoder.layer``, a
decoder's ``layers``, both of ELECTRA's stacks) is compiled with ``nn.Module.compile``, as
torchtitan does: the blocks share one graph, the parameter names stay what they were (no
``_orig_mod.`` prefix, so checkpoints, ``save_pretrained`` and FSDP's per-block sharding see the
same model), and the embeddings and the sparse output heads, whose shapes follow the data, stay
eager. Shapes inside a block are fixed by the packed sequences (a rank's micro-batch size is
its own, so a rank compiles for its sizes once).

``auto`` compiles on CUDA and not on a CPU, where it gave 0-13% after a 30 s cold compile (see
docs/DESIGN.md); DeepSpeed is never compiled here (it wraps the module its own way).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

CompileSetting = bool | Literal["auto"]


def should_compile(setting: CompileSetting, device: torch.device, engine: str) -> bool:
    if engine == "deepspeed":
        return False
    return device.type == "cuda" if setting == "auto" else bool(setting)


def compile_blocks(model: nn.Module) -> int:
    """Compile every transformer block of ``model`` in place; returns how many."""
    blocks = [
        block for module in model.modules() if isinstance(module, nn.ModuleList) for block in module
    ]
    for block in blocks:
        block.compile()
    return len(blocks)
