"""Document-aware retention: packed documents (``segment_ids``) against the same documents run alone.

Every document of a random packing (1 to 6 documents per row, lengths from 1 up, documents crossing chunk
boundaries, left and right padding) must get the numbers it gets alone: the same form without segments on a
row holding only that document (padded at the end, which a causal form never sees). Chunkwise with segments
normalises rows as the parallel form does, so its reference is the parallel form of the document alone.
"""

import functools
from typing import List, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import max_abs
from nucleusx_jax import retention as ret
from nucleusx_jax.kernels import chunkwise_retention as pallas_chunkwise

TOL = 2e-5
H, K, V, T = 2, 4, 8, 21


def random_packing(rng: np.random.Generator, length: int) -> np.ndarray:
    """One row of segment ids: optional left padding, 1 to 6 documents (ids increasing, lengths >= 1, often
    1), optional gaps and right padding."""
    ids = np.zeros(length, np.int32)
    left = int(rng.integers(0, 4)) if rng.random() < 0.4 else 0
    right = int(rng.integers(0, 3)) if rng.random() < 0.3 else 0
    room = length - left - right
    n = int(rng.integers(1, min(6, room) + 1))
    cuts = np.sort(rng.choice(np.arange(1, room), size=n - 1, replace=False)) if n > 1 else np.zeros(0, int)
    bounds = np.concatenate([[0], cuts, [room]]) + left
    next_id = int(rng.integers(1, 4))
    for a, b in zip(bounds[:-1], bounds[1:]):
        gap = int(b - a > 2 and rng.random() < 0.2)  # a padding token between two documents
        ids[a + gap:b] = next_id
        next_id += int(rng.integers(1, 3))
    return ids


def documents(seg: np.ndarray) -> List[Tuple[int, int, int]]:
    """(row, start, stop) of every document of ``seg`` ``[B, T]``."""
    out = []
    for row, ids in enumerate(seg):
        for sid in np.unique(ids[ids != 0]):
            idx = np.flatnonzero(ids == sid)
            out.append((row, int(idx[0]), int(idx[-1]) + 1))
    return out


def alone(x: np.ndarray, docs: List[Tuple[int, int, int]]) -> np.ndarray:
    """``[B, H, T, D]`` -> ``[len(docs), H, T, D]``: each document moved to the start of its own row."""
    out = np.zeros((len(docs),) + x.shape[1:], x.dtype)
    for i, (row, a, b) in enumerate(docs):
        out[i, :, : b - a] = x[row, :, a:b]
    return out


def alone_mask(docs: List[Tuple[int, int, int]], length: int) -> np.ndarray:
    return (np.arange(length)[None] < np.array([b - a for _, a, b in docs])[:, None]).astype(np.int32)


def _inputs(seed: int, batch: int = 3):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, H, T, K)).astype(np.float32)
    k = rng.standard_normal((batch, H, T, K)).astype(np.float32) * K**-0.5
    v = rng.standard_normal((batch, H, T, V)).astype(np.float32)
    seg = np.stack([random_packing(rng, T) for _ in range(batch)])
    w = rng.standard_normal((batch, 1, T, V)).astype(np.float32)  # a random projection: the loss to differentiate
    w = w * (seg != 0)[:, None, :, None]  # over real tokens (what padding outputs hold is unspecified)
    return q, k, v, seg, w, jnp.asarray(ret.log_decay_table(H, bool(seed % 2)))


def _recurrent(q, k, v, log_decay, mask, segment_ids):
    state = ret.empty_state(q.shape[0], q.shape[1], q.shape[3], v.shape[3])
    return ret.recurrent_retention(q, k, v, log_decay, state, mask, segment_ids)[0]


FORMS = {
    "parallel": ret.parallel_retention,
    "recurrent": _recurrent,
    **{f"chunkwise{c}": functools.partial(lambda c, q, k, v, d, m, s: ret.chunkwise_retention(q, k, v, d, c, m, s), c)
       for c in (1, 5, 8, 32)},
    **{f"pallas-{layout}{c}": functools.partial(
        lambda c, layout, q, k, v, d, m, s: pallas_chunkwise(q, k, v, d, c, m, s, layout=layout), c, layout)
       for c, layout in ((4, "tpu"), (5, "gpu"))},
}


def _reference(form: str):
    """The form a document alone is compared with: chunkwise with segments normalises like parallel."""
    return FORMS[form if form in ("parallel", "recurrent") else "parallel"]


@functools.lru_cache(maxsize=None)
def _value_and_grads(form: str, with_segments: bool):
    fn = FORMS[form] if with_segments else _reference(form)

    def loss(q, k, v, log_decay, mask, seg, w):
        out = fn(q, k, v, log_decay, mask, seg)
        return jnp.sum(out * w), out

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


@pytest.mark.parametrize("form", list(FORMS))
def test_packed_documents_equal_documents_alone(form):
    """Outputs and the gradients with respect to q, k and v, for several random packings per form."""
    packed_fn, alone_fn = _value_and_grads(form, True), _value_and_grads(form, False)
    for seed in range(2):
        q, k, v, seg, w, log_decay = _inputs(seed)
        docs = documents(seg)
        (_, out), grads = packed_fn(q, k, v, log_decay, None, jnp.asarray(seg), w)
        (_, out1), grads1 = alone_fn(*(alone(x, docs) for x in (q, k, v)), log_decay,
                                     jnp.asarray(alone_mask(docs, T)), None, alone(w, docs))
        # the loss is a sum over documents: each document's gradients are those of the document alone
        for i, (row, a, b) in enumerate(docs):
            assert max_abs(out[row, :, a:b], out1[i, :, : b - a]) < TOL, (seed, row, a, b)
            for name, g, g1 in zip("qkv", grads, grads1):
                assert max_abs(g[row, :, a:b], g1[i, :, : b - a]) < TOL, (seed, name, row, a, b)
        padding = np.asarray(seg) == 0  # padding tokens get no gradient
        for g in grads[1:]:
            assert float(jnp.max(jnp.abs(jnp.where(padding[:, None, :, None], g, 0.0)))) == 0.0


def test_state_handed_on_is_the_last_documents():
    """final_state (parallel/chunkwise) and the recurrent form leave the state of each row's last document,
    equal to that document's state alone, with its next position."""
    q, k, v, seg, _, log_decay = _inputs(4)
    seg[0, -2:] = 0  # right padding after the last document
    last = [max((d for d in documents(seg) if d[0] == row), key=lambda d: d[1]) for row in range(seg.shape[0])]
    want = ret.final_state(alone(k, last), alone(v, last), log_decay, jnp.asarray(alone_mask(last, T)))
    fin = ret.final_state(k, v, log_decay, None, jnp.asarray(seg))
    _, rec = ret.recurrent_retention(q, k, v, log_decay, ret.empty_state(3, H, K, V), None, jnp.asarray(seg))
    for got in (fin, rec):
        assert max_abs(got.kv, want.kv) < TOL and max_abs(got.scale, want.scale) < TOL
        assert np.asarray(got.seqlen).tolist() == [b - a for _, a, b in last]


def test_documents_from_boundaries_and_targets():
    from nucleusx_jax.documents import document_segment_ids, next_token_targets

    bos, eos = 1, 2
    window = np.array([[7, 8, 2, 1, 9, 2, 1, 5],    # cut inside a document; BOS after EOS
                       [1, 5, 6, 2, 7, 2, 2, 8]])   # no BOS: a document starts after each EOS
    seg = np.asarray(document_segment_ids(window, bos, eos))
    assert seg.tolist() == [[1, 1, 1, 2, 2, 2, 3, 3], [1, 1, 1, 1, 2, 2, 3, 4]]
    assert np.asarray(document_segment_ids(window, None, eos)).tolist()[0] == [1, 1, 1, 2, 2, 2, 3, 3]
    targets = np.asarray(next_token_targets(window, seg))
    assert targets.tolist() == [[8, 2, -100, 9, 2, -100, 5], [5, 6, 2, -100, 2, -100, -100]]


# ------------------------------------------------------------------------------------------------ the model
@pytest.fixture(scope="module")
def model():
    from nucleusx_jax import NucleusX, NucleusXConfig

    cfg = NucleusXConfig(vocab_size=61, decoder_embed_dim=16, decoder_value_embed_dim=24, decoder_ffn_embed_dim=32,
                         decoder_layers=2, decoder_retention_heads=2, recurrent_chunk_size=4, pad_token_id=0,
                         use_lm_decay=True)
    m = NucleusX(cfg, seed=5)
    m.params = jax.tree.map(lambda p: p * 2.0, m.params)  # larger activations: the clamps are active
    return m


L = 17  # model rows: 17 tokens


def _packed_rows(seed: int):
    """input ids, segment ids and attention mask [3, L] of a random packing; row 0 always left-padded."""
    rng = np.random.default_rng(seed)
    seg = np.stack([np.concatenate([[0, 0], random_packing(rng, L - 2)])] + [random_packing(rng, L) for _ in range(2)])
    ret.check_segment_ids(seg, seg.shape)
    ids = np.where(seg != 0, rng.integers(1, 61, size=seg.shape), 0).astype(np.int32)
    return ids, seg, (seg != 0).astype(np.int32)


def _alone_ids(ids: np.ndarray, docs):
    out = np.zeros((len(docs), L), np.int32)
    for i, (row, a, b) in enumerate(docs):
        out[i, : b - a] = ids[row, a:b]
    return out, alone_mask(docs, L)


MODEL_FORMS = [("parallel", None, "xla"), ("recurrent", None, "xla"), ("chunkwise", 4, "xla"),
               ("chunkwise", 5, "xla"), pytest.param("chunkwise", 5, "pallas", marks=pytest.mark.slow)]


@pytest.mark.parametrize("mode,chunk,impl", MODEL_FORMS)
def test_model_packed_documents_equal_documents_alone(model, mode, chunk, impl):
    """Logits of every document (left padding, gaps and right padding included) against the document alone in
    the same form (chunkwise with segments: the parallel form, whose normalisation it uses); and for the XLA
    forms the parameter gradients of a loss over every real position."""
    from nucleusx_jax.modeling import RunOptions

    ids, seg, mask = _packed_rows(11)
    docs = documents(seg)
    alone_ids, alone_m = _alone_ids(ids, docs)
    ref_mode = "recurrent" if mode == "recurrent" else "parallel"
    opts = RunOptions.from_config(model.config, mode=mode, chunk_size=chunk or 4, impl=impl)
    ref_opts = RunOptions.from_config(model.config, mode=ref_mode)
    proj = jnp.asarray(np.random.default_rng(1).standard_normal((61,)), jnp.float32)

    def loss(params, ids, mask, seg, options):
        logits = model.module.apply({"params": params}, ids, mask, None, seg, options=options)[0]
        return jnp.sum(logits @ proj * mask), logits

    run = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnames="options")
    (_, packed), grads = run(model.params, ids, mask, seg, options=opts)
    (_, single), single_grads = run(model.params, alone_ids, alone_m, None, options=ref_opts)
    for i, (row, a, b) in enumerate(docs):
        assert max_abs(packed[row, a:b], single[i, : b - a]) < TOL, (row, a, b)
    if impl == "xla":
        for (path, g), g1 in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(single_grads)):
            err = float(jnp.max(jnp.abs(g - g1)) / (jnp.max(jnp.abs(g1)) + 1e-12))
            assert err < TOL, (jax.tree_util.keystr(path), err)


@pytest.mark.parametrize("threshold", [None, 4])  # the prompt in parallel, and chunkwise
def test_decode_after_packed_prompt_equals_last_document_alone(model, threshold):
    from nucleusx_jax.generate import generate

    ids, seg, mask = _packed_rows(3)
    kw = dict(max_new_tokens=6, output_logits=True, eos_token_id=[], prompt_chunkwise_threshold=threshold)
    out, logits = generate(model, ids, mask, segment_ids=seg, **kw)
    for row in range(3):
        ids_row = ids[row][seg[row] != 0]
        row_seg = seg[row][seg[row] != 0]
        last = ids_row[row_seg == row_seg[-1]][None]
        out1, logits1 = generate(model, last, **kw)
        assert out[row, L:].tolist() == out1[0, last.shape[1]:].tolist()
        assert max_abs(logits[row], logits1[0]) < TOL


def test_bad_segment_ids_raise_before_compiling(model):
    from conftest import count_traces

    ids, seg, mask = _packed_rows(5)
    past = model(ids, mask, segment_ids=seg, use_cache=True).past_key_values
    bad = [
        (seg[:, :-1], r"segment_ids has shape \(3, 16\) but input_ids has shape \(3, 17\)"),
        (np.where(seg == seg[1, -1], -seg, seg), r"segment_ids must be >= 0"),
        (np.concatenate([seg[:, :-1], seg[:, :1]], axis=1) * 0 + np.array([[1, 2, 1] + [0] * (L - 3)]),
         r"row 0: id 1 reappears after another segment"),
        (seg.astype(np.float32), r"segment_ids must hold integers"),
    ]
    with count_traces() as traces:
        for s, match in bad:
            with pytest.raises(ValueError, match=match):
                model(ids, segment_ids=s)
        with pytest.raises(ValueError, match=r"attention_mask and segment_ids disagree"):
            model(ids, np.ones_like(mask), segment_ids=seg)
        with pytest.raises(ValueError, match=r"different config or batch"):  # a cache of another row count
            model(ids[:2], segment_ids=seg[:2], forward_mode="recurrent", past_key_values=past)
    assert traces == []


@pytest.mark.parametrize("reset", [True, False])
def test_trainer_loss_keeps_documents_apart(reset):
    """The trainer's eval loss on a window of three packed documents: with the reset, the mean over every
    in-document prediction of each document run alone (no document predicts the next one's BOS); without it,
    the plain next-token loss of the whole window."""
    from nucleusx_jax import sharding as shd
    from nucleusx_jax.losses import next_token_loss
    from nucleusx_jax.modeling import RunOptions
    from nucleusx_jax.train.config import load_config
    from nucleusx_jax.train.step import make_trainer

    cfg = load_config(None, ["model.vocab_size=32", "model.decoder_embed_dim=16", "model.decoder_value_embed_dim=16",
                             "model.decoder_ffn_embed_dim=16", "model.decoder_layers=1",
                             "model.decoder_retention_heads=2", "model.forward_mode=chunkwise",
                             "model.recurrent_chunk_size=4", "model.z_loss_coeff=0", "model.bos_token_id=1",
                             "model.eos_token_id=2", "data.seq_len=12", "train.global_batch=1",
                             f"data.reset_at_document_boundaries={str(reset).lower()}"])
    trainer = make_trainer(cfg, shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]))
    params = trainer.init_state().params
    window = np.array([[5, 6, 7, 2, 1, 8, 9, 10, 11, 2, 1, 12, 13]], np.int32)
    got = float(trainer.eval_step(params, jax.device_put(window, trainer.batch_sharding)))

    def logits(ids, mask, mode):
        options = RunOptions.from_config(trainer.module.config, mode=mode)
        return trainer.module.apply({"params": params}, jnp.asarray(ids), mask, options=options)[0]

    if reset:  # chunkwise with segments normalises like parallel: the documents alone (one per row) in parallel
        docs = [window[0, :4], window[0, 4:10], window[0, 10:]]
        rows = np.zeros((3, 5), np.int32)
        for i, d in enumerate(docs):
            rows[i, : len(d) - 1] = d[:-1]
        out = jax.nn.log_softmax(logits(rows, jnp.asarray(rows != 0, jnp.int32), "parallel"))
        want = -float(np.mean(np.concatenate([out[i, np.arange(len(d) - 1), d[1:]] for i, d in enumerate(docs)])))
    else:
        want = float(next_token_loss(logits(window[:, :-1], None, "chunkwise"), jnp.asarray(window[:, 1:])))
    assert abs(got - want) < 1e-5 * abs(want)
