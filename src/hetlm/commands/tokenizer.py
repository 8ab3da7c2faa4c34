"""``hetlm tokenizer train``: a SentencePiece tokenizer saved for plain ``AutoTokenizer``."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    """Add ``hetlm tokenizer`` and its ``train`` action."""
    parser = subparsers.add_parser("tokenizer", help="train a tokenizer on a corpus")
    actions = parser.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    train = actions.add_parser(
        "train", help="train a SentencePiece (unigram/BPE) tokenizer with BERT special tokens",
        description="Train a SentencePiece tokenizer on plain text (blank line between "
                    "documents) or JSON Lines files, directories or globs, and save a folder "
                    "that transformers.AutoTokenizer loads as a fast tokenizer.")
    train.add_argument("inputs", nargs="+", metavar="INPUT",
                       help="corpus files, folders (*.txt, *.jsonl, *.json) or glob patterns")
    train.add_argument("--output", required=True, metavar="DIR", help="tokenizer folder to write")
    train.add_argument("--vocab-size", type=int, default=8000)
    train.add_argument("--model-type", choices=("unigram", "bpe"), default="unigram")
    train.add_argument("--character-coverage", type=float, default=0.9995,
                       help="share of characters covered by pieces (0.98-1.0; default 0.9995)")
    train.add_argument("--byte-fallback", action="store_true",
                       help="encode uncovered characters as UTF-8 bytes instead of [UNK]")
    train.add_argument("--input-sentence-size", type=int, default=1_000_000,
                       help="sentences sampled for training (bounds memory; default 1000000)")
    train.add_argument("--text-field", default="text", help="JSON Lines field holding the text")
    train.add_argument("--no-normalize", dest="normalize", action="store_false",
                       help="turn off Unicode NFKC normalisation")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--model-max-length", type=int, default=512,
                       help="longest input the tokenizer declares (default 512)")
    train.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    """Train, then print what was read and where the tokenizer went."""
    from hetlm.data.corpus import CorpusStats
    from hetlm.data.tokenizer import train_tokenizer

    stats = CorpusStats()
    output = train_tokenizer(
        args.inputs, args.output, vocab_size=args.vocab_size, model_type=args.model_type,
        character_coverage=args.character_coverage, byte_fallback=args.byte_fallback,
        input_sentence_size=args.input_sentence_size, text_field=args.text_field,
        normalize=args.normalize, seed=args.seed, model_max_length=args.model_max_length,
        stats=stats)
    print(stats.summary())
    print(f"Saved the {args.model_type} tokenizer (vocabulary {args.vocab_size:,}) to {output}; "
          "load it with transformers.AutoTokenizer.from_pretrained.")
    return 0
