"""torchrun's own failure report is dropped under --local-nodes; everything else passes."""

from hetlm.launch.output import AgentReportFilter

AGENT_FAILURE = b"""hetlm: error (rank 0): the plan is for 2 ranks
E1129 09:08:53.905000 8707 .venv/lib/python3.11/site-packages/torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: 2) local_rank: 0 (pid: 8715) of binary: python
Traceback (most recent call last):
  File "<frozen runpy>", line 198, in _run_module_as_main
  File "/x/site-packages/torch/distributed/run.py", line 1032, in <module>
    main()
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
hetlm.cli FAILED
------------------------------------------------------------
Failures:
  <NO_OTHER_FAILURES>
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  exitcode  : 2 (pid: 8715)
============================================================
after
"""

BUG = b"""Traceback (most recent call last):
  File "/x/src/hetlm/train/pretrain.py", line 10, in run
    1 / 0
ZeroDivisionError: division by zero
"""


def _run(data: bytes, chunk: int) -> bytes:
    f = AgentReportFilter()
    out = b"".join(f.feed(data[i : i + chunk]) for i in range(0, len(data), chunk))
    return out + f.flush()


def test_agent_report_is_dropped_and_the_rank_message_kept():
    for chunk in (1, 7, 4096):
        out = _run(AGENT_FAILURE, chunk)
        assert out == b"hetlm: error (rank 0): the plan is for 2 ranks\nafter\n"


def test_real_tracebacks_and_progress_bars_pass_through():
    assert _run(BUG, 5) == BUG
    bar = b"\rpretrain:  10%|#  | 1/10\rpretrain:  20%|## | 2/10"
    f = AgentReportFilter()
    out = f.feed(bar)
    assert out == b"\rpretrain:  10%|#  | 1/10\r"  # each update passes as the next one starts
    assert f.flush() == b"pretrain:  20%|## | 2/10"
