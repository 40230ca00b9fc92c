"""One writer per output: a lock file beside it, ``{output}.lock``, held while a run writes the output.

A second run on the same output is refused in one line naming the holder (its process id, host, start
time and command, which the holder writes into the lock file). The lock is an operating-system lock
(``filelock``: ``flock`` on Unix, ``msvcrt`` on Windows), so it is released when its process ends in
any way: the lock of a process that died is simply taken by the next run.

The lock file is removed on release, while still held, and so are the folders made for it that
stayed empty (a run refused after it took the lock leaves nothing behind). A run that opened the file just before that
and locks it just after holds a lock on a file no longer at that path; it sees so (the path no longer
names the file it locked) and tries again, so two runs never both hold an output.
"""
import datetime
import os
import shlex
import socket
import sys
from typing import List, Optional, Sequence

import filelock

from common import UserError

LOCK_SUFFIX = ".lock"
_ATTEMPTS = 10


class OutputBusy(UserError):
    """Another run holds the lock of an output; the message names it."""


class _Moved(Exception):
    """The file locked is no longer the one at the lock's path (removed by its last holder): try again."""


def lock_path(output: str) -> str:
    return str(output) + LOCK_SUFFIX


def _holder_text() -> str:
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    command = shlex.join([os.path.basename(sys.argv[0])] + sys.argv[1:])
    return f"pid {os.getpid()} on {socket.gethostname()} since {started}: {command}"


def _holder(path: str) -> str:
    try:
        with open(path) as handle:
            text = handle.read().strip()
    except OSError:
        text = ""
    return text or "holder not known yet"


class OutputLock:
    """The lock of one output; ``acquire`` raises ``OutputBusy`` when another run holds it."""

    def __init__(self, output: str):
        self.output = str(output)
        self.path = lock_path(output)
        self._lock: Optional[filelock.BaseFileLock] = None
        self._created: List[str] = []   # the folders made for the lock, deepest first

    def _on_acquired(self, fd: int):
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(self.path))
        except FileNotFoundError:
            same = False
        if not same:
            raise _Moved()
        text = (_holder_text() + "\n").encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, text, 0)

    def acquire(self):
        folder = os.path.dirname(os.path.abspath(self.path))
        while not os.path.exists(folder):
            self._created.append(folder)
            folder = os.path.dirname(folder)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        for _ in range(_ATTEMPTS):
            lock = filelock.FileLock(self.path, on_acquired=self._on_acquired)
            try:
                lock.acquire(timeout=0)
            except _Moved:
                continue
            except filelock.Timeout:
                self._remove_created_folders()
                raise OutputBusy(f"'{self.output}' is being written by another run ({_holder(self.path)}); wait for "
                                 f"it to finish or stop it (the lock '{self.path}' of a run that has ended is taken "
                                 "over), or choose another output") from None
            self._lock = lock
            return self
        raise OutputBusy(f"could not lock '{self.path}': it was replaced {_ATTEMPTS} times while being locked")

    def release(self):
        if self._lock is None:
            return
        try:
            os.remove(self.path)   # while still held: see the module's docstring
        except FileNotFoundError:
            pass
        finally:
            self._lock.release()
            self._lock = None
            self._remove_created_folders()

    def _remove_created_folders(self):
        """Remove the folders made for the lock that nothing else was written into (a run refused later)."""
        for folder in self._created:
            try:
                os.rmdir(folder)
            except OSError:   # not empty: the run wrote its output there
                break
        self._created = []


class OutputLocks:
    """The locks of several outputs, taken in order and all released together (also when one is busy)."""

    def __init__(self, outputs: Sequence[str]):
        self.locks: List[OutputLock] = [OutputLock(o) for o in sorted(set(map(str, outputs)))]

    def acquire(self):
        try:
            for lock in self.locks:
                lock.acquire()
        except BaseException:
            self.release()
            raise
        return self

    def release(self):
        for lock in reversed(self.locks):
            lock.release()

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
