"""Properties on seeded random configs and inputs: the three forms agree, gradients agree, no retraces."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nucleusx_jax import NucleusX, NucleusXConfig, retention
from nucleusx_jax.losses import lm_head_loss, next_token_loss
from nucleusx_jax.modeling import RunOptions

from conftest import count_traces, max_abs

TOL = 1e-4
parallel = jax.jit(retention.parallel_retention)
chunkwise = jax.jit(retention.chunkwise_retention, static_argnums=4)
recurrent = jax.jit(retention.recurrent_retention)
final_state = jax.jit(retention.final_state)


def rms(x: jax.Array) -> jax.Array:
    """The per-head RMSNorm with a tiny epsilon: removes the forms' per-row scalars."""
    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-20)


@pytest.mark.parametrize("seed", range(6))
def test_retention_forms_agree_on_random_shapes(seed):
    rng = np.random.default_rng(seed)
    b, h, t = int(rng.integers(1, 3)), int(rng.integers(1, 4)), int(rng.integers(1, 14))
    kd, vd = 2 * int(rng.integers(1, 5)), int(rng.integers(1, 7))
    scale = float(rng.choice([0.3, 3.0]))  # small activations, and large ones where the clamps are active
    q, k = (jnp.asarray(rng.normal(size=(b, h, t, kd)) * scale, jnp.float32) for _ in range(2))
    v = jnp.asarray(rng.normal(size=(b, h, t, vd)), jnp.float32)
    log_decay = jnp.asarray(retention.log_decay_table(h, bool(seed % 2)))
    mask = None
    if seed >= 3:  # left padding
        lengths = rng.integers(1, t + 1, size=b)
        mask = jnp.asarray(np.arange(t)[None, :] >= (t - lengths)[:, None], jnp.int32)
    real = np.ones((b, t), bool) if mask is None else np.asarray(mask, bool)
    rows = lambda x: np.asarray(rms(x)).transpose(0, 2, 1, 3)[real]  # noqa: E731  (real tokens only)
    par = parallel(q, k, v, log_decay, mask)
    rec, rec_state = recurrent(q, k, v, log_decay, retention.empty_state(b, h, kd, vd), mask)
    assert max_abs(rows(par), rows(rec)) < TOL
    fin = final_state(k, v, log_decay, mask)
    assert max_abs(fin.kv, rec_state.kv) < TOL and max_abs(fin.scale, rec_state.scale) < TOL
    for chunk in sorted({1, 2, 3, t, t + 5}):
        ch = chunkwise(q, k, v, log_decay, chunk, mask)
        assert max_abs(rows(ch), rows(par)) < TOL, chunk


@pytest.fixture(scope="module")
def model():
    cfg = NucleusXConfig(vocab_size=61, decoder_embed_dim=24, decoder_value_embed_dim=36, decoder_ffn_embed_dim=40,
                         decoder_layers=2, decoder_retention_heads=3, recurrent_chunk_size=4, pad_token_id=0,
                         groupnorm_eps=1e-12, use_lm_decay=True, activation_fn="gelu")
    m = NucleusX(cfg, seed=7)
    m.params = jax.tree.map(lambda p: p * 3.0, m.params)  # larger activations: the clamps are active
    return m


IDS = np.random.default_rng(0).integers(1, 61, size=(2, 11))


@pytest.mark.parametrize("chunk", [1, 2, 3, 11, 16])
def test_model_modes_agree(model, chunk):
    par = model(IDS, forward_mode="parallel", use_cache=True)
    ch = model(IDS, forward_mode="chunkwise", recurrent_chunk_size=chunk, use_cache=True)
    assert max_abs(par.logits, ch.logits) < TOL
    for a, b in zip(par.past_key_values, ch.past_key_values):
        assert max_abs(a.kv, b.kv) < TOL and int(a.seqlen) == int(b.seqlen) == IDS.shape[1]


def test_model_recurrent_agrees(model):
    par = model(IDS, forward_mode="parallel", use_cache=True)
    rec = model(IDS, forward_mode="recurrent", use_cache=True)
    assert max_abs(par.logits, rec.logits) < TOL
    for a, b in zip(par.past_key_values, rec.past_key_values):
        assert max_abs(a.kv, b.kv) < TOL and max_abs(a.scale, b.scale) < TOL


def test_chunkwise_gradients_equal_parallel_gradients(model):
    def grads(mode, chunk):
        loss = lambda p: model(IDS, labels=IDS, params=p, forward_mode=mode, recurrent_chunk_size=chunk).loss  # noqa
        return jax.grad(loss)(model.params)

    par = grads("parallel", 4)
    for chunk in (3, 4):
        ch = grads("chunkwise", chunk)
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(par), jax.tree.leaves(ch)):
            err = float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(a)) + 1e-12))
            assert err < TOL, (jax.tree_util.keystr(path), chunk, err)


def test_every_mode_compiles_once_per_shape(model):
    calls = [dict(forward_mode="parallel"), dict(forward_mode="chunkwise", recurrent_chunk_size=3),
             dict(forward_mode="recurrent", use_cache=True)]
    for kw in calls:
        model(IDS, **kw)
    with count_traces() as traces:
        for kw in calls:
            model(IDS, **kw)
            model((IDS + 1) % 61, **kw)  # new values, same shapes
    assert traces == []
    past = model(IDS[:, :5], forward_mode="recurrent", use_cache=True).past_key_values
    past = model(IDS[:, 5:6], forward_mode="recurrent", past_key_values=past, use_cache=True).past_key_values
    with count_traces() as traces:
        for t in range(6, 11):  # decoding: one compiled step reused for every token
            past = model(IDS[:, t:t + 1], forward_mode="recurrent", past_key_values=past,
                         use_cache=True).past_key_values
    assert traces == []
    with count_traces() as traces:  # the counter sees a new shape
        model(IDS[:, :7], forward_mode="parallel")
    assert traces


@pytest.mark.parametrize("block_tokens", [1, 5, 8, 4096])
@pytest.mark.parametrize("z_loss_coeff", [0.0, 0.01])
def test_lm_head_loss_equals_loss_on_logits(block_tokens, z_loss_coeff):
    """The blocked LM-head loss (gradients computed in its forward pass) against the plain loss on whole
    logits: value, d/d hidden and d/d kernel, with ignored labels, blocks that do not divide T, float32 and a
    bfloat16 hidden state."""
    rng = np.random.default_rng(block_tokens)
    hidden = jnp.asarray(rng.normal(size=(2, 7, 12)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(12, 29)) * 0.5, jnp.float32)
    labels = jnp.asarray(rng.integers(0, 29, size=(2, 7))).at[0, :3].set(-100).at[1, 5].set(-100)

    def plain(h, w):
        logits = jnp.einsum("bte,ev->btv", h, w.astype(h.dtype), preferred_element_type=jnp.float32)
        return next_token_loss(logits, labels, z_loss_coeff)

    def blocked(h, w):
        return lm_head_loss(h, w, labels, z_loss_coeff, block_tokens)

    for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)):
        h = hidden.astype(dtype)
        want, want_grads = jax.value_and_grad(plain, (0, 1))(h, kernel)
        got, got_grads = jax.jit(jax.value_and_grad(blocked, (0, 1)))(h, kernel)
        assert abs(float(got) - float(want)) < tol * abs(float(want))
        assert abs(float(jax.jit(blocked)(h, kernel)) - float(want)) < tol * abs(float(want))
        for a, b in zip(got_grads, want_grads):
            assert a.dtype == b.dtype
            assert max_abs(a, b) < tol * float(jnp.max(jnp.abs(b.astype(jnp.float32))))


@pytest.mark.parametrize("tied", [False, True])
def test_module_next_token_loss_and_gradients(model, tied):
    """``NucleusXForCausalLMModule.next_token_loss`` (the trainer's loss) equals the loss on the model's
    logits, and so do its parameter gradients, for an LM head and for tied embeddings."""
    m = model
    if tied:
        cfg = NucleusXConfig(**{**model.config.to_dict(), "tie_word_embeddings": True})
        m = NucleusX(cfg, seed=3)
    inputs, targets = IDS[:, :-1], IDS[:, 1:]
    options = RunOptions.from_config(m.config, mode="chunkwise", chunk_size=4)

    def plain(p):
        logits = m.module.apply({"params": p}, inputs, options=options)[0]
        return next_token_loss(logits, targets)

    def blocked(p):
        return m.module.apply({"params": p}, inputs, targets, options=options, method="next_token_loss")

    want, want_grads = jax.value_and_grad(plain)(m.params)
    got, got_grads = jax.jit(jax.value_and_grad(blocked))(m.params)
    initialised = nn.meta.unbox(m.module.init(jax.random.PRNGKey(0), inputs, targets, method="next_token_loss")["params"])
    assert jax.tree.structure(initialised) == jax.tree.structure(m.params)  # init through the loss: same tree
    assert abs(float(got) - float(want)) < TOL
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want_grads), jax.tree.leaves(got_grads)):
        err = float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(a)) + 1e-12))
        assert err < TOL, (jax.tree_util.keystr(path), err)
