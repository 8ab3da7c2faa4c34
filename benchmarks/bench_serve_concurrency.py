"""``hetlm serve`` under concurrent clients: batched generation against one request at a time.

A random LLaMA of hetlm's "small" decoder shape (hidden 256, 4 layers, built from config: no
download) with a hetlm SentencePiece tokenizer (8k, trained on the shipped dolly-ja sample) is
served by ``hetlm serve`` in a subprocess on 127.0.0.1, twice:

- ``one at a time``: ``--max-batch 1``, requests queue and are answered one after another
  (what ``hetlm serve`` did before batching);
- ``batched``: ``--max-batch 16``, the requests waiting together run as one ``generate`` call.

For 1, 4 and 16 concurrent clients (threads with the official ``openai`` client, each sending
its next request when the previous one is answered), the same set of chat requests (dolly-ja
instructions, greedy, ``max_tokens`` fixed) is sent and timed; requests/s and generated
tokens/s (the ``usage.completion_tokens`` of the replies) are over the whole set, latency is
per request. Both servers run at once (an idle one costs nothing) and the measurements
alternate between them, ``--repeats`` times, keeping each one's best: on a shared machine
other load only ever slows a run down. Every batched reply is checked against the
one-at-a-time reply to the same request (greedy: they must be equal). Loopback only; every
loop is bounded.

    python benchmarks/bench_serve_concurrency.py [--requests 32] [--max-tokens 32] [--repeats 3]

Writes benchmarks/results/serve_concurrency.{md,json}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOLLY = ROOT / "data" / "instruct_dolly_ja" / "databricks-dolly-15k-ja_v0_every3rd.jsonl"
RESULTS = ROOT / "benchmarks" / "results"
CLIENTS = (1, 4, 16)
SERVERS = {"one_at_a_time": 1, "batched": 16}


def prepare(cache: Path, vocab_size: int = 8000) -> Path:
    """A hetlm tokenizer and a random "small" LLaMA saved as one model folder (built once)."""
    model_dir = cache / f"small-llama-v{vocab_size}"
    if (model_dir / "config.json").is_file():
        return model_dir
    import torch

    from hetlm.data.prepare.tokenizer_training import train_tokenizer
    from hetlm.data.tokenizer import save_tokenizer
    from hetlm.sft.config import SFTModelSection
    from hetlm.sft.train import build_base_model, load_sft_tokenizer

    cache.mkdir(parents=True, exist_ok=True)
    texts = cache / "dolly-texts.jsonl"
    with DOLLY.open(encoding="utf-8") as f, texts.open("w", encoding="utf-8") as out:
        for line in f:
            row = json.loads(line)
            text = "\n".join(str(row.get(k) or "") for k in ("instruction", "input", "output"))
            out.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    tokenizer_dir = train_tokenizer(
        [texts], cache / f"tokenizer-v{vocab_size}", vocab_size=vocab_size
    )
    tokenizer = load_sft_tokenizer(tokenizer_dir)
    model = build_base_model(
        SFTModelSection(preset="small", tokenizer=str(tokenizer_dir)),
        tokenizer,
        max_length=512,
        seed=0,
        device=torch.device("cpu"),
    )
    model.save_pretrained(model_dir)
    save_tokenizer(tokenizer, model_dir)
    return model_dir


def questions(count: int) -> list[str]:
    with DOLLY.open(encoding="utf-8") as f:
        rows = [json.loads(line) for _, line in zip(range(count), f, strict=False)]
    return [row["instruction"][:200] for row in rows]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``hetlm serve`` in a subprocess on 127.0.0.1 (stopped on exit)."""

    def __init__(self, model_dir: Path, max_batch: int, device: str, threads: int):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": str(threads),
            "PYTHONPATH": str(ROOT / "src"),
        }
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "hetlm.cli",
                "serve",
                "--model",
                str(model_dir),
                "--port",
                str(self.port),
                "--model-name",
                "bench",
                "--temperature",
                "0",
                "--device",
                device,
                "--max-batch",
                str(max_batch),
                "--max-queue",
                "64",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )

    def __enter__(self) -> Server:
        import httpx

        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"hetlm serve exited: {self.proc.stdout.read()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.2)
        raise RuntimeError("hetlm serve did not answer /health within 180 s")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(20)


def run_clients(url: str, prompts: list[str], clients: int, max_tokens: int) -> dict:
    """Send ``prompts`` from ``clients`` threads (closed loop); time the whole set."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=600, max_retries=0)

    def ask(prompt: str) -> tuple[str, int, float]:
        start = time.perf_counter()
        reply = client.chat.completions.create(
            model="bench",
            messages=[{"role": "user", "content": prompt}],
            temperature=0,
            max_tokens=max_tokens,
        )
        return (
            reply.choices[0].message.content,
            reply.usage.completion_tokens,
            time.perf_counter() - start,
        )

    import httpx

    for prompt in prompts[:2]:  # warm-up (first-call allocations), not timed
        ask(prompt)
    before = httpx.get(f"{url}/health", timeout=30).json()
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        answers = list(pool.map(ask, prompts))
    elapsed = time.perf_counter() - start
    after = httpx.get(f"{url}/health", timeout=30).json()
    batches = after["batches"] - before["batches"]
    tokens = sum(a[1] for a in answers)
    latencies = sorted(a[2] for a in answers)
    return {
        "clients": clients,
        "requests": len(prompts),
        "seconds": round(elapsed, 3),
        "requests_per_s": round(len(prompts) / elapsed, 3),
        "tokens_per_s": round(tokens / elapsed, 1),
        "completion_tokens": tokens,
        "latency_p50_s": round(statistics.median(latencies), 3),
        "latency_max_s": round(latencies[-1], 3),
        "mean_batch": round((after["requests"] - before["requests"]) / max(batches, 1), 2),
        "texts": [a[0] for a in answers],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32, help="requests per measurement")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs; best kept")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each server")
    parser.add_argument("--cache", default="/tmp/hetlm-bench-serve")
    parser.add_argument("--out", default=str(RESULTS / "serve_concurrency"))
    args = parser.parse_args()

    model_dir = prepare(Path(args.cache))
    prompts = questions(args.requests)
    runs: dict[str, list[dict]] = {name: [] for name in SERVERS}
    with contextlib.ExitStack() as stack:
        servers = {
            name: stack.enter_context(Server(model_dir, max_batch, args.device, args.threads))
            for name, max_batch in SERVERS.items()
        }
        for clients in CLIENTS:
            best: dict[str, dict] = {}
            for _ in range(args.repeats):
                for name, server in servers.items():
                    result = run_clients(server.url, prompts, clients, args.max_tokens)
                    print(
                        f"{name:14s} clients {clients:2d}: {result['requests_per_s']:7.2f} "
                        f"req/s {result['tokens_per_s']:8.1f} tok/s p50 "
                        f"{result['latency_p50_s']:.2f} s, mean batch {result['mean_batch']}",
                        flush=True,
                    )
                    if name not in best or result["seconds"] < best[name]["seconds"]:
                        best[name] = result
            for name in SERVERS:
                runs[name].append(best[name])
    reference = runs["one_at_a_time"][0]["texts"]
    same = all(r["texts"] == reference for rs in runs.values() for r in rs)
    for rs in runs.values():
        for r in rs:
            r.pop("texts")
    write(args, model_dir, runs, same)


def write(
    args: argparse.Namespace, model_dir: Path, runs: dict[str, list[dict]], same: bool
) -> None:
    import torch

    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, device {args.device}, server torch threads "
        f"{args.threads}"
    )
    load = os.getloadavg()[1]
    record = {
        "machine": machine,
        "load_average_5min": round(load, 1),
        "model": "random LLaMA 'small' (hidden 256, 4 layers), 8k SentencePiece vocabulary",
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "repeats": args.repeats,
        "greedy_replies_identical": same,
        "runs": runs,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    seq = {r["clients"]: r for r in runs["one_at_a_time"]}
    bat = {r["clients"]: r for r in runs["batched"]}
    lines = [
        "# hetlm serve: concurrent clients, batched vs one at a time",
        "",
        f"`python benchmarks/bench_serve_concurrency.py` ({machine}). {record['model']}, "
        f"{args.requests} chat requests (dolly-ja instructions) per row, greedy, max_tokens "
        f"{args.max_tokens}, official `openai` client threads in a closed loop on 127.0.0.1. "
        "One at a time: `hetlm serve --max-batch 1`; batched: `--max-batch 16`. Best of "
        f"{args.repeats} alternating runs each.",
        "",
        "| clients | one at a time req/s | tok/s | p50 latency s | batched req/s | tok/s | "
        "p50 latency s | mean batch | speed-up (tok/s) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for clients in CLIENTS:
        s, b = seq[clients], bat[clients]
        lines.append(
            f"| {clients} | {s['requests_per_s']:.2f} | {s['tokens_per_s']:.0f} | "
            f"{s['latency_p50_s']:.2f} | {b['requests_per_s']:.2f} | "
            f"{b['tokens_per_s']:.0f} | {b['latency_p50_s']:.2f} | "
            f"{b['mean_batch']:.1f} | {b['tokens_per_s'] / s['tokens_per_s']:.2f}x |"
        )
    lines += [
        "",
        f"Batched greedy replies identical to one-at-a-time replies: "
        f"{'yes' if same else 'NO'}. Mean batch: requests per `generate` call of the "
        f"batched server. Load average (5 min) at the end: {load:.1f} on "
        f"{os.cpu_count()} CPUs (a shared machine: absolute numbers are noisy, hence "
        "best-of runs; the ratio is the point).",
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
