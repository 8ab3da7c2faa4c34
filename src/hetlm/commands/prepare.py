"""``hetlm prepare``: tokenize a corpus and pack it into fixed-length sequences on disk."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    """Add ``hetlm prepare``."""
    parser = subparsers.add_parser(
        "prepare", help="tokenize and pack a corpus into train/validation sequences",
        description="Tokenize documents in parallel, join them with [SEP], cut [CLS] ... [SEP] "
                    "sequences of --seq-len tokens and save a datasets.DatasetDict "
                    "(train, validation) plus hetlm_dataset.json.")
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="corpus files, folders (*.txt, *.jsonl, *.json) or glob patterns")
    parser.add_argument("--tokenizer", required=True, metavar="DIR",
                        help="tokenizer folder (from `hetlm tokenizer train`)")
    parser.add_argument("--output", required=True, metavar="DIR", help="dataset folder to write")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--validation-fraction", type=float, default=0.02,
                        help="share of documents held out for validation (default 0.02)")
    parser.add_argument("--workers", type=int, default=None,
                        help="tokenizer processes (default: the CPUs available)")
    parser.add_argument("--text-field", default="text", help="JSON Lines field holding the text")
    parser.add_argument("--no-normalize", dest="normalize", action="store_false",
                        help="turn off Unicode NFKC normalisation")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/validation split")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing dataset in --output")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Prepare the dataset and print its summary."""
    from hetlm.data.packing import prepare_dataset

    summary = prepare_dataset(
        args.inputs, args.tokenizer, args.output, seq_len=args.seq_len,
        validation_fraction=args.validation_fraction, text_field=args.text_field,
        normalize=args.normalize, workers=args.workers, seed=args.seed,
        overwrite=args.overwrite)
    print(summary.summary())
    return 0
