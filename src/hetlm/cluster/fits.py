"""What fits where: LoRA/QLoRA tuning and serving of LLaMA shapes on common GPUs (`hetlm plan --fits`).

Every number comes from the memory model (:mod:`hetlm.cluster.memory_lora` for training, the
weights plus the KV cache for serving); docs/SFT.md shows this module's output, and a test checks
that the docs still match it. One GPU per model copy (no sharding), the planner's defaults
(90% of the memory, 1 GiB of CUDA context and buffers, 5% allocator slack), bf16 where the GPU
has it and fp16 otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from hetlm.cluster.hardware import GpuModel, lookup_gpu
from hetlm.cluster.memory import GIB, MemoryModel, ModelShape, max_micro_batch
from hetlm.cluster.memory_lora import LoraSpec, base_bytes

FIT_MODELS = ("1b", "7b", "13b")
FIT_GPUS = ("T4", "V100-32GB", "RTX-A6000", "A100-80GB")
#: (label, how the base is held) in table order; "fp32" is what `hetlm sft` loads today.
FIT_BASES: tuple[tuple[str, LoraSpec], ...] = (
    ("fp32 + autocast", LoraSpec(base_dtype="fp32")),
    ("bf16/fp16", LoraSpec(base_dtype="16bit")),
    ("8-bit", LoraSpec(quantization="8bit")),
    ("4-bit NF4", LoraSpec(quantization="4bit")),
)
SERVE_TOKENS = 2048  # context of one served conversation (prompt + answer)
_MODEL_NAMES = {"1b": "LLaMA 1.1B (TinyLlama shape)", "7b": "LLaMA-2 7B", "13b": "LLaMA-2 13B"}


@dataclass(frozen=True)
class Fit:
    """One model x base x GPU cell."""

    model: str
    base: str
    gpu: str
    precision: str
    base_gib: float
    micro_batch: int  # largest micro-batch at max_length, 0: not even one sample
    micro_batch_gc: int  # the same with gradient checkpointing
    serve_gib: float  # weights + KV cache of one SERVE_TOKENS conversation + overhead


def llama_shape(preset: str, vocab_size: int = 32000) -> ModelShape:
    from hetlm.models.presets import model_config

    config = model_config(
        "llama", preset, vocab_size=vocab_size, max_position_embeddings=4096, pad_token_id=0
    )
    return ModelShape.from_config(config, name=f"llama-{preset}")


def serve_bytes(shape: ModelShape, spec: LoraSpec, tokens: int = SERVE_TOKENS) -> float:
    """Inference: the weights (a non-quantized model served in 16 bits), the 16-bit KV cache of
    ``tokens`` positions, the framework overhead and the allocator slack."""
    model = MemoryModel()
    held = spec if spec.quantization != "none" else replace(spec, base_dtype="16bit")
    kv_cache = 2 * shape.num_layers * (shape.kv_dim or shape.hidden_size) * 2 * tokens
    return (base_bytes(shape, held) + kv_cache) * (1 + model.fragmentation) + (
        model.overhead_gib * GIB
    )


def fits(
    models: tuple[str, ...] = FIT_MODELS,
    gpus: tuple[str, ...] = FIT_GPUS,
    max_length: int = 512,
    r: int = 16,
    memory_fraction: float = 0.9,
) -> list[Fit]:
    """Every model x base x GPU cell, in table order."""
    cells = []
    for preset in models:
        shape = llama_shape(preset)
        for label, spec in FIT_BASES:
            spec = replace(spec, r=r)
            for name in gpus:
                gpu: GpuModel = lookup_gpu(name)
                precision = "bf16" if gpu.supports("bf16") else "fp16"
                usable = gpu.memory_bytes * memory_fraction
                model = MemoryModel.for_device(is_cpu=False)
                caps = [
                    max_micro_batch(
                        usable,
                        shape,
                        max_length,
                        precision,
                        0,
                        1,
                        model,
                        replace(spec, gradient_checkpointing=gc),
                    )
                    for gc in (False, True)
                ]
                cells.append(
                    Fit(
                        model=preset,
                        base=label,
                        gpu=gpu.name,
                        precision=precision,
                        base_gib=base_bytes(shape, spec) / GIB,
                        micro_batch=caps[0],
                        micro_batch_gc=caps[1],
                        serve_gib=serve_bytes(shape, spec) / GIB,
                    )
                )
    return cells


def format_fits(cells: list[Fit], max_length: int = 512, r: int = 16) -> str:
    """Two markdown tables: LoRA training micro-batches, and serving."""
    gpus = list(dict.fromkeys(c.gpu for c in cells))
    memory = {c.gpu: lookup_gpu(c.gpu).memory_gib for c in cells}
    head = " | ".join(f"{g} ({memory[g]:g} GiB)" for g in gpus)
    rows: dict[tuple[str, str], list[Fit]] = {}
    for c in cells:
        rows.setdefault((c.model, c.base), []).append(c)

    def train_cell(c: Fit) -> str:
        if c.micro_batch_gc == 0:
            return "–"
        return f"{c.micro_batch or '–'} / {c.micro_batch_gc}"

    lines = [
        f"LoRA r {r} on all linear layers, max_length {max_length}, one GPU; largest micro-batch "
        "without / with gradient checkpointing (– : not even one sample):",
        "",
        f"| model | base | base GiB | {head} |",
        "|---|---|---|" + "---|" * len(gpus),
    ]
    for (model, base), row in rows.items():
        cells_text = " | ".join(train_cell(c) for c in row)
        lines.append(
            f"| {_MODEL_NAMES.get(model, model)} | {base} | {row[0].base_gib:.1f} | {cells_text} |"
        )
    lines += [
        "",
        f"Serving (`hetlm chat` / `serve`): weights + the KV cache of one {SERVE_TOKENS}-token "
        "conversation; a 16/32-bit base is served in 16 bits:",
        "",
        f"| model | weights | GiB needed | {' | '.join(gpus)} |",
        "|---|---|---|" + "---|" * len(gpus),
    ]
    for (model, base), row in rows.items():
        if base.startswith("fp32"):
            continue
        marks = " | ".join("fits" if c.serve_gib <= memory[c.gpu] * 0.9 else "–" for c in row)
        lines.append(
            f"| {_MODEL_NAMES.get(model, model)} | {base} | {row[0].serve_gib:.1f} | {marks} |"
        )
    return "\n".join(lines)
