"""RunOptions: one typed, hashable object per call; defaults from the config; bad options are errors."""

import jax
import pytest

from nucleusx_jax.configuration import ForwardMode, NucleusXConfig, RetentionImpl
from nucleusx_jax.modeling import RunOptions


def test_defaults_come_from_the_config_and_overrides_are_typed():
    cfg = NucleusXConfig(forward_mode="chunkwise", recurrent_chunk_size=7, retention_impl="pallas")
    opts = RunOptions.from_config(cfg)
    assert (opts.mode, opts.chunk_size, opts.impl) == (ForwardMode.CHUNKWISE, 7, RetentionImpl.PALLAS)
    assert (opts.return_state, opts.hidden_states, opts.deterministic) == (False, False, True)
    other = RunOptions.from_config(cfg, mode="recurrent", return_state=True)
    assert other.mode is ForwardMode.RECURRENT and other.chunk_size == 7 and other.return_state
    # hashable and equal by value (a static argument of jit); no array leaves (static under nn.remat)
    assert hash(RunOptions.from_config(cfg)) == hash(opts) and RunOptions.from_config(cfg) == opts
    assert jax.tree.leaves(opts) == [] and len({opts, other}) == 2


@pytest.mark.parametrize("overrides, error, words", [
    (dict(chunk=4), TypeError, ["chunk", "chunk_size"]),  # a mistyped option is not dropped
    (dict(mode="sideways"), ValueError, ["'sideways'", "parallel, chunkwise, recurrent"]),
    (dict(impl="cuda"), ValueError, ["'cuda'", "xla, pallas"]),
    (dict(chunk_size=0), ValueError, ["chunk_size=0", ">= 1"]),
    (dict(return_state="yes"), ValueError, ["return_state='yes'"]),
])
def test_bad_options_are_errors(overrides, error, words):
    with pytest.raises(error) as err:
        RunOptions.from_config(NucleusXConfig(), **overrides)
    assert all(w in str(err.value) for w in words), str(err.value)
