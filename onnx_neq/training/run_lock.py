"""An OS file lock on a run directory (train) or a compare --out (compare): one writer at a time,
released on any exit (even SIGKILL).

DIR/.lock holds the pid of the holder (informational; the kernel lock is what counts).
"""

from __future__ import annotations

import os
from pathlib import Path

from onnx_neq.errors import NeqError

LOCK_NAME = ".lock"


class RunLock:
    """`with RunLock(directory):` holds an exclusive, non-blocking lock on DIR/.lock."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if not _try_lock(fd):
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise NeqError(
                f"{self.path.parent} is in use by another onnx-neq process (pid {holder}); wait for it to finish, or choose another --out"
            )
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _try_lock(fd: int) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
