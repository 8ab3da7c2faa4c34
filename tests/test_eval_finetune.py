"""Classifier fine-tuning: learns a learnable task, and seeds never move the split."""

from __future__ import annotations

from dataclasses import replace

import pytest
from _eval_fixtures import (  # noqa: F401
    CHABSA,
    EWS,
    one_torch_thread_fixture,
    tiny_bert_fixture,
    tiny_llama_fixture,
)

from hetlm.evaluate.checkpoint import ModelSpec
from hetlm.evaluate.finetune import (
    FinetuneOptions,
    encode,
    finetune_task,
    prepare_tokenizer,
)
from hetlm.evaluate.metrics import majority_baseline
from hetlm.evaluate.tasks import load_chabsa, load_ews

# Tuned for a randomly initialised tiny BERT: a high learning rate and enough steps to learn
# the keyword (a pretrained model would use the defaults, 5e-5 and 3 epochs).
FAST = dict(epochs=6, lr=3e-3, batch_size=16, max_length=48)


def test_fine_tuning_beats_the_majority_class(tiny_bert):
    task = load_chabsa(CHABSA)
    result = finetune_task(
        ModelSpec("bert", str(tiny_bert)), task, [0], FinetuneOptions(**FAST), log=lambda _: None
    )
    floor = majority_baseline(
        [e.label for e in task.splits["train"]], [e.label for e in task.splits["test"]]
    )
    run = result.runs[0]
    assert result.eval_examples == len(task.splits["test"])
    assert run.accuracy > floor["accuracy"] + 0.15, (run, floor)
    assert run.macro_f1 > floor["macro_f1"] + 0.2
    assert sum(map(sum, run.confusion)) == result.eval_examples


def test_seeds_change_the_model_not_the_data(tiny_bert):
    task = load_ews(EWS)
    options = FinetuneOptions(
        epochs=1, lr=3e-3, max_length=32, max_train_examples=64, max_eval_examples=40
    )
    spec = ModelSpec("bert", str(tiny_bert))
    a = finetune_task(spec, task, [0], options, log=lambda _: None)
    b = finetune_task(spec, task, [1], options, log=lambda _: None)
    again = finetune_task(spec, load_ews(EWS), [0], options, log=lambda _: None)
    assert (a.train_examples, a.eval_examples) == (64, 40)
    assert a.train_ids_sha256 == b.train_ids_sha256 == again.train_ids_sha256
    assert a.eval_ids_sha256 == b.eval_ids_sha256 == again.eval_ids_sha256
    assert a.runs[0].final_train_loss == pytest.approx(again.runs[0].final_train_loss, abs=1e-6)
    assert a.runs[0].final_train_loss != pytest.approx(b.runs[0].final_train_loss, abs=1e-6)


def test_pairs_are_encoded_as_sentence_and_target(tiny_bert):
    tokenizer = prepare_tokenizer(ModelSpec("bert", str(tiny_bert)))
    example = load_chabsa(CHABSA).splits["test"][0]
    features = encode([example], tokenizer, 64)[0]
    assert features["labels"] == example.label
    assert 1 in features["token_type_ids"]  # the second segment is the target
    decoded = tokenizer.decode(features["input_ids"], skip_special_tokens=True).replace(" ", "")
    assert decoded.endswith(example.text_pair)


def test_bad_options_are_refused():
    from hetlm.errors import HetlmError

    with pytest.raises(HetlmError, match="epochs must be at least 1"):
        FinetuneOptions(epochs=0).check()
    with pytest.raises(HetlmError, match="max-train-examples"):
        FinetuneOptions(max_train_examples=0).check()


def test_segment_ids_only_go_to_models_with_a_segment_table():
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        LlamaConfig,
        LlamaForSequenceClassification,
        RobertaConfig,
        RobertaForSequenceClassification,
    )

    from hetlm.evaluate.finetune import _uses_segments

    shape = dict(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=40,
    )
    assert _uses_segments(BertForSequenceClassification(BertConfig(**shape)))
    roberta = RobertaForSequenceClassification(RobertaConfig(type_vocab_size=1, **shape))
    assert not _uses_segments(roberta)  # token_type_ids of 1 would index past its table
    llama = LlamaForSequenceClassification(LlamaConfig(num_key_value_heads=2, **shape))
    assert not _uses_segments(llama)


def test_a_decoder_classifies_from_the_last_text_token_not_the_closing_separator(tiny_llama):
    tokenizer = prepare_tokenizer(ModelSpec("llama", str(tiny_llama)))
    example = load_chabsa(CHABSA).splits["test"][0]
    as_encoder = encode([example], tokenizer, 64)[0]
    as_decoder = encode([example], tokenizer, 64, decoder=True)[0]
    assert as_encoder["input_ids"][-1] == tokenizer.sep_token_id
    assert as_decoder["input_ids"] == as_encoder["input_ids"][:-1]
    assert len(as_decoder["attention_mask"]) == len(as_decoder["input_ids"])
    assert as_decoder["labels"] == example.label


def test_probe_pools_the_mean_for_encoders_and_the_last_real_token_for_decoders():
    import torch

    from hetlm.evaluate.linear_probe import pool

    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    right_padded = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    left_padded = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    assert torch.equal(pool(hidden, right_padded, decoder=True), hidden[[0, 1], [2, 3]])
    assert torch.equal(pool(hidden, left_padded, decoder=True), hidden[[0, 1], [3, 3]])
    assert torch.allclose(pool(hidden, right_padded, decoder=False)[0], hidden[0, :3].mean(0))
    assert torch.allclose(pool(hidden, left_padded, decoder=False)[1], hidden[1].mean(0))


def test_linear_probe_learns_from_frozen_features_and_leaves_the_model_alone(tiny_bert):
    import torch
    from safetensors.torch import load_file

    from hetlm.evaluate.linear_probe import probe_task

    spec = ModelSpec("bert", str(tiny_bert))
    weights_before = load_file(str(tiny_bert / "model.safetensors"))
    task = load_chabsa(CHABSA)
    options = FinetuneOptions(epochs=30, lr=1e-2, max_length=48, linear_probe=True)
    logged = []
    result = probe_task(spec, task, [0, 1], options, log=logged.append)
    assert result.linear_probe is True
    assert [r.seed for r in result.runs] == [0, 1] and len(logged) == 2
    # the same data as fine-tuning would see, the seeds change only the head
    tuning = replace(options, epochs=1, linear_probe=False)
    tuned = finetune_task(spec, task, [0], tuning, log=lambda _: None)
    assert result.train_ids_sha256 == tuned.train_ids_sha256
    assert result.eval_ids_sha256 == tuned.eval_ids_sha256
    assert result.runs[0].final_train_loss != result.runs[1].final_train_loss
    with pytest.raises(ValueError, match="probe_task"):  # never a fine-tuning marked as a probe
        finetune_task(spec, task, [0], options, log=lambda _: None)
    # the keyword of the fixture task is readable in the mean of random-network states
    floor = majority_baseline(
        [e.label for e in task.splits["train"]], [e.label for e in task.splits["test"]]
    )
    assert max(r.macro_f1 for r in result.runs) > floor["macro_f1"] + 0.1, (result, floor)
    after = load_file(str(tiny_bert / "model.safetensors"))
    assert all(torch.equal(weights_before[k], after[k]) for k in weights_before)


def test_a_probe_refuses_a_checkpoint_with_non_finite_states(tiny_bert, tmp_path):
    import shutil

    import torch
    from transformers import AutoModelForMaskedLM

    from hetlm.errors import HetlmError
    from hetlm.evaluate.linear_probe import probe_task

    broken = tmp_path / "broken"
    shutil.copytree(tiny_bert, broken)
    model = AutoModelForMaskedLM.from_pretrained(broken)
    with torch.no_grad():
        model.bert.embeddings.word_embeddings.weight.fill_(float("nan"))
    model.save_pretrained(broken)
    options = FinetuneOptions(epochs=1, max_length=32, max_train_examples=8, linear_probe=True)
    with pytest.raises(HetlmError, match="non-finite hidden states"):
        probe_task(ModelSpec("broken", str(broken)), load_ews(EWS), [0], options, lambda _: None)
