"""An independent float64 NumPy computation of NucleusX's parallel form (pre-norm, no deepnorm, untied head),
written from the reference's math, not from our modules: it reads the PyTorch state dict (``[out, in]``
weights) and config.json directly. Used where an epsilon matters (tests/test_epsilons.py), where it gives the
true logits to compare our float32 ones with.

Shapes: B batch, T length, E embed dim, H heads, K key head dim, V value head dim."""

from typing import Dict

import numpy as np


def rms_norm(x: np.ndarray, eps: float, weight: np.ndarray = None) -> np.ndarray:
    """``x / sqrt(mean(x**2) + eps)`` over the last axis, times ``weight`` when given."""
    y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return y if weight is None else y * weight


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def rotate(x: np.ndarray, angle: np.ndarray) -> np.ndarray:
    """xPos-free rotation of ``[B, H, T, K]``: pairs ``(x[2i], x[2i+1])`` rotated by ``t * angle``."""
    theta = np.arange(x.shape[2])[:, None] * angle[None]  # [T, K]
    turned = np.stack([-x[..., 1::2], x[..., 0::2]], axis=-1).reshape(x.shape)
    return x * np.cos(theta) + turned * np.sin(theta)


def retention(q: np.ndarray, k: np.ndarray, v: np.ndarray, heads: int) -> np.ndarray:
    """Parallel retention ``[B, H, T, V]``: decay ``gamma_h = 1 - 2**(-5 - h)``, rows of the decay mask divided
    by the square root of their sum, then by ``max(|row sum of q k^T D|, 1)``."""
    t = q.shape[2]
    gamma = 1.0 - 2.0 ** (-5.0 - np.arange(heads))
    i, j = np.arange(t)[:, None], np.arange(t)[None]
    d = np.where(j <= i, gamma[:, None, None] ** np.maximum(i - j, 0), 0.0)  # [H, T, T]
    d = d / np.sqrt(d.sum(-1, keepdims=True))
    r = np.einsum("bhik,bhjk->bhij", q, k) * d
    r = r / np.maximum(np.abs(r.sum(-1, keepdims=True)), 1.0)
    return np.einsum("bhij,bhjv->bhiv", r, v)


def logits(state: Dict[str, np.ndarray], config: dict, input_ids: np.ndarray) -> np.ndarray:
    """Causal-LM logits ``[B, T, vocab]`` float64 of ``input_ids`` ``[B, T]`` (no padding)."""
    assert config["decoder_normalize_before"] and not config["deepnorm"] and not config["use_lm_decay"]
    assert config["activation_fn"] in ("swish", "silu") and not config["tie_word_embeddings"]
    w = {k: np.asarray(v, np.float64) for k, v in state.items()}
    e, heads, layers = config["decoder_embed_dim"], config["decoder_retention_heads"], config["decoder_layers"]
    kdim, vdim = e // heads, config["decoder_value_embed_dim"] // heads
    eps, geps = config["rms_norm_eps"], config["groupnorm_eps"]
    angle = np.repeat(1.0 / 10000.0 ** np.linspace(0.0, 1.0, kdim // 2), 2)
    x = w["model.embed_tokens.weight"][input_ids] * (1.0 if config["no_scale_embedding"] else np.sqrt(e))
    if config["rms_norm_embedding"]:
        x = rms_norm(x, eps, w["model.rms_norm_embedding.weight"])
    b, t = input_ids.shape
    for n in range(layers):
        p = f"model.layers.{n}."
        h = rms_norm(x, eps, w[p + "retention_rms_norm.weight"])
        q, k, v, g = (h @ w[p + f"retention.{m}_proj.weight"].T for m in "qkvg")
        split = lambda a, d: a.reshape(b, t, heads, d).transpose(0, 2, 1, 3)  # noqa: E731
        q, k, v = rotate(split(q, kdim), angle), rotate(split(k, kdim) * kdim**-0.5, angle), split(v, vdim)
        out = rms_norm(retention(q, k, v, heads), geps).transpose(0, 2, 1, 3).reshape(b, t, heads * vdim)
        x = x + (silu(g) * out) @ w[p + "retention.out_proj.weight"].T
        h = rms_norm(x, eps, w[p + "final_rms_norm.weight"])
        ffn = silu(h @ w[p + "ffn.fc1.weight"].T) * (h @ w[p + "ffn.gate.weight"].T)
        x = x + ffn @ w[p + "ffn.fc2.weight"].T
    x = rms_norm(x, eps, w["model.rms_norm.weight"])
    return x @ w["lm_head.weight"].T
