"""One trainer per run directory: ``<run_dir>/run.lock`` names the process that trains there.

A run's process 0 takes the lock at start and empties the file at exit (the file itself stays, so that its
``flock`` keeps serialising the check-and-take of later runs). A second run finds the holder in it and is
refused with :class:`RunLockedError`, unless the holder is gone: a holder on this host whose process no
longer exists (a crash, ``kill -9``) is stale and its lock is taken over with a warning. A holder on another
host cannot be checked from here; the error says so and which file to delete once that run is gone.
The other processes of a multi-host run never touch the lock (see ``loop.run``). ``prepare`` locks a token
store's directory the same way (``prepare.lock``, :class:`~nucleusx_jax.data.prepare.PrepareLock`).

On object storage (a ``gs://`` run directory) there is no ``flock``: the lock is the object ``run.lock`` itself.
Taking it creates the object only if none exists (GCS's ``ifGenerationMatch=0`` precondition, through
:func:`~nucleusx_jax.storage.create_new`), so of two runs racing for it one wins and the other is refused;
releasing it deletes the object, and a stale holder's object is deleted before the create. The same holder
checks apply (a holder on another host is never taken over).
"""

import dataclasses
import fcntl
import json
import logging
import os
import socket
import time
from typing import Callable, Optional

from . import storage
from .runs import RUN_FILES
from .tensorio import process_start

logger = logging.getLogger(__name__)


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
    frees it; a context manager doing both. A subclass changes ``FILE`` (the lock's name in the directory),
    ``WHAT`` (who holds it, for messages) and ``ADVICE`` (what a refused process should do)."""

    FILE, WHAT, ADVICE = RUN_FILES.lock, "run", "stop it or choose another train.run_dir"

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, self.FILE)
        self.holder = Holder.me()
        self.remote = storage.is_url(run_dir)

    def _parse(self, raw: str) -> Optional[Holder]:
        try:
            return Holder(**json.loads(raw)) if raw.strip() else None
        except (ValueError, TypeError):
            raise RunLockedError(f"{self.path} is not a lock file this {self.WHAT} wrote ({raw[:80]!r}); delete "
                                 f"it if no {self.WHAT} runs in this directory") from None

    def _check(self, current: Optional[Holder]) -> None:
        """Raise :class:`RunLockedError` unless ``current`` is None or a dead process on this host."""
        if current is None:
            return
        alive = current.alive()
        if alive is None:
            raise RunLockedError(f"{os.path.dirname(self.path)} is in use by another {self.WHAT} ({current}); "
                                 f"this host cannot tell whether it still runs: if it does not, delete "
                                 f"{self.path}")
        if alive:
            raise RunLockedError(f"{os.path.dirname(self.path)} is in use by another {self.WHAT} ({current}); "
                                 f"{self.ADVICE}")
        logger.warning("taking over the stale lock %s of a %s that no longer exists (%s)", self.path, self.WHAT,
                       current)

    def _current_object(self) -> Optional[Holder]:
        try:
            return self._parse(storage.read_bytes(self.path).decode(errors="replace"))
        except FileNotFoundError:
            return None

    def _locked(self, action: Callable[[int, Optional[Holder]], None]) -> None:
        """``action(fd, current holder or None)`` on the open lock file under an exclusive ``flock``."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # held only for the check-and-take, never while training
            action(fd, self._parse(os.pread(fd, 1 << 16, 0).decode(errors="replace")))
        finally:
            os.close(fd)  # also drops the flock

    def acquire(self) -> "RunLock":
        data = json.dumps(dataclasses.asdict(self.holder)).encode()
        if self.remote:
            current = self._current_object()
            self._check(current)
            if current is not None:
                storage.remove_tree(self.path)
            try:
                storage.create_new(self.path, data)
            except FileExistsError:
                raise RunLockedError(f"{os.path.dirname(self.path)}: another {self.WHAT} created {self.path} at the "
                                     f"same time; {self.ADVICE}") from None
            return self

        def take(fd: int, current: Optional[Holder]) -> None:
            self._check(current)
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
            os.fsync(fd)

        self._locked(take)
        return self

    def release(self) -> None:
        """Empty the lock file (on object storage: delete the lock object) if it still names this process."""
        if self.remote:
            if self._current_object() == self.holder:
                storage.remove_tree(self.path)
            return

        def free(fd: int, current: Optional[Holder]) -> None:
            if current == self.holder:
                os.ftruncate(fd, 0)

        self._locked(free)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
