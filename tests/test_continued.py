"""Continued pretraining (``model.init_from``) for an encoder, ELECTRA and a LLaMA decoder.

The checkpoints are made here with plain ``transformers`` (the LLaMA one with a LLaMA-style
BPE tokenizer: ``<s>``/``</s>``, no pad, no [MASK]), so the tests also show that
``hetlm prepare`` packs data for any causal-LM tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _dist import run_single
from conftest import tiny_config, write_small_corpus
from safetensors.torch import load_file

from hetlm.config import parse_config
from hetlm.errors import HetlmError


@pytest.fixture(scope="module")
def llama_style(tmp_path_factory):
    """(tokenizer folder, dataset tokenized with it, a tiny LlamaForCausalLM checkpoint)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from hetlm.data.prepare.pipeline import prepare_dataset

    root = tmp_path_factory.mktemp("llama_style")
    corpus = write_small_corpus(root / "corpus.jsonl")
    texts = [json.loads(line)["text"] for line in corpus.read_text("utf-8").splitlines()]
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
        ),
    )
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.save_pretrained(root / "tokenizer")
    prepare_dataset(
        [corpus], root / "tokenizer", root / "data", seq_len=32, validation_fraction=0.2, workers=1
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
            bos_token_id=1,
            eos_token_id=2,
            tie_word_embeddings=False,
        )
    )
    model.save_pretrained(root / "checkpoint")
    tokenizer.save_pretrained(root / "checkpoint")
    return root / "tokenizer", root / "data", root / "checkpoint"


@pytest.fixture(scope="module")
def encoder_checkpoints(tiny_packed, tmp_path_factory):
    """A tiny BertForMaskedLM and a hetlm-style ELECTRA folder, with tiny_packed's tokenizer."""
    import transformers

    from hetlm.config import ModelSection
    from hetlm.models.build import build_model

    root = tmp_path_factory.mktemp("encoders")
    meta = json.loads((tiny_packed / "hetlm_dataset.json").read_text())
    tokenizer = transformers.AutoTokenizer.from_pretrained(meta["tokenizer_dir"])
    torch.manual_seed(0)
    bert = transformers.BertForMaskedLM(
        transformers.BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
        )
    )
    bert.save_pretrained(root / "bert")
    tokenizer.save_pretrained(root / "bert")
    pair = build_model(
        ModelSection(type="electra", preset="tiny"),
        vocab_size=len(tokenizer),
        pad_token_id=0,
        max_position_embeddings=64,
        seed=1,
    )
    pair.save_pretrained(root / "electra")
    for part in ("discriminator", "generator"):
        tokenizer.save_pretrained(root / "electra" / part)
    return {"bert": root / "bert", "electra": root / "electra"}


def _continued(model_type: str, dataset: Path, init_from: Path, out: Path, **model) -> dict:
    config = tiny_config(dataset, out, max_steps=2, max_eval_samples=8)
    del config["train"]["learning_rate"], config["train"]["warmup_steps"]  # the continued defaults
    config["model"] = {"type": model_type, "init_from": str(init_from), "dropout": 0.0, **model}
    return config


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / "model.safetensors").is_file():
        return load_file(str(folder / "model.safetensors"))
    return {
        f"{part}.{k}": v
        for part in ("discriminator", "generator")
        for k, v in load_file(str(folder / part / "model.safetensors")).items()
    }


def _load_checkpoint(model_type: str, folder: Path) -> torch.nn.Module:
    """The checkpoint as plain transformers loads it (ELECTRA: its two parts, paired)."""
    import transformers

    if model_type == "electra":
        from hetlm.models.electra import ElectraPair

        return ElectraPair(
            transformers.ElectraForPreTraining.from_pretrained(folder / "discriminator"),
            transformers.ElectraForMaskedLM.from_pretrained(folder / "generator"),
        )
    auto = (
        transformers.AutoModelForCausalLM
        if model_type == "llama"
        else transformers.AutoModelForMaskedLM
    )
    return auto.from_pretrained(folder)


def _first_batch_loss(config_dict: dict, model: torch.nn.Module) -> float:
    """The loss of ``model`` on the run's first global batch, computed outside the loop."""
    from hetlm.data.packed import load_packed_dataset
    from hetlm.data.sampler import HeterogeneousBatchSampler
    from hetlm.train.objectives import build_data, loss_weights, objective_module
    from hetlm.train.trainer import combined_loss

    config = parse_config(config_dict)
    dataset, meta = load_packed_dataset(config.data.dataset)
    data = build_data(config, dataset["train"], meta)
    step = HeterogeneousBatchSampler(
        len(data), config.batch_split(1, [0]), 0, config.run.seed
    ).next_step()
    batch = data.batch(step.micro_batches[0], step.epoch)
    module = objective_module(config, model).eval()
    with torch.no_grad():
        loss_sum, _ = module(**batch.model_inputs())
    return combined_loss(
        torch.atleast_1d(loss_sum), torch.tensor(batch.counts), loss_weights(module)
    )


def test_prepare_packs_with_a_llama_style_tokenizer(llama_style):
    from hetlm.data.packed import load_packed_dataset
    from hetlm.train.objectives import build_data

    _, data_dir, _ = llama_style
    dataset, meta = load_packed_dataset(data_dir)
    assert meta["special_token_ids"] == {"unk": 0, "bos": 1, "eos": 2, "pad": 0}
    rows = np.asarray(dataset["train"]["input_ids"])
    assert (rows[:, 0] == 1).all() and (rows[:, -1] == 2).all()  # <s> ... </s>
    assert (rows[:, 1:-1] == 2).any()  # documents joined by </s>
    masked = parse_config(tiny_config(data_dir, data_dir.parent / "unused"))
    with pytest.raises(HetlmError, match="no mask token"):
        build_data(masked, dataset["train"], meta)


@pytest.mark.parametrize("model_type", ["bert", "electra", "llama"])
def test_continued_starts_from_the_checkpoint_and_freezes(
    model_type, llama_style, encoder_checkpoints, tiny_packed, tmp_path
):
    if model_type == "llama":
        _, dataset, checkpoint = llama_style
    else:
        dataset, checkpoint = tiny_packed, encoder_checkpoints[model_type]
    config = _continued(
        model_type, dataset, checkpoint, tmp_path, freeze_embeddings=True, freeze_layers=1
    )
    parsed = parse_config(config)
    assert (parsed.learning_rate, parsed.warmup) == (1e-4, 0)  # round(6% of 2 steps)
    summary = run_single(config)

    expected = _first_batch_loss(config, _load_checkpoint(model_type, checkpoint))
    assert summary["loss_first"] == pytest.approx(expected, rel=1e-5)

    before, after = _weights(checkpoint), _weights(tmp_path / "model")
    shared = sorted(set(before) & set(after))
    frozen = [
        k
        for k in shared
        if "word_embeddings" in k or "embed_tokens" in k or ".layer.0." in k or ".layers.0." in k
    ]
    trained = [k for k in shared if ".layer.1." in k or ".layers.1." in k]
    assert frozen and trained
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in trained)


def _checkpoint_with(model_type: str, tokenizer_dir: Path, out: Path) -> Path:
    """A tiny ``model_type`` checkpoint saved with another tokenizer than tiny_packed's."""
    import transformers

    from hetlm.config import ModelSection
    from hetlm.models.build import build_model

    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    model = build_model(
        ModelSection(type=model_type, preset="tiny"),
        vocab_size=len(tokenizer),
        pad_token_id=0,
        max_position_embeddings=64,
        seed=0,
    )
    model.save_pretrained(out)
    for part in getattr(model, "artifact_subdirs", ("",)):
        tokenizer.save_pretrained(out / part)
    return out


def test_checkpoint_and_data_must_match(llama_style, encoder_checkpoints, tiny_packed, tmp_path):
    llama_tokenizer, _, llama_checkpoint = llama_style
    mismatch = "not with the tokenizer of model.init_from"
    refused = [
        (
            _continued(
                "bert",
                tiny_packed,
                _checkpoint_with("bert", llama_tokenizer, tmp_path / "bert"),
                tmp_path / "a",
            ),
            mismatch,
        ),
        (
            _continued(
                "electra",
                tiny_packed,
                _checkpoint_with("electra", llama_tokenizer, tmp_path / "electra"),
                tmp_path / "b",
            ),
            rf"{mismatch} .*discriminator",
        ),
        (_continued("llama", tiny_packed, llama_checkpoint, tmp_path / "c"), mismatch),
        (
            _continued("electra", tiny_packed, encoder_checkpoints["bert"], tmp_path / "d"),
            "not a hetlm ELECTRA output folder",
        ),
        (
            _continued("bert", tiny_packed, llama_checkpoint, tmp_path / "e"),
            "set model.type: llama",
        ),
    ]
    for config, message in refused:
        with pytest.raises(HetlmError, match=message):
            run_single(config)
