"""Command-line entry points report a user's mistake as one line, tracebacks are for bugs.

:func:`reports_user_errors` wraps a CLI's ``main``: a ``ValueError`` (bad config, bad option value, bad
checkpoint: :class:`~nucleusx_jax.tensorio.CheckpointError` and the training ``ConfigError`` are ValueErrors),
an ``OSError`` (missing file, no permission, disk full) or any exception carrying an ``exit_status`` is printed
as ``error: <message>`` on stderr and ends the program with that status, as ``argparse`` does for bad
options. Anything else is a bug and keeps its traceback.

A ``TypeError`` is one of those bugs: a user's value of the wrong type is refused where it enters, with a
``ValueError`` naming it (the training config's schema raises ``ConfigError``, a ``ValueError`` and a
``TypeError`` at once; the CLIs' options go through argparse types and :mod:`nucleusx_jax.checks`). So
``--set train.steps=[1]`` is one ``error:`` line, while a ``TypeError`` raised by our own code is not hidden.
"""

import functools
import sys
from typing import Callable, TypeVar

USER_ERRORS = (ValueError, OSError)
USER_ERROR_STATUS = 2  # argparse's status for a bad command line
INTERRUPTED_STATUS = 130  # 128 + SIGINT, as shells report Ctrl-C

Main = TypeVar("Main", bound=Callable[..., object])


def reports_user_errors(main: Main) -> Main:
    """``main`` with user errors turned into one line on stderr and ``SystemExit`` (see the module docstring)."""

    @functools.wraps(main)
    def wrapper(*args: object, **kwargs: object) -> object:
        try:
            return main(*args, **kwargs)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(INTERRUPTED_STATUS) from None
        except Exception as err:  # noqa: BLE001 - re-raised unless it is a user error
            status = getattr(err, "exit_status", USER_ERROR_STATUS if isinstance(err, USER_ERRORS) else None)
            if status is None:
                raise
            message = " ".join(str(err).split("\n")) or type(err).__name__
            print(f"error: {message}", file=sys.stderr)
            raise SystemExit(status) from None

    return wrapper  # type: ignore[return-value]
