"""``hetlm tokenizer train|compare``: train a tokenizer saved for plain ``AutoTokenizer``; compare
tokenizers on a corpus."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_cleaning_arguments(parser: argparse.ArgumentParser) -> None:
    """The cleaning switches shared by ``tokenizer train`` and ``prepare``."""
    from hetlm.data.prepare.cleaning import DEFAULT_MIN_DOC_CHARS

    group = parser.add_argument_group("cleaning (on by default)")
    group.add_argument(
        "--min-doc-chars",
        type=int,
        default=DEFAULT_MIN_DOC_CHARS,
        help="drop documents shorter than this many characters (default "
        f"{DEFAULT_MIN_DOC_CHARS}; 0 keeps all)",
    )
    group.add_argument(
        "--keep-duplicates",
        dest="dedup",
        action="store_false",
        help="keep exact-duplicate documents (removed by default)",
    )
    group.add_argument(
        "--keep-control-chars",
        dest="strip_control",
        action="store_false",
        help="keep control characters (stripped by default)",
    )
    group.add_argument(
        "--strict",
        action="store_true",
        help="stop at the first bad record or undecodable line, naming file:line "
        "(default: skip, count, and name the first few in the summary)",
    )


def add_hf_arguments(parser: argparse.ArgumentParser) -> None:
    """Options for a Hugging Face ``datasets`` corpus, streamed."""
    group = parser.add_argument_group("Hugging Face datasets input (streamed)")
    group.add_argument(
        "--hf-dataset",
        metavar="NAME",
        help="datasets.load_dataset name (e.g. cc100), or parquet/json/arrow "
        "with --hf-data-files; read after the INPUT files",
    )
    group.add_argument("--hf-config", metavar="NAME", help="dataset configuration (e.g. ja)")
    group.add_argument("--hf-split", default="train", help="split to read (default train)")
    group.add_argument(
        "--hf-data-files",
        nargs="+",
        metavar="FILE",
        help="data files for a packaged builder such as parquet",
    )


def cleaning_options(args: argparse.Namespace):
    from hetlm.data.prepare.cleaning import CleaningOptions

    return CleaningOptions(
        strip_control=args.strip_control, min_doc_chars=args.min_doc_chars, dedup=args.dedup
    )


def hf_source(args: argparse.Namespace):
    from hetlm.data.prepare.sources import HFSource
    from hetlm.errors import HetlmError

    if not args.hf_dataset:
        if args.hf_config or args.hf_data_files:
            raise HetlmError("--hf-config and --hf-data-files need --hf-dataset")
        return None
    return HFSource(args.hf_dataset, args.hf_config, args.hf_split, tuple(args.hf_data_files or ()))


def register(subparsers) -> None:
    """Add ``hetlm tokenizer`` and its ``train`` and ``compare`` actions."""
    parser = subparsers.add_parser("tokenizer", help="train or compare tokenizers")
    actions = parser.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    train = actions.add_parser(
        "train",
        help="train a SentencePiece, MeCab+WordPiece or Sudachi+WordPiece tokenizer",
        description="Train a tokenizer on plain text (blank line between documents), JSON Lines, "
        "Parquet or Arrow files, directories or globs (or a streamed datasets "
        "corpus), and save a folder that transformers.AutoTokenizer loads. "
        "--type sentencepiece (default) needs no analyser; mecab and sudachi "
        "segment words first and need pip install 'hetlm[ja]'.",
    )
    train.add_argument(
        "inputs",
        nargs="*",
        metavar="INPUT",
        help="corpus files, folders (*.txt, *.jsonl, *.json, *.parquet, *.arrow) or glob patterns",
    )
    train.add_argument("--output", required=True, metavar="DIR", help="tokenizer folder to write")
    train.add_argument(
        "--type",
        dest="tokenizer_type",
        default="sentencepiece",
        choices=("sentencepiece", "mecab", "sudachi"),
        help="sentencepiece (no segmentation; default), mecab or sudachi "
        "(word segmentation + WordPiece, BertJapaneseTokenizer)",
    )
    train.add_argument("--vocab-size", type=int, default=8000)
    train.add_argument(
        "--model-type",
        choices=("unigram", "bpe"),
        default="unigram",
        help="SentencePiece model (default unigram)",
    )
    train.add_argument(
        "--mecab-dic",
        choices=("unidic-lite", "ipadic", "unidic"),
        default="unidic-lite",
        help="MeCab dictionary (default unidic-lite)",
    )
    train.add_argument(
        "--sudachi-mode",
        choices=("A", "B", "C"),
        default="A",
        help="Sudachi split mode: A short units (default), B middle, C long",
    )
    train.add_argument(
        "--sudachi-dict",
        choices=("core", "small", "full"),
        default="core",
        help="Sudachi dictionary (default core)",
    )
    train.add_argument(
        "--character-coverage",
        type=float,
        default=0.9995,
        help="share of characters covered by the alphabet (0.98-1.0; default "
        "0.9995); WordPiece caps the alphabet at a quarter of the vocabulary",
    )
    train.add_argument(
        "--byte-fallback",
        action="store_true",
        help="SentencePiece: encode uncovered characters as UTF-8 bytes, not [UNK]",
    )
    train.add_argument(
        "--input-sentence-size",
        type=int,
        default=1_000_000,
        help="lines sampled for training (bounds memory; default 1000000)",
    )
    train.add_argument(
        "--text-field", default="text", help="JSON Lines field / Parquet column holding the text"
    )
    train.add_argument(
        "--no-normalize",
        dest="normalize",
        action="store_false",
        help="turn off Unicode NFKC normalisation",
    )
    train.add_argument("--seed", type=int, default=0)
    train.add_argument(
        "--workers",
        type=int,
        default=None,
        help="segmentation processes for mecab/sudachi (default: the CPUs)",
    )
    train.add_argument(
        "--model-max-length",
        type=int,
        default=512,
        help="longest input the tokenizer declares (default 512)",
    )
    add_cleaning_arguments(train)
    add_hf_arguments(train)
    train.set_defaults(func=run_train)

    compare = actions.add_parser(
        "compare",
        help="compare tokenizers on a corpus (chars/token, [UNK], speed, ...)",
        description="Tokenize the first --max-chars characters of the corpus with each "
        "tokenizer and print characters per token, share of [UNK], characters per "
        "sequence, vocabulary use and speed, as a table (and Markdown/JSON files).",
    )
    compare.add_argument("inputs", nargs="+", metavar="CORPUS", help="corpus files or folders")
    compare.add_argument(
        "--tokenizer",
        dest="tokenizers",
        action="append",
        required=True,
        metavar="DIR",
        help="a tokenizer folder (repeat for each)",
    )
    compare.add_argument("--text-field", default="text")
    compare.add_argument(
        "--max-chars",
        type=int,
        default=1_000_000,
        help="characters of the corpus to tokenize (default 1000000)",
    )
    compare.add_argument(
        "--seq-len",
        type=int,
        default=512,
        help="sequence length for 'characters per sequence' (default 512)",
    )
    compare.add_argument("--label", help="name of the corpus in the table")
    compare.add_argument("--output", metavar="FILE.md", help="also write the table as Markdown")
    compare.add_argument("--json", metavar="FILE.json", help="also write the numbers as JSON")
    compare.set_defaults(func=run_compare)


def run_train(args: argparse.Namespace) -> int:
    """Train, then print what was read and where the tokenizer went."""
    from hetlm.data.prepare.cleaning import CleaningStats
    from hetlm.data.prepare.corpus import CorpusStats
    from hetlm.data.prepare.tokenizer_training import train_tokenizer

    stats, cleaning_stats = CorpusStats(), CleaningStats()
    cleaning = cleaning_options(args)
    output = train_tokenizer(
        args.inputs,
        args.output,
        vocab_size=args.vocab_size,
        model_type=args.model_type,
        character_coverage=args.character_coverage,
        byte_fallback=args.byte_fallback,
        input_sentence_size=args.input_sentence_size,
        text_field=args.text_field,
        normalize=args.normalize,
        seed=args.seed,
        model_max_length=args.model_max_length,
        stats=stats,
        tokenizer_type=args.tokenizer_type,
        mecab_dic=args.mecab_dic,
        sudachi_mode=args.sudachi_mode,
        sudachi_dict=args.sudachi_dict,
        cleaning=cleaning,
        cleaning_stats=cleaning_stats,
        hf=hf_source(args),
        workers=args.workers,
        strict=args.strict,
    )
    for line in stats.warning_lines():  # first: e.g. a file partly in another encoding
        print(line)
    print(stats.summary())
    print(cleaning_stats.summary(cleaning))
    kind = (
        args.model_type
        if args.tokenizer_type == "sentencepiece"
        else f"{args.tokenizer_type}+WordPiece"
    )
    print(
        f"Saved the {kind} tokenizer (vocabulary {args.vocab_size:,}) to {output}; "
        "load it with transformers.AutoTokenizer.from_pretrained."
    )
    return 0


def run_compare(args: argparse.Namespace) -> int:
    """Measure, print the table, write the files."""
    from hetlm.data.prepare.compare import compare_tokenizers, markdown_table, write_reports

    reports = compare_tokenizers(
        args.inputs,
        args.tokenizers,
        text_field=args.text_field,
        max_chars=args.max_chars,
        seq_len=args.seq_len,
        corpus_label=args.label,
    )
    print(markdown_table(reports, args.seq_len), end="")
    write_reports(
        reports,
        Path(args.output) if args.output else None,
        Path(args.json) if args.json else None,
        args.seq_len,
        title="Tokenizer comparison",
    )
    return 0
