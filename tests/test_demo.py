"""``hetlm demo``: the pretraining demo runs end to end (a few steps on a corpus slice), for the
causal LM (default) and BERT, and its summary sets the held-out accuracy next to the
most-frequent-token baseline."""

from __future__ import annotations

import re

import numpy as np
import pytest
from conftest import write_small_corpus

from hetlm.cli import main
from hetlm.evaluate.heldout import frequency_baseline, token_counts


def test_frequency_baseline_by_hand():
    labels = np.array([5, 5, 5, 7, 9, -100, -100])  # -100: padding slots, not targets
    counts = token_counts(np.array([[1, 5, 5, 7, 2], [1, 5, 9, 9, 2]]), 10, exclude=(1, 2))
    assert counts.tolist() == [0, 0, 0, 0, 0, 3, 0, 1, 0, 2]
    base = frequency_baseline(labels, counts)
    assert base.token_id == 5 and base.accuracy == pytest.approx(3 / 5) and base.targets == 5
    smoothed = (counts + 1) / (counts + 1).sum()
    expected = -(3 * np.log(smoothed[5]) + np.log(smoothed[7]) + np.log(smoothed[9])) / 5
    assert base.loss == pytest.approx(expected)


@pytest.mark.parametrize("model", ["bert", "deberta-v2"])
def test_demo_summary_prints_the_baseline(model, tmp_path, capfd):
    corpus = write_small_corpus(tmp_path / "corpus.jsonl")
    code = main(
        [
            "demo",
            "--model",
            model,
            "--workdir",
            str(tmp_path / "demo"),
            "--corpus",
            str(corpus),
            "--vocab-size",
            "3000",
            "--seq-len",
            "32",
            "--steps",
            "4",
            "--micro-batches",
            "2,1",
            "--precision",
            "fp32",
        ]
    )
    out = capfd.readouterr().out
    assert code == 0
    held_out = re.search(r"held-out MLM +loss [\d.]+, accuracy ([\d.]+)%", out)
    baseline = re.search(
        r"baseline +always guessing '.+': accuracy ([\d.]+)% on the held-out "
        r"\[MASK\]s; token frequencies alone: loss ([\d.]+)\. The model: "
        r"([\d.]+)x",
        out,
    )
    assert held_out and baseline, out
    accuracy, base_accuracy = float(held_out.group(1)), float(baseline.group(1))
    assert 0 < base_accuracy < 100 and float(baseline.group(2)) > 0
    assert float(baseline.group(3)) == pytest.approx(accuracy / base_accuracy, abs=0.06)
    # 4 steps cannot leave the plateau, and the summary says so
    assert "still on the token-frequency plateau" in out
    assert "fill-mask" in out


def test_causal_demo_prints_next_token_baseline(tmp_path, capfd):
    corpus = write_small_corpus(tmp_path / "corpus.jsonl")
    code = main(
        [
            "demo",
            "--model",
            "llama",
            "--workdir",
            str(tmp_path / "demo"),
            "--corpus",
            str(corpus),
            "--vocab-size",
            "3000",
            "--seq-len",
            "32",
            "--steps",
            "4",
            "--micro-batches",
            "2,1",
            "--precision",
            "fp32",
        ]
    )
    captured = capfd.readouterr()
    out = captured.out
    assert code == 0
    # quiet output: no transformers loading bar when the demo loads its saved model
    assert "Loading weights" not in captured.out + captured.err
    held_out = re.search(
        r"held-out LM +loss [\d.]+, perplexity [\d.]+, next-token accuracy "
        r"([\d.]+)%",
        out,
    )
    baseline = re.search(
        r"baseline +always guessing '.+': accuracy ([\d.]+)% on the held-out "
        r"next tokens;.+The model: ([\d.]+)x",
        out,
    )
    assert held_out and baseline, out
    assert float(baseline.group(2)) == pytest.approx(
        float(held_out.group(1)) / float(baseline.group(1)), abs=0.06
    )
    assert "next token" in out
