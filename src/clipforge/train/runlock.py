"""One run per output directory: an advisory lock held for the run's life.

    with RunLock("runs/x"):        # a second run on runs/x is refused, naming the holder
        run(...)

The lock is `fcntl.flock` on `<dir>/run.lock`: the kernel drops it when the holder exits in any way
(kill -9 included), so a stale lock is simply taken over. The file also records the holder (pid, host,
start time) for the message another run prints. Under torchrun only rank 0 takes it.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

LOCK_FILE = "run.lock"


class RunLockedError(RuntimeError):
    """Another live process holds the run directory."""


class RunLock:
    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def holder(self) -> str:
        try:
            info = json.loads(self.path.read_text())
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
            return f"pid {info['pid']} on {info['host']} since {since}"
        except (OSError, ValueError, KeyError, TypeError):
            return "another process"

    def acquire(self) -> RunLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunLockedError(
                f"{self.path.parent} is in use by another clipforge run ({self.holder()}); wait for it to "
                "finish or set another run.output_dir"
            ) from None
        # ours now (a previous holder that died released it): record who holds it
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        import fcntl

        try:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
