"""Held-out LM metrics: finite, deterministic, packed and masked as documented."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from _eval_fixtures import (  # noqa: F401
    EVAL_DATA,
    one_torch_thread_fixture,
    tiny_bert_fixture,
    tiny_llama_fixture,
)

from hetlm.evaluate.checkpoint import ModelSpec, is_causal_lm, load_config, load_tokenizer
from hetlm.evaluate.heldout import evaluate_lm, mlm_collator, pack_for_clm, pack_for_mlm
from hetlm.evaluate.tasks import DataPaths, heldout_texts


@pytest.fixture(scope="module")
def corpora() -> dict[str, list[str]]:
    paths = DataPaths(data_dir=EVAL_DATA)
    return {"chabsa-test": heldout_texts("chabsa", paths), "ews-test": heldout_texts("ews", paths)}


def test_mlm_loss_is_finite_and_deterministic(tiny_bert, corpora):
    spec = ModelSpec("bert", str(tiny_bert))
    first = evaluate_lm(spec, corpora, seq_len=64, batch_size=4)
    second = evaluate_lm(spec, corpora, seq_len=64, batch_size=7)  # batching must not matter
    assert [r.kind for r in first] == ["mlm", "mlm"]
    for a, b in zip(first, second, strict=True):
        assert a.skipped is None and math.isfinite(a.loss) and 0 <= a.accuracy <= 1
        assert a.predicted_tokens > 0 and a.sequences > 0
        assert a.loss == pytest.approx(b.loss, abs=1e-5) and a.accuracy == b.accuracy
        assert a.predicted_tokens == b.predicted_tokens
    # a random tiny model is near uniform: loss close to ln(vocabulary)
    vocab = len(load_tokenizer(spec))
    assert abs(first[0].loss - math.log(vocab)) < 1.0


def test_mlm_rows_are_packed_like_prepare_and_masks_are_fixed(tiny_bert, corpora):
    from hetlm.data.collators import EVAL_EPOCH

    tokenizer = load_tokenizer(ModelSpec("bert", str(tiny_bert)))
    rows, dropped = pack_for_mlm(corpora["ews-test"], tokenizer, 32)
    assert rows.shape[1] == 32 and 0 <= dropped < 30
    assert (rows[:, 0] == tokenizer.cls_token_id).all()
    assert (rows[:, -1] == tokenizer.sep_token_id).all()
    collator = mlm_collator(tokenizer, 32, len(tokenizer))
    a = collator(rows[:4], np.arange(4), EVAL_EPOCH)
    b = collator(rows[:4], np.arange(4), EVAL_EPOCH)
    assert a.num_targets > 0 and (a.masked_positions == b.masked_positions).all()
    assert (a.input_ids == b.input_ids).all()
    masked = a.masked_positions[a.masked_labels != -100]
    assert (masked > 0).all() and (masked < 31).all()  # [CLS]/[SEP] never predicted
    # held-out targets are all [MASK]: no kept token lets a copying model score without context
    real = a.masked_labels != -100
    shown = a.input_ids.gather(1, a.masked_positions)
    assert (shown[real] == tokenizer.mask_token_id).all()
    training = collator(rows[:4], np.arange(4), 0)  # training keeps BERT's 80/10/10
    assert (training.input_ids.gather(1, training.masked_positions) != tokenizer.mask_token_id)[
        training.masked_labels != -100
    ].any()


def test_decoder_gets_perplexity(tiny_llama, corpora):
    spec = ModelSpec("llama", str(tiny_llama))
    assert is_causal_lm(load_config(spec))
    results = evaluate_lm(spec, corpora, seq_len=64)
    again = evaluate_lm(spec, corpora, seq_len=64)
    for r, s in zip(results, again, strict=True):
        assert r.kind == "clm" and math.isfinite(r.loss)
        assert r.perplexity == pytest.approx(math.exp(r.loss))
        assert r.loss == pytest.approx(s.loss, abs=1e-5)
        assert r.predicted_tokens == r.sequences * 63


def test_clm_packing_keeps_every_token_but_the_tail(tiny_llama):
    tokenizer = load_tokenizer(ModelSpec("llama", str(tiny_llama)))
    texts = ["売上高が増加しました。"] * 20
    rows, dropped = pack_for_clm(texts, tokenizer, 16)
    per_doc = len(tokenizer("売上高が増加しました。", add_special_tokens=False)["input_ids"]) + 1
    assert rows.size + dropped == 20 * per_doc


def test_a_checkpoint_without_an_mlm_head_is_skipped_not_scored(tiny_bert, tmp_path, corpora):
    import shutil

    import torch
    from transformers import ElectraConfig, ElectraForPreTraining

    tokenizer = load_tokenizer(ModelSpec("bert", str(tiny_bert)))
    config = ElectraConfig(
        vocab_size=len(tokenizer),
        embedding_size=16,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    folder = tmp_path / "electra-discriminator"
    ElectraForPreTraining(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_bert / name, folder / name)
    results = evaluate_lm(ModelSpec("electra", str(folder)), corpora, seq_len=32)
    assert all(r.skipped and "no trained MLM head" in r.skipped for r in results)
    assert all(r.loss is None and r.missing_weights for r in results)


def test_packed_dataset_scores_like_the_pretraining_objective(tiny_bert, tiny_llama, tmp_path):
    """A `hetlm prepare` folder is scored as packed; the full-logit loss equals the
    masked-only loss `hetlm pretrain` reports (``SparseMaskedLM``) on the same masks."""
    import torch
    from _eval_fixtures import fixture_texts
    from transformers import AutoModelForMaskedLM

    from hetlm.data.collators import EVAL_EPOCH
    from hetlm.data.prepare.pipeline import prepare_dataset
    from hetlm.evaluate.heldout import load_packed_corpus
    from hetlm.models.masked_lm import SparseMaskedLM

    corpus = tmp_path / "text.jsonl"
    corpus.write_text(
        "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in fixture_texts()[:300]),
        encoding="utf-8",
    )
    prepare_dataset(
        [corpus], tiny_bert, tmp_path / "data", seq_len=32, validation_fraction=0.2, workers=1
    )
    packed = load_packed_corpus(str(tmp_path / "data"), max_sequences=12)
    assert packed.rows.shape == (12, 32)
    [result] = evaluate_lm(ModelSpec("bert", str(tiny_bert)), {"v": packed}, batch_size=5)
    assert result.skipped is None and result.sequences == 12

    model = AutoModelForMaskedLM.from_pretrained(tiny_bert).eval()
    tokenizer = load_tokenizer(ModelSpec("bert", str(tiny_bert)))
    batch = mlm_collator(tokenizer, 32, len(tokenizer))(packed.rows, np.arange(12), EVAL_EPOCH)
    with torch.no_grad():
        loss_sum, correct = SparseMaskedLM(model)(
            batch.input_ids, batch.masked_positions, batch.masked_labels
        )
    assert result.predicted_tokens == batch.num_targets
    assert result.loss == pytest.approx(float(loss_sum) / batch.num_targets, abs=1e-5)
    [decoder] = evaluate_lm(ModelSpec("llama", str(tiny_llama)), {"v": packed})
    assert decoder.skipped and "packed MLM dataset" in decoder.skipped
