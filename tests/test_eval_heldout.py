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
    # the sparse objective's loss is the full-logit next-token loss of the model's own forward
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    rows, _ = pack_for_clm(corpora["ews-test"], load_tokenizer(spec), 64)
    ids = torch.from_numpy(rows)
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()(input_ids=ids).logits
    flat = logits[:, :-1].reshape(-1, logits.shape[-1])
    reference = F.cross_entropy(flat, ids[:, 1:].reshape(-1))
    assert results[1].loss == pytest.approx(float(reference), abs=1e-5)
    correct = int((flat.argmax(-1) == ids[:, 1:].reshape(-1)).sum())
    assert results[1].accuracy == correct / results[1].predicted_tokens


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


def full_logit_mlm(model, batch) -> tuple[float, int]:
    """The reference the sparse scorer must equal: every position projected onto the
    vocabulary by the model's own forward, the masked slots picked, cross-entropy summed."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        logits = model(input_ids=batch.input_ids).logits
    index = batch.masked_positions.unsqueeze(-1).expand(-1, -1, logits.shape[-1])
    picked = logits.gather(1, index).float().reshape(-1, logits.shape[-1])
    labels = batch.masked_labels.reshape(-1)
    loss = float(F.cross_entropy(picked, labels, ignore_index=-100, reduction="sum"))
    return loss, int(((picked.argmax(-1) == labels) & (labels != -100)).sum())


def test_packed_dataset_scores_like_the_pretraining_objective(tiny_bert, tiny_llama, tmp_path):
    """A `hetlm prepare` folder is scored as packed, by `hetlm pretrain`'s objective
    (``SparseMaskedLM``, the head on the masked slots only); its loss equals the full-logit
    loss of the model's own forward on the same masks, to float rounding."""
    from _eval_fixtures import fixture_texts
    from transformers import AutoModelForMaskedLM

    from hetlm.data.collators import EVAL_EPOCH
    from hetlm.data.prepare.pipeline import prepare_dataset
    from hetlm.evaluate.heldout import load_packed_corpus

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
    loss_sum, correct = full_logit_mlm(model, batch)
    assert result.predicted_tokens == batch.num_targets
    assert result.loss == pytest.approx(loss_sum / batch.num_targets, abs=1e-5)
    assert result.accuracy == correct / batch.num_targets
    [decoder] = evaluate_lm(ModelSpec("llama", str(tiny_llama)), {"v": packed})
    assert decoder.skipped and "packed MLM dataset" in decoder.skipped


def test_a_model_type_without_a_split_head_is_scored_by_its_own_forward(
    tiny_bert, tmp_path, corpora
):
    """A public encoder whose head the sparse objective cannot split off (DistilBERT) is still
    scored, through its full forward, with the numbers of the full-logit reference."""
    import shutil

    import torch
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    from hetlm.data.collators import EVAL_EPOCH
    from hetlm.errors import HetlmError
    from hetlm.models.masked_lm import SparseMaskedLM

    tokenizer = load_tokenizer(ModelSpec("bert", str(tiny_bert)))
    config = DistilBertConfig(
        vocab_size=len(tokenizer),
        dim=32,
        n_layers=1,
        n_heads=2,
        hidden_dim=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = DistilBertForMaskedLM(config).eval()
    with pytest.raises(HetlmError, match="does not support model type 'distilbert'"):
        SparseMaskedLM(model)  # training refuses it when the module is built
    folder = tmp_path / "distilbert"
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_bert / name, folder / name)
    [result] = evaluate_lm(
        ModelSpec("distilbert", str(folder)), {"ews": corpora["ews-test"]}, seq_len=32
    )
    rows, _ = pack_for_mlm(corpora["ews-test"], tokenizer, 32)
    batch = mlm_collator(tokenizer, 32, len(tokenizer))(rows, np.arange(len(rows)), EVAL_EPOCH)
    loss_sum, correct = full_logit_mlm(model, batch)
    assert result.skipped is None and result.predicted_tokens == batch.num_targets
    assert result.loss == pytest.approx(loss_sum / batch.num_targets, abs=1e-5)
    assert result.accuracy == correct / batch.num_targets
