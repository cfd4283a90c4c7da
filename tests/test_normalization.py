"""``chunkwise_normalization``: ``"exact"`` (the default) makes the chunkwise form equal the parallel form for every
chunk size, so every prefill form hands decoding the parallel pass's numbers; ``"reference"`` keeps the PyTorch
reference's chunk-dependent rows (pinned bit for bit against the fixtures in test_parity.py). Core API only."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nucleusx_jax import NucleusX, NucleusXConfig, from_pretrained
from nucleusx_jax import retention as ret
from nucleusx_jax.kernels import chunkwise as cw
from nucleusx_jax.kernels import chunkwise_retention as pallas_chunkwise
from nucleusx_jax.train.config import load_config

from conftest import FIXTURE_NAMES, FIXTURES, load_cases, max_abs

TOL = 2e-5
TINY = FIXTURES / "nucleus_x_tiny"
BAD = r"chunkwise_normalization='fast' is invalid: must be one of exact, reference"


# ------------------------------------------------------------------------------------------- the option
def test_default_is_exact_and_config_json_records_the_choice(tmp_path):
    assert NucleusXConfig().chunkwise_normalization == "exact"
    assert from_pretrained(TINY).config.chunkwise_normalization == "exact"  # a reference config.json has no key
    model = from_pretrained(TINY, chunkwise_normalization="reference")
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["chunkwise_normalization"] == "reference"
    assert from_pretrained(tmp_path).config.chunkwise_normalization == "reference"
    assert from_pretrained(tmp_path, chunkwise_normalization="exact").config.chunkwise_normalization == "exact"


DIMS = {"vocab_size": 64, "decoder_embed_dim": 16, "decoder_value_embed_dim": 32, "decoder_ffn_embed_dim": 32,
        "decoder_layers": 1, "decoder_retention_heads": 2}  # a trainer config must give the model's dimensions


def test_trainer_yaml_model_section(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    dims = "".join(f"  {k}: {v}\n" for k, v in DIMS.items())
    yaml_file.write_text(f"model:\n{dims}  chunkwise_normalization: reference\n")
    assert load_config(str(yaml_file)).model_config().chunkwise_normalization == "reference"
    yaml_file.write_text(f"model:\n{dims}")
    assert load_config(str(yaml_file)).model_config().chunkwise_normalization == "exact"
    with pytest.raises(ValueError, match=BAD):
        load_config(str(yaml_file), ["model.chunkwise_normalization=fast"]).model_config()


def test_bad_values_name_the_value_and_the_allowed_ones():
    with pytest.raises(ValueError, match=BAD):
        NucleusXConfig(chunkwise_normalization="fast")
    with pytest.raises(ValueError, match=BAD):
        from_pretrained(TINY, chunkwise_normalization="fast")
    x = jnp.ones((1, 1, 4, 2))
    with pytest.raises(ValueError, match=BAD):
        ret.chunkwise_retention(x, x, x, jnp.zeros(1), 2, normalization="fast")


# ---------------------------------------------------------------------------- the forms, every chunk size
def _inputs(lm_decay: bool):
    """q, k, v at the fixtures' sizes (B 3, H 4, T 21, K 16, V 32), large enough that the clamps act; a mask
    with 0, 6 and 13 left pads; segment ids with documents inside and across chunks after the same pads."""
    rng = np.random.default_rng(int(lm_decay))
    b, h, t, kd, vd = 3, 4, 21, 16, 32
    q = jnp.asarray(rng.normal(size=(b, h, t, kd)) * 3, jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, h, t, kd)) * 3 * kd**-0.5, jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, h, t, vd)), jnp.float32)
    mask = (np.arange(t)[None] >= np.array([0, 6, 13])[:, None]).astype(np.int32)
    seg = mask * np.array([np.repeat([1, 2], [8, 13]), np.repeat([1, 2, 3], [9, 1, 11]), np.full(t, 4)])
    return q, k, v, jnp.asarray(ret.log_decay_table(h, lm_decay)), jnp.asarray(mask), jnp.asarray(seg, jnp.int32)


@pytest.mark.parametrize("lm_decay", [False, True])
def test_exact_chunkwise_equals_parallel_for_every_chunk_size(lm_decay):
    """Every chunk size 1..T, without and with left padding and segments: the raw retention output (before the
    per-head RMSNorm, so no epsilon hides a per-row factor) equals the parallel form's, within 2e-5 of its
    largest value."""
    q, k, v, log_decay, mask, seg = _inputs(lm_decay)
    parallel = [ret.parallel_retention(q, k, v, log_decay, m, s) for m, s in ((None, None), (mask, None), (mask, seg))]

    worst_reference = 0.0
    for chunk in range(1, q.shape[2] + 1):
        run = jax.jit(lambda m, s, norm: ret.chunkwise_retention(q, k, v, log_decay, chunk, m, s, norm),
                      static_argnums=2)
        for (m, s), want in zip(((None, None), (mask, None), (mask, seg)), parallel):
            assert max_abs(run(m, s, "exact"), want) < TOL * float(jnp.max(jnp.abs(want))), (chunk, m, s)
        worst_reference = max(worst_reference, max_abs(run(None, None, "reference"), parallel[0]))
    assert worst_reference > 1e-2  # what the option changes: the reference's rows depend on the chunk size


@pytest.mark.parametrize("layout", cw.LAYOUTS)
def test_pallas_kernel_runs_both_normalizations(layout):
    """Interpret mode: the kernel's values and gradients equal the XLA form's for each normalisation (left padding,
    T not a multiple of C), and "exact" equals the parallel form."""
    q, k, v, log_decay, mask, _ = _inputs(True)
    q, k, v, log_decay, mask = q[:2, :2, :13, :8], k[:2, :2, :13, :8], v[:2, :2, :13, :16], log_decay[:2], mask[:2, :13]
    w = jnp.asarray(np.random.default_rng(3).normal(size=16), jnp.float32)

    def value_and_grads(fn):
        loss = lambda q, k, v: (jnp.sum(fn(q, k, v) * w), fn(q, k, v))  # noqa: E731
        (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
        return out, grads

    for norm in ("exact", "reference"):
        want, want_grads = value_and_grads(lambda q, k, v: ret.chunkwise_retention(q, k, v, log_decay, 4, mask,
                                                                                    normalization=norm))
        got, grads = value_and_grads(lambda q, k, v: pallas_chunkwise(q, k, v, log_decay, 4, mask,
                                                                      normalization=norm, layout=layout))
        np.testing.assert_allclose(got, want, atol=TOL, rtol=TOL, err_msg=norm)
        for name, g, wg in zip("qkv", grads, want_grads):
            np.testing.assert_allclose(g, wg, atol=5e-5, rtol=5e-5, err_msg=f"{norm} d{name}")
        if norm == "exact":
            assert max_abs(got, ret.parallel_retention(q, k, v, log_decay, mask)) < TOL


# ---------------------------------------------------------------------------------------- on the fixtures
@pytest.fixture(scope="module", params=FIXTURE_NAMES)
def fx(request):
    return from_pretrained(FIXTURES / request.param), load_cases(request.param)


@pytest.mark.parametrize("chunk", [7, 8])  # the chunk sizes of the fixtures' chunkwise logits (T = 21)
def test_fixture_chunkwise_equals_parallel_logits(fx, chunk):
    model, c = fx
    out = model(c["input_ids"], forward_mode="chunkwise", recurrent_chunk_size=chunk)
    assert max_abs(out.logits, c["logits_parallel"]) < TOL


def test_fixture_left_padding_and_segments(fx):
    model, c = fx
    ids, mask = c["lp_input_ids"], c["lp_attention_mask"]
    real = mask.astype(bool)
    out = model(ids, attention_mask=mask, forward_mode="chunkwise", recurrent_chunk_size=5)
    assert max_abs(np.asarray(out.logits)[real], c["lp_logits_parallel"][real]) < TOL
    seg = np.where(real, np.where(np.arange(ids.shape[1]) < 10, 1, 2), 0)  # two documents after the pads
    want = model(ids, attention_mask=mask, segment_ids=seg, forward_mode="parallel").logits
    got = model(ids, attention_mask=mask, segment_ids=seg, forward_mode="chunkwise", recurrent_chunk_size=4).logits
    assert max_abs(np.asarray(got)[real], np.asarray(want)[real]) < TOL


@pytest.mark.parametrize("mode,chunk", [("parallel", None), ("recurrent", None), ("chunkwise", 2), ("chunkwise", 5)])
def test_any_prefill_then_recurrent_decoding_equals_the_parallel_pass(fx, mode, chunk):
    """The prompt in any form, then one recurrent step per token: the logits of the whole sequence."""
    model, c = fx
    p, ids = int(c["prefill_len"]), c["input_ids"]
    pre = model(ids[:, :p], forward_mode=mode, recurrent_chunk_size=chunk, use_cache=True)
    cont = model(ids[:, p:], forward_mode="recurrent", past_key_values=pre.past_key_values, use_cache=True)
    assert max_abs(np.concatenate([pre.logits, cont.logits], 1), c["logits_parallel"]) < TOL


def test_lm_decay_chunkwise_prefill_then_decoding():
    """The tiny fixture's weights with ``use_lm_decay``, a prompt of 9 in chunks of 4, 3 decoding steps: with the
    reference's rows the logits after the prompt are off the parallel pass (3e-4), with the exact ones not."""
    ids = load_cases("nucleus_x_tiny")["input_ids"][:, :12]
    tiny, errors = from_pretrained(TINY), {}
    for norm in ("exact", "reference"):
        model = NucleusX(tiny.config.replace(use_lm_decay=True, chunkwise_normalization=norm), tiny.params)
        want = model(ids, forward_mode="parallel").logits
        pre = model(ids[:, :9], forward_mode="chunkwise", recurrent_chunk_size=4, use_cache=True)
        cont = model(ids[:, 9:], past_key_values=pre.past_key_values)
        errors[norm] = max_abs(np.concatenate([pre.logits, cont.logits], 1)[:, 8:], np.asarray(want)[:, 8:])
    assert errors["exact"] < TOL and errors["reference"] > 10 * TOL, errors
