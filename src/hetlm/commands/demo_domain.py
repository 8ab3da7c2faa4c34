"""``hetlm demo domain``: the domain-adaptation experiment, end to end, on CPU.

(a) a model (LLaMA-mini by default, or BERT) pretrained on the general corpus, (b) from scratch
on general + finance text, (c) (a) continued on finance text, then held-out finance LM loss and
the two financial tasks, fine-tuned and as a linear probe, for the three
(``hetlm.experiments.domain``). The finance text is the evaluation's *train* split only.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hetlm.evaluate.recipes import PROBE_EPOCHS, PROBE_LR
from hetlm.names import RenamedFlag

# The full run (the CPU variant: about 40 minutes on an idle 2-core CPU, one thread) and the
# quick one (tests: seconds). LLaMA-mini learns at this scale where a BERT stays on the
# token-frequency plateau (docs/MODELS.md, "Does it learn?"); lr 2e-3 is the learning check's.
# The fine-tuning lr is higher than hetlm eval's 5e-5: these models are tiny.
FULL = {
    "model_type": "llama",
    "preset": "mini",
    "steps": 2000,
    "continue_steps": 1000,
    "batch_size": 16,
    "seq_len": 128,
    "vocab_size": 8000,
    "lr": 2e-3,
    "seeds": "0,1,2",
    "epochs": 3,
    "finetune_lr": 5e-4,
    "max_train_examples": 2000,
    "max_eval_examples": None,
    "max_length": 128,
    "mlm_max_sequences": 200,
    "max_corpus_chars": None,
    "threads": 1,
}
QUICK = {
    "model_type": "llama",
    "preset": "tiny",
    "steps": 8,
    "continue_steps": 4,
    "batch_size": 8,
    "seq_len": 64,
    "vocab_size": 3000,
    "lr": 1e-3,
    "seeds": "0",
    "epochs": 1,
    "finetune_lr": 5e-5,
    "max_train_examples": 48,
    "max_eval_examples": 48,
    "max_length": 64,
    "mlm_max_sequences": 8,
    "max_corpus_chars": 60_000,
    "threads": 1,
}


def register_demo(subparsers) -> None:
    """Add ``hetlm demo domain``."""
    p = subparsers.add_parser(
        "domain",
        help="domain adaptation: general vs mixed vs continued pretraining on finance",
        description="Pretrain three small models (LLaMA-mini by default) with one tokenizer: "
        "(a) general corpus only, (b) general + finance from scratch, (c) (a) continued on "
        "finance; then held-out finance LM loss and chABSA / Economy Watchers, fine-tuned "
        "and as a linear probe of the frozen models (mean ± std over seeds, and which "
        "differences are beyond the seeds' spread). The finance text is the evaluation's train split only. Writes "
        "domain_adaptation.{md,json,png} to --workdir. See docs/EVAL.md.",
    )
    p.add_argument("--workdir", default="runs/demo-domain", help="where everything is written")
    p.add_argument(
        "--quick",
        action="store_true",
        help="a tiny version in seconds (tiny model, few steps, 1 seed, small "
        "subsets): checks the path, not the science",
    )
    p.add_argument(
        "--model",
        dest="model_type",
        choices=["llama", "deberta-v2", "bert"],
        default=None,
        help="llama: causal LMs (default); deberta-v2: masked LMs with relative positions; "
        "both leave the token-frequency plateau at CPU scale; bert: masked LMs, which need "
        "a GPU's scale to learn (see docs/EVAL.md)",
    )
    p.add_argument("--preset", default=None, help=f"model preset (default {FULL['preset']})")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        metavar="N",
        help=f"(a)'s optimizer steps; (b) gets N + M (default {FULL['steps']})",
    )
    p.add_argument(
        "--continue-steps",
        type=int,
        default=None,
        metavar="M",
        help=f"(c)'s steps on finance after (a) (default {FULL['continue_steps']})",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help=f"sequences per optimizer step (default {FULL['batch_size']})",
    )
    p.add_argument(
        "--seq-len", type=int, default=None, help=f"tokens per sequence (default {FULL['seq_len']})"
    )
    p.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help=f"tokenizer size (default {FULL['vocab_size']})",
    )
    p.add_argument(
        "--learning-rate",
        "--lr",
        dest="lr",
        type=float,
        default=None,
        action=RenamedFlag,
        metavar="LR",
        help=f"lr of (a) and (b) (default {FULL['lr']:g})",
    )
    p.add_argument(
        "--continue-learning-rate",
        "--continue-lr",
        dest="continue_lr",
        type=float,
        default=None,
        action=RenamedFlag,
        metavar="LR",
        help="lr of (c) (default: the continued-pretraining default, 1e-4)",
    )
    p.add_argument("--precision", default="auto", help="auto|fp32|bf16 (default auto)")
    ev = p.add_argument_group("evaluation (as hetlm eval)")
    ev.add_argument("--seeds", default=None, help=f"fine-tuning seeds (default {FULL['seeds']})")
    ev.add_argument(
        "--epochs", type=int, default=None, help=f"fine-tuning epochs (default {FULL['epochs']})"
    )
    ev.add_argument(
        "--max-train-examples",
        type=int,
        default=None,
        metavar="N",
        help=f"fine-tuning subsample per task (default {FULL['max_train_examples']}; 0: all)",
    )
    ev.add_argument(
        "--max-eval-examples",
        type=int,
        default=None,
        metavar="N",
        help="test subsample per task (default: all; 0: all)",
    )
    ev.add_argument(
        "--finetune-learning-rate",
        "--finetune-lr",
        dest="finetune_lr",
        type=float,
        default=None,
        action=RenamedFlag,
        metavar="LR",
        help=f"fine-tuning lr, the same for every model (default {FULL['finetune_lr']:g})",
    )
    ev.add_argument(
        "--max-length",
        type=int,
        default=None,
        help=f"fine-tuning tokens per example (default {FULL['max_length']})",
    )
    ev.add_argument(
        "--no-probe",
        dest="probe",
        action="store_false",
        help="skip the linear probe (a linear classifier on the frozen models' features) "
        "beside full fine-tuning",
    )
    ev.add_argument(
        "--probe-learning-rate",
        dest="probe_lr",
        type=float,
        default=PROBE_LR,
        metavar="LR",
        help=f"the linear probe's lr (default {PROBE_LR:g})",
    )
    ev.add_argument(
        "--probe-epochs",
        type=int,
        default=PROBE_EPOCHS,
        help=f"the linear probe's epochs (default {PROBE_EPOCHS})",
    )
    ev.add_argument(
        "--mlm-max-sequences",
        type=int,
        default=None,
        metavar="N",
        help=f"held-out MLM sequences per corpus (default {FULL['mlm_max_sequences']}; 0: all)",
    )
    ev.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads for pretraining and fine-tuning (default 1: on a "
        "busy 2-core machine 1 thread ran 6x faster than 2; try 2 on a quiet "
        "one)",
    )
    ev.add_argument(
        "--data-dir",
        default=None,
        metavar="DIR",
        help="folder holding general_aozora/, finance_chabsa/ and "
        "finance_economy_watchers/ (default: the checkout's data/)",
    )
    p.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace):
    """The experiment's settings: --quick or full defaults, then the flags given."""
    from hetlm.evaluate.suite import parse_seeds
    from hetlm.experiments.domain import DomainSettings

    base = dict(QUICK if args.quick else FULL)
    for key in base:
        value = getattr(args, key, None)
        if value is not None:
            base[key] = value
    for key in ("max_train_examples", "max_eval_examples", "mlm_max_sequences"):
        if base[key] == 0:
            base[key] = None
    seeds = parse_seeds(str(base.pop("seeds")))
    return DomainSettings(
        workdir=Path(args.workdir),
        seeds=seeds,
        continue_lr=args.continue_lr,
        probe=args.probe,
        probe_lr=args.probe_lr,
        probe_epochs=args.probe_epochs,
        precision=args.precision,
        data_dir=Path(args.data_dir) if args.data_dir else None,
        **base,
    )


def run(args: argparse.Namespace) -> int:
    import time

    from hetlm.experiments.domain import run_experiment
    from hetlm.experiments.domain_report import main_table, render

    settings = settings_from_args(args)
    started = time.perf_counter()
    results = run_experiment(settings, log=lambda line: print(line, flush=True))
    work = Path(settings.workdir)
    print()
    print("=" * 72)
    print(render(main_table(results)))
    print()
    print(results["budgets_note"])
    print(
        f"time {time.perf_counter() - started:.0f} s; wrote {work / 'domain_adaptation.md'}, "
        f".json, .png (evaluation details: {work / 'eval' / 'eval.md'})"
    )
    print("=" * 72)
    return 0
