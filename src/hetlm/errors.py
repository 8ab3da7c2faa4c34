"""The one exception type for user mistakes.

A ``HetlmError`` is printed by the CLI as a single line (``hetlm: error: ...``) with a non-zero
exit and no traceback, so its message must say what is wrong *and* how to fix it. Bugs in hetlm
itself stay ordinary exceptions and keep their tracebacks.
"""


class HetlmError(Exception):
    """A problem the user can fix: bad config, bad input file, mismatched topology, ..."""

    exit_code = 2


class HetlmWarning(UserWarning):
    """Something the user should know that does not stop the run (a broken checkpoint skipped
    in favour of an older one); the CLI prints it as ``hetlm: warning: ...``."""
