"""``hetlm eval``: held-out LM metrics and financial classification tasks, one table.

Splits are fixed (hash of the document or text, see docs/EVAL.md); ``--seeds`` only changes
fine-tuning. ``--export-splits DIR`` writes the splits as JSON Lines, so a continued-pretraining
corpus can be built from the training split alone.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hetlm.evaluate.recipes import FINETUNE_EPOCHS, FINETUNE_LR, PROBE_EPOCHS, PROBE_LR
from hetlm.names import RenamedFlag

DEFAULT_OUTPUT = "runs/eval"


def register(subparsers) -> None:
    """Add ``hetlm eval``."""
    p = subparsers.add_parser(
        "eval",
        help="evaluate checkpoints: held-out MLM/perplexity, chABSA and EWS fine-tuning",
        description="Evaluate one or more checkpoints (save_pretrained folders with their "
        "tokenizer, or hub names) and write one table: held-out masked-LM loss "
        "and accuracy (perplexity for decoders), and fine-tuned accuracy / macro-F1 "
        "(mean ± std over seeds) on chABSA target sentiment and the Economy "
        "Watchers 5-level judgment. See docs/EVAL.md.",
    )
    p.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="[LABEL=]PATH",
        help="checkpoint folder or hub name; repeat for several models in one table",
    )
    p.add_argument(
        "--tasks",
        default="mlm,chabsa,ews",
        help="comma-separated: mlm (held-out LM), chabsa, ews (default: all)",
    )
    p.add_argument(
        "--output",
        default=DEFAULT_OUTPUT,
        metavar="DIR",
        help=f"where eval.md and eval.json go (default {DEFAULT_OUTPUT})",
    )
    p.add_argument(
        "--device",
        default="auto",
        help="auto (a CUDA GPU when visible, else cpu), cpu, cuda or cuda:N",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="torch CPU threads (default: torch's choice; 1 is fastest for tiny "
        "models on a busy machine)",
    )
    data = p.add_argument_group("data")
    data.add_argument(
        "--data-dir",
        default=None,
        metavar="DIR",
        help="folder holding finance_chabsa/ and finance_economy_watchers/ "
        "(default: the checkout's data/)",
    )
    data.add_argument(
        "--chabsa-path",
        default=None,
        metavar="FILE",
        help="chABSA JSON Lines (overrides --data-dir for this task)",
    )
    data.add_argument(
        "--ews-path",
        default=None,
        metavar="FILE",
        help="Economy Watchers JSON Lines (overrides --data-dir for this task)",
    )
    data.add_argument(
        "--export-splits",
        default=None,
        metavar="DIR",
        help="also write the task splits as JSON Lines to DIR (alone: only that)",
    )
    lm = p.add_argument_group("held-out language modelling (task mlm)")
    lm.add_argument(
        "--mlm-corpus",
        action="append",
        default=[],
        metavar="PATH|chabsa|ews",
        help="corpus file/folder (text or JSON Lines), a `hetlm prepare` dataset "
        "folder (its validation split), or a built-in test split (chabsa: "
        "test reports, ews: test comments); repeat for several (default: "
        "chabsa and ews)",
    )
    lm.add_argument("--mlm-text-field", default="text", help="JSON Lines field of --mlm-corpus")
    lm.add_argument("--mlm-seq-len", type=int, default=128, help="tokens per packed sequence")
    lm.add_argument(
        "--mlm-max-sequences",
        type=int,
        default=None,
        metavar="N",
        help="score only the first N packed sequences of each corpus",
    )
    lm.add_argument("--lm-batch-size", type=int, default=16)
    ft = p.add_argument_group("fine-tuning (tasks chabsa, ews)")
    ft.add_argument("--seeds", default="0,1,2", help="fine-tuning seeds (default 0,1,2)")
    ft.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"passes over the training split (default {FINETUNE_EPOCHS}; "
        f"{PROBE_EPOCHS} with --linear-probe)",
    )
    ft.add_argument("--batch-size", type=int, default=16)
    ft.add_argument(
        "--learning-rate",
        "--lr",
        dest="lr",
        type=float,
        default=None,
        action=RenamedFlag,
        metavar="LR",
        help=f"peak learning rate (default {FINETUNE_LR:g}; {PROBE_LR:g} with --linear-probe)",
    )
    ft.add_argument("--max-length", type=int, default=128, help="tokens per example")
    ft.add_argument(
        "--linear-probe",
        action="store_true",
        help="instead of fine-tuning, train a linear classifier on the frozen model's "
        "features (encoders: mean of the last hidden states; decoders: the last token's): "
        "scores what pretraining put into the representations (docs/EVAL.md)",
    )
    ft.add_argument(
        "--max-train-examples",
        type=int,
        default=None,
        metavar="N",
        help="train on a fixed subsample of N (the same for every seed and model)",
    )
    ft.add_argument(
        "--max-eval-examples",
        type=int,
        default=None,
        metavar="N",
        help="score a fixed subsample of N evaluation examples",
    )
    ft.add_argument(
        "--eval-split",
        choices=("test", "dev"),
        default="test",
        help="score on test (default) or dev (for tuning the recipe)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Check everything, evaluate, print the table, write Markdown and JSON."""
    from hetlm.quiet import no_loading_bars

    no_loading_bars()
    from hetlm.errors import HetlmError
    from hetlm.evaluate.checkpoint import parse_model_specs, resolve_device
    from hetlm.evaluate.finetune import FinetuneOptions
    from hetlm.evaluate.suite import (
        BUILTIN_CORPORA,
        EvalConfig,
        parse_seeds,
        parse_tasks,
        run_eval,
        summarize,
    )
    from hetlm.evaluate.tasks import DataPaths, export_splits

    paths = DataPaths(
        data_dir=_path(args.data_dir), chabsa=_path(args.chabsa_path), ews=_path(args.ews_path)
    )
    if args.export_splits:
        manifest = export_splits(paths, Path(args.export_splits))
        chabsa = manifest["tasks"]["chabsa"]["document_ids"]
        ews = manifest["tasks"]["ews"]["counts"]
        print(
            f"wrote the splits to {args.export_splits}: chABSA documents "
            + ", ".join(f"{k} {len(v)}" for k, v in chabsa.items())
            + "; EWS texts "
            + ", ".join(f"{k} {v['examples']}" for k, v in ews.items())
        )
        if not args.model:
            return 0
    if not args.model:
        raise HetlmError(
            "no model given: pass --model DIR (repeat for several), or only --export-splits DIR"
        )
    probe = args.linear_probe
    options = FinetuneOptions(
        epochs=(PROBE_EPOCHS if probe else FINETUNE_EPOCHS) if args.epochs is None else args.epochs,
        batch_size=args.batch_size,
        lr=(PROBE_LR if probe else FINETUNE_LR) if args.lr is None else args.lr,
        max_length=args.max_length,
        max_train_examples=args.max_train_examples,
        max_eval_examples=args.max_eval_examples,
        eval_split=args.eval_split,
        device=resolve_device(args.device),
        linear_probe=args.linear_probe,
    )
    config = EvalConfig(
        models=parse_model_specs(args.model),
        tasks=parse_tasks(args.tasks),
        seeds=parse_seeds(args.seeds),
        finetune=options,
        data=paths,
        mlm_corpora=args.mlm_corpus or list(BUILTIN_CORPORA),
        mlm_text_field=args.mlm_text_field,
        mlm_seq_len=args.mlm_seq_len,
        mlm_max_sequences=args.mlm_max_sequences,
        lm_batch_size=args.lm_batch_size,
    )
    if args.threads is not None:
        if args.threads < 1:
            raise HetlmError(f"--threads must be at least 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    output = Path(args.output)
    report = run_eval(config, output_dir=output, log=lambda line: print(line, flush=True))
    print()
    print(summarize(report))
    print(f"\nwrote {output / 'eval.md'} and {output / 'eval.json'}")
    return 0


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None
