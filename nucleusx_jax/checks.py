"""The validations that recur across the package, each with one wording: ``name=value is invalid: must be ...``.

They run on the host (outside jit) and raise ``ValueError``, which every CLI turns into one ``error:`` line.
"""

from __future__ import annotations

from typing import Any, Collection, Tuple

import numpy as np


def shape_of(x: Any) -> Tuple[int, ...]:
    """The shape of an array-like (an array, nested lists, a scalar), as a tuple, for messages and checks."""
    return tuple(np.shape(x))


def integer(name: str, value: Any, *, minimum: int = 1, maximum: int | None = None, hint: str = "") -> int:
    """``value`` as an ``int`` when it is an integer (not a bool) in ``[minimum, maximum]``; else ValueError
    naming ``name``, the value and what is allowed (``hint`` is appended, e.g. ``" (seconds)"``)."""
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    if ok and value >= minimum and (maximum is None or value <= maximum):
        return int(value)
    allowed = f"an integer >= {minimum}" if maximum is None else f"an integer in [{minimum}, {maximum}]"
    raise ValueError(f"{name}={value!r} is invalid: must be {allowed}{hint}")


def flag(name: str, value: Any) -> bool:
    """``value`` as a ``bool`` when it is one; else ValueError."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise ValueError(f"{name}={value!r} is invalid: must be true or false")


def choice(name: str, value: Any, allowed: Collection[str]) -> str:
    """``value`` when it is one of ``allowed``; else ValueError listing them."""
    if isinstance(value, str) and value in allowed:
        return value
    raise ValueError(f"{name}={value!r} is invalid: must be one of {', '.join(allowed)}")
