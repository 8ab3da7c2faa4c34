"""Memory model for data-parallel training of a transformer: what caps each rank's micro-batch.

Per rank, peak memory = model states (parameters, gradients, optimizer states; partitioned by the
ZeRO stage) + working copies + max(activations of one micro-batch, optimizer-step temporaries),
plus allocator slack and a fixed framework overhead. Everything is in bytes; Ψ is the parameter
count, N the data-parallel world size, s the sequence length, h the hidden size, a the attention
heads, L the layers, V the vocabulary, I the MLP width.

Model states (``layout``):

* ``"zero"`` -- the ZeRO paper's accounting (Rajbhandari et al. 2020, section 3) for
  mixed-precision Adam, as DeepSpeed stores it: 2Ψ fp16/bf16 parameters + 2Ψ gradients +
  KΨ optimizer states with K = 12 (fp32 master weights, momentum, variance). fp32 training:
  4Ψ + 4Ψ + 8Ψ. Stage 1 divides the optimizer states by N, stage 2 also the gradients, stage 3
  also the parameters. (7.5B parameters on 64 ranks: 120 / 31.4 / 16.6 / 1.9 GB.)
* ``"torch"`` -- what hetlm's torch engines hold (DDP, ZeroRedundancyOptimizer, FSDP2): the model
  stays fp32 (4Ψ), gradients are fp32 (4Ψ), AdamW keeps 8Ψ; the same 16Ψ total as the paper at
  stage 0 but partitioned differently. 16-bit compute adds a working copy: autocast's cast weights
  (2Ψ) for stages 0/1. FSDP2 (stages 2 and 3) shards the fp32 parameters too, and with a 16-bit
  ``param_dtype`` keeps a gathered copy: all of it through a micro-step at stage 2
  (``reshard_after_forward=False``, 2Ψ), two layers at a time (current + prefetched) at stage 3.
  DDP is assumed to run with ``gradient_as_bucket_view=True`` (otherwise add 4Ψ of buckets).

Activations per sample (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models", no recomputation, no sequence parallelism): one layer stores
s*h*(34 + 5*a*s/h) bytes with 16-bit activations and 1-byte dropout masks. Counted in elements
that is 16*s*h 16-bit tensors + 2*a*s^2 attention probabilities (softmax and dropout outputs),
plus 2*s*h + a*s^2 mask bytes, so fp32 gives 66*s*h + 9*a*s^2. Refinements, each measured or
read from the code paths:

* the MLP term follows the real width I (Korthikanti assumes I = 4h) and gated MLPs (LLaMA's
  SwiGLU) store four I-wide tensors instead of two;
* without dropout the masks and the dropout output vanish;
* fused attention kernels (``attention="sdpa"``: flash / memory-efficient SDPA on CUDA) store no
  s^2 tensors, only a log-sum-exp per head and token; ``"eager"`` keeps the s^2 terms. On CPU,
  PyTorch's SDPA falls back to the math path when dropout is on, so CPU ranks are planned eager;
* the MLM head: hetlm computes vocabulary logits only at the masked positions (~15% of tokens),
  so the head stores ``ceil(0.15*s)`` positions of: 4 h-wide inputs of its transform and decoder,
  and 16 bytes per logit (the logits, the fp32 log-softmax that cross-entropy saves, and two
  gradient buffers of that size alive at once early in backward). Decoders predict every token.

The framework overhead is a constant per process: the CUDA context, cuBLAS workspaces and NCCL
buffers (0.5-1 GiB; 1 GiB by default) on a GPU, the torch process's own RSS (~0.5 GiB) on a CPU.
``fragmentation`` is a fraction added on top of the tensors for the caching allocator's slack.

LoRA/QLoRA instruction tuning (a frozen base, trained adapters) has its own states and activations:
:mod:`hetlm.cluster.memory_lora`, reached through ``estimate_memory(..., lora=LoraSpec(...))``.

Validated on CPU (fp32 and bf16 autocast, tiny and small BERT, see tests/test_cluster_memory.py
and docs/PLANNER.md for the measured error); the GPU constants are from the papers above.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from hetlm.cluster.state_bytes import StateBytes, bytes_per_element
from hetlm.errors import HetlmError

if TYPE_CHECKING:
    from hetlm.cluster.memory_lora import LoraSpec

GIB = 2**30
#: Bytes per predicted vocabulary logit alive at the activation peak (see module docstring).
LOGIT_BYTES = 16
#: MLM masking rate: hetlm's head computes logits only at these positions.
MLM_PREDICTED_FRACTION = 0.15

_ENCODERS_BERT_LIKE = {"bert", "roberta", "xlm-roberta", "camembert"}
_DECODERS_LLAMA_LIKE = {"llama", "mistral", "qwen2", "qwen3"}
_DECODER_TYPES = _DECODERS_LLAMA_LIKE | {
    "gpt2",
    "gpt_neox",
    "opt",
    "phi",
    "phi3",
    "gemma",
    "gemma2",
    "qwen3_moe",
    "mixtral",
    "falcon",
}

Layout = Literal["torch", "zero"]
Attention = Literal["sdpa", "eager"]


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a model config that memory and FLOPs depend on."""

    name: str
    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    vocab_size: int
    n_params: int
    layer_params: int  # one transformer block: FLOPs per token and ZeRO-3 gather size
    gated_mlp: bool = False
    causal: bool = False
    dropout: bool = True
    predicted_fraction: float = MLM_PREDICTED_FRACTION  # tokens whose vocab logits are computed
    q_dim: int = 0  # attention heads x head size (0: hidden_size); LoRA's q/o projections
    kv_dim: int = 0  # key/value heads x head size (0: hidden_size; less with grouped queries)

    @classmethod
    def from_config(
        cls, config: Any, name: str | None = None, predicted_fraction: float | None = None
    ) -> ModelShape:
        """Read a ``transformers`` config (BERT family exactly, others by their common fields)."""
        if isinstance(config, ModelShape):
            return config
        model_type = getattr(config, "model_type", "") or "unknown"
        hidden = _first_attr(config, "hidden_size", "n_embd", "d_model")
        layers = _first_attr(config, "num_hidden_layers", "n_layer", "num_layers")
        heads = _first_attr(config, "num_attention_heads", "n_head", "num_heads")
        vocab = _first_attr(config, "vocab_size")
        intermediate = (
            getattr(config, "intermediate_size", None)
            or getattr(config, "n_inner", None)
            or 4 * hidden
        )
        causal = model_type in _DECODER_TYPES or bool(getattr(config, "is_decoder", False))
        gated = model_type in _DECODERS_LLAMA_LIKE or str(
            getattr(config, "hidden_act", "")
        ).lower() in ("silu", "swiglu")
        dropout = any(
            float(getattr(config, key, 0.0) or 0.0) > 0
            for key in (
                "hidden_dropout_prob",
                "attention_probs_dropout_prob",
                "attention_dropout",
                "hidden_dropout",
                "resid_pdrop",
                "attn_pdrop",
                "dropout",
            )
        )
        n_params, layer_params = count_parameters(config)
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        if predicted_fraction is None:
            predicted_fraction = 1.0 if causal else MLM_PREDICTED_FRACTION
        return cls(
            name=name or model_type,
            model_type=model_type,
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            intermediate_size=int(intermediate),
            vocab_size=vocab,
            n_params=n_params,
            layer_params=layer_params,
            gated_mlp=gated,
            causal=causal,
            dropout=dropout,
            predicted_fraction=predicted_fraction,
            q_dim=heads * head_dim,
            kv_dim=kv_heads * head_dim,
        )

    def predicted_positions(self, seq_len: int) -> int:
        return min(seq_len, math.ceil(self.predicted_fraction * seq_len))


def _first_attr(config: Any, *names: str) -> int:
    for name in names:
        value = getattr(config, name, None)
        if value:
            return int(value)
    raise HetlmError(
        f"the model config has none of {', '.join(names)}: "
        "give a transformer config (config.json) with those fields"
    )


def count_parameters(config: Any) -> tuple[int, int]:
    """(total parameters, parameters of one transformer block) of the pretraining model.

    BERT-like MLM models and LLaMA-like causal LMs are counted from their formulas (the test suite
    checks them against instantiated models); other architectures are instantiated on the meta
    device, which costs no memory.
    """
    model_type = getattr(config, "model_type", "")
    h = getattr(config, "hidden_size", 0)
    if model_type in _ENCODERS_BERT_LIKE and getattr(config, "embedding_size", h) == h:
        v, i = config.vocab_size, config.intermediate_size
        positions = config.max_position_embeddings
        types = getattr(config, "type_vocab_size", 0) or 0
        layer = 4 * h * h + 2 * h * i + 9 * h + i  # QKV+O with biases, 2 LayerNorms, MLP
        embeddings = (v + positions + types) * h + 2 * h
        head = h * h + h + 2 * h + v  # transform + LayerNorm + decoder bias (weights tied)
        if not getattr(config, "tie_word_embeddings", True):
            head += v * h
        return embeddings + config.num_hidden_layers * layer + head, layer
    if model_type in _DECODERS_LLAMA_LIKE:
        v, i, heads = config.vocab_size, config.intermediate_size, config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or h // heads
        kv = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
        layer = h * heads * head_dim * 2 + 2 * h * kv + 3 * h * i + 2 * h
        if getattr(config, "attention_bias", False):
            layer += heads * head_dim + 2 * kv + h
        lm_head = 0 if getattr(config, "tie_word_embeddings", False) else v * h
        return v * h + config.num_hidden_layers * layer + h + lm_head, layer
    return _count_on_meta_device(config)


def _count_on_meta_device(config: Any) -> tuple[int, int]:
    import torch
    import transformers

    factories = (
        transformers.AutoModelForCausalLM
        if getattr(config, "is_decoder", False)
        or getattr(config, "model_type", "") in _DECODER_TYPES
        else transformers.AutoModelForMaskedLM,
        transformers.AutoModel,
    )
    for factory in factories:
        try:
            with torch.device("meta"):
                model = factory.from_config(config)
        except (ValueError, KeyError, TypeError):
            continue
        total = sum(p.numel() for p in model.parameters())
        layers = max(1, _first_attr(config, "num_hidden_layers", "n_layer", "num_layers"))
        # Blocks hold nearly all non-embedding parameters; the rest is a small error here.
        embedding = model.get_input_embeddings().weight.numel()
        return total, max(1, (total - embedding) // layers)
    raise HetlmError(
        f"cannot build a model of type {getattr(config, 'model_type', '?')!r} "
        "to count its parameters: use a BERT- or LLaMA-family config"
    )


def activation_bytes_per_sample(
    shape: ModelShape, seq_len: int, precision: str, attention: Attention = "sdpa"
) -> float:
    """Bytes of activations one sample keeps for the backward pass (see the module docstring)."""
    p = bytes_per_element(precision)
    s, h, a = seq_len, shape.hidden_size, shape.num_heads
    mlp_elements = 1 + (4 if shape.gated_mlp else 2) * shape.intermediate_size / h
    # Attention inputs: QKV input, Q, K, V, output-projection input; SDPA also saves its output.
    attn_elements = 5 if attention == "eager" else 6
    per_token = h * (p * (attn_elements + mlp_elements + 2) + (2 if shape.dropout else 0))
    if attention == "eager":
        probs = 2 if shape.dropout else 1  # softmax output, and the dropout output if any
        per_token += a * s * (p * probs + (1 if shape.dropout else 0))
    elif attention == "sdpa":
        per_token += 4 * a  # fp32 log-sum-exp per head
    else:
        raise HetlmError(f"attention must be 'sdpa' or 'eager', not {attention!r}")
    layers = s * per_token * shape.num_layers
    embeddings = s * h * (p + (1 if shape.dropout and not shape.causal else 0))
    n_pred = shape.predicted_positions(s)
    head_inputs = 1 if shape.causal else 4  # decoder: final-norm output; MLM: transform + decoder
    head = n_pred * (head_inputs * p * h + LOGIT_BYTES * shape.vocab_size)
    return layers + embeddings + head


def model_state_bytes(
    n_params: int,
    precision: str,
    zero_stage: int = 0,
    world_size: int = 1,
    layout: Layout = "zero",
    layer_params: int | None = None,
) -> StateBytes:
    """Parameters, gradients and Adam states held by one rank, per the ZeRO stage.

    ``layout="zero"`` is the ZeRO paper's accounting, ``"torch"`` hetlm's torch engines (see the
    module docstring). ``layer_params`` sizes ZeRO-3's gathered layers (default: Ψ/24).
    """
    if zero_stage not in (0, 1, 2, 3):
        raise HetlmError(f"ZeRO stage must be 0, 1, 2 or 3, not {zero_stage!r}")
    if world_size < 1:
        raise HetlmError(f"world size must be >= 1, got {world_size}")
    psi, n = float(n_params), world_size
    mixed = bytes_per_element(precision) == 2
    if layout == "zero":
        param_b, grad_b, opt_b = (2, 2, 12) if mixed else (4, 4, 8)
        working = 0.0
    elif layout == "torch":
        param_b, grad_b, opt_b = 4, 4, 8
        compute_b = 2 if mixed else 4
        if zero_stage <= 1:
            working = 2 * psi if mixed else 0.0  # autocast's cached 16-bit weights
        elif zero_stage == 2:
            working = compute_b * psi  # FSDP2 reshard_after_forward=False: unsharded params
        else:
            working = 2 * compute_b * float(layer_params or psi / 24)  # current + prefetched
    else:
        raise HetlmError(f"memory layout must be 'zero' or 'torch', not {layout!r}")
    # ZeRO-3 partitions parameters; FSDP2 (hetlm's stage 2 as well) always shards them and
    # counts the gathered copy as working memory.
    shard_params_from = 3 if layout == "zero" else 2
    return StateBytes(
        params=param_b * psi / (n if zero_stage >= shard_params_from else 1),
        grads=grad_b * psi / (n if zero_stage >= 2 else 1),
        optimizer=opt_b * psi / (n if zero_stage >= 1 else 1),
        working=working,
    )


@dataclass(frozen=True)
class MemoryModel:
    """Assumptions about the software stack that are not properties of the model."""

    layout: Layout = "torch"
    attention: Attention = "sdpa"
    overhead_gib: float = 1.0  # CUDA context + cuBLAS workspaces + NCCL buffers; CPU: own RSS
    fragmentation: float = 0.05  # caching-allocator slack, as a fraction of tensor bytes
    foreach_optimizer: bool = True  # CUDA AdamW (foreach): one fp32 temporary of its partition
    fused_dropout: bool = True  # CUDA's dropout keeps a 1-byte mask; CPU's a tensor like its input

    @classmethod
    def for_device(cls, is_cpu: bool, layout: Layout = "torch") -> MemoryModel:
        """GPU defaults, or CPU ones: eager attention (SDPA's math fallback), no CUDA context."""
        if is_cpu:
            return cls(
                layout=layout,
                attention="eager",
                overhead_gib=0.5,
                foreach_optimizer=False,
                fused_dropout=False,
            )
        return cls(layout=layout)


@dataclass(frozen=True)
class MemoryEstimate:
    states: StateBytes
    activations: float
    optimizer_step: float
    slack: float
    overhead: float

    @property
    def total(self) -> float:
        return (
            self.states.persistent
            + max(self.states.working + self.activations, self.optimizer_step)
            + self.slack
            + self.overhead
        )

    @property
    def total_gib(self) -> float:
        return self.total / GIB


def estimate_memory(
    shape: ModelShape,
    micro_batch: int,
    seq_len: int,
    precision: str,
    zero_stage: int = 0,
    world_size: int = 1,
    model: MemoryModel | None = None,
    lora: LoraSpec | None = None,
) -> MemoryEstimate:
    """Peak bytes on one rank for one micro-batch of ``micro_batch`` samples.

    ``lora``: plan LoRA/QLoRA instruction tuning instead of pretraining
    (:mod:`hetlm.cluster.memory_lora`): frozen base, trainable adapters, ``seq_len`` = max_length.
    """
    model = model or MemoryModel()
    if lora is not None:
        from hetlm.cluster import memory_lora as ml

        states = ml.lora_state_bytes(shape, lora, precision, zero_stage, world_size)
        per_sample = ml.lora_activation_bytes_per_sample(
            shape, seq_len, precision, model.attention, lora, model.fused_dropout
        )
        activations = micro_batch * per_sample + (ml.head_chunk_bytes(shape) if micro_batch else 0)
        trained = float(ml.lora_parameter_count(shape, lora))
    else:
        states = model_state_bytes(
            shape.n_params, precision, zero_stage, world_size, model.layout, shape.layer_params
        )
        activations = micro_batch * activation_bytes_per_sample(
            shape, seq_len, precision, model.attention
        )
        trained = float(shape.n_params)
    # foreach AdamW materialises e.g. sqrt(v) for all of its parameters at once.
    step = (
        4.0 * trained / (world_size if zero_stage >= 1 else 1) if model.foreach_optimizer else 0.0
    )
    tensors = states.persistent + max(states.working + activations, step)
    return MemoryEstimate(
        states=states,
        activations=activations,
        optimizer_step=step,
        slack=model.fragmentation * tensors,
        overhead=model.overhead_gib * GIB,
    )


def max_micro_batch(
    device_memory_bytes: float,
    shape: ModelShape,
    seq_len: int,
    precision: str,
    zero_stage: int = 0,
    world_size: int = 1,
    model: MemoryModel | None = None,
    lora: LoraSpec | None = None,
) -> int:
    """The largest micro-batch whose estimated peak fits in ``device_memory_bytes`` (0: none)."""
    model = model or MemoryModel()

    def estimate(batch: int) -> MemoryEstimate:
        return estimate_memory(
            shape, batch, seq_len, precision, zero_stage, world_size, model, lora
        )

    one = estimate(1)
    if one.total > device_memory_bytes:
        return 0
    per_sample = estimate(2).activations - one.activations
    budget = (device_memory_bytes - one.overhead) / (1 + model.fragmentation)
    budget -= one.states.persistent + one.states.working + one.activations
    batch = 1 + int(budget // per_sample)
    # The closed form ignores the optimizer-step term and float rounding: confirm and step back.
    while batch > 1 and estimate(batch).total > device_memory_bytes:
        batch -= 1
    return batch
