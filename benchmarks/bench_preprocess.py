"""Preprocessing throughput and peak memory: ``hetlm prepare`` vs the HF run_mlm recipe.

Builds corpora of ~100 MB and ~1 GB (JSON Lines) under runs/bench_preprocess by repeating and
shuffling the shipped data: every document is a random run of paragraphs from the four shipped
corpora, so documents are unique (duplicate removal has nothing to do) and the text is realistic.
Then, on each corpus, with the same SentencePiece tokenizer (unigram, 8,000, trained on the
Aozora corpus) and 512-token sequences:

- ``hetlm``: ``hetlm prepare CORPUS --tokenizer TOK --output OUT --seq-len 512 --workers 2``
  (cleaning and NFKC on, as by default);
- ``hf``: the recipe of transformers' ``run_mlm.py`` (not line by line): ``load_dataset("json")``
  (which converts the JSON Lines to an Arrow cache), ``map(tokenize, batched=True, num_proc=2)``
  with ``return_special_tokens_mask=True``, then ``map(group_texts, batched=True, num_proc=2)``
  into 512-token blocks; its cache files are its output (no extra ``save_to_disk``).

Each system runs in its own subprocess (fresh caches and output folders). Measured:

- wall time, and CPU time of the whole process tree (user + sys of every descendant,
  ``RUSAGE_CHILDREN``): "MB/s per core" is raw MB / CPU seconds, which other load on the
  machine does not inflate, next to raw MB / wall seconds / 2 cores;
- peak memory of the process tree, sampled every 0.25 s with psutil: the sum of RSS over the
  process and all its children (which counts shared library pages once per process), and the
  sum of PSS (proportional set size: shared pages divided among their users, so the sum is the
  tree's real footprint). The peak of the sum, not the largest single process (which is what
  ``ru_maxrss`` of children would give).

    python benchmarks/bench_preprocess.py [--sizes 100,1000] [--systems hetlm,hf]

Writes benchmarks/results/preprocess.{md,json}. The 1 GB runs take several minutes each on
2 cores; run nothing else heavy meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"
SOURCES = [
    (DATA / "general_aozora" / "aozora_soseki_akutagawa.jsonl", "text"),
    (
        DATA / "finance_economy_watchers" / "ews_current_2024H2.jsonl",
        "追加説明及び具体的状況の説明",
    ),
    (DATA / "instruct_dolly_ja" / "databricks-dolly-15k-ja_v0_every3rd.jsonl", "output"),
]
SEQ_LEN = 512

HF_RECIPE = r"""
import sys
from itertools import chain
from datasets import load_dataset
from transformers import AutoTokenizer

corpus, tokenizer_dir, cache, seq_len = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
raw = load_dataset("json", data_files=corpus, split="train", cache_dir=cache)

def tokenize_function(examples):
    return tokenizer(examples["text"], return_special_tokens_mask=True)

tokenized = raw.map(tokenize_function, batched=True, num_proc=2, remove_columns=["text"])

def group_texts(examples):
    concatenated = {k: list(chain(*examples[k])) for k in examples.keys()}
    total_length = len(concatenated[list(examples.keys())[0]])
    total_length = (total_length // seq_len) * seq_len
    return {k: [t[i : i + seq_len] for i in range(0, total_length, seq_len)]
            for k, t in concatenated.items()}

grouped = tokenized.map(group_texts, batched=True, num_proc=2)
print("SEQUENCES", len(grouped))
"""


# ---------------------------------------------------------------- corpora


def paragraphs() -> list[str]:
    """Every non-blank paragraph of the shipped corpora (about 12 MB of text)."""
    out = []
    for path, field in SOURCES:
        with path.open(encoding="utf-8") as f:
            for line in f:
                text = json.loads(line).get(field)
                if isinstance(text, str):
                    out.extend(p.strip() for p in text.split("\n") if p.strip())
    return out


def build_corpus(path: Path, megabytes: int, seed: int = 0) -> Path:
    """Random runs of paragraphs (about 2,000 characters each) until ``megabytes`` MB."""
    if path.is_file() and path.stat().st_size >= megabytes * 1e6:
        return path
    rng = random.Random(seed)
    pool = paragraphs()
    target = megabytes * 1_000_000
    size = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        while size < target:
            order = list(range(len(pool)))
            rng.shuffle(order)
            document: list[str] = []
            length = 0
            for k in order:
                document.append(pool[k])
                length += len(pool[k])
                if length >= 2000:
                    line = json.dumps({"text": "\n".join(document)}, ensure_ascii=False) + "\n"
                    f.write(line)
                    size += len(line.encode())
                    document, length = [], 0
                    if size >= target:
                        break
    tmp.rename(path)
    return path


# ---------------------------------------------------------------- measuring


class TreeSampler(threading.Thread):
    """Peak over time of the summed RSS and PSS of a process and all its descendants."""

    def __init__(self, pid: int, interval: float = 0.25):
        super().__init__(daemon=True)
        import psutil

        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak_rss = self.peak_pss = 0
        self.peak_processes = 0
        self.stop = threading.Event()

    def run(self) -> None:
        import psutil

        while not self.stop.is_set():
            rss = pss = 0
            try:
                processes = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                break
            for process in processes:
                try:
                    info = process.memory_full_info()
                    rss += info.rss
                    pss += getattr(info, "pss", info.rss)
                except psutil.Error:
                    continue
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_pss = max(self.peak_pss, pss)
            self.peak_processes = max(self.peak_processes, len(processes))
            self.stop.wait(self.interval)


def run_measured(command: list[str], log: Path) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    env = {
        **os.environ,
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        sampler = TreeSampler(process.pid)
        sampler.start()
        code = process.wait()
        sampler.stop.set()
        sampler.join()
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if code != 0:
        raise SystemExit(f"{command[:4]} failed ({code}); see {log}")
    return {
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "peak_rss_mb": round(sampler.peak_rss / 1e6),
        "peak_pss_mb": round(sampler.peak_pss / 1e6),
        "processes": sampler.peak_processes,
    }


def run_system(system: str, corpus: Path, tokenizer: Path, work: Path) -> dict:
    out = work / f"{system}-{corpus.stem}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    if system == "hetlm":
        command = [
            sys.executable,
            "-m",
            "hetlm.cli",
            "prepare",
            str(corpus),
            "--tokenizer",
            str(tokenizer),
            "--output",
            str(out / "dataset"),
            "--seq-len",
            str(SEQ_LEN),
            "--workers",
            "2",
        ]
    else:
        command = [
            sys.executable,
            "-c",
            HF_RECIPE,
            str(corpus),
            str(tokenizer),
            str(out / "cache"),
            str(SEQ_LEN),
        ]
    result = run_measured(command, out / "log.txt")
    log = (out / "log.txt").read_text(errors="replace")
    if system == "hetlm":
        meta = json.loads((out / "dataset" / "hetlm_dataset.json").read_text("utf-8"))
        result["sequences"] = sum(meta["num_sequences"].values())
    else:
        result["sequences"] = int(log.split("SEQUENCES")[-1].split()[0])
    size = corpus.stat().st_size / 1e6
    result.update(
        system=system,
        corpus=corpus.name,
        corpus_mb=round(size, 1),
        mb_s_per_core_cpu=round(size / max(result["cpu_s"], 1e-9), 2),
        mb_s_per_core_wall=round(size / result["wall_s"] / 2, 2),
    )
    shutil.rmtree(out, ignore_errors=True)  # outputs are large; the numbers are what we keep
    return result


def markdown(results: list[dict], note: str) -> str:
    lines = [
        "# Preprocessing: `hetlm prepare` vs the HF run_mlm recipe",
        "",
        note,
        "How it is measured, and the results against the goals: docs/DATA.md.",
        "",
        "| system | corpus | MB | wall s | CPU s | MB/s per core (CPU) | MB/s per core "
        "(wall / 2) | peak RSS sum MB | peak PSS sum MB | processes | sequences |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['system']} | {r['corpus']} | {r['corpus_mb']:,.0f} | "
            f"{r['wall_s']:,.1f} | {r['cpu_s']:,.1f} | {r['mb_s_per_core_cpu']:.2f} | "
            f"{r['mb_s_per_core_wall']:.2f} | {r['peak_rss_mb']:,} | "
            f"{r['peak_pss_mb']:,} | {r['processes']} | {r['sequences']:,} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000", help="corpus sizes in MB")
    parser.add_argument("--systems", default="hetlm,hf")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "bench_preprocess")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument(
        "--update",
        action="store_true",
        help="keep the other rows of an existing preprocess.json (e.g. rerun "
        "only --sizes 100 when the machine is quieter)",
    )
    args = parser.parse_args()

    from hetlm.data.prepare.tokenizer_training import train_tokenizer

    args.work.mkdir(parents=True, exist_ok=True)
    tokenizer = args.work / "tokenizer"
    if not (tokenizer / "tokenizer.json").is_file():
        train_tokenizer([SOURCES[0][0]], tokenizer, vocab_size=8000)
    results: list[dict] = []
    previous = args.results / "preprocess.json"
    if args.update and previous.is_file():
        results = json.loads(previous.read_text("utf-8"))["results"]
    for size in (int(s) for s in args.sizes.split(",")):
        corpus = build_corpus(args.work / f"corpus-{size}mb.jsonl", size)
        for system in args.systems.split(","):
            print(f"{system} on {corpus.name} ...", flush=True)
            result = run_system(system, corpus, tokenizer, args.work)
            results = [
                r for r in results if (r["system"], r["corpus"]) != (system, corpus.name)
            ] + [result]
            results.sort(key=lambda r: (r["corpus_mb"], r["system"] != "hetlm"))
            print(json.dumps(result), flush=True)
            write(results, args.results)


def write(results: list[dict], folder: Path) -> None:
    load = os.getloadavg()
    note = (
        f"`python benchmarks/bench_preprocess.py` on {platform.machine()} with "
        f"{os.cpu_count()} cores, Python {platform.python_version()}; SentencePiece "
        f"unigram 8,000 tokenizer, {SEQ_LEN}-token sequences, 2 worker processes each. "
        f"Load average at the end: {load[0]:.1f} (other processes on the machine)."
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "preprocess.md").write_text(markdown(results, note), encoding="utf-8")
    (folder / "preprocess.json").write_text(
        json.dumps({"note": note, "results": results}, indent=2) + "\n", encoding="utf-8"
    )


if __name__ == "__main__":
    main()
