"""The Pallas chunkwise-retention kernel (interpret mode on CPU) against the pure-JAX chunkwise form.

The pure-JAX form is itself pinned to the PyTorch reference by the fixture tests, so agreement here means the
kernel reproduces the reference's chunkwise normalisation (inner rows over sqrt of row sums, the |.|-sum
clamps, the cross scale from the state, ``all_scale = max(inner, cross)``), its values and its gradients.
"""

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nucleusx_jax import retention as ret
from nucleusx_jax.configuration import NucleusXConfig
from nucleusx_jax.kernels import chunkwise_retention as pallas_chunkwise
from nucleusx_jax.modeling import NucleusXForCausalLMModule, RunOptions, causal_lm_loss


def _inputs(seed: int, batch: int, heads: int, length: int, kdim: int, vdim: int, pad_left: Optional[list],
            dtype: jnp.dtype):
    """Random q, k (scaled like the model's), v, the model's decays and a left-padding mask (or None)."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, heads, length, kdim)).astype(np.float32)
    k = rng.standard_normal((batch, heads, length, kdim)).astype(np.float32) * kdim**-0.5
    v = rng.standard_normal((batch, heads, length, vdim)).astype(np.float32)
    log_decay = jnp.asarray(ret.log_decay_table(heads, use_lm_decay=bool(seed % 2)))
    mask = None
    if pad_left is not None:
        mask = jnp.asarray((np.arange(length)[None, :] >= np.asarray(pad_left)[:, None]).astype(np.int32))
    return jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype), log_decay, mask


def _value_and_grads(fn, q, k, v, seed: int):
    """Output and the gradients of a fixed random projection of it with respect to q, k and v."""
    w = jnp.asarray(np.random.default_rng(seed + 1).standard_normal(v.shape[-1]), jnp.float32)

    def loss(q, k, v):
        out = fn(q, k, v)
        return jnp.sum(out.astype(jnp.float32) * w), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


# (seed, batch, heads, T, K, V, chunk, left padding per row, layout, block_v): T multiple of C or not,
# one chunk or many, masks, both layouts, V split into blocks.
CASES = [
    (0, 2, 3, 37, 8, 16, 8, [0, 5], "tpu", None),
    (1, 1, 2, 32, 16, 8, 8, None, "gpu", None),
    (2, 2, 2, 21, 8, 16, 4, [3, 0], "gpu", 8),
    (3, 1, 4, 13, 4, 8, 16, None, "tpu", 4),
    (4, 3, 1, 40, 8, 8, 5, [0, 39, 7], "tpu", None),
]


@pytest.mark.parametrize("seed,batch,heads,length,kdim,vdim,chunk,pad_left,layout,block_v", CASES)
def test_float32_values_and_gradients(seed, batch, heads, length, kdim, vdim, chunk, pad_left, layout, block_v):
    q, k, v, log_decay, mask = _inputs(seed, batch, heads, length, kdim, vdim, pad_left, jnp.float32)
    ref_out, ref_grads = _value_and_grads(lambda q, k, v: ret.chunkwise_retention(q, k, v, log_decay, chunk, mask),
                                          q, k, v, seed)
    out, grads = _value_and_grads(
        lambda q, k, v: pallas_chunkwise(q, k, v, log_decay, chunk, mask, layout=layout, block_v=block_v),
        q, k, v, seed)
    assert out.shape == ref_out.shape and out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=2e-5)
    for name, g, ref_g in zip("qkv", grads, ref_grads):
        assert g.dtype == jnp.float32, name
        np.testing.assert_allclose(g, ref_g, atol=5e-5, rtol=5e-5, err_msg=f"d{name}")


@pytest.mark.parametrize("layout", ["tpu", "gpu"])
def test_bfloat16_close_to_float32_truth(layout):
    """bf16 inputs: the kernel's error against the float32 result is no worse than the pure-JAX bf16 path's
    (float32 state, float32 accumulation in both), for values and gradients."""
    seed, chunk, shape = 5, 8, (2, 2, 19, 16, 16)
    q32, k32, v32, log_decay, mask = _inputs(seed, *shape, [0, 4], jnp.float32)
    q, k, v = (x.astype(jnp.bfloat16) for x in (q32, k32, v32))
    up = lambda *xs: [x.astype(jnp.float32) for x in xs]  # noqa: E731
    truth, truth_grads = _value_and_grads(lambda q, k, v: ret.chunkwise_retention(q, k, v, log_decay, chunk, mask),
                                          *up(q, k, v), seed)
    xla, xla_grads = _value_and_grads(lambda q, k, v: ret.chunkwise_retention(q, k, v, log_decay, chunk, mask),
                                      q, k, v, seed)
    out, grads = _value_and_grads(lambda q, k, v: pallas_chunkwise(q, k, v, log_decay, chunk, mask, layout=layout),
                                  q, k, v, seed)
    assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
    err = lambda a, b: float(jnp.max(jnp.abs(a.astype(jnp.float32) - b)))  # noqa: E731
    assert err(out, truth) <= 1.5 * err(xla, truth) + 1e-3
    assert err(out, xla.astype(jnp.float32)) <= 2e-2
    for name, g, xg, tg in zip("qkv", grads, xla_grads, truth_grads):
        scale = float(jnp.max(jnp.abs(tg)))
        assert err(g, tg) <= 1.5 * err(xg, tg) + 2e-3 * scale, name


def test_no_gradient_to_log_decay_and_bad_arguments():
    q, k, v, log_decay, _ = _inputs(6, 1, 2, 8, 4, 4, None, jnp.float32)
    g = jax.grad(lambda d: jnp.sum(pallas_chunkwise(q, k, v, d, 4)))(log_decay)
    np.testing.assert_array_equal(g, np.zeros_like(g))
    with pytest.raises(ValueError, match="layout='cuda'.*gpu, tpu"):
        pallas_chunkwise(q, k, v, log_decay, 4, layout="cuda")
    with pytest.raises(ValueError, match="block_v=3.*divisor of the value head dim 4"):
        pallas_chunkwise(q, k, v, log_decay, 4, block_v=3)
    with pytest.raises(ValueError, match="chunk_size=0"):
        pallas_chunkwise(q, k, v, log_decay, 0)


def test_config_switch_validates():
    assert NucleusXConfig().retention_impl == "xla"
    assert NucleusXConfig(retention_impl="pallas").retention_impl == "pallas"
    with pytest.raises(ValueError, match="retention_impl='triton'.*xla, pallas"):
        NucleusXConfig(retention_impl="triton")


@pytest.mark.slow
def test_model_with_pallas_matches_xla():
    """A whole (tiny) model in chunkwise mode: logits and parameter gradients of the loss agree."""
    kw = dict(vocab_size=64, decoder_embed_dim=16, decoder_value_embed_dim=32, decoder_ffn_embed_dim=32,
              decoder_layers=1, decoder_retention_heads=2, recurrent_chunk_size=4)
    ids = jnp.asarray(np.random.default_rng(7).integers(1, 64, (2, 11)), jnp.int32)
    mask = jnp.asarray([[1] * 11, [0, 0] + [1] * 9], jnp.int32)
    results = []
    for impl in ("xla", "pallas"):
        model = NucleusXForCausalLMModule(NucleusXConfig(retention_impl=impl, **kw))
        params = model.init(jax.random.PRNGKey(0), ids)["params"]

        def loss(p):
            logits = model.apply({"params": p}, ids, mask, options=RunOptions.from_config(model.config, mode="chunkwise"))[0]
            return causal_lm_loss(logits, ids), logits

        results.append(jax.jit(jax.value_and_grad(loss, has_aux=True))(params))
    ((_, xla_logits), xla_grads), ((_, logits), grads) = results
    np.testing.assert_allclose(logits, xla_logits, atol=2e-5, rtol=2e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), grads, xla_grads)
