"""The package's error contract: what a command reports as bad input and how it exits.

Every error class of lub_fast that means "the user's input, files or settings cannot work" derives
from ``UsageError``. Commands end such an error with one line ``lub_fast.<command>: error: ...`` on
stderr and exit code 2; any other exception is a bug and keeps its traceback (exit code 1).

Exit codes, the same in every command: 0 finished, 2 bad input, 143 stopped by SIGTERM after
saving (resumable with ``--resume``), 1 a bug.
"""

EXIT_OK = 0
EXIT_BUG = 1
EXIT_USAGE = 2
EXIT_PREEMPTED = 143  # 128 + SIGTERM, what a shell reports for a process killed by SIGTERM


class UsageError(Exception):
    """Bad input (a file, a layout, a value) the user can fix; the message names the file or field,
    the rule it broke, and what to do."""
