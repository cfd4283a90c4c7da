"""One trainer per run directory: ``<run_dir>/run.lock`` names the process that trains there.

A run's process 0 takes the lock at start and empties the file at exit (the file itself stays, so that its
``flock`` keeps serialising the check-and-take of later runs). A second run finds the holder in it and is
refused with :class:`RunLockedError`, unless the holder is gone: a holder on this host whose process no
longer exists (a crash, ``kill -9``) is stale and its lock is taken over with a warning. A holder on another
host cannot be checked from here; the error says so and which file to delete once that run is gone.
The other processes of a multi-host run never touch the lock (see ``loop.run``).
"""

import dataclasses
import fcntl
import json
import logging
import os
import socket
import time
from typing import Callable, Optional

from ..tensorio import process_start

logger = logging.getLogger(__name__)
LOCK_FILE = "run.lock"


class RunLockedError(RuntimeError):
    """Another run holds the run directory; the message names it (pid, host, start time)."""

    exit_status = 4  # train.py's exit status (see nucleusx_jax.cli)


@dataclasses.dataclass(frozen=True)
class Holder:
    """The process holding a lock."""

    pid: int
    host: str
    started: str  # UTC, ISO 8601
    process_start: Optional[int]  # see :func:`process_start`

    @classmethod
    def me(cls) -> "Holder":
        return cls(os.getpid(), socket.gethostname(), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   process_start(os.getpid()))

    def alive(self) -> Optional[bool]:
        """Whether the holder still runs: None when it is on another host (cannot be checked from here)."""
        if self.host != socket.gethostname():
            return None
        now = process_start(self.pid)
        return now is not None and (self.process_start in (None, 0) or now in (0, self.process_start))

    def __str__(self) -> str:
        return f"pid {self.pid} on host {self.host}, started {self.started}"


class RunLock:
    """``<run_dir>/run.lock``: :meth:`acquire` takes it (or raises :class:`RunLockedError`), :meth:`release`
    frees it; a context manager doing both."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, LOCK_FILE)
        self.holder = Holder.me()

    def _locked(self, action: Callable[[int, Optional[Holder]], None]) -> None:
        """``action(fd, current holder or None)`` on the open lock file under an exclusive ``flock``."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # held only for the check-and-take, never while training
            raw = os.pread(fd, 1 << 16, 0).decode(errors="replace")
            try:
                current = Holder(**json.loads(raw)) if raw.strip() else None
            except (ValueError, TypeError):
                raise RunLockedError(f"{self.path} is not a lock file this trainer wrote ({raw[:80]!r}); delete "
                                     "it if no trainer runs in this directory") from None
            action(fd, current)
        finally:
            os.close(fd)  # also drops the flock

    def acquire(self) -> "RunLock":
        def take(fd: int, current: Optional[Holder]) -> None:
            if current is not None:
                alive = current.alive()
                if alive is None:
                    raise RunLockedError(f"{os.path.dirname(self.path)} is in use by another run ({current}); "
                                         f"this host cannot tell whether it still runs: if it does not, delete "
                                         f"{self.path}")
                if alive:
                    raise RunLockedError(f"{os.path.dirname(self.path)} is in use by another run ({current}); "
                                         "stop it or choose another train.run_dir")
                logger.warning("taking over the stale lock %s of a run that no longer exists (%s)", self.path,
                               current)
            data = json.dumps(dataclasses.asdict(self.holder)).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
            os.fsync(fd)

        self._locked(take)
        return self

    def release(self) -> None:
        """Empty the lock file if it still names this process."""
        def free(fd: int, current: Optional[Holder]) -> None:
            if current == self.holder:
                os.ftruncate(fd, 0)

        self._locked(free)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
