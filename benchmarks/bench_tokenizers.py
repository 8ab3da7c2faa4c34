"""SentencePiece vs MeCab+WordPiece vs Sudachi+WordPiece on general and finance text.

Trains the three tokenizer types at the same vocabulary size on the shipped corpora together
(Aozora Bunko novels, Economy Watchers comments, chABSA securities-report sentences), then runs
``hetlm tokenizer compare`` on each corpus and writes benchmarks/results/tokenizers.{md,json}.
Work files go to runs/bench_tokenizers (not committed). About 2 minutes on 2 cores.

    python benchmarks/bench_tokenizers.py [--vocab-size 16000]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"
AOZORA = DATA / "general_aozora" / "aozora_soseki_akutagawa.jsonl"
EWS = DATA / "finance_economy_watchers" / "ews_current_2024H2.jsonl"
EWS_FIELD = "追加説明及び具体的状況の説明"
CHABSA = DATA / "finance_chabsa" / "chabsa_annotations.jsonl"
TYPES = (("sentencepiece", {}), ("mecab", {}), ("sudachi", {"sudachi_mode": "C"}))


def write_text_corpora(work: Path) -> dict[str, Path]:
    """JSON Lines with a "text" field for each corpus (chABSA: one document per report)."""
    work.mkdir(parents=True, exist_ok=True)
    out = {
        "aozora": work / "aozora.jsonl",
        "ews": work / "ews.jsonl",
        "chabsa": work / "chabsa.jsonl",
    }
    with AOZORA.open(encoding="utf-8") as src, out["aozora"].open("w", encoding="utf-8") as dst:
        for line in src:
            dst.write(json.dumps({"text": json.loads(line)["text"]}, ensure_ascii=False) + "\n")
    with EWS.open(encoding="utf-8") as src, out["ews"].open("w", encoding="utf-8") as dst:
        for line in src:
            text = json.loads(line).get(EWS_FIELD)
            if isinstance(text, str):
                dst.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    with CHABSA.open(encoding="utf-8") as src, out["chabsa"].open("w", encoding="utf-8") as dst:
        for line in src:
            sentences = [s["sentence"] for s in json.loads(line)["sentences"]]
            dst.write(json.dumps({"text": "\n".join(sentences)}, ensure_ascii=False) + "\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab-size", type=int, default=16000)
    parser.add_argument("--max-chars", type=int, default=1_000_000)
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "bench_tokenizers")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()

    from hetlm.data.prepare.compare import compare_tokenizers, markdown_table, reports_json
    from hetlm.data.prepare.tokenizer_training import train_tokenizer

    corpora = write_text_corpora(args.work)
    tokenizers, train_seconds = [], {}
    for kind, options in TYPES:
        folder = args.work / f"{kind}-{args.vocab_size}"
        started = time.perf_counter()
        train_tokenizer(
            list(corpora.values()),
            folder,
            tokenizer_type=kind,
            vocab_size=args.vocab_size,
            **options,
        )
        train_seconds[kind] = round(time.perf_counter() - started, 1)
        tokenizers.append(folder)
        print(f"trained {kind} in {train_seconds[kind]} s")
    labels = {
        "aozora": "general: Aozora (Soseki, Akutagawa)",
        "ews": "finance: Economy Watchers comments",
        "chabsa": "finance: chABSA report sentences",
    }
    reports = []
    for name, path in corpora.items():
        reports += compare_tokenizers(
            [path], tokenizers, max_chars=args.max_chars, corpus_label=labels[name]
        )
    table = markdown_table(reports)
    print(table)
    args.results.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.machine()}, {platform.python_version()}"
    header = (
        f"# Tokenizers: SentencePiece vs MeCab+WordPiece vs Sudachi+WordPiece\n\n"
        f"`python benchmarks/bench_tokenizers.py --vocab-size {args.vocab_size}` "
        f"({machine}). Each type trained with `hetlm tokenizer train` defaults at "
        f"vocabulary {args.vocab_size:,} on the three shipped corpora together "
        f"(Aozora 2.2M characters, Economy Watchers comments, chABSA sentences; "
        f"Sudachi in split mode C, MeCab with unidic-lite), then measured with "
        f"`hetlm tokenizer compare` on the first {args.max_chars:,} characters of each "
        f"corpus. Training time (s): {json.dumps(train_seconds)}. What it shows: "
        f"docs/DATA.md.\n\n"
    )
    (args.results / "tokenizers.md").write_text(header + table, encoding="utf-8")
    (args.results / "tokenizers.json").write_text(
        json.dumps(
            {
                "vocab_size": args.vocab_size,
                "train_seconds": train_seconds,
                "reports": reports_json(reports),
            },
            ensure_ascii=False,
            indent=2,
        )
        + "\n",
        encoding="utf-8",
    )


if __name__ == "__main__":
    main()
