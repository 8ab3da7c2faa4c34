"""Filter torchrun's own failure report out of an agent's stderr.

When a rank exits non-zero, the torchrun agent prints a Python traceback of *itself*
(``ChildFailedError``) and a boxed failure summary. For a user mistake the rank has already
printed the one line that matters (``hetlm: error (rank 0): ...``), so under
``--local-nodes`` hetlm drops the agent's report and keeps everything else: the ranks' output,
progress bars (``\\r`` updates pass through as they come) and the tracebacks of real bugs.
"""

from __future__ import annotations

import os
import re
import threading
from typing import BinaryIO

_AGENT_LOG = re.compile(rb"^[EWI]\d{4} [\d:.]+ \d+ .*torch/distributed/elastic/")
_SEGMENT = re.compile(rb"[^\r\n]*(?:\r\n|\r|\n)")


class AgentReportFilter:
    """A line-wise state machine; ``feed`` returns what to pass on."""

    def __init__(self) -> None:
        self._pending = b""
        self._traceback: list[bytes] | None = None
        self._in_report = False
        self._rules_seen = 0

    def feed(self, data: bytes) -> bytes:
        self._pending += data
        out = []
        consumed = 0
        for match in _SEGMENT.finditer(self._pending):
            consumed = match.end()
            out.append(self._line(match.group(0)))
        self._pending = self._pending[consumed:]
        return b"".join(out)

    def flush(self) -> bytes:
        rest, self._pending = self._pending, b""
        held = b"".join(self._traceback or [])
        self._traceback = None
        return held + rest

    def _line(self, line: bytes) -> bytes:
        text = line.rstrip(b"\r\n")
        if self._in_report:
            if text and set(text) == {ord("=")}:
                self._rules_seen += 1
                if self._rules_seen >= 2:  # the box's top and closing rules
                    self._in_report = False
            return b""
        if self._traceback is not None:
            self._traceback.append(line)
            if text and not text[:1].isspace() and not text.startswith(b"Traceback"):
                block, self._traceback = b"".join(self._traceback), None
                if b"ChildFailedError" in text or b"torch/distributed/run.py" in block:
                    self._in_report, self._rules_seen = True, 0
                    return b""
                return block
            return b""
        if text.startswith(b"Traceback (most recent call last):"):
            self._traceback = [line]
            return b""
        if _AGENT_LOG.match(text):
            return b""
        return line


def pump_filtered(source: BinaryIO, sink_fd: int) -> threading.Thread:
    """Copy ``source`` to ``sink_fd`` through an ``AgentReportFilter``, in a daemon thread."""

    def run() -> None:
        report_filter = AgentReportFilter()
        fd = source.fileno()
        while chunk := os.read(fd, 65536):
            os.write(sink_fd, report_filter.feed(chunk))
        os.write(sink_fd, report_filter.flush())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread
