"""The shared validations: what they accept, and the one wording of what they refuse."""

import numpy as np
import pytest

from nucleusx_jax import checks


def test_integer_accepts_integers_in_range():
    assert checks.integer("n", 1) == 1
    assert checks.integer("n", np.int64(7), maximum=7) == 7
    assert type(checks.integer("n", np.int32(3))) is int


@pytest.mark.parametrize("value", [0, -1, True, 1.0, "2", None, 9])
def test_integer_refuses_with_name_value_and_range(value):
    with pytest.raises(ValueError) as err:
        checks.integer("max_batch", value, maximum=8)
    assert str(err.value) == f"max_batch={value!r} is invalid: must be an integer in [1, 8]"


def test_integer_hint_and_open_range():
    with pytest.raises(ValueError, match=r"^keep_alive=0 is invalid: must be an integer >= 1 \(seconds\)$"):
        checks.integer("keep_alive", 0, hint=" (seconds)")


def test_flag_and_choice():
    assert checks.flag("x", np.bool_(True)) is True
    with pytest.raises(ValueError, match="^x=1 is invalid: must be true or false$"):
        checks.flag("x", 1)
    assert checks.choice("mode", "b", ("a", "b")) == "b"
    with pytest.raises(ValueError, match="^mode='c' is invalid: must be one of a, b$"):
        checks.choice("mode", "c", ("a", "b"))
