"""Training recipes from the literature: the defaults a config gets per model type and size.

A recipe is what a paper published for pretraining that model (learning rate, warm-up, schedule,
AdamW betas/epsilon, weight decay, gradient clipping, dropout, MLM probability), each value with
the table or section it comes from, so that a default is never a guess and ``--help-config``
can say where it came from. The config (``hetlm.config``, ``hetlm.sft.config``) fills every
hyper-parameter the user left out from here; an explicit value always wins.

Two adaptations, both documented in docs/CONFIG.md:

- **Warm-up** is the paper's number of steps, but at most 10% of ``max_steps`` (papers warm up
  for 10k-30k steps of 0.5-1M; a 2,000-step run would otherwise never leave its warm-up), and
  never 0 from scratch.
- **Small presets** (tiny, mini, small: hidden 256 or less) take ELECTRA-Small's rate (5e-4), the
  published rate for an encoder of that width (hidden 256); LLaMA shapes below 1B take GPT-3
  Small's.

The rates were tuned at the papers' batch sizes (noted per recipe): at a much larger or smaller
global batch, scale ``train.learning_rate`` yourself.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from hetlm.errors import HetlmError

WARMUP_CAP = 0.10  # the default warm-up is at most this share of max_steps


@dataclass(frozen=True)
class Recipe:
    """One model type and size's defaults; ``sources`` names where each value comes from."""

    learning_rate: float
    warmup_steps: int | None  # the paper's steps (capped, see module doc); None: warmup_ratio
    warmup_ratio: float | None
    lr_scheduler_type: str
    adam_beta1: float
    adam_beta2: float
    adam_epsilon: float
    weight_decay: float
    max_grad_norm: float  # 0: no clipping
    dropout: float
    mlm_probability: float | None  # None: not a masked-LM objective
    min_lr_rate: float = 0.0  # cosine_with_min_lr: the final lr as a share of the peak
    batch: str = ""  # the batch size the rate was tuned at
    sources: dict[str, str] = field(default_factory=dict)

    def source(self, key: str) -> str:
        return self.sources.get(key, self.sources.get("*", ""))

    def resolved_warmup(self, max_steps: int) -> int:
        """Warm-up steps for a run of ``max_steps``: the paper's, capped at 10%, at least 1."""
        if self.warmup_ratio is not None:
            return max(1, round(self.warmup_ratio * max_steps))
        assert self.warmup_steps is not None
        return max(1, min(self.warmup_steps, round(WARMUP_CAP * max_steps)))

    def describe_warmup(self) -> str:
        if self.warmup_ratio is not None:
            return f"{self.warmup_ratio:.0%} of max_steps"
        return f"min({self.warmup_steps:,} steps, {WARMUP_CAP:.0%} of max_steps)"


HYPERPARAMETERS = tuple(
    f.name for f in fields(Recipe) if f.name not in ("batch", "sources", "warmup_ratio")
)

# Sources, cited once each.
_BERT = "BERT (Devlin et al. 2019) App. A.2"
_BERT_CODE = "BERT's optimization.py (google-research/bert)"
_ELECTRA = "ELECTRA (Clark et al. 2020) App. A, Table 6"
_ROBERTA = "RoBERTa (Liu et al. 2019) Table 9"
_DEBERTA = "DeBERTa (He et al. 2021) Table 8 (DeBERTaV3 §5 trains with the same settings)"
_LLAMA2 = "Llama 2 (Touvron et al. 2023) §2.2"
_TINYLLAMA = "TinyLlama (Zhang et al. 2024) §2"
_GPT3 = "GPT-3 (Brown et al. 2020) Table 2.1 (125M) and App. B"
_HF_LLAMA = "transformers LlamaConfig (attention_dropout 0; Llama 2 uses none)"


def _encoder(
    lr: float,
    lr_source: str,
    warmup: int,
    beta2: float,
    clip: float,
    source: str,
    *,
    mlm: float = 0.15,
    batch: str,
    mlm_source: str = "",
    eps_source: str = "",
    clip_source: str = "",
) -> Recipe:
    sources = {"*": source, "learning_rate": lr_source}
    if mlm_source:
        sources["mlm_probability"] = mlm_source
    if eps_source:
        sources["adam_epsilon"] = eps_source
    if clip_source:
        sources["max_grad_norm"] = clip_source
    return Recipe(
        learning_rate=lr,
        warmup_steps=warmup,
        warmup_ratio=None,
        lr_scheduler_type="linear",
        adam_beta1=0.9,
        adam_beta2=beta2,
        adam_epsilon=1e-6,
        weight_decay=0.01,
        max_grad_norm=clip,
        dropout=0.1,
        mlm_probability=mlm,
        batch=batch,
        sources=sources,
    )


_SMALL_LR = f"{_ELECTRA}: Small (hidden 256)"

_BERT_SMALL = _encoder(
    5e-4,
    _SMALL_LR,
    10_000,
    0.999,
    1.0,
    _BERT,
    batch="128",
    eps_source=_BERT_CODE,
    clip_source=_BERT_CODE,
)
_BERT_BASE = _encoder(
    1e-4,
    _BERT,
    10_000,
    0.999,
    1.0,
    _BERT,
    batch="256 x 512 tokens",
    eps_source=_BERT_CODE,
    clip_source=_BERT_CODE,
)
_ROBERTA_SMALL = _encoder(5e-4, _SMALL_LR, 24_000, 0.98, 0.0, _ROBERTA, batch="128")
_ROBERTA_BASE = _encoder(6e-4, _ROBERTA, 24_000, 0.98, 0.0, _ROBERTA, batch="8k")
_ROBERTA_LARGE = _encoder(4e-4, _ROBERTA, 30_000, 0.98, 0.0, _ROBERTA, batch="8k")
_ELECTRA_SMALL = _encoder(
    5e-4,
    _ELECTRA,
    10_000,
    0.999,
    1.0,
    _ELECTRA,
    batch="128",
    clip_source="ELECTRA's optimization.py (google-research/electra)",
)
_ELECTRA_BASE = _encoder(
    2e-4,
    _ELECTRA,
    10_000,
    0.999,
    1.0,
    _ELECTRA,
    batch="256",
    clip_source="ELECTRA's optimization.py (google-research/electra)",
)
_ELECTRA_LARGE = _encoder(
    2e-4,
    _ELECTRA,
    10_000,
    0.999,
    1.0,
    _ELECTRA,
    mlm=0.25,
    batch="2048",
    clip_source="ELECTRA's optimization.py (google-research/electra)",
)
_DEBERTA_SMALL = _encoder(5e-4, _SMALL_LR, 10_000, 0.999, 1.0, _DEBERTA, batch="128")
_DEBERTA_BASE = _encoder(2e-4, _DEBERTA, 10_000, 0.999, 1.0, _DEBERTA, batch="2k")


def _llama(lr: float, lr_source: str, eps: float, eps_source: str, batch: str) -> Recipe:
    return Recipe(
        learning_rate=lr,
        warmup_steps=2000,
        warmup_ratio=None,
        lr_scheduler_type="cosine_with_min_lr",
        min_lr_rate=0.1,
        adam_beta1=0.9,
        adam_beta2=0.95,
        adam_epsilon=eps,
        weight_decay=0.1,
        max_grad_norm=1.0,
        dropout=0.0,
        mlm_probability=None,
        batch=batch,
        sources={
            "*": _LLAMA2,
            "learning_rate": lr_source,
            "adam_epsilon": eps_source,
            "dropout": _HF_LLAMA,
        },
    )


_LLAMA_SMALL = _llama(6e-4, _GPT3, 1e-8, _GPT3, batch="0.5M tokens")
_LLAMA_1B = _llama(
    4e-4, _TINYLLAMA, 1e-8, f"{_TINYLLAMA} (torch's AdamW default)", batch="2M tokens"
)
_LLAMA_7B = _llama(3e-4, _LLAMA2, 1e-5, _LLAMA2, batch="4M tokens")

# model type -> preset -> recipe. Every preset of presets.py has an entry (tested).
PRETRAIN_RECIPES: dict[str, dict[str, Recipe]] = {
    "bert": {
        "tiny": _BERT_SMALL,
        "mini": _BERT_SMALL,
        "small": _BERT_SMALL,
        "base": _BERT_BASE,
        "large": _BERT_BASE,
    },
    "roberta": {
        "tiny": _ROBERTA_SMALL,
        "mini": _ROBERTA_SMALL,
        "small": _ROBERTA_SMALL,
        "base": _ROBERTA_BASE,
        "large": _ROBERTA_LARGE,
    },
    "electra": {
        "tiny": _ELECTRA_SMALL,
        "mini": _ELECTRA_SMALL,
        "small": _ELECTRA_SMALL,
        "base": _ELECTRA_BASE,
        "large": _ELECTRA_LARGE,
    },
    "deberta-v2": {
        "tiny": _DEBERTA_SMALL,
        "mini": _DEBERTA_SMALL,
        "small": _DEBERTA_SMALL,
        "base": _DEBERTA_BASE,
        "large": _DEBERTA_BASE,
    },
    "llama": {
        "tiny": _LLAMA_SMALL,
        "mini": _LLAMA_SMALL,
        "small": _LLAMA_SMALL,
        "base": _LLAMA_SMALL,
        "1b": _LLAMA_1B,
        "7b": _LLAMA_7B,
        "13b": _LLAMA_7B,
    },
}

# Continued pretraining (model.init_from) keeps the type's recipe but for the rate and warm-up:
# the checkpoint already sits in a good region (a high rate undoes it), and its Adam moments are
# not kept (a short warm-up avoids a jolt).
CONTINUED_LR = 1e-4
CONTINUED_WARMUP_RATIO = 0.06
CONTINUED_SOURCE = (
    "hetlm's continued-pretraining default (6% warm-up as in Don't Stop "
    "Pretraining, Gururangan et al. 2020, App. B)"
)

_QLORA = "QLoRA (Dettmers et al. 2023) App. B"
_ALPACA = "Stanford Alpaca's train recipe (cosine, warmup_ratio 0.03, no weight decay)"

# LoRA instruction tuning (hetlm sft), whatever the base.
SFT_RECIPE = Recipe(
    learning_rate=2e-4,
    warmup_steps=None,
    warmup_ratio=0.03,
    lr_scheduler_type="cosine",
    adam_beta1=0.9,
    adam_beta2=0.999,
    adam_epsilon=1e-8,
    weight_decay=0.0,
    max_grad_norm=0.3,
    dropout=0.0,
    mlm_probability=None,
    batch="16",
    sources={
        "*": _QLORA,
        "warmup_steps": _ALPACA,
        "lr_scheduler_type": _ALPACA,
        "adam_epsilon": "torch's AdamW default (as the HF Trainer)",
        "learning_rate": f"{_QLORA}: 2e-4 for 7B/13B (1e-4 from 33B)",
        "dropout": _HF_LLAMA,
    },
)


def pretrain_recipe(model_type: str, preset: str) -> Recipe:
    """The recipe of a model type and preset (the preset of a continued run's checkpoint is
    unknown: its type's base recipe, with the continued-pretraining rate and warm-up)."""
    table = PRETRAIN_RECIPES.get(model_type)
    if table is None:
        raise HetlmError(
            f"no recipe for model type {model_type!r}: choose one of {', '.join(PRETRAIN_RECIPES)}"
        )
    recipe = table.get(preset)
    if recipe is None:
        raise HetlmError(
            f"unknown {model_type} preset {preset!r}: choose one of {', '.join(table)}"
        )
    return recipe


def recipe_rows() -> list[tuple[str, str, Recipe]]:
    """(model type, presets, recipe) with the presets that share a recipe in one row."""
    rows = []
    for model_type, presets in PRETRAIN_RECIPES.items():
        groups: dict[int, list[str]] = {}
        for name, recipe in presets.items():
            groups.setdefault(id(recipe), []).append(name)
        rows += [(model_type, ", ".join(names), presets[names[0]]) for names in groups.values()]
    rows.append(("sft (LoRA)", "any", SFT_RECIPE))
    return rows


RECIPE_COLUMNS = (
    "type",
    "preset",
    "lr",
    "warm-up",
    "schedule",
    "betas",
    "eps",
    "wd",
    "clip",
    "dropout",
    "mlm",
    "batch",
    "source of the lr",
)


def recipe_cells(model_type: str, presets: str, r: Recipe) -> list[str]:
    schedule = r.lr_scheduler_type + (f" (min {r.min_lr_rate:g})" if r.min_lr_rate else "")
    return [
        model_type,
        presets,
        f"{r.learning_rate:.0e}",
        r.describe_warmup(),
        schedule,
        f"{r.adam_beta1:g}/{r.adam_beta2:g}",
        f"{r.adam_epsilon:.0e}",
        f"{r.weight_decay:g}",
        f"{r.max_grad_norm:g}" if r.max_grad_norm else "none",
        f"{r.dropout:g}",
        f"{r.mlm_probability:g}" if r.mlm_probability is not None else "-",
        r.batch,
        r.source("learning_rate"),
    ]


def recipe_table() -> str:
    """The recipes as aligned text columns (``--help-config``)."""
    table = [list(RECIPE_COLUMNS)] + [recipe_cells(*row) for row in recipe_rows()]
    widths = [max(len(row[i]) for row in table) for i in range(len(RECIPE_COLUMNS) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[-1]
        for row in table
    )
