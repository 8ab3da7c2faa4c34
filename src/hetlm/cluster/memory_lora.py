"""Memory model for LoRA / QLoRA instruction tuning (``hetlm sft``): what caps a rank's micro-batch.

The pretraining model (:mod:`hetlm.cluster.memory`) counts 16 bytes of states per parameter. In
LoRA the base is frozen: it is held once (no gradients, no optimizer states), and only the
adapters train. Per rank, peak memory =

* **frozen base**: the linear layers of the transformer blocks at ``b_w`` bytes per weight, the
  rest (embeddings, output head, norms) at ``b_rest``:

  ======================  ===================================  ===============================
  base                    ``b_w`` (block linears)              ``b_rest``
  ======================  ===================================  ===============================
  fp32 (hetlm's default)  4                                    4
  bf16 / fp16             2                                    2
  8-bit (LLM.int8)        1 + 4/in (an fp32 scale per row)     2 (bitsandbytes keeps them 16-bit)
  4-bit (NF4, QLoRA)      0.5 + 1/64 + 4/(64*256) (double      2
                          quantization: an 8-bit absmax per
                          64 weights, an fp32 one per 256
                          blocks; Dettmers et al. 2023, 0.127
                          bits/param)
  ======================  ===================================  ===============================

  FSDP2 (``--zero 2/3``) shards a non-quantized base like any parameter (and holds a gathered
  16-bit copy: all of it at stage 2, two layers at stage 3); a quantized base is never sharded.
* **adapters**: ``r * (in + out)`` parameters per adapted ``in -> out`` linear layer (A: r x in,
  B: out x r), fp32 (4) + fp32 gradients (4) + AdamW moments (8) = 16 bytes each, the optimizer
  states divided over the ranks from ZeRO-1 on, gradients from ZeRO-2 on.
* **working copies**: an fp32 base under 16-bit autocast is cast layer by layer, and autograd
  keeps each cast weight for the input gradient of the backward: 2 bytes per block-linear weight
  (one layer's worth with gradient checkpointing). A 16-bit or quantized base needs none
  (bitsandbytes dequantizes per layer, transiently).
* **activations** of one sample at ``max_length`` tokens (the planner plans the longest
  micro-batch: length grouping puts full-length examples together), counted tensor by tensor for
  a LLaMA block with peft's LoRA layers (see :func:`lora_activation_bytes_per_sample`): the two
  RMSNorms' fp32 inputs, attention's q/k/v (and the fp32 softmax with eager attention, SDPA's
  output and log-sum-exp with fused kernels), the MLP's three I-wide tensors, and per adapted
  layer its input (dropped out, with the mask, when ``lora_dropout > 0``: peft applies dropout
  per module) cast to the compute dtype for A's gradient plus the r-wide ``x @ A``. No base
  weight gets a gradient, but the backward still needs these for the input gradients and the
  adapters. With gradient checkpointing (per decoder layer, as transformers does it) only each
  layer's input is kept, plus one layer's activations recomputed during its backward.
  The output head is hetlm's fused, chunked one (``hetlm.models.causal_head``): per target
  token the gradient it keeps for the backward, plus a constant chunk of ``HEAD_CHUNK_LOGITS``
  logits (fp32 logits, their 16-bit gradient, the fp32 softmax): 10 bytes per logit, whatever
  the batch.
  Measured on CPU against peak RSS: -13% to +26% (docs/SFT.md).
* the optimizer-step temporaries, slack and framework overhead of :class:`MemoryModel`.

Every sequence position is planned as a target (``train_on_prompt`` or all-response worst case).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from hetlm.errors import HetlmError

if TYPE_CHECKING:
    from hetlm.cluster.memory import ModelShape, StateBytes

Quantization = Literal["none", "8bit", "4bit"]
BaseDtype = Literal["fp32", "16bit"]
QUANTIZATIONS = ("none", "8bit", "4bit")
#: How ``hetlm sft`` holds a non-quantized base on a CPU or without bf16 (fp32 under autocast);
#: on GPUs training in bf16 it holds it in bf16 ("16bit": ``hetlm plan`` picks that there).
DEFAULT_BASE_DTYPE: BaseDtype = "fp32"
#: LLaMA-family linear layers, the names peft's ``target_modules`` uses.
LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: NF4 with double quantization: 4 bits + an 8-bit absmax per 64 weights + an fp32 absmax per
#: 256 blocks (QLoRA, section 2).
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)
HEAD_CHUNK_BYTES_PER_LOGIT = 10  # fp32 logits + their 16-bit gradient + the fp32 softmax
#: Logits per chunk of the fused SFT head: hetlm.models.causal_head.CHUNK_LOGITS (a test keeps
#: them equal; the planner does not import that torch module).
HEAD_CHUNK_LOGITS = 8 * 1024 * 1024


@dataclass(frozen=True)
class LoraSpec:
    """What an SFT run trains and how it holds the base (mirrors the ``hetlm sft`` config)."""

    r: int = 16
    target_modules: tuple[str, ...] | None = None  # None: all-linear (every block linear)
    quantization: Quantization = "none"
    base_dtype: BaseDtype = DEFAULT_BASE_DTYPE  # a non-quantized base: fp32 or 16-bit
    gradient_checkpointing: bool = False
    lora_dropout: bool = True  # dropout > 0: peft keeps a dropped-out copy of each input

    def __post_init__(self) -> None:
        if self.r < 1:
            raise HetlmError(f"LoRA rank must be >= 1, got {self.r}")
        if self.quantization not in QUANTIZATIONS:
            raise HetlmError(
                f"quantization must be one of {', '.join(QUANTIZATIONS)}, not {self.quantization!r}"
            )
        if self.base_dtype not in ("fp32", "16bit"):
            raise HetlmError(f"base dtype must be fp32 or 16bit, not {self.base_dtype!r}")
        unknown = sorted(set(self.target_modules or ()) - set(LLAMA_LINEARS))
        if unknown:
            raise HetlmError(
                f"LoRA target modules {unknown} are not LLaMA linear layers: use all-linear or "
                f"some of {', '.join(LLAMA_LINEARS)}"
            )
        if self.target_modules is not None and not self.target_modules:
            raise HetlmError("LoRA target_modules is empty: give module names or all-linear")

    @property
    def modules(self) -> tuple[str, ...]:
        return self.target_modules or LLAMA_LINEARS

    def describe(self) -> str:
        base = {"none": f"{self.base_dtype} base", "8bit": "8-bit base", "4bit": "4-bit NF4 base"}
        targets = "all-linear" if self.target_modules is None else "+".join(self.target_modules)
        gc = ", gradient checkpointing" if self.gradient_checkpointing else ""
        return f"LoRA r {self.r} {targets}, {base[self.quantization]}{gc}"

    def as_dict(self) -> dict:
        return {
            "r": self.r,
            "target_modules": "all-linear"
            if self.target_modules is None
            else list(self.target_modules),
            "quantization": self.quantization,
            "base_dtype": self.base_dtype,
            "gradient_checkpointing": self.gradient_checkpointing,
            "lora_dropout": self.lora_dropout,
        }


def block_linears(shape: ModelShape) -> dict[str, tuple[int, int]]:
    """(in, out) features of each linear layer of one LLaMA-family decoder block."""
    if not shape.causal or not shape.gated_mlp:
        raise HetlmError(
            f"LoRA planning knows LLaMA-family decoders (llama, mistral, qwen2, qwen3), not "
            f"{shape.model_type!r}: plan with --model llama-<preset> or a LLaMA config"
        )
    h, i = shape.hidden_size, shape.intermediate_size
    q, kv = shape.q_dim or h, shape.kv_dim or h
    return {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }


def lora_parameter_count(shape: ModelShape, spec: LoraSpec) -> int:
    """Adapter parameters: r * (in + out) per adapted linear layer, in every block."""
    linears = block_linears(shape)
    per_block = sum(spec.r * (linears[m][0] + linears[m][1]) for m in spec.modules)
    return per_block * shape.num_layers


def block_linear_parameters(shape: ModelShape) -> int:
    """Weights of all blocks' linear layers: what bitsandbytes quantizes."""
    return shape.num_layers * sum(i * o for i, o in block_linears(shape).values())


def base_bytes(shape: ModelShape, spec: LoraSpec) -> float:
    """Bytes of the frozen base as loaded (see the table in the module docstring)."""
    linears = block_linears(shape)
    linear = block_linear_parameters(shape)
    rest = shape.n_params - linear
    if spec.quantization == "4bit":
        return linear * NF4_BYTES_PER_WEIGHT + 2.0 * rest
    if spec.quantization == "8bit":
        scales = shape.num_layers * sum(4.0 * o for _, o in linears.values())
        return linear * 1.0 + scales + 2.0 * rest
    per = 4.0 if spec.base_dtype == "fp32" else 2.0
    return per * shape.n_params


def lora_state_bytes(
    shape: ModelShape,
    spec: LoraSpec,
    precision: str,
    zero_stage: int = 0,
    world_size: int = 1,
) -> StateBytes:
    """Frozen base + adapters (fp32, gradients, AdamW) + working copies on one rank."""
    from hetlm.cluster.state_bytes import StateBytes, bytes_per_element

    if zero_stage >= 2 and spec.quantization != "none":
        raise HetlmError(
            f"ZeRO stage {zero_stage} (FSDP2) shards the base, which hetlm does not do for a "
            f"{spec.quantization} base: use --zero 0 or 1, or quantization none"
        )
    n = world_size
    compute = bytes_per_element(precision)
    adapters = float(lora_parameter_count(shape, spec))
    base = base_bytes(shape, spec) / (n if zero_stage >= 2 else 1)
    layer_linear = block_linear_parameters(shape) / shape.num_layers
    if zero_stage == 2 and spec.quantization == "none":
        working = compute * float(shape.n_params)  # reshard_after_forward=False: all gathered
    elif zero_stage == 3 and spec.quantization == "none":
        working = 2.0 * compute * float(shape.layer_params)  # current + prefetched layer
    elif spec.quantization == "none" and spec.base_dtype == "fp32" and compute == 2:
        layers = 1 if spec.gradient_checkpointing else shape.num_layers
        working = 2.0 * layer_linear * layers  # autocast's casts, kept for the backward
    else:
        working = 0.0
    return StateBytes(
        params=base + 4.0 * adapters,
        grads=4.0 * adapters / (n if zero_stage >= 2 else 1),
        optimizer=8.0 * adapters / (n if zero_stage >= 1 else 1),
        working=working,
    )


def lora_activation_bytes_per_sample(
    shape: ModelShape,
    seq_len: int,
    precision: str,
    attention: str,
    spec: LoraSpec,
    fused_dropout: bool = True,
) -> float:
    """Bytes one sample of ``seq_len`` tokens keeps for the backward (module docstring).

    Counted tensor by tensor for a LLaMA block with peft LoRA layers, in the dtypes they have:
    linear outputs in the compute dtype ``c``; the residual stream (and so the inputs of q/k/v
    and gate/up) in the base's dtype ``res`` (fp32 for an fp32 base, also under autocast);
    RMSNorm saves an fp32 copy of its input. Dropout masks are 1 byte with CUDA's fused dropout
    and a tensor of the input's dtype on CPU (``fused_dropout=False``).
    """
    from hetlm.cluster.state_bytes import bytes_per_element

    c = bytes_per_element(precision)
    res = 4 if (spec.quantization == "none" and spec.base_dtype == "fp32") else c
    if precision == "fp32":
        res = 4
    s, h, a = seq_len, shape.hidden_size, shape.num_heads
    i = shape.intermediate_size
    linears = block_linears(shape)
    adapted = set(spec.modules)

    def mask(input_bytes: int) -> int:
        return 1 if fused_dropout else input_bytes

    per_token = 2 * 4 * h  # two RMSNorms keep an fp32 copy of their input
    # attention: q (after RoPE), k and v repeated to every head, and what the kernel keeps
    per_token += 3 * c * h
    if attention == "eager":
        per_token += a * s * (4 + (c if c != 4 else 0))  # fp32 softmax (+ its cast for @ v)
    else:
        per_token += c * h + 4 * a  # SDPA's output and fp32 log-sum-exp
    per_token += 3 * c * i  # gate output (SiLU's input), SiLU output, up output
    # LoRA: each adapted layer keeps its (dropped-out) input, cast to c, for A's gradient,
    # and x @ A (r wide) for B's gradient.
    for group, members in (
        ("qkv", ("q_proj", "k_proj", "v_proj")),
        ("o", ("o_proj",)),
        ("mlp", ("gate_proj", "up_proj")),
        ("down", ("down_proj",)),
    ):
        used = [m for m in members if m in adapted]
        if not used:
            continue
        width = linears[used[0]][0]
        in_bytes = res if group in ("qkv", "mlp") else c
        if spec.lora_dropout:
            per_token += len(used) * width * (c + mask(in_bytes))
        else:
            copies = 1 if in_bytes == c else len(used)  # autocast casts once per layer
            per_token += copies * width * c
        per_token += len(used) * spec.r * c
    layer = s * per_token
    if spec.gradient_checkpointing:
        layers = shape.num_layers * s * res * h + layer  # inputs kept, one layer recomputed
    else:
        layers = shape.num_layers * layer
    head = s * (4 * h + c * h)  # final RMSNorm's fp32 input, the fused head's saved gradient
    return layers + head


def head_chunk_bytes(shape: ModelShape) -> float:
    """The fused head's transient chunk (at least 16 positions): a constant per micro-step."""
    return max(16 * shape.vocab_size, HEAD_CHUNK_LOGITS) * HEAD_CHUNK_BYTES_PER_LOGIT


def lora_flops_per_sample(shape: ModelShape, seq_len: int, spec: LoraSpec) -> float:
    """Training FLOPs of one sample: the frozen base costs a forward and the input gradients
    (4 per weight and token, not 6), 2 more with gradient checkpointing (a second forward);
    the adapters 6 per parameter; the frozen head 4*h*V per target token; attention 12*L*s*h
    (+4 with checkpointing)."""
    s, h, layers = seq_len, shape.hidden_size, shape.num_layers
    base_factor = 6 if spec.gradient_checkpointing else 4
    linear = block_linear_parameters(shape)
    adapters = lora_parameter_count(shape, spec)
    attention = (16 if spec.gradient_checkpointing else 12) * layers * s * h
    per_token = base_factor * linear + 6 * adapters + attention
    return s * per_token + s * 4 * h * shape.vocab_size
