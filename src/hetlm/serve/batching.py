"""Serving several requests with one ``generate`` call: a queue, a batching worker, and the
per-row bookkeeping that lets rows of one batch differ.

Why batch: decoding one token costs nearly the same for 1 sequence as for 16 (the weights are
read once per step either way), so answering the requests that wait together multiplies the
tokens per second, where a lock that serves them one after another only makes them queue.

How: every request becomes a :class:`Generation` in the :class:`BatchScheduler`'s queue. One
worker thread takes the requests waiting at that moment (after at most ``batch_wait`` seconds
of collecting, up to ``max_batch``), left-pads their prompts into one batch and calls
``model.generate`` once. This is static batching: a request arriving while a batch runs waits
for the next one (no continuous batching; vLLM does that, see docs/SFT.md). Inside the batch,
rows keep their own settings:

- :class:`_RowStop`, a stopping criterion that sees each new token of every row, appends it to
  that row's reply, streams the new text, and ends the row at its own end-of-sequence token,
  ``max_new_tokens``, stop string, or cancellation, while the other rows go on;
- :class:`_RowSampling`, a logits processor with each row's temperature and top-p (a row with
  temperature 0 keeps only its argmax, which makes sampling pick it: greedy). When all rows
  share their settings, generate's own greedy search or warpers are used instead.

A request with a ``seed`` runs in a batch of its own, so its random stream (and its reply) is
the same as when it runs alone. More than ``max_queue`` waiting requests are refused with
:class:`QueueFull` (the API answers 503), rather than letting the latency grow without bound.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)

from hetlm.errors import HetlmError

if TYPE_CHECKING:
    from hetlm.serve.generation import ChatEngine, GenerationSettings

_END = object()


class QueueFull(HetlmError):
    """More requests wait than the scheduler's ``max_queue`` allows."""


class Generation:
    """One streamed reply. Iterate for text pieces; afterwards ``completion_tokens`` and
    ``finish_reason`` ("stop": an end-of-sequence token or stop string; "length": max new
    tokens reached; "cancelled") are set. ``cancel()`` stops it early (safe from any thread),
    also while it still waits in the queue."""

    def __init__(self, ids: list[int], settings: GenerationSettings):
        self.ids = ids
        self.settings = settings
        self.prompt_tokens = len(ids)
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.tokens: list[int] = []
        self._text = ""  # decoded so far (cut at a stop string once found)
        self._sent = 0  # characters of _text already handed out
        self._pieces: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._cancelled = threading.Event()
        self._done = threading.Event()

    # -- consumer side

    def __iter__(self) -> Iterator[str]:
        while True:
            piece = self._pieces.get()
            if piece is _END:
                break
            yield piece
        if self.error is not None:
            raise self.error

    def text(self) -> str:
        """Wait for the whole reply."""
        return "".join(self)

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def join(self, timeout: float | None = None) -> None:
        self._done.wait(timeout)

    # -- worker side

    def _add_token(self, token: int, tokenizer: Any, eos_ids: Sequence[int]) -> None:
        """Append a generated token, stream the text it completes, and finish the row when
        it ends (end of sequence, stop string, length)."""
        self.tokens.append(token)
        self.completion_tokens = len(self.tokens)
        stops = self.settings.stop
        text = tokenizer.decode(self.tokens, skip_special_tokens=True)
        if stops:
            start = max(0, self._sent - max(len(s) for s in stops))
            hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
            if hits:
                self._text = text[: min(hits)]
                self._finish("stop")
                return
        self._text = text
        if token in eos_ids:
            self._finish("stop")
        elif self.completion_tokens >= self.settings.max_new_tokens:
            self._finish("length")
        else:
            # Hold back an incomplete UTF-8 character, and what could be the start of a stop
            # string, until the next tokens settle them.
            safe = text.rstrip("\ufffd")
            if stops:
                safe = safe[: max(0, len(safe) - max(len(s) for s in stops) + 1)]
            self._send(len(safe))

    def _send(self, upto: int) -> None:
        if upto > self._sent:
            self._pieces.put(self._text[self._sent : upto])
            self._sent = upto

    def _finish(self, reason: str | None, error: BaseException | None = None) -> None:
        if self._done.is_set():
            return
        if error is not None:
            self.error = error
        else:
            self._send(len(self._text))
            self.finish_reason = (
                "cancelled" if self._cancelled.is_set() and reason != "stop" else reason
            )
        self._done.set()
        self._pieces.put(_END)


class _RowStop(StoppingCriteria):
    """Feeds each row's newest token to its :class:`Generation` and reports which rows are
    done, so that one row's end does not end the batch."""

    def __init__(self, rows: list[Generation], tokenizer: Any, eos_ids: Sequence[int]):
        self.rows = rows
        self.tokenizer = tokenizer
        self.eos_ids = list(eos_ids)

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        newest = input_ids[:, -1].tolist()
        for row, token in zip(self.rows, newest, strict=True):
            if row.done:
                continue
            if row.cancelled:
                row._finish("cancelled")
                continue
            row._add_token(token, self.tokenizer, self.eos_ids)
        return torch.tensor(
            [row.done for row in self.rows], dtype=torch.bool, device=input_ids.device
        )


class _RowSampling(LogitsProcessor):
    """Per-row temperature and top-p, in the order and with the rule of transformers'
    ``TemperatureLogitsWarper`` and ``TopPLogitsWarper``; temperature 0 rows keep only their
    argmax (greedy under sampling)."""

    def __init__(self, temperatures: list[float], top_ps: list[float], device: Any):
        self.temperature = torch.tensor(temperatures, dtype=torch.float32, device=device)
        self.top_p = torch.tensor(top_ps, dtype=torch.float32, device=device)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        greedy = self.temperature == 0
        best = scores.argmax(dim=-1, keepdim=True)
        scores = scores / torch.where(greedy, 1.0, self.temperature)[:, None]
        sorted_logits, sorted_index = torch.sort(scores, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1 - self.top_p)[:, None]
        remove_sorted[:, -1] = False  # always keep the most likely token
        remove = remove_sorted.scatter(1, sorted_index, remove_sorted)
        scores = scores.masked_fill(remove, -float("inf"))
        if bool(greedy.any()):
            only_best = torch.full_like(scores, -float("inf")).scatter(
                1, best, scores.gather(1, best)
            )
            scores = torch.where(greedy[:, None], only_best, scores)
        return scores


class BatchScheduler:
    """A queue of :class:`Generation` requests and the worker thread that answers them in
    batches of at most ``max_batch``; at most ``max_queue`` may wait (then :class:`QueueFull`).
    After taking the first waiting request the worker waits up to ``batch_wait`` seconds for
    more to arrive, so clients sending at nearly the same time share a batch."""

    def __init__(
        self,
        engine: ChatEngine,
        *,
        max_batch: int = 8,
        max_queue: int = 64,
        batch_wait: float = 0.01,
    ):
        if max_batch < 1:
            raise HetlmError(f"max batch must be at least 1, got {max_batch}")
        if max_queue < 0:
            raise HetlmError(f"max queue must be at least 0, got {max_queue}")
        if batch_wait < 0:
            raise HetlmError(f"batch wait must be at least 0, got {batch_wait}")
        self.engine = engine
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.batch_wait = batch_wait
        # Sizes of the last batches run, and totals (for /health, tests and benchmarks).
        self.batch_sizes: deque[int] = deque(maxlen=1024)
        self.batches_run = 0
        self.requests_run = 0
        self._waiting: deque[Generation] = deque()
        self._cond = threading.Condition()
        self._running = 0
        self._worker: threading.Thread | None = None
        self._closed = False

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return self._running

    def submit(self, generation: Generation) -> Generation:
        with self._cond:
            if len(self._waiting) >= self.max_queue + (0 if self._running else self.max_batch):
                raise QueueFull(
                    f"the server is busy: {self._running} requests running and "
                    f"{len(self._waiting)} waiting (limits: --max-batch {self.max_batch}, "
                    f"--max-queue {self.max_queue}); retry later"
                )
            self._waiting.append(generation)
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(
                    target=self._loop, daemon=True, name="hetlm-generate"
                )
                self._worker.start()
            self._cond.notify()
        return generation

    def close(self, timeout: float = 10.0) -> None:
        """Stop the worker once the batch it runs (if any) is done, and wait for it: a
        generation thread still alive at interpreter exit can abort the process (seen: "terminate
        called without an active exception" after ``hetlm chat --cli`` answered)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._worker is not None:
            self._worker.join(timeout)

    def _take(self) -> list[Generation]:
        """The next batch, in arrival order: a seeded request alone, else up to max_batch
        unseeded ones (stopping at the next seeded one). Called with the lock held."""
        batch: list[Generation] = []
        while self._waiting and len(batch) < self.max_batch:
            head = self._waiting[0]
            if head.cancelled:
                self._waiting.popleft()._finish("cancelled")
                continue
            if head.settings.seed is not None and batch:
                break
            batch.append(self._waiting.popleft())
            if head.settings.seed is not None:
                break
        return batch

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                first_seeded = self._waiting[0].settings.seed is not None
                deadline = time.monotonic() + self.batch_wait
                while (
                    not first_seeded
                    and len(self._waiting) < self.max_batch
                    and (left := deadline - time.monotonic()) > 0
                ):
                    self._cond.wait(left)
                batch = self._take()
                self._running = len(batch)
            if batch:
                try:
                    self.batch_sizes.append(len(batch))
                    self.batches_run += 1
                    self.requests_run += len(batch)
                    run_batch(self.engine, batch)
                finally:
                    with self._cond:
                        self._running = 0


def run_batch(engine: ChatEngine, rows: list[Generation]) -> None:
    """One left-padded ``generate`` call for ``rows``; every row ends finished (or failed)."""
    try:
        with torch.inference_mode():
            _generate(engine, rows)
        for row in rows:  # generate stopped at its max_new_tokens: rows still open hit theirs
            row._finish("length")
    except BaseException as exc:  # handed to every consumer, raised in its thread
        for row in rows:
            row._finish(None, exc)


def _generate(engine: ChatEngine, rows: list[Generation]) -> None:
    width = max(len(row.ids) for row in rows)
    pad = engine.pad_token_id
    input_ids = torch.tensor(
        [[pad] * (width - len(r.ids)) + r.ids for r in rows], dtype=torch.long, device=engine.device
    )
    attention_mask = torch.tensor(
        [[0] * (width - len(r.ids)) + [1] * len(r.ids) for r in rows],
        dtype=torch.long,
        device=engine.device,
    )
    settings = [row.settings for row in rows]
    kwargs: dict[str, Any] = {"max_new_tokens": max(s.max_new_tokens for s in settings)}
    if len({(s.temperature, s.top_p) for s in settings}) == 1:
        first = settings[0]
        kwargs.update({k: v for k, v in first.generate_kwargs().items() if k != "max_new_tokens"})
    else:  # mixed settings: sample through the per-row warper (greedy rows keep one token)
        kwargs.update(
            do_sample=True,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            logits_processor=LogitsProcessorList(
                [
                    _RowSampling(
                        [s.temperature for s in settings],
                        [s.top_p for s in settings],
                        engine.device,
                    )
                ]
            ),
        )
    if len(rows) == 1 and settings[0].seed is not None:
        torch.manual_seed(settings[0].seed)
    engine.model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        stopping_criteria=StoppingCriteriaList(
            [_RowStop(rows, engine.tokenizer, engine.eos_token_ids)]
        ),
        eos_token_id=engine.eos_token_ids,
        pad_token_id=pad,
        **kwargs,
    )
