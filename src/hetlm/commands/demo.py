"""``hetlm demo``: the whole path on the shipped corpus, on this machine, in minutes.

``hetlm demo`` alone is the pretraining demo below; ``hetlm demo <name>`` runs one of the other
demos, each a module ``hetlm.commands.demo_<name>`` with ``register_demo(subparsers)`` (listed
in ``OTHER_DEMOS``).

Tokenizer → packed dataset → a small DeBERTa-v2 masked LM (``--model deberta-v2``, the
default), BERT (``--model bert``) or LLaMA (``--model llama``) pretrained on two emulated nodes
with different micro-batch sizes (8 and 4) → held-out accuracy next to the most-frequent-token
baseline, and fill-mask (masked LMs) or next-token guesses (LLaMA) on held-out sentences
through the saved model, loaded by plain ``transformers``.

A language model first sits on the token-frequency plateau (it predicts `、 。 の` whatever the
sentence); the summary says plainly whether the run got past it. With the defaults (a 4k
vocabulary, 64-token sequences, 2 layers of width 128, lr 2e-3 with 5% warm-up, 1,500 steps,
~2.5 minutes on two CPU cores) DeBERTa-v2 does (measured: 16.9% held-out [MASK] accuracy
against 4.1%), and so does the causal LM (21% next-token accuracy against 4.4%); BERT, whose
positions are learned absolute embeddings, does not, even in 12,000 steps (docs/MODELS.md,
"Does it learn?").
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

DEFAULT_CORPUS = "general_aozora/aozora_soseki_akutagawa.jsonl"
OTHER_DEMOS: list[str] = ["domain", "sft"]  # "domain" -> hetlm.commands.demo_domain
# The demo's models: the "mini" preset (2 layers of width 128, BERT-Tiny's shape), no dropout.
DEMO_MODEL_TYPES = ("bert", "deberta-v2", "llama")
FILL_MASK_SENTENCES = 2  # held-out sentences shown with one token to guess
# The token to guess is the first of these (particles and the like: the context decides them)
# after the sentence's third token; chosen before the model is asked, never after.
MASK_CANDIDATES = ("の", "に", "を", "は", "が", "と", "で", "も", "た", "て")


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="the end-to-end demo on the shipped Japanese corpus")
    p.add_argument("--workdir", default="runs/demo", help="where everything is written")
    p.add_argument("--corpus", default=None, help=f"default: data/{DEFAULT_CORPUS}")
    p.add_argument("--steps", type=int, default=1500, help="optimizer steps")
    p.add_argument("--vocab-size", type=int, default=4000)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument(
        "--model",
        default="deberta-v2",
        choices=sorted(DEMO_MODEL_TYPES),
        help="deberta-v2 (default): masked LM with relative positions, fill-mask; it gets "
        "past the token-frequency plateau on a CPU in minutes; llama: causal LM, next-token "
        "guesses (also gets past it); bert: masked LM, fill-mask (stays on the plateau at "
        "this scale, and says so)",
    )
    p.add_argument(
        "--preset",
        default=None,
        help="model preset (tiny|mini|small|base|large); "
        "default: mini (2 layers of width 128) without dropout, minutes on a CPU",
    )
    p.add_argument(
        "--learning-rate",
        "--lr",
        type=float,
        default=2e-3,
        help="peak learning rate (5%% warm-up, then linear decay)",
    )
    p.add_argument("--micro-batches", default="8,4", help="micro-batch of each emulated node")
    p.add_argument("--precision", default="auto", help="auto|fp32|bf16")
    p.set_defaults(func=run)
    if OTHER_DEMOS:
        import importlib

        demos = p.add_subparsers(
            dest="demo",
            metavar="{" + ",".join(OTHER_DEMOS) + "}",
            help="another demo (default: the pretraining demo)",
        )
        for name in OTHER_DEMOS:
            importlib.import_module(f"hetlm.commands.demo_{name}").register_demo(demos)


def find_data_dir() -> Path:
    """The project's data/ folder: next to the checkout (editable install) or the cwd."""
    from hetlm.errors import HetlmError

    for base in (Path.cwd(), *Path(__file__).resolve().parents):
        if (base / "data" / DEFAULT_CORPUS).is_file():
            return base / "data"
    raise HetlmError(
        "cannot find the shipped corpus data/" + DEFAULT_CORPUS + ": run the demo "
        "from the hetlm checkout or pass --corpus"
    )


def run(args: argparse.Namespace) -> int:
    from hetlm.quiet import no_loading_bars

    no_loading_bars()
    from hetlm.commands.pretrain import format_summary
    from hetlm.data.prepare.pipeline import prepare_dataset
    from hetlm.data.prepare.tokenizer_training import train_tokenizer
    from hetlm.models.presets import model_name

    work = Path(args.workdir)
    corpus = Path(args.corpus) if args.corpus else find_data_dir() / DEFAULT_CORPUS
    micro = [int(m) for m in args.micro_batches.split(",")]
    timings: dict[str, float] = {}

    print(f"[1/4] tokenizer: SentencePiece Unigram, vocab {args.vocab_size}, on {corpus}")
    started = time.perf_counter()
    tokenizer_dir = train_tokenizer([corpus], work / "tokenizer", vocab_size=args.vocab_size)
    timings["tokenizer"] = time.perf_counter() - started

    print(f"[2/4] packing into {args.seq_len}-token sequences")
    started = time.perf_counter()
    summary = prepare_dataset(
        [corpus],
        tokenizer_dir,
        work / "data",
        seq_len=args.seq_len,
        validation_fraction=0.05,
        overwrite=True,
    )
    print(summary.summary())
    timings["prepare"] = time.perf_counter() - started

    model = (
        {"type": args.model, "preset": args.preset}
        if args.preset
        else {"type": args.model, "preset": "mini", "dropout": 0.0}
    )
    # Every hyper-parameter written out: the demo shows what these settings reach, whatever
    # hetlm's defaults become.
    config = {
        "run": {"output_dir": str(work / "run"), "seed": 0},
        "data": {"dataset": str(work / "data")},
        "model": model,
        "train": {
            "global_batch": sum(micro),
            "micro_batch": {"per_node": micro},
            "max_steps": args.steps,
            "learning_rate": args.learning_rate,
            "lr_scheduler_type": "linear",
            "warmup_steps": max(1, round(0.05 * args.steps)),
            "adam_beta1": 0.9,
            "adam_beta2": 0.98,
            "adam_epsilon": 1e-6,
            "weight_decay": 0.01,
            "max_grad_norm": 1.0,
            "mlm_probability": 0.15,
            "precision": args.precision,
            "save_steps": max(1, args.steps // 2),
            "eval_steps": max(1, args.steps // 4),
            "max_eval_samples": 512,
            "logging_steps": 10,
        },
    }
    config_path = work / "pretrain.yaml"
    name = model_name(args.model, model["preset"])
    if not args.preset:
        name += " (2 layers of 128, no dropout)"
    print(
        f"[3/4] pretraining {name} on {len(micro)} emulated nodes, micro-batches "
        f"{micro} (config: {config_path})"
    )
    started = time.perf_counter()
    run_summary = run_demo_step(
        "pretrain", config, config_path, nodes=len(micro), what="pretraining"
    )
    timings["pretrain"] = time.perf_counter() - started

    causal = args.model == "llama"
    task = "next token" if causal else "fill-mask"
    print(
        f"[4/4] the most-frequent-token baseline, and {task} on held-out sentences through "
        "the saved model (plain transformers)"
    )
    baseline = heldout_baseline(config)
    model_dir = run_summary["model_dir"]
    sentences = held_out_sentences(work / "data", model_dir)
    examples = (next_token_examples if causal else fill_mask_examples)(model_dir, sentences)
    print()
    print("=" * 72)
    print(format_summary(run_summary))
    print(baseline_line(run_summary, baseline, model_dir, causal))
    for text, answer, predictions in examples:
        print(
            f"{task:16s} {text} (held out; answer {answer}) -> "
            + ", ".join(f"{t} ({s:.2f})" for t, s in predictions)
        )
    if not examples:
        print(f"{task:16s} (no held-out sentence of 10-40 characters found)")
    print("time             " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    print(
        f"metrics          {work / 'run' / 'metrics.jsonl'} (plot: {work / 'run' / 'loss.png'}; "
        f"tensorboard --logdir {work / 'run' / 'tensorboard'})"
    )
    print("=" * 72)
    return 0


def run_demo_step(command: str, config: dict, config_path: Path, *, nodes: int, what: str) -> dict:
    """Write ``config`` to ``config_path``, empty its ``run.output_dir``, run ``hetlm <command>``
    on ``nodes`` emulated nodes and return the run's ``summary.json``."""
    import shutil

    import yaml

    from hetlm.errors import HetlmError
    from hetlm.launch.local import run_local_nodes

    config_path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    output_dir = Path(config["run"]["output_dir"])
    shutil.rmtree(output_dir, ignore_errors=True)
    code = run_local_nodes([command, str(config_path), "--quiet"], nodes=nodes)
    if code != 0:
        raise HetlmError(f"{what} failed (exit code {code}); see the messages above")
    return json.loads((output_dir / "summary.json").read_text())


def heldout_baseline(config: dict):
    """The most-frequent-token baseline on the positions the run's held-out MLM scored."""
    from hetlm.config import parse_config
    from hetlm.evaluate.heldout import pretraining_heldout

    return pretraining_heldout(parse_config(config))[2]


def baseline_line(summary: dict, baseline, model_dir: str, causal: bool = False) -> str:
    """Held-out accuracy against always guessing the most frequent token, said plainly (both
    on the same held-out targets: every one shown to a masked LM as [MASK], every next token
    for a causal LM)."""
    from transformers import AutoTokenizer

    token = AutoTokenizer.from_pretrained(model_dir).convert_ids_to_tokens(baseline.token_id)
    ratio = summary["eval_accuracy"] / max(baseline.accuracy, 1e-12)
    verdict = (
        "it predicts from the context"
        if ratio >= 2
        else "still on the token-frequency plateau (it has learnt which tokens are frequent, "
        "not yet to read the context; docs/MODELS.md, 'Does it learn?')"
    )
    targets = "next tokens" if causal else "[MASK]s"
    return (
        f"baseline         always guessing {token!r}: accuracy {baseline.accuracy:.1%} on the "
        f"held-out {targets}; token frequencies alone: loss {baseline.loss:.3f}. The model: "
        f"{ratio:.1f}x the baseline accuracy, {verdict}"
    )


def held_out_sentences(
    dataset_dir: Path, model_dir: str, count: int = FILL_MASK_SENTENCES
) -> list[tuple[list[int], int]]:
    """``count`` sentences of the held-out documents, each with the position of the token to
    guess (the first of ``MASK_CANDIDATES`` after its third token): (token ids, position).

    Taken from the validation split (whole documents never trained on), between two ``。``
    of one row, and checked against the training split: a sentence whose tokens also occur
    there (a quotation, a refrain) is skipped.
    """
    import numpy as np
    from transformers import AutoTokenizer

    from hetlm.data.packed import load_packed_dataset

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dataset, _ = load_packed_dataset(dataset_dir)
    period = tokenizer.convert_tokens_to_ids("。")
    if period is None or period == tokenizer.unk_token_id:
        return []
    train = np.asarray(dataset["train"].with_format("numpy")[:]["input_ids"]).reshape(-1)
    special = np.array(tokenizer.all_special_ids)
    found: list[tuple[str, str]] = []
    for row in np.asarray(dataset["validation"].with_format("numpy")[:]["input_ids"]):
        ends = np.flatnonzero(row == period)
        for start, end in zip(ends[:-1], ends[1:], strict=True):
            ids = row[start + 1 : end + 1]
            if np.isin(ids, special).any() or _occurs_in(ids, train):
                continue
            sentence = tokenizer.decode(ids.tolist()).strip()
            position = _guess_position(ids, tokenizer) if 10 <= len(sentence) <= 40 else None
            if position is not None:
                found.append((ids.tolist(), position))
            if len(found) == count:
                return found
    return found


def _occurs_in(ids, stream) -> bool:
    """Whether the token sequence ``ids`` occurs in ``stream`` (1-D arrays)."""
    import numpy as np

    n = len(ids)
    starts = np.flatnonzero(stream[: len(stream) - n + 1] == ids[0])
    return any((stream[s : s + n] == ids).all() for s in starts)


def _guess_position(ids, tokenizer) -> int | None:
    pieces = tokenizer.convert_ids_to_tokens(ids.tolist())
    return next((k for k in range(3, len(pieces) - 1) if pieces[k] in MASK_CANDIDATES), None)


Example = tuple[str, str, list[tuple[str, float]]]  # shown text, answer, top-5 (token, p)


def fill_mask_examples(model_dir: str, sentences: list[tuple[list[int], int]]) -> list[Example]:
    """Each sentence with its token masked, through the plain fill-mask pipeline."""
    from transformers import AutoTokenizer, pipeline
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    fill = pipeline("fill-mask", model=model_dir, tokenizer=model_dir, device="cpu")
    out = []
    for ids, k in sentences:
        text = (
            tokenizer.decode(ids[:k]).strip()
            + tokenizer.mask_token
            + tokenizer.decode(ids[k + 1 :])
        )
        predictions = fill(text, top_k=5)
        out.append(
            (
                text,
                tokenizer.convert_ids_to_tokens(ids[k]),
                [(p["token_str"], float(p["score"])) for p in predictions],
            )
        )
    return out


def next_token_examples(model_dir: str, sentences: list[tuple[list[int], int]]) -> list[Example]:
    """Each sentence cut before its token: the causal LM's five likeliest next tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    start = [model.config.bos_token_id] if model.config.bos_token_id is not None else []
    out = []
    for ids, k in sentences:
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([start + ids[:k]])).logits[0, -1]
        top = logits.float().softmax(-1).topk(5)
        out.append(
            (
                tokenizer.decode(ids[:k]).strip() + "___",
                tokenizer.convert_ids_to_tokens(ids[k]),
                [
                    (tokenizer.convert_ids_to_tokens(int(i)), float(p))
                    for p, i in zip(top.values, top.indices, strict=True)
                ],
            )
        )
    return out
