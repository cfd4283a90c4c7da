"""The server's sampler (``nucleusx_jax.serve.engine.sample``) draws from the distribution its settings
define: token frequencies over many seeded draws equal the probabilities computed here independently
(softmax of logits / temperature, then top-k, then the smallest top-p set, renormalised), within 5 standard
errors of the sample size; filtered-out tokens are never drawn."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nucleusx_jax.serve import engine

LOGITS = np.array([2.0, 1.5, 1.0, 0.6, 0.2, -0.5, -1.0, -3.0], np.float32)
# (temperature, top_k, top_p): plain, cold, hot, top-k, mid-range top-p, all three
SETTINGS = [(1.0, 0, 1.0), (0.5, 0, 1.0), (2.0, 0, 1.0), (1.0, 3, 1.0), (1.0, 0, 0.7), (0.7, 5, 0.8)]
DRAWS = 4000  # per setting
SIGMAS = 5  # the bound on |frequency - probability| in standard errors sqrt(p (1 - p) / DRAWS)


def probabilities(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """The distribution ``[V]`` float64 that the settings define."""
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-z, kind="stable")
    if top_k > 0:
        p[order[top_k:]] = 0
        p /= p.sum()
    if top_p < 1:
        before = np.cumsum(p[order]) - p[order]  # mass of the more likely tokens
        p[order[before >= top_p]] = 0
        p /= p.sum()
    return p


def frequencies(logits: np.ndarray, settings, draws: int) -> np.ndarray:
    """``[len(settings), V]``: how often each token was drawn, ``draws`` seeded draws per setting, in one
    call of the server's sampler (one row per draw, each with its own seed)."""
    n = len(settings) * draws
    column = lambda i, dtype: np.repeat(np.asarray([s[i] for s in settings], dtype), draws)  # noqa: E731
    rows = engine.Rows(np.ones(n, bool), column(0, np.float32), column(1, np.int32), column(2, np.float32),
                       np.arange(n, dtype=np.uint32), np.zeros(n, np.uint32), np.zeros(n, np.uint32),
                       np.zeros(n, bool))
    tokens = np.asarray(jax.jit(engine.sample)(jnp.broadcast_to(jnp.asarray(logits), (n, len(logits))), rows,
                                               jnp.zeros(n, jnp.int32)))
    counts = np.stack([np.bincount(t, minlength=len(logits)) for t in tokens.reshape(len(settings), draws)])
    return counts / draws


def test_probabilities_of_the_settings():
    """The independent computation itself, on cases worked by hand."""
    np.testing.assert_allclose(probabilities(np.log(np.array([4.0, 3, 2, 1])), 1.0, 0, 1.0), [0.4, 0.3, 0.2, 0.1])
    np.testing.assert_allclose(probabilities(np.log(np.array([4.0, 3, 2, 1])), 1.0, 2, 1.0), [4 / 7, 3 / 7, 0, 0])
    np.testing.assert_allclose(probabilities(np.log(np.array([4.0, 3, 2, 1])), 1.0, 0, 0.7), [4 / 7, 3 / 7, 0, 0])
    np.testing.assert_allclose(probabilities(np.log(np.array([4.0, 3, 2, 1])), 1.0, 0, 0.71), [4 / 9, 3 / 9, 2 / 9, 0])
    np.testing.assert_allclose(probabilities(np.log(np.array([1.0, 4])), 0.5, 0, 1.0), [1 / 17, 16 / 17])


@pytest.mark.parametrize("setting", SETTINGS, ids=[f"T{t}-k{k}-p{p}" for t, k, p in SETTINGS])
def test_token_frequencies_follow_the_filtered_probabilities(setting):
    got = frequencies(LOGITS, [setting], DRAWS)[0]
    want = probabilities(LOGITS, *setting)
    bound = SIGMAS * np.sqrt(want * (1 - want) / DRAWS)
    assert np.all(got[want == 0] == 0), (setting, got, want)  # filtered out: never drawn
    assert np.all(np.abs(got - want) <= bound), (setting, got.round(4), want.round(4), bound.round(4))
