"""``hetlm stage SRC DST``: copy a prepared dataset to node-local disk, verified and atomic."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    """Add ``hetlm stage``."""
    parser = subparsers.add_parser(
        "stage",
        help="copy a prepared dataset to local disk (verified, resumable)",
        description="Copy the dataset SRC (e.g. on NFS) to DST (local disk): every file is "
        "hashed while copied and checked against hetlm_manifest.json (sizes and "
        "sha256), the copy is built beside DST and renamed into place when complete, "
        "a stopped copy resumes, and an up-to-date DST is left alone. Point "
        "data.local_copy at DST to have training read it.",
    )
    parser.add_argument("source", metavar="SRC", help="dataset folder from `hetlm prepare`")
    parser.add_argument("destination", metavar="DST", help="local folder for the copy")
    parser.add_argument(
        "--verify-existing",
        action="store_true",
        help="re-hash an existing DST before declaring it up to date",
    )
    parser.add_argument("--quiet", action="store_true", help="no per-file progress lines")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hetlm.data.staging import stage_dataset

    summary = stage_dataset(
        args.source,
        args.destination,
        verify_existing=args.verify_existing,
        progress=None if args.quiet else print,
    )
    print(summary.summary())
    return 0
