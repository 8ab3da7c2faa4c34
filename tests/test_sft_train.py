"""LoRA instruction tuning in the shared loop (``hetlm sft``): split invariance on 2 gloo ranks,
exact resume, a plain-peft-loadable adapter, the response-only loss, length grouping, and
one-line errors. Tiny LLaMA preset (hidden 32), 1,200-piece byte-level BPE, short dolly-ja rows.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from _dist import _free_port
from _sft_fixtures import build_tokenizer, dolly_rows
from safetensors.torch import load_file

from hetlm.errors import HetlmError

TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def sft_inputs(tmp_path_factory) -> dict[str, Path]:
    """A tokenizer and 48 short dolly-ja rows (varied lengths) as JSON Lines."""
    root = tmp_path_factory.mktemp("sft_train")
    build_tokenizer(root / "tokenizer")
    rows = [
        r
        for r in dolly_rows(400, start=400)
        if len(r["instruction"]) + len(r["input"]) + len(r["output"]) < 160
    ][:48]
    data = root / "data.jsonl"
    data.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
    )
    return {"tokenizer": root / "tokenizer", "data": data}


def sft_config(
    inputs: dict[str, Path],
    output_dir: Path,
    *,
    lora_dropout: float = 0.0,
    length_grouping: bool = True,
    validation: float = 0.1,
    **train,
) -> dict:
    """fp32, dropout-free unless asked: split invariance needs both."""
    base = {
        "global_batch": 8,
        "micro_batch": 8,
        "max_steps": 3,
        "learning_rate": 2e-3,
        "warmup_steps": 0,
        "precision": "fp32",
        "max_eval_samples": 8,
        "logging_steps": 1,
    }
    base.update(train)
    return {
        "run": {"output_dir": str(output_dir), "seed": 0},
        "model": {"preset": "tiny", "tokenizer": str(inputs["tokenizer"])},
        "data": {
            "dataset": str(inputs["data"]),
            "template": "ja-alpaca",
            "max_length": 192,
            "validation_fraction": validation,
            "length_grouping": length_grouping,
        },
        "lora": {"r": 4, "alpha": 8, "dropout": lora_dropout},
        "train": base,
    }


def adapter(output_dir: Path, where: str = "adapter") -> dict[str, torch.Tensor]:
    return load_file(str(Path(output_dir) / where / "adapter_model.safetensors"))


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _worker(rank: int, world: int, port: int, config: dict, kwargs: dict) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK="0",
        GROUP_RANK=str(rank),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    from hetlm.sft.config import parse_sft_config
    from hetlm.sft.train import run_sft

    run_sft(parse_sft_config(config), **kwargs)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as tests/_dist.py: no gloo teardown at exit


def run_ranks(config: dict, world: int, **kwargs) -> None:
    config = {**config, "train": {**config["train"], "dist_timeout_s": 60}}
    mp.spawn(_worker, args=(world, _free_port(), config, kwargs), nprocs=world, join=True)


def run_single(config: dict, **kwargs) -> dict:
    from hetlm.sft.config import parse_sft_config
    from hetlm.sft.train import run_sft

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: more threads only contend
    try:
        return run_sft(parse_sft_config(config), **kwargs)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(sft_inputs, tmp_path_factory):
    """One process, global batch 8 in one micro-batch, 3 steps; the trainer object is kept."""
    from hetlm.sft.config import parse_sft_config
    from hetlm.sft.train import InstructionTuningRecipe
    from hetlm.train import distributed as D
    from hetlm.train.trainer import Trainer

    out = tmp_path_factory.mktemp("ref")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = parse_sft_config(sft_config(sft_inputs, out))
        trainer = Trainer(
            config, InstructionTuningRecipe(config), D.init_distributed(), resume=False
        )
        summary = trainer.run()
    finally:
        torch.set_num_threads(threads)
    return {"dir": out, "trainer": trainer, "summary": summary}


def test_split_invariance_on_two_ranks(reference, sft_inputs, tmp_path):
    """per_rank [3, 5] on 2 gloo ranks == one process with the global batch of 8."""
    run_ranks(sft_config(sft_inputs, tmp_path, micro_batch={"per_rank": [3, 5]}), world=2)
    ref = adapter(reference["dir"])
    diff = max_abs_diff(ref, adapter(tmp_path))
    print(f"SFT split [3, 5]: max abs diff {diff:.2e}")
    assert diff <= TOLERANCE
    assert max(float(v.abs().max()) for k, v in ref.items() if "lora_B" in k) > 1e-3  # trained
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["micro_batches"] == [[3], [5]]
    # the loss per step is the same too (token-exact over response tokens)
    steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    ref_steps = [
        json.loads(line) for line in (reference["dir"] / "metrics.jsonl").read_text().splitlines()
    ]
    losses = [r["loss"] for r in steps if "event" not in r]
    ref_losses = [r["loss"] for r in ref_steps if "event" not in r]
    assert np.allclose(losses, ref_losses, rtol=0, atol=1e-6)


def test_adapter_loads_with_plain_peft_and_gives_the_same_logits(reference):
    """<output_dir>/adapter is a peft folder: PeftModel.from_pretrained on the saved base gives
    the trained model's logits; the checkpoints hold the adapter, not the base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, trainer = reference["dir"], reference["trainer"]
    folder = out / "adapter"
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(out / "base")
    assert (folder / "hetlm_template.json").is_file()
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])
    loaded = PeftModel.from_pretrained(base, folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.eos_token_id is not None and tokenizer.pad_token_id is not None
    batch = trainer.eval_data.batch(np.arange(min(3, len(trainer.eval_data))))
    trained = trainer.hf_model.eval()
    with torch.no_grad():
        want = trained(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        got = loaded(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert torch.allclose(want, got, atol=1e-6, rtol=0)
    ckpt = out / "checkpoints" / "step-00000003"
    names = {p.name for p in ckpt.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt"} <= names
    assert "model.safetensors" not in names
    assert (ckpt / "adapter_model.safetensors").stat().st_size < 0.2 * (
        out / "base" / "model.safetensors"
    ).stat().st_size
    summary = reference["summary"]
    assert summary["adapter_dir"] == str(folder) and "eval_perplexity" in summary


def test_resume_is_exact(sft_inputs, tmp_path):
    """4 steps straight == 2 steps, stop, resume, 2 more (LoRA dropout on: RNG restored).
    Nothing held out (validation 0): the run ends without an evaluation."""
    straight = sft_config(
        sft_inputs,
        tmp_path / "straight",
        lora_dropout=0.1,
        max_steps=4,
        micro_batch=4,
        validation=0.0,
    )
    summary = run_single(straight)
    assert "eval_loss" not in summary and summary["validation_examples"] == 0
    stopped = sft_config(
        sft_inputs,
        tmp_path / "stopped",
        lora_dropout=0.1,
        max_steps=4,
        micro_batch=4,
        save_steps=2,
        validation=0.0,
    )
    assert run_single(stopped, stop_at_step=2)["stopped_at"] == 2
    run_single(stopped, resume=True)
    a, b = adapter(tmp_path / "straight"), adapter(tmp_path / "stopped")
    assert all(torch.equal(a[k], b[k]) for k in a), f"max diff {max_abs_diff(a, b):.2e}"
    changed = sft_config(
        sft_inputs,
        tmp_path / "stopped",
        lora_dropout=0.1,
        max_steps=4,
        micro_batch=4,
        validation=0.0,
    )
    changed["lora"]["r"] = 8
    with pytest.raises(HetlmError, match="lora"):
        run_single(changed, resume=True)


def test_loss_counts_response_tokens_only(sft_inputs):
    """The count is the response tokens (+ EOS); the summed loss is the cross-entropy over
    exactly those positions; train_on_prompt counts every token after the first."""
    from transformers import AutoTokenizer

    from hetlm.chat.prompt import encode_segments
    from hetlm.chat.templates import JA_ALPACA
    from hetlm.models.causal_lm import SparseCausalLM
    from hetlm.sft.data import load_examples
    from hetlm.sft.masking import tokenize_examples
    from hetlm.sft.train import SFTData, load_sft_tokenizer

    tokenizer = load_sft_tokenizer(sft_inputs["tokenizer"])
    assert AutoTokenizer.from_pretrained(sft_inputs["tokenizer"]).bos_token is not None
    examples = load_examples(sft_inputs["data"])[:4]
    tokenized, _ = tokenize_examples(examples, tokenizer, JA_ALPACA, max_length=192)
    batch = SFTData(tokenized, tokenizer.pad_token_id).batch(np.arange(4))
    responses = sum(
        sum(encode_segments(JA_ALPACA.segments(e.messages, e.context), tokenizer, bos=True)[1])
        for e in examples
    )
    assert batch.counts == (responses,)
    # target_index: the predicting positions, computed on the CPU (no GPU sync in the model)
    assert set(batch.model_inputs()) == {"input_ids", "labels", "attention_mask", "target_index"}

    from hetlm.sft.config import SFTModelSection
    from hetlm.sft.train import build_base_model

    model = build_base_model(
        SFTModelSection(preset="tiny", tokenizer="x"),
        tokenizer,
        max_length=192,
        seed=0,
        device=torch.device("cpu"),
    ).eval()
    with torch.no_grad():
        loss_sum, _ = SparseCausalLM(model)(**batch.model_inputs())
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    log_probs = torch.log_softmax(logits[:, :-1].float(), -1)
    mask = batch.labels[:, 1:] != -100
    # response positions only: the prompt and padding never enter the sum
    want = -log_probs.gather(-1, batch.labels[:, 1:].clamp(min=0)[..., None])[..., 0][mask].sum()
    assert torch.allclose(loss_sum, want, rtol=1e-5)
    # the fused, chunked head + loss hetlm sft trains with: the same sum, count and gradient
    from hetlm.models.causal_head import FusedSparseCausalLM

    grads = []
    for objective in (SparseCausalLM(model), FusedSparseCausalLM(model, chunk=7)):
        model.zero_grad()
        loss, correct = objective(**batch.model_inputs())
        loss.backward()
        grads.append(
            (
                loss.detach(),
                correct,
                model.lm_head.weight.grad.clone(),
                model.model.embed_tokens.weight.grad.clone(),
            )
        )
    (l1, c1, *g1), (l2, c2, *g2) = grads
    assert torch.allclose(l1, l2, rtol=1e-6) and int(c1) == int(c2)
    for a, b in zip(g1, g2, strict=True):
        assert torch.allclose(a, b, atol=1e-5 * float(a.abs().max()), rtol=0)
    everything, _ = tokenize_examples(
        examples, tokenizer, JA_ALPACA, max_length=192, train_on_prompt=True
    )
    all_batch = SFTData(everything, tokenizer.pad_token_id).batch(np.arange(4))
    assert all_batch.counts[0] == sum(len(t) - 1 for t in everything) > 2 * responses


def test_length_grouping_pads_less_and_gives_the_same_adapter(reference, sft_inputs, tmp_path):
    from hetlm.data.sampler import HeterogeneousBatchSampler
    from hetlm.sft.collator import padded_tokens
    from hetlm.sft.train import LengthGroupedSampler
    from hetlm.topology import BatchSplit

    lengths = reference["trainer"].train_data.lengths
    split = BatchSplit.from_micro_batches(8, [2, 2])  # 2 ranks, 2 micro-steps of 2 each

    def padding(sampler_cls, *args) -> int:
        total = 0
        for rank in range(2):
            sampler = sampler_cls(*args, split, rank, 0)
            for _ in range(sampler.steps_per_epoch):
                total += padded_tokens(sampler.next_step().micro_batches, lengths)
        return total

    grouped = padding(LengthGroupedSampler, lengths)
    plain = padding(HeterogeneousBatchSampler, len(lengths))
    print(f"tokens processed per epoch: {plain} unordered, {grouped} length-grouped")
    assert grouped < 0.9 * plain
    # micro-batches of 2 without grouping (4 micro-steps): the same adapter as the reference
    run_single(sft_config(sft_inputs, tmp_path, micro_batch=2, length_grouping=False))
    assert max_abs_diff(adapter(reference["dir"]), adapter(tmp_path)) <= TOLERANCE


def test_gradient_checkpointing_gives_the_same_adapter(reference, sft_inputs, tmp_path):
    """Recomputing activations in the backward saves memory and changes nothing else."""
    config = sft_config(sft_inputs, tmp_path)
    config["model"]["gradient_checkpointing"] = True
    run_single(config)
    assert max_abs_diff(adapter(reference["dir"]), adapter(tmp_path)) <= TOLERANCE


def test_quantization_without_cuda_is_a_one_line_error(sft_inputs, tmp_path):
    from hetlm.sft.config import parse_sft_config
    from hetlm.sft.train import run_sft

    config = sft_config(sft_inputs, tmp_path)
    config["model"] = {"init_from": str(tmp_path / "base"), "quantization": "4bit"}
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(HetlmError, match="needs a CUDA GPU") as info:
        run_sft(parse_sft_config(config))
    assert "\n" not in str(info.value) and "quantization: none" in str(info.value)
    config["model"] = {"preset": "tiny", "tokenizer": "x", "quantization": "8bit"}
    with pytest.raises(HetlmError, match="model: .*quantization"):
        parse_sft_config(config)


@pytest.mark.parametrize(
    "engine, message",
    [
        ({"engine": "ddp", "zero_stage": 2}, "engine ddp cannot run ZeRO stage 2"),
        (
            {"engine": "fsdp2", "grad_compression": "bf16"},
            "grad_compression applies to the ddp and zero1 engines only",
        ),
    ],
)
def test_engine_settings_are_checked_before_launch(engine, message, sft_inputs, tmp_path, capsys):
    """As for pretraining: what every rank would refuse is one line before any agent starts."""
    from hetlm.cli import main

    config = sft_config(sft_inputs, tmp_path / "run", micro_batch={"per_node": [3, 5]}, **engine)
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(config))
    assert main(["sft", str(path), "--local-nodes", "2"]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # nothing started


def test_cli_errors_are_one_line(sft_inputs, tmp_path, capsys):
    from hetlm.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "run: {output_dir: out}\nmodel: {preset: tiny, tokenizer: t}\n"
        "data: {dataset: d.jsonl, max_lenght: 64}\ntrain: {global_batch: 8}\n"
    )
    assert main(["sft", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("hetlm: error: invalid")
    assert (
        "data.max_lenght: unknown key" in err and "train.max_steps: required key is missing" in err
    )
    # a bad row is named by file and line, before any training
    data = tmp_path / "rows.jsonl"
    data.write_text(
        sft_inputs["data"].read_text().splitlines()[0]
        + "\n"
        + '{"instruction": "質問", "output": ""}\n',
        encoding="utf-8",
    )
    config = sft_config(sft_inputs, tmp_path / "run")
    config["data"]["dataset"] = str(data)
    good = tmp_path / "good.yaml"
    good.write_text(json.dumps(config))
    assert main(["sft", str(good)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{data}:2: field 'output' is empty" in err
