"""Retention with a state in and out (issue 26): a sequence run as windows, each continuing the state the one
before left, gives the numbers of one pass over the whole sequence, and the gradients of one pass.

4 x 512 tokens as four windows against one 2048-token pass, in float32 (errors relative to the largest value,
within 2e-5), for the chunkwise form (XLA, both
normalisations) and the sequence-parallel form (8 simulated devices), with and without documents (segments
crossing window boundaries, starting at one, starting inside one). The gradient with respect to the incoming
state is checked against an independent parallel form that reads a state (:func:`parallel_with_state`).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import max_abs, run_on_8_devices

from nucleusx_jax import retention as ret

TOL = 2e-5
B, H, K, V, C = 2, 2, 8, 8, 64
WINDOW, WINDOWS = 512, 4
T = WINDOW * WINDOWS
LOG_DECAY = jnp.asarray(ret.log_decay_table(H, True))


def rel(got, want) -> float:
    """``max |got - want| / max |want|``."""
    return max_abs(got, want) / float(np.max(np.abs(np.asarray(want))))


def inputs(seed: int = 0, length: int = T):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.normal(size=(B, H, length, d)), jnp.float32) for d in (K, K, V))
    return q, k * K**-0.5, v


def documents(length: int = T) -> np.ndarray:
    """Row 0: a document over windows 0-2 ending inside window 2, one starting there and running on; row 1:
    left padding, a document ending at a window boundary, one starting exactly there, short ones inside."""
    seg = np.ones((B, length), np.int32)
    seg[0, 1300:] = 2
    seg[1, :40] = 0
    seg[1, 40:1024] = 3
    seg[1, 1024:1100] = 4
    seg[1, 1100:1101] = 5
    seg[1, 1101:] = 6
    return seg


def windowed(q, k, v, segment_ids, normalization, state=None, window: int = WINDOW):
    """The chunkwise form over consecutive windows, each continuing the state of the one before; a window
    whose first token starts a new document passes count 0 (see :func:`retention.chunkwise_carry`)."""
    outs = []
    for start in range(0, q.shape[2], window):
        part = slice(start, start + window)
        seg = None if segment_ids is None else segment_ids[:, part]
        if start and segment_ids is not None:
            new = segment_ids[:, start] != segment_ids[:, start - 1]
            state = state._replace(count=jnp.where(new, 0, state.count))
        out, state = ret.chunkwise_carry(q[:, :, part], k[:, :, part], v[:, :, part], LOG_DECAY, C, state,
                                         None, seg, normalization)
        outs.append(out)
    return jnp.concatenate(outs, axis=2), state


CASES = [("exact", False), ("exact", True), ("reference", False), ("reference", True)]


@pytest.mark.parametrize("normalization,segments", CASES)
def test_windows_equal_one_pass(normalization, segments):
    """Outputs within 2e-5, and the final state equals the one a single pass leaves."""
    q, k, v = inputs()
    seg = jnp.asarray(documents()) if segments else None
    got, state = jax.jit(windowed, static_argnums=4)(q, k, v, seg, normalization)
    want, want_state = ret.chunkwise_carry(q, k, v, LOG_DECAY, C, None, None, seg, normalization)
    assert rel(got, want) < TOL
    if seg is not None or normalization == "exact":
        real = np.asarray(ret.normalizing_segments(seg, None, (B, T), normalization)) != 0
        parallel = ret.parallel_retention(q, k, v, LOG_DECAY, None, seg)
        assert rel(np.asarray(got) * real[:, None, :, None], np.asarray(parallel) * real[:, None, :, None]) < TOL
    np.testing.assert_array_equal(state.count, want_state.count)
    np.testing.assert_allclose(state.kv, want_state.kv, rtol=1e-5, atol=1e-5)
    if normalization == "exact" or segments:
        np.testing.assert_allclose(state.z, want_state.z, rtol=1e-5, atol=1e-5)
    else:
        assert state.z is None


def test_final_state_is_the_recurrent_one():
    """The state after a window whose length is no multiple of C, converted, is :func:`retention.final_state`
    (the recurrent form's), and counts the last document's positions."""
    q, k, v = inputs(1, 300)
    seg = jnp.asarray(documents(300))
    seg = seg.at[0, 250:].set(7)
    for segment_ids in (None, seg):
        _, state = ret.chunkwise_carry(q, k, v, LOG_DECAY, C, None, None, segment_ids)
        got = ret.carried_to_recurrent(state, LOG_DECAY)
        want = ret.final_state(k, v, LOG_DECAY, None, segment_ids)
        np.testing.assert_allclose(got.kv, want.kv, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got.scale, want.scale, rtol=1e-6)
        np.testing.assert_array_equal(got.seqlen, np.broadcast_to(want.seqlen, (B,)))
    assert state.count.tolist() == [50, 260]  # row 0: from 250; row 1: from 40 (after left padding)


def parallel_with_state(q, k, v, segment_ids, state):
    """An independent exact-normalised retention reading a state, ``[T, T]`` at once: token i of the window's
    first run (its document began ``count`` positions before) adds ``gamma**(i+1) q_i kv`` and ``gamma**(i+1)
    q_i z`` to its sums; every row is divided by ``sqrt(sum_{l <= p} gamma**l)``, p its position in the
    document, and by ``max(|row sum|, 1)`` (stop-gradient, as every form)."""
    length = q.shape[2]
    starts = ret.segment_starts(segment_ids)
    starts = jnp.where(starts == 0, -state.count[:, None], starts)  # [B, T]
    i = jnp.arange(length)
    gamma = jnp.exp(LOG_DECAY)[None, :, None, None]  # [1, H, 1, 1]
    dist = (i[:, None] - i[None, :]).astype(jnp.float32)
    inside = (i[None, None, :] >= starts[:, :, None]) & (i[None, None, :] <= i[None, :, None])  # [B, T, T]
    d = jnp.where(inside[:, None], gamma ** jnp.maximum(dist, 0), 0.0)  # [B, H, T, T]
    reads = jnp.where((starts < 0)[:, None, :, None], gamma ** (i[:, None] + 1.0), 0.0)  # [B, H, T, 1]
    qk = jnp.einsum("bhik,bhjk->bhij", q, k) * d
    p = (i[None] - starts).astype(jnp.float32)  # [B, T]
    norm = jnp.sqrt((1 - gamma[..., 0] ** (p[:, None] + 1)) / (1 - gamma[..., 0]))[..., None]  # [B, H, T, 1]
    row = (jnp.sum(qk, -1, keepdims=True) + reads * jnp.einsum("bhik,bhkx->bhix", q, state.z)) / norm
    num = (jnp.einsum("bhij,bhjv->bhiv", qk, v) + reads * jnp.einsum("bhik,bhkv->bhiv", q, state.kv)) / norm
    return num / jnp.maximum(jnp.abs(jax.lax.stop_gradient(row)), 1.0)


def prefix_state(seed: int = 5):
    """A state worth reading: the one 700 tokens of one document leave (count 700)."""
    q, k, v = inputs(seed, 700)
    return ret.chunkwise_carry(q, k, v, LOG_DECAY, C, None)[1]


def test_state_read_as_the_parallel_form_does():
    """A window continuing a state (its first document continues, later ones start afresh) against
    :func:`parallel_with_state`: the outputs, and the gradients with respect to q, k, v and the state's kv."""
    q, k, v = inputs(2, WINDOW)
    seg = jnp.asarray(documents()[:, 1024:1024 + WINDOW])
    seg = seg.at[1, :].set(jnp.where(jnp.arange(WINDOW) < 60, 6, seg[1]))  # row 1 continues, then new ones
    state = prefix_state()
    cot = jnp.asarray(np.random.default_rng(3).normal(size=(B, H, WINDOW, V)), jnp.float32)

    def loss(fn, q, k, v, kv):
        return jnp.sum(fn(q, k, v, state._replace(kv=kv)) * cot)

    chunked = lambda q, k, v, s: ret.chunkwise_carry(q, k, v, LOG_DECAY, C, s, None, seg)[0]  # noqa: E731
    reference = lambda q, k, v, s: parallel_with_state(q, k, v, seg, s)  # noqa: E731
    assert rel(chunked(q, k, v, state), reference(q, k, v, state)) < TOL
    got = jax.grad(lambda *a: loss(chunked, *a), argnums=(0, 1, 2, 3))(q, k, v, state.kv)
    want = jax.grad(lambda *a: loss(reference, *a), argnums=(0, 1, 2, 3))(q, k, v, state.kv)
    for g, w in zip(got, want):
        assert rel(g, w) < 1e-5
    assert float(np.max(np.abs(want[3]))) > 0  # the state is read


@pytest.mark.parametrize("normalization,segments", CASES)
def test_gradients_through_windows_equal_one_pass(normalization, segments):
    """jax.grad of a loss over all windows (gradients flowing back through each carried state) equals that of
    one pass, for q, k, v of every window (relative 1e-5); and the gradient to an incoming state is that of
    the same pass continuing it."""
    q, k, v = inputs(4)
    seg = jnp.asarray(documents()) if segments else None
    cot = jnp.asarray(np.random.default_rng(6).normal(size=(B, H, T, V)), jnp.float32)
    state = prefix_state()
    if normalization == "reference" and not segments:
        state = state._replace(z=None)

    def loss_windows(q, k, v, kv):
        return jnp.sum(windowed(q, k, v, seg, normalization, state._replace(kv=kv))[0] * cot)

    def loss_one(q, k, v, kv):
        out = ret.chunkwise_carry(q, k, v, LOG_DECAY, C, state._replace(kv=kv), None, seg, normalization)[0]
        return jnp.sum(out * cot)

    got = jax.jit(jax.grad(loss_windows, argnums=(0, 1, 2, 3)))(q, k, v, state.kv)
    want = jax.jit(jax.grad(loss_one, argnums=(0, 1, 2, 3)))(q, k, v, state.kv)
    for g, w in zip(got, want):
        assert rel(g, w) < 1e-5


def test_empty_state_changes_nothing():
    """``state=None``, an empty state and :func:`retention.chunkwise_retention` give the same numbers."""
    q, k, v = inputs(7, 200)
    seg = jnp.asarray(documents(200))
    for normalization in ("exact", "reference"):
        want = ret.chunkwise_retention(q, k, v, LOG_DECAY, C, None, seg, normalization)
        for state in (None, ret.empty_carried(B, H, K, V)):
            got = ret.chunkwise_carry(q, k, v, LOG_DECAY, C, state, None, seg, normalization)[0]
            np.testing.assert_array_equal(got, want)


def test_reference_state_refused_by_exact():
    q, k, v = inputs(8, 64)
    state = ret.chunkwise_carry(q, k, v, LOG_DECAY, C, None, normalization="reference")[1]
    with pytest.raises(ValueError, match="state.z is None"):
        ret.chunkwise_carry(q, k, v, LOG_DECAY, C, state)


WORKER = r"""
import json, sys
sys.path.insert(0, "tests")
import jax, jax.numpy as jnp, numpy as np
from nucleusx_jax import retention as ret, sequence_parallel, sharding as shd
import test_carried_state as t

assert len(jax.devices()) == 8
q, k, v = t.inputs(4)
cot = jnp.asarray(np.random.default_rng(6).normal(size=(t.B, t.H, t.T, t.V)), jnp.float32)
out = {}
for norm, segments in t.CASES:
    seg = jnp.asarray(t.documents()) if segments else None
    state = t.prefix_state()
    if norm == "reference" and not segments:
        state = state._replace(z=None)

    def windows(q, k, v, kv, carry):
        outs, s = [], state._replace(kv=kv)
        for start in range(0, t.T, t.WINDOW):
            part = slice(start, start + t.WINDOW)
            if start and seg is not None:
                s = s._replace(count=jnp.where(seg[:, start] != seg[:, start - 1], 0, s.count))
            o, s = carry(q[:, :, part], k[:, :, part], v[:, :, part], t.LOG_DECAY, t.C, s, None,
                         None if seg is None else seg[:, part], norm)
            outs.append(o)
        return jnp.concatenate(outs, axis=2), s

    loss = lambda *a: jnp.sum(windows(*a)[0] * cot)  # noqa: E731
    with jax.set_mesh(shd.make_mesh({"sequence": 8})):
        got, state_got = jax.jit(lambda *a: windows(*a, sequence_parallel.chunkwise_carry))(q, k, v, state.kv)
        grads = jax.jit(jax.grad(lambda *a: loss(*a, sequence_parallel.chunkwise_carry), argnums=(0, 1, 2, 3)))(
            q, k, v, state.kv)
    one = lambda q, k, v, kv: ret.chunkwise_carry(q, k, v, t.LOG_DECAY, t.C, state._replace(kv=kv), None, seg, norm)
    want, state_want = jax.jit(one)(q, k, v, state.kv)
    want_grads = jax.jit(jax.grad(lambda *a: jnp.sum(one(*a)[0] * cot), argnums=(0, 1, 2, 3)))(q, k, v, state.kv)
    out[f"{norm}-{segments}"] = dict(
        out=t.rel(got, want),
        grads=max(t.rel(g, w) for g, w in zip(grads, want_grads)), kv=t.rel(state_got.kv, state_want.kv),
        count=[np.asarray(state_got.count).tolist(), np.asarray(state_want.count).tolist()])
# the Pallas kernel per block of rows and heads (shard_map over data x fsdp and tensor), continuing the state
from nucleusx_jax.kernels import sharded_chunkwise_carry
seg = jnp.asarray(t.documents())
with jax.set_mesh(shd.make_mesh({"data": 2, "fsdp": 1, "tensor": 2, "sequence": 2})):
    got, s = [], t.prefix_state()
    for start in range(0, t.T, t.WINDOW):
        part = slice(start, start + t.WINDOW)
        if start:
            s = s._replace(count=jnp.where(seg[:, start] != seg[:, start - 1], 0, s.count))
        o, s = jax.jit(sharded_chunkwise_carry, static_argnums=4)(q[:, :, part], k[:, :, part], v[:, :, part],
                                                                  t.LOG_DECAY, t.C, s, None, seg[:, part])
        got.append(o)
want, state_want = ret.chunkwise_carry(q, k, v, t.LOG_DECAY, t.C, t.prefix_state(), None, seg)
# the model's windows with T split over `sequence` (8 devices): the one-device one-pass logits
from nucleusx_jax.modeling import RunOptions
from nucleusx_jax import runtime
model = t.tiny_model("exact")
ids = np.random.default_rng(9).integers(3, 64, (t.B, t.T)).astype(np.int32)
options = RunOptions.from_config(model.config, mode="chunkwise", return_state=True)
apply = jax.jit(lambda p, ids, seg, past: model.module.apply({"params": p}, ids, None, past, seg, options=options)[:2])
want_logits = model(ids, forward_mode="chunkwise", segment_ids=np.asarray(seg)).logits
with jax.set_mesh(shd.make_mesh({"sequence": 8})):
    logits, past = [], runtime.empty_carried_cache(model.config, t.B)
    for start in range(0, t.T, t.WINDOW):
        part = slice(start, start + t.WINDOW)
        if start:
            past = tuple(p._replace(count=jnp.where(seg[:, start] != seg[:, start - 1], 0, p.count)) for p in past)
        o, past = apply(model.params, ids[:, part], seg[:, part], past)
        logits.append(o)
model_error = t.rel(jnp.concatenate(logits, axis=1), want_logits)
pallas = dict(out=t.rel(jnp.concatenate(got, axis=2), want), kv=t.rel(s.kv, state_want.kv),
              count=[np.asarray(s.count).tolist(), np.asarray(state_want.count).tolist()])
print("RESULT" + json.dumps(dict(forms=out, pallas=pallas, model=model_error)))
"""


@pytest.mark.slow
def test_sequence_parallel_windows_equal_one_pass():
    """Four windows, each split over 8 simulated devices (``sequence``), continuing the state: the outputs of one
    pass on one device within 2e-5 (relative), its gradients (q, k, v, the incoming state's kv) within 1e-5 relative,
    and its final state, for both normalisations, with and without documents. Also the Pallas kernel under a mesh
    splitting rows and heads (:func:`kernels.sharded_chunkwise_carry`, outputs and final state), and the model's
    windows with ``past_key_values`` split over ``sequence`` (logits)."""
    results = run_on_8_devices(WORKER)
    assert len(results["forms"]) == len(CASES)
    for case, got in results["forms"].items():
        assert got["out"] < TOL and got["grads"] < 1e-5 and got["kv"] < 1e-5, (case, got)
        assert got["count"][0] == got["count"][1], case
    pallas = results["pallas"]
    assert pallas["out"] < TOL and pallas["kv"] < 1e-5 and pallas["count"][0] == pallas["count"][1], pallas
    assert results["model"] < TOL


# ------------------------------------------------------------------------------------------- the model call
def tiny_model(normalization: str, scan_layers: bool = False, impl: str = "xla"):
    from nucleusx_jax import NucleusX, NucleusXConfig

    cfg = NucleusXConfig(vocab_size=64, decoder_embed_dim=16, decoder_value_embed_dim=32, decoder_ffn_embed_dim=24,
                         decoder_layers=2, decoder_retention_heads=2, recurrent_chunk_size=C,
                         chunkwise_normalization=normalization, scan_layers=scan_layers, retention_impl=impl)
    return NucleusX(cfg, seed=0)


@pytest.mark.parametrize("normalization,segments,scan_layers,impl",
                         [("exact", False, False, "xla"), ("exact", True, True, "xla"),
                          ("reference", False, False, "xla"), ("exact", True, False, "pallas")])
def test_model_windows_equal_one_pass(normalization, segments, scan_layers, impl):
    """The model called on four 512-token windows with ``forward_mode="chunkwise"``, each continuing the
    ``past_key_values`` the one before returned (from :func:`runtime.empty_carried_cache`), gives the logits of
    one 2048-token pass (XLA; relative 2e-5); decoding on in recurrent mode from the last cache gives the
    logits of the one-pass prefill's recurrent continuation."""
    from nucleusx_jax import runtime

    model = tiny_model(normalization, scan_layers, impl)
    ids = np.random.default_rng(9).integers(3, 64, (B, T)).astype(np.int32)
    seg = documents() if segments else None
    want = tiny_model(normalization, scan_layers)(ids, forward_mode="chunkwise", segment_ids=seg).logits
    past, logits = runtime.empty_carried_cache(model.config, B), []
    for start in range(0, T, WINDOW):
        part = slice(start, start + WINDOW)
        if start and seg is not None:
            new = seg[:, start] != seg[:, start - 1]
            past = tuple(s._replace(count=jnp.where(new, 0, s.count)) for s in past)
        out = model(ids[:, part], forward_mode="chunkwise", past_key_values=past,
                    segment_ids=None if seg is None else seg[:, part])
        logits.append(out.logits)
        past = out.past_key_values
    assert rel(jnp.concatenate(logits, axis=1), want) < TOL
    if normalization == "exact":  # the carried cache converts for decoding on
        nxt = np.random.default_rng(10).integers(3, 64, (B, 3)).astype(np.int32)
        prefill = model(ids, forward_mode="chunkwise", use_cache=True, segment_ids=seg).past_key_values
        want_next = model(nxt, forward_mode="recurrent", past_key_values=prefill).logits
        assert rel(model(nxt, forward_mode="recurrent", past_key_values=past).logits, want_next) < TOL


def test_model_refuses_a_recurrent_cache_in_chunkwise_mode():
    model = tiny_model("exact")
    ids = np.ones((B, 8), np.int32)
    past = model(ids, forward_mode="parallel", use_cache=True).past_key_values
    with pytest.raises(ValueError, match="forward_mode='chunkwise' continues a cache of CarriedState"):
        model(ids, forward_mode="chunkwise", past_key_values=past)
    from nucleusx_jax import runtime

    pallas = tiny_model("reference", impl="pallas")
    with pytest.raises(ValueError, match="normalization='reference' without segments takes no incoming state"):
        pallas(ids, forward_mode="chunkwise", past_key_values=runtime.empty_carried_cache(model.config, B))

    with pytest.raises(ValueError, match=r"past_key_values\[0\].kv has shape \(1, 2, 8, 16\) but this model and "
                                         r"batch expect \(2, 2, 8, 16\)"):
        model(ids, forward_mode="chunkwise", past_key_values=runtime.empty_carried_cache(model.config, 1))


# ---------------------------------------------------------------------------------------- the Pallas kernel
@pytest.mark.parametrize("segments", [False, True])
def test_pallas_windows_equal_one_pass(segments):
    """The Pallas kernel (interpreted, TPU layout) over four windows continuing the state: the XLA one-pass
    outputs (relative 2e-5) and final state, and its gradients for q, k, v and the incoming state's kv."""
    from nucleusx_jax.kernels import chunkwise_carry

    q, k, v = inputs(11)
    seg = jnp.asarray(documents()) if segments else None
    cot = jnp.asarray(np.random.default_rng(12).normal(size=(B, H, T, V)), jnp.float32)
    state = prefix_state()

    def windows(carry, q, k, v, kv):
        outs, s = [], state._replace(kv=kv)
        for start in range(0, T, WINDOW):
            part = slice(start, start + WINDOW)
            if start and seg is not None:
                s = s._replace(count=jnp.where(seg[:, start] != seg[:, start - 1], 0, s.count))
            out, s = carry(q[:, :, part], k[:, :, part], v[:, :, part], LOG_DECAY, C, s, None,
                           None if seg is None else seg[:, part])
            outs.append(out)
        return jnp.concatenate(outs, axis=2), s

    pallas = lambda *a: chunkwise_carry(*a, layout="tpu", interpret=True)  # noqa: E731
    got, got_state = jax.jit(lambda *a: windows(pallas, *a))(q, k, v, state.kv)
    want, want_state = ret.chunkwise_carry(q, k, v, LOG_DECAY, C, state, None, seg)
    assert rel(got, want) < TOL and rel(got_state.kv, want_state.kv) < 1e-5 and rel(got_state.z, want_state.z) < 1e-5
    np.testing.assert_array_equal(got_state.count, want_state.count)
    loss = lambda carry: lambda *a: jnp.sum(windows(carry, *a)[0] * cot)  # noqa: E731
    got = jax.jit(jax.grad(loss(pallas), argnums=(0, 1, 2, 3)))(q, k, v, state.kv)
    want = jax.jit(jax.grad(loss(ret.chunkwise_carry), argnums=(0, 1, 2, 3)))(q, k, v, state.kv)
    for g, w in zip(got, want):
        assert rel(g, w) < 1e-5


def test_pallas_reference_refuses_a_state():
    from nucleusx_jax.kernels import chunkwise_carry

    q, k, v = inputs(13, 64)
    with pytest.raises(ValueError, match="normalization='reference' without segments takes no incoming state"):
        chunkwise_carry(q, k, v, LOG_DECAY, C, prefix_state(), normalization="reference", layout="tpu", interpret=True)
    out, state = chunkwise_carry(q, k, v, LOG_DECAY, C, None, normalization="reference", layout="tpu", interpret=True)
    want, want_state = ret.chunkwise_carry(q, k, v, LOG_DECAY, C, None, normalization="reference")
    assert rel(out, want) < TOL and rel(state.kv, want_state.kv) < 1e-5 and state.z is None
