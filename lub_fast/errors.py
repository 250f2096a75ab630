"""The package's error contract: what a command reports as bad input and how it exits.

Every error class of lub_fast that means "the user's input, files or settings cannot work" derives
from ``UsageError``. Commands end such an error with one line ``lub_fast.<command>: error: ...`` on
stderr and exit code 2; any other exception is a bug and keeps its traceback (exit code 1).

Exit codes, the same in every command: 0 finished, 2 bad input, 143 stopped by SIGTERM after
saving (resumable with ``--resume``), 1 a bug. ``run_command`` is the one place that maps them:
every command's ``main`` runs its body through it.
"""

import os
import signal
import sys
import threading
from collections.abc import Callable

EXIT_OK = 0
EXIT_BUG = 1
EXIT_USAGE = 2
EXIT_PREEMPTED = 143  # 128 + SIGTERM, what a shell reports for a process killed by SIGTERM

EXIT_CODES_HELP = (
    "Exit status: 0 finished; 2 bad input (one line 'lub_fast.COMMAND: error: ...' naming the file or "
    "option); 143 stopped by SIGTERM after saving (run the same command again, with --resume where it "
    "has one, to continue); 1 a bug (with its traceback)."
)


class UsageError(Exception):
    """Bad input (a file, a layout, a value) the user can fix; the message names the file or field,
    the rule it broke, and what to do."""


class Preempted(BaseException):
    """Stopped by SIGTERM after saving what there was to save; the message says how to continue.

    A ``BaseException`` (like ``KeyboardInterrupt``) so that no ``except Exception`` on the way
    mistakes a stop for a failure."""


def run_command(command: str, body: Callable[[], object]) -> int:
    """Run a command's ``body`` and return its exit status: 0 when it returns, 2 with one line
    ``lub_fast.<command>: error: ...`` for a ``UsageError``, 143 for ``Preempted``. Any other
    exception propagates with its traceback (Python exits 1).

    While ``body`` runs, SIGTERM raises ``Preempted`` (where a loop installs its own handler, as
    the training loop does to save first, that one wins until the loop ends). Forked worker
    processes that inherit the handler die of the signal as they would by default."""
    owner = os.getpid()

    def on_sigterm(signum, frame):
        if os.getpid() != owner:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        raise Preempted("stopped by SIGTERM; run the same command again to continue")

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        body()
    except Preempted as stop:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"lub_fast.{command}: {stop}", file=sys.stderr)
        return EXIT_PREEMPTED
    except UsageError as error:
        print(f"lub_fast.{command}: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return EXIT_OK


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split("\n")).strip() or type(error).__name__
