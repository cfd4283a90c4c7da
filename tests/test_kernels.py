"""The Pallas chunkwise-retention kernel (interpret mode on CPU) against the pure-JAX chunkwise form.

The pure-JAX form is itself pinned to the PyTorch reference by the fixture tests, so agreement here (with
``normalization="reference"``, and segments) means the kernel reproduces the reference's chunkwise normalisation
(inner rows over sqrt of row sums, the |.|-sum clamps, the cross scale from the state, ``all_scale = max(inner,
cross)``) and the parallel form's (with segments), its values and its gradients. The default ``"exact"``
without segments runs the segments kernels: test_normalization.py.
"""

import glob
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from nucleusx_jax import retention as ret
from nucleusx_jax.configuration import NucleusXConfig
from nucleusx_jax.kernels import chunkwise as cw
from nucleusx_jax.kernels import chunkwise_retention as pallas_chunkwise
from nucleusx_jax.losses import causal_lm_loss
from nucleusx_jax.modeling import NucleusXForCausalLMModule, RunOptions
from nucleusx_jax.train.config import resolve_model

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


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
    (2, 2, 2, 21, 8, 32, 4, [3, 0], "gpu", 16),
    (3, 1, 4, 13, 4, 200, 16, None, "tpu", 128),
    (4, 3, 1, 40, 8, 8, 5, [0, 39, 7], "tpu", None),
]


@pytest.mark.parametrize("seed,batch,heads,length,kdim,vdim,chunk,pad_left,layout,block_v", CASES)
def test_float32_values_and_gradients(seed, batch, heads, length, kdim, vdim, chunk, pad_left, layout, block_v):
    q, k, v, log_decay, mask = _inputs(seed, batch, heads, length, kdim, vdim, pad_left, jnp.float32)
    ref_out, ref_grads = _value_and_grads(
        lambda q, k, v: ret.chunkwise_retention(q, k, v, log_decay, chunk, mask, normalization="reference"),
        q, k, v, seed)
    out, grads = _value_and_grads(
        lambda q, k, v: pallas_chunkwise(q, k, v, log_decay, chunk, mask, normalization="reference", layout=layout,
                                         block_v=block_v),
        q, k, v, seed)
    assert out.shape == ref_out.shape and out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=2e-5)
    for name, g, ref_g in zip("qkv", grads, ref_grads):
        assert g.dtype == jnp.float32, name
        np.testing.assert_allclose(g, ref_g, atol=5e-5, rtol=5e-5, err_msg=f"d{name}")


@pytest.mark.parametrize("layout,chunk,tile", [("tpu", 8, None), ("gpu", 8, None), ("gpu", 32, 16)])
def test_bfloat16_close_to_float32_truth(layout, chunk, tile):
    """bf16 inputs: the kernel's error against the float32 result is no worse than the pure-JAX bf16 path's
    (float32 state, float32 accumulation in both), for values and gradients; also with two GPU row tiles."""
    seed, shape = 5, (2, 2, 19, 16, 16)
    q32, k32, v32, log_decay, mask = _inputs(seed, *shape, [0, 4], jnp.float32)
    q, k, v = (x.astype(jnp.bfloat16) for x in (q32, k32, v32))
    up = lambda *xs: [x.astype(jnp.float32) for x in xs]  # noqa: E731
    truth, truth_grads = _value_and_grads(lambda q, k, v: ret.chunkwise_retention(q, k, v, log_decay, chunk, mask),
                                          *up(q, k, v), seed)
    xla, xla_grads = _value_and_grads(lambda q, k, v: ret.chunkwise_retention(q, k, v, log_decay, chunk, mask),
                                      q, k, v, seed)
    out, grads = _value_and_grads(
        lambda q, k, v: pallas_chunkwise(q, k, v, log_decay, chunk, mask, layout=layout, tile=tile), q, k, v, seed)
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
    with pytest.raises(ValueError, match="block_v=48 is invalid for layout 'gpu': must be a power of two >= 16"):
        pallas_chunkwise(q, k, v, log_decay, 4, layout="gpu", block_v=48)
    with pytest.raises(ValueError, match="block_v=64 is invalid for layout 'tpu': must be a multiple of 128"):
        pallas_chunkwise(q, k, v, log_decay, 4, layout="tpu", block_v=64)
    with pytest.raises(ValueError, match="chunk_size=0"):
        pallas_chunkwise(q, k, v, log_decay, 0)
    with pytest.raises(ValueError, match="tile=24 is invalid for layout 'gpu' with chunk_size=4: must be a power of "
                                         "two >= 16 and at most 16"):
        pallas_chunkwise(q, k, v, log_decay, 4, layout="gpu", tile=24)
    with pytest.raises(ValueError, match="tile=32 is invalid for layout 'gpu'.*at most 16"):
        pallas_chunkwise(q, k, v, log_decay, 4, layout="gpu", tile=32)
    with pytest.raises(ValueError, match="tile=16 is invalid for layout 'tpu': its kernels take whole chunks"):
        pallas_chunkwise(q, k, v, log_decay, 4, layout="tpu", tile=16)
    with pytest.raises(ValueError, match="kernel='fwd' is invalid: must be one of forward, dq, dkv"):
        cw.working_set(cw.geometry("gpu", length=8, key_dim=4, value_dim=4, chunk_size=4), kernel="fwd",
                       segments=False, itemsize=4)


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


# ------------------------------------------------------------------------ legal blocks on real hardware
def _config_dims():
    """(name, K, V, C) of every model config in configs/: the JSON files and the YAMLs' model sections."""
    out = []
    for path in sorted(glob.glob(os.path.join(CONFIGS, "*.json")) + glob.glob(os.path.join(CONFIGS, "*.yaml"))):
        if path.endswith(".json"):
            config = NucleusXConfig.from_pretrained(path)
        else:
            with open(path) as f:
                config = NucleusXConfig(**resolve_model(yaml.safe_load(f)["model"]))
        out.append((os.path.basename(path), config.key_head_dim, config.value_head_dim, config.recurrent_chunk_size))
    return out


def _pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


SEQUENCE_KINDS = ("k", "v", "row", "key", "start")


def assert_legal(layout: str, length: int, kdim: int, vdim: int, chunk: int) -> None:
    """Every block of every launch of the three kernels (with and without segments) obeys the layout's rules:
    Triton: every block dim a power of two, the matmul dims (Cp, Kp, block_v) >= 16; Mosaic: the last two
    dims of every block multiples of 8 and 128 or equal to the array's. No block holds the whole sequence
    when it is longer than one chunk (TPU) or GPU_MAX_CHUNKS chunks (GPU); the blocks stay inside their
    arrays and the outputs' sequence blocks cover every row exactly once."""
    geo = cw.geometry(layout, length=length, key_dim=kdim, value_dim=vdim, chunk_size=chunk)
    cp, n = geo.block_rows, -(-length // chunk)
    assert geo.chunk == chunk and geo.n_chunks == n and cp >= chunk and geo.key_dim >= kdim
    assert geo.value_dim >= vdim and geo.value_dim % geo.block_v == 0
    if layout == "gpu":
        assert all(_pow2(d) and d >= 16 for d in (cp, geo.key_dim, geo.block_v, geo.tile)), geo
        assert cp % geo.tile == 0 and geo.key_dim * geo.block_v * 4 <= max(cw.GPU_STATE_BYTES, geo.key_dim * 64), geo
    else:
        assert geo.tile == cp, geo
    bound = cp if layout == "tpu" else cw.GPU_MAX_CHUNKS * cp
    for kernel in cw.KERNELS:
        for segments in (False, True):
            plan = cw.launches(geo, batch=2, heads=3, kernel=kernel, segments=segments)
            assert len(plan) == 1 or layout == "gpu"
            for launch in plan:
                corners = [(0,) * len(launch.grid), tuple(g - 1 for g in launch.grid)]
                for b in launch.inputs + launch.outputs:
                    dims = [1 if d is None else d for d in b.block]
                    assert len(dims) == len(b.shape) and None not in b.block[-2:], b
                    if layout == "gpu":
                        assert all(_pow2(d) for d in dims), (kernel, b)
                    else:
                        assert dims[-2] % 8 == 0 or dims[-2] == b.shape[-2], (kernel, b)
                        assert dims[-1] % 128 == 0 or dims[-1] == b.shape[-1], (kernel, b)
                    if b.kind in SEQUENCE_KINDS:
                        assert dims[-2] <= bound and (dims[-2] < n * cp or n * cp <= bound), (kernel, b)
                    for corner in corners:
                        index = b.index_map(*corner)
                        assert all(0 <= i and (i + 1) * d <= s for i, d, s in zip(index, dims, b.shape)), b
            # the sequence blocks cover every row once: TPU through the chunk axis, GPU through the launches
            for pos, b in enumerate(plan[0].inputs + plan[0].outputs):
                if b.kind not in SEQUENCE_KINDS:
                    continue
                if layout == "tpu":
                    assert sorted(b.index_map(0, 0, 0, t)[-2] for t in range(n)) == list(range(n))
                    continue
                spans = sorted((blk.index_map(0, 0, 0)[-2] * blk.block[-2], blk.block[-2])
                               for blk in ((launch.inputs + launch.outputs)[pos] for launch in plan))
                if pos >= len(plan[0].inputs):  # outputs: one array per launch, its block the whole array
                    assert all(start == 0 and rows == blk_rows for (start, rows), blk_rows in zip(
                        spans, sorted((launch.inputs + launch.outputs)[pos].shape[-2] for launch in plan)))
                    assert sum(rows for _, rows in spans) == n * cp
                else:
                    assert [start for start, _ in spans] == list(np.cumsum([0] + [r for _, r in spans])[:-1])
                    assert sum(rows for _, rows in spans) == n * cp


@pytest.mark.parametrize("layout", cw.LAYOUTS)
def test_every_config_launches_legal_blocks(layout):
    """Block shapes the wrapper would launch for every config in configs/ at T = 1, 7, 512 and 4096."""
    dims = _config_dims()
    assert {"nucleusx-7b.json", "retnet-2.7b.json", "tiny.yaml", "nucleusx-7b-8xh100.yaml"} <= {d[0] for d in dims}
    assert {432, 428} <= {d[2] for d in dims}  # the value heads the issue names
    for _, kdim, vdim, chunk in dims:
        for length in (1, 7, 512, 4096):
            assert_legal(layout, length, kdim, vdim, chunk)


# The custom call each layout's kernels lower to, on the platform it is built for.
LOWERING = {"gpu": ("cuda", "__gpu$xla.gpu.triton"), "tpu": ("tpu", "tpu_custom_call")}


@pytest.mark.parametrize("layout", cw.LAYOUTS)
def test_every_config_lowers_for_triton_and_mosaic(layout):
    """The kernels' forward and backward (bf16, as trained) for every config's head shapes, lowered, not run,
    by Pallas' Triton (layout gpu, platform cuda) or Mosaic TPU front end on this CPU-only machine. Those
    lowerings enforce the rules themselves: Mosaic rejects blocks off the 8 x 128 tiling, Triton loads and
    stores of sizes that are not powers of two. One custom call per launch."""
    platform, call = LOWERING[layout]
    for kdim, vdim, chunk in sorted({d[1:] for d in _config_dims()}):
        for length in (1, 7, 512, 4096):
            segments = length in (7, 4096)
            log_decay = jnp.asarray(ret.log_decay_table(2, use_lm_decay=False))

            def grads(q, k, v, seg):
                def loss(q, k, v):
                    out = pallas_chunkwise(q, k, v, log_decay, chunk, None, seg if segments else None, layout=layout,
                                           interpret=False)
                    return jnp.sum(out.astype(jnp.float32))
                return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

            qk = jax.ShapeDtypeStruct((1, 2, length, kdim), jnp.bfloat16)
            args = (qk, qk, jax.ShapeDtypeStruct((1, 2, length, vdim), jnp.bfloat16),
                    jax.ShapeDtypeStruct((1, length), jnp.int32))
            text = jax.jit(grads).trace(*args).lower(lowering_platforms=(platform,)).as_text()
            launches = 1 if layout == "tpu" else len(cw.gpu_pieces(-(-length // chunk)))
            assert text.count(call) == len(cw.KERNELS) * launches, (kdim, vdim, chunk, length)


@settings(max_examples=60, deadline=None)
@given(layout=st.sampled_from(cw.LAYOUTS), length=st.integers(1, 20000), kdim=st.integers(1, 600),
       vdim=st.integers(1, 1200), chunk=st.integers(1, 1100))
def test_any_head_size_launches_legal_blocks(layout, length, kdim, vdim, chunk):
    assert_legal(layout, length, kdim, vdim, chunk)


def test_gpu_pieces_are_aligned_powers_of_two():
    for n in range(1, 70):
        pieces = cw.gpu_pieces(n)
        assert sum(size for _, size in pieces) == n and pieces[0][0] == 0
        for (first, size), nxt in zip(pieces, pieces[1:] + [(n, None)]):
            assert _pow2(size) and size <= cw.GPU_MAX_CHUNKS and first % size == 0 and first + size == nxt[0]


# (seed, T, K, V, C, left padding, segments): V = 432 / 428 (7B, 2.7B value heads), 48; K and C padded too;
# the V = 48 case walks 11 chunks, three GPU launches (8 + 2 + 1 chunks).
PADDED = [
    (7, 13, 24, 432, 6, None, False),
    (8, 20, 12, 428, 8, None, True),
    (9, 44, 20, 48, 4, [0, 5], False),
]


@pytest.mark.parametrize("layout", cw.LAYOUTS)
@pytest.mark.parametrize("seed,length,kdim,vdim,chunk,pad_left,segments", PADDED)
def test_padded_shapes_match_xla(layout, seed, length, kdim, vdim, chunk, pad_left, segments):
    """Interpret-mode values and gradients on shapes the wrapper pads (V, K, the chunk) equal the XLA form."""
    batch = 1 if pad_left is None else len(pad_left)
    q, k, v, log_decay, mask = _inputs(seed, batch, 2, length, kdim, vdim, pad_left, jnp.float32)
    geo = cw.geometry(layout, length=length, key_dim=kdim, value_dim=vdim, chunk_size=chunk)
    assert geo.value_dim > vdim and geo.key_dim > kdim
    seg = None
    if segments:
        seg = jnp.asarray(np.repeat([1, 2, 3], [5, 9, length - 14])[None].repeat(batch, 0), jnp.int32)
    ref_out, ref_grads = _value_and_grads(
        lambda q, k, v: ret.chunkwise_retention(q, k, v, log_decay, chunk, mask, seg, "reference"), q, k, v, seed)
    out, grads = _value_and_grads(
        lambda q, k, v: pallas_chunkwise(q, k, v, log_decay, chunk, mask, seg, "reference", layout=layout),
        q, k, v, seed)
    assert out.shape == ref_out.shape
    np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=2e-5)
    for name, g, ref_g in zip("qkv", grads, ref_grads):
        assert g.shape == ref_g.shape, name
        np.testing.assert_allclose(g, ref_g, atol=5e-5, rtol=5e-5, err_msg=f"d{name}")


# (seed, T, K, V, C, tile, left padding, segments): GPU chunks of 2 and 4 row tiles (C = 48 padded to 64 rows),
# documents and left padding crossing tile and chunk boundaries.
TILED = [
    (10, 70, 16, 24, 32, 16, [0, 5], False),
    (11, 75, 8, 40, 48, 16, [3, 0], True),
]


@pytest.mark.parametrize("seed,length,kdim,vdim,chunk,tile,pad_left,segments", TILED)
def test_tiled_gpu_kernels_match_xla(seed, length, kdim, vdim, chunk, tile, pad_left, segments):
    """The GPU kernels with several row tiles per chunk (interpret mode): values and gradients equal the XLA
    form and the untiled GPU run (one tile per chunk)."""
    q, k, v, log_decay, mask = _inputs(seed, len(pad_left), 2, length, kdim, vdim, pad_left, jnp.float32)
    geo = cw.geometry("gpu", length=length, key_dim=kdim, value_dim=vdim, chunk_size=chunk, tile=tile)
    assert geo.block_rows // geo.tile >= 2 and geo.n_chunks >= 2
    seg = None
    if segments:
        ids = np.repeat([1, 2, 3, 4], [20, 1, 30, length - 51])[None].repeat(len(pad_left), 0)
        seg = jnp.asarray(ids * np.asarray(mask), jnp.int32)
    ref_out, ref_grads = _value_and_grads(
        lambda q, k, v: ret.chunkwise_retention(q, k, v, log_decay, chunk, mask, seg, "reference"), q, k, v, seed)
    for t in (tile, geo.block_rows):
        out, grads = _value_and_grads(
            lambda q, k, v: pallas_chunkwise(q, k, v, log_decay, chunk, mask, seg, "reference", layout="gpu", tile=t),
            q, k, v, seed)
        np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=2e-5)
        for name, g, ref_g in zip("qkv", grads, ref_grads):
            np.testing.assert_allclose(g, ref_g, atol=5e-5, rtol=5e-5, err_msg=f"d{name} tile={t}")


def test_gpu_working_set_fits_shared_memory():
    """Every config's GPU kernels (forward, dq, dkv, with and without segments; bf16 and float32 inputs) at
    T = 512 and 4096 hold at most GPU_WORKING_SET_BUDGET (160 KiB, under H100/H200's 227 KiB of shared memory
    per block) per program by :func:`working_set`, which does not grow with C; one tile per chunk (the layout
    before tiling) would not fit at C = 512."""
    assert cw.GPU_WORKING_SET_BUDGET == 160 * 1024
    for _, kdim, vdim, chunk in _config_dims():
        for length in (512, 4096):
            geo = cw.geometry("gpu", length=length, key_dim=kdim, value_dim=vdim, chunk_size=chunk)
            wider = geo._replace(chunk=4 * chunk, block_rows=4 * geo.block_rows)
            for kernel in cw.KERNELS:
                for segments in (False, True):
                    for itemsize in (2, 4):
                        size = cw.working_set(geo, kernel=kernel, segments=segments, itemsize=itemsize)
                        assert 0 < size <= cw.GPU_WORKING_SET_BUDGET, (kdim, vdim, chunk, kernel, segments, itemsize)
                        assert cw.working_set(wider, kernel=kernel, segments=segments, itemsize=itemsize) == size
    untiled = cw.geometry("gpu", length=512, key_dim=256, value_dim=432, chunk_size=512, tile=512)
    # q k^T, the decay table and P's cast alone: 2.5 MiB
    assert cw.working_set(untiled, kernel="forward", segments=False, itemsize=2) > 512 * 512 * 10


SHARDED_WORKER = r"""
import json
import jax, jax.numpy as jnp, numpy as np
from nucleusx_jax import retention as ret, sharding as shd
from nucleusx_jax.kernels import sharded_chunkwise_retention

rng = np.random.default_rng(3)
q, k = (jnp.asarray(rng.standard_normal((4, 2, 24, 8)), jnp.float32) for _ in range(2))
v = jnp.asarray(rng.standard_normal((4, 2, 24, 16)), jnp.float32)
segments = jnp.asarray(np.cumsum(rng.random((4, 24)) < 0.1, axis=1), jnp.int32)
log_decay = jnp.asarray(ret.log_decay_table(2, use_lm_decay=False))
w = jnp.asarray(rng.standard_normal(16), jnp.float32)

def grads(fn):
    loss = lambda q, k, v: jnp.sum(fn(q, k, v, log_decay, 8, None, segments) * w)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)

want = grads(ret.chunkwise_retention)
out = {}
for sizes in ({"data": 2, "fsdp": 2, "tensor": 2}, {"data": 8}):
    mesh = shd.make_mesh(sizes)
    with jax.set_mesh(mesh):
        text = jax.jit(sharded_chunkwise_retention, static_argnums=4).lower(q, k, v, log_decay, 8, None, segments).as_text()
        got = grads(sharded_chunkwise_retention)
    diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
    out[str(sizes)] = {"diff": diff, "shard_map": "shard_map" in text or "sdy.manual_computation" in text}
print("RESULT" + json.dumps(out))
"""


@pytest.mark.slow
def test_kernel_under_shard_map_matches_xla_on_8_devices():
    """The kernel on a mesh runs per device inside shard_map (rows over data x fsdp, heads over tensor; with 8
    data devices the 4 rows do not divide and stay whole): value and gradients equal the XLA form's."""
    from conftest import run_on_8_devices

    for sizes, result in run_on_8_devices(SHARDED_WORKER).items():
        assert result["shard_map"], sizes
        assert result["diff"] < 1e-4, (sizes, result)
