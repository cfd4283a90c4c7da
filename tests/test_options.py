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


def test_deepnorm_scales_the_initial_v_out_fc1_fc2_weights_once():
    """DeepNet's beta = (8L)^(-1/4) (torchscale's RetNet decoder): v_proj, out_proj, fc1 and fc2 start at
    beta times the plain init (same seed, so the same draws); every other weight is untouched."""
    import numpy as np
    from flax.traverse_util import flatten_dict

    from nucleusx_jax import NucleusX

    kw = dict(vocab_size=32, decoder_embed_dim=16, decoder_value_embed_dim=16, decoder_ffn_embed_dim=24,
              decoder_layers=3, decoder_retention_heads=2)
    plain = flatten_dict(NucleusX(NucleusXConfig(decoder_normalize_before=False, **kw), seed=5).params)
    deep = flatten_dict(NucleusX(NucleusXConfig(deepnorm=True, **kw), seed=5).params)
    beta = (8 * 3) ** -0.25
    assert set(plain) == set(deep)
    scaled = {k for k in deep if k[-2] in ("v_proj", "out_proj", "fc1", "fc2")}
    assert len(scaled) == 4 * 3
    for key in deep:
        want = plain[key] * (beta if key in scaled else 1.0)
        np.testing.assert_allclose(deep[key], want, rtol=1e-6, err_msg=str(key))


def test_deepnorm_leaves_loaded_weights_alone(tmp_path):
    """README's deliberate difference 5: the deepnorm scale is part of random initialisation only. A deepnorm
    model saved in our format and converted to PyTorch loads back with every weight unchanged."""
    import numpy as np

    from nucleusx_jax import NucleusX, from_pretrained
    from nucleusx_jax.convert import convert

    cfg = NucleusXConfig(deepnorm=True, vocab_size=32, decoder_embed_dim=16, decoder_value_embed_dim=16,
                         decoder_ffn_embed_dim=24, decoder_layers=3, decoder_retention_heads=2)
    model = NucleusX(cfg, seed=5)
    model.save_pretrained(tmp_path / "flax")
    convert(tmp_path / "flax", tmp_path / "torch", "torch", progress=False)
    for directory in ("flax", "torch"):
        loaded = from_pretrained(tmp_path / directory)
        assert loaded.config.deepnorm
        leaves, want = jax.tree_util.tree_leaves_with_path(loaded.params), jax.tree.leaves(model.params)
        assert len(leaves) == len(want)
        for (path, a), b in zip(leaves, want):
            np.testing.assert_array_equal(a, b, err_msg=f"{directory} {jax.tree_util.keystr(path)}")
