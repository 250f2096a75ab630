"""One owner per output directory: the exclusive lock every writing command holds for its lifetime.

``prepare``, ``pretrain``, ``distill``, ``finetune`` and ``convert`` run their whole body inside
``output_lock(DIR, command)``. The lock is ``DIR/.lub_fast.lock``, held with ``fcntl.flock``
(``LOCK_EX | LOCK_NB``) on an open descriptor, and holds one JSON line naming the holder: host,
PID, command and start time. A second writer does not wait: it stops at once with a ``LockedError``
(exit code 2) that names the holder. The kernel drops a flock when its process dies, by SIGKILL
too, so a crashed writer never blocks the next one; the file it leaves behind (with its PID) is
taken over with a note on stderr. A clean exit removes the file (while still holding the lock;
an acquirer re-checks after locking that the file it locked is still the one at the path, so
removing it is safe, see flock(2) and the "lock file" pattern of e.g. ``filelock``).

Reentrant within one process: a command that locks ``RUN`` and then calls code that locks ``RUN``
again just nests. Directories are locked each for themselves: ``pretrain`` with raw text holds
``RUN`` and, while it prepares, also ``RUN/data/train`` and ``RUN/data/heldout`` (separate files,
so no deadlock), which keeps a stray ``prepare --output RUN/data/train`` out too.

Under ``torchrun`` the run belongs to rank 0 (``RANK`` 0, of every node): only it takes the lock;
the other ranks write nothing but what rank 0 coordinates, and never wait on the lock.

Owners and readers: only the holder renames or deletes inside a run (pruning old checkpoints,
setting invalid ones aside); readers (``convert RUN``, ``--init-from RUN``, ``--resume`` before it
owns the run) leave what they read in place (``holds`` tells ``lub_fast.checkpoint`` which it is).

Network filesystems: flock on NFS v4 is forwarded to the server (Linux >= 2.6.12 emulates it with
POSIX byte-range locks, through lockd on NFS v3), so two hosts exclude each other there. On
filesystems that keep flock local to one host (NFS mounted with ``nolock`` or ``local_lock=flock``,
some FUSE and cluster filesystems) two writers on *different* hosts are NOT excluded: each sees
only its own host's locks. A lock file naming another host is reported when it is taken over, but
on such filesystems give every run its own output directory.
"""

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from lub_fast.errors import UsageError

LOCK_FILE = ".lub_fast.lock"

_held: dict[str, list] = {}  # realpath of a locked directory -> [descriptor, nesting depth]


class LockedError(UsageError):
    """The output directory belongs to another running writer (or cannot be locked)."""


def holds(directory: str | os.PathLike) -> bool:
    """Whether this process holds the lock of ``directory`` (it owns the run)."""
    return os.path.realpath(directory) in _held


@contextlib.contextmanager
def output_lock(directory: str | os.PathLike, command: str) -> Iterator[None]:
    """Hold the exclusive lock of ``directory`` (created if missing) for the ``with`` block.

    ``command`` (e.g. ``"pretrain"``) is written into the lock file for whoever is refused.
    Raises ``LockedError`` at once when another process holds it. Not rank 0 under torchrun: a
    no-op. A directory this call created and that is empty at the end is removed again.
    """
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    directory = Path(directory)
    created = not directory.exists()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a file of that name, a read-only parent, ...
        raise LockedError(f"{directory}: cannot create the output directory ({error.strerror})") from None
    key = os.path.realpath(directory)
    if key in _held:
        _held[key][1] += 1
        try:
            yield
        finally:
            _held[key][1] -= 1
        return
    path = directory / LOCK_FILE
    fd = _acquire(path, command)
    _held[key] = [fd, 1]
    try:
        yield
    finally:
        del _held[key]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                directory.rmdir()  # only when empty: a run that stopped before writing anything


def _acquire(path: Path, command: str) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(_read(fd))
            os.close(fd)
            raise LockedError(
                f"{path.parent} is in use by {holder} (lock file {path}): wait for it to finish, stop it, "
                "or choose another output directory"
            ) from None
        except OSError as error:
            os.close(fd)
            raise LockedError(
                f"cannot lock {path} ({error.strerror}): the filesystem does not support flock; "
                "use an output directory on a local or NFS v4 filesystem"
            ) from None
        try:
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)  # the previous holder removed the file between our open and our lock
    previous = _read(fd)
    if previous:
        print(f"lub_fast.{command}: note: {_stale_note(previous, path)}", file=sys.stderr)
    record = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "command": f"lub_fast.{command}",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    os.fsync(fd)
    return fd


def _read(fd: int) -> dict | None:
    """The holder record in the lock file, ``None`` when empty; ``{}`` when unreadable."""
    raw = os.pread(fd, 4096, 0)
    if not raw.strip():
        return None
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return record if isinstance(record, dict) else {}


def _describe(record: dict | None) -> str:
    if not record:
        return "another process (it is just starting: the lock file names no holder yet)"
    return (
        f"{record.get('command', 'an unknown command')}, PID {record.get('pid', '?')} on host "
        f"{record.get('host', '?')}, started {record.get('started', '?')}"
    )


def _stale_note(record: dict, path: Path) -> str:
    holder = _describe(record)
    if record.get("host") == socket.gethostname():
        return f"took over {path} from {holder}, which no longer runs (it was killed or crashed)"
    return (
        f"took over {path} from {holder}: no process holds its lock as this host sees it; if that host "
        "still writes here, this filesystem keeps flock local to each host and does not exclude it"
    )
