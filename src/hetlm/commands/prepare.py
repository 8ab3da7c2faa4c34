"""``hetlm prepare``: tokenize a corpus and pack it into fixed-length sequences on disk.

Also the scale-out modes: ``--shard i/n`` writes shard i of n into ``--output`` (one node's
share), ``--merge SHARD_DIR...`` combines the n shard folders into the dataset.
"""

from __future__ import annotations

import argparse

from hetlm.commands.tokenizer import (
    add_cleaning_arguments,
    add_hf_arguments,
    cleaning_options,
    hf_source,
)


def register(subparsers) -> None:
    """Add ``hetlm prepare``."""
    parser = subparsers.add_parser(
        "prepare",
        help="tokenize and pack a corpus into train/validation sequences",
        description="Tokenize documents in parallel, join them with [SEP], cut [CLS] ... [SEP] "
        "sequences of --seq-len tokens and save a datasets.DatasetDict "
        "(train, validation) plus hetlm_dataset.json. Work is done in chunks of "
        "--chunk-chars characters: a stopped run resumes from its finished chunks "
        "when run again; --shard i/n does one node's share and --merge combines "
        "the shards into exactly the dataset a single run gives.",
    )
    parser.add_argument(
        "inputs",
        nargs="*",
        metavar="INPUT",
        help="corpus files, folders (*.txt, *.jsonl, *.json, *.parquet, *.arrow) "
        "or glob patterns; with --merge, the shard folders",
    )
    parser.add_argument(
        "--tokenizer",
        metavar="DIR_OR_HUB_NAME",
        help="tokenizer folder (from `hetlm tokenizer train`), or the folder or "
        "hub name of a checkpoint to continue (e.g. a LLaMA-style one: rows "
        "are then <s> ... </s>, documents joined by </s>)",
    )
    parser.add_argument(
        "--output",
        required=True,
        metavar="DIR",
        help="dataset folder to write (with --shard: this shard's folder)",
    )
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument(
        "--validation-fraction",
        type=float,
        default=0.02,
        help="share of documents held out for validation (default 0.02)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="tokenizer processes (default: the CPUs available)",
    )
    parser.add_argument(
        "--text-field", default="text", help="JSON Lines field / Parquet column holding the text"
    )
    parser.add_argument(
        "--no-normalize",
        dest="normalize",
        action="store_false",
        help="turn off Unicode NFKC normalisation",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/validation split")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing dataset (or restart a shard) in --output",
    )
    scale = parser.add_argument_group("scale-out and resume")
    scale.add_argument(
        "--shard",
        metavar="I/N",
        help="tokenize only shard I of N (chunks c with c %% N == I) into "
        "--output; combine the N folders with --merge",
    )
    scale.add_argument(
        "--merge",
        action="store_true",
        help="the INPUTs are the folders of shards 0..N-1: combine them into "
        "--output (Arrow files hard-linked, no tokens rewritten)",
    )
    scale.add_argument(
        "--move",
        action="store_true",
        help="with --merge: move the shards' Arrow files instead of linking",
    )
    scale.add_argument(
        "--chunk-chars",
        type=int,
        default=None,
        help="characters per chunk, the unit of resume and sharding (default 4000000)",
    )
    scale.add_argument(
        "--work-dir",
        metavar="DIR",
        help="where an unsharded run keeps its chunks until done (default "
        ".<output>.partial beside --output)",
    )
    scale.add_argument(
        "--max-chunks",
        type=int,
        default=None,
        help="stop after tokenizing this many chunks (run again to continue)",
    )
    add_cleaning_arguments(parser)
    add_hf_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Prepare (or merge) and print the summary."""
    from hetlm.errors import HetlmError

    if args.merge:
        from hetlm.data.prepare.pipeline import merge_shards

        if not args.inputs:
            raise HetlmError("--merge needs the shard folders as INPUTs")
        summary = merge_shards(args.inputs, args.output, overwrite=args.overwrite, move=args.move)
        print(summary.summary())
        return 0
    from hetlm.models.source import resolve_model_source

    if not args.tokenizer:
        raise HetlmError("--tokenizer is required (a folder from `hetlm tokenizer train`)")
    resolve_model_source(args.tokenizer, "--tokenizer")  # a mistyped folder fails at once
    from hetlm.data.prepare.pipeline import prepare_dataset
    from hetlm.data.prepare.shards import parse_shard

    hf = hf_source(args)
    if not args.inputs and hf is None:
        raise HetlmError("no corpus given: pass INPUT files/folders or --hf-dataset")
    summary = prepare_dataset(
        args.inputs,
        args.tokenizer,
        args.output,
        seq_len=args.seq_len,
        validation_fraction=args.validation_fraction,
        text_field=args.text_field,
        normalize=args.normalize,
        workers=args.workers,
        seed=args.seed,
        overwrite=args.overwrite,
        cleaning=cleaning_options(args),
        chunk_chars=args.chunk_chars,
        shard=parse_shard(args.shard) if args.shard else None,
        hf=hf,
        strict=args.strict,
        work_dir=args.work_dir,
        max_chunks=args.max_chunks,
    )
    print(summary.summary())
    return 0
