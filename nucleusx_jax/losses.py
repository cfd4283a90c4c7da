"""The losses of the heads, as the reference computes them: shifted next-token cross-entropy with the z-loss,
:func:`lm_head_loss` (the same without the whole ``[B, T, vocab]`` logits, the trainer's), and the
sequence-classification losses; :func:`head_loss` picks a head's.

Shapes: B batch, T length, E hidden size.
"""

from functools import partial
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp

from .configuration import NucleusXConfig
from .types import Array

F32 = jnp.float32


def causal_lm_loss(logits: Array, labels: Array, z_loss_coeff: float = 0.0) -> Array:
    """Mean next-token cross-entropy of ``logits[:, :-1]`` against ``labels[:, 1:]``, -100 ignored.

    With ``z_loss_coeff > 0`` adds the reference's z-loss: ``coeff * mean(log(logsumexp(logits)))`` over
    every shifted position (ignored ones included, as the reference does).
    """
    return next_token_loss(logits[:, :-1], labels[:, 1:], z_loss_coeff)


def next_token_loss(logits: Array, labels: Array, z_loss_coeff: float = 0.0) -> Array:
    """:func:`causal_lm_loss` on already aligned ``logits`` ``[B, T, vocab]`` and ``labels`` ``[B, T]``
    (``labels[:, t]`` is the token that ``logits[:, t]`` predicts); -100 ignored."""
    real = jnp.ones(labels.shape, bool)
    return _loss_terms(logits.astype(F32), labels, real, jnp.sum(labels != -100), labels.size, z_loss_coeff)[0]


def _loss_terms(logits: Array, labels: Array, real: Array, n_valid: Array, n_real: Any,
                z_loss_coeff: float) -> Tuple[Array, Array]:
    """(``sum over valid labels of (lse - picked logit) / n_valid`` plus the z-loss ``z * sum over real
    positions of log(lse) / n_real``, and ``lse``): logits ``[..., vocab]`` float32, labels and real ``[...]``."""
    valid = labels != -100
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
    loss = jnp.sum(jnp.where(valid, lse - picked, 0.0)) / n_valid
    if z_loss_coeff > 0:
        loss = loss + z_loss_coeff * jnp.sum(jnp.where(real, jnp.log(lse), 0.0)) / n_real
    return loss, lse


def _head_block(h: Array, kernel: Array, labels: Array, real: Array, n_valid: Array, n_real: Array,
                z_loss_coeff: float, want_grads: bool) -> Tuple[Array, Optional[Tuple[Array, Array]]]:
    """One block of :func:`lm_head_loss`: h ``[N, E]``, labels/real ``[N]`` -> (its share of the loss,
    (d loss / d h ``[N, E]``, d loss / d kernel ``[E, vocab]``) when ``want_grads``)."""
    logits = jnp.dot(h, kernel.astype(h.dtype), preferred_element_type=F32)  # [N, vocab]
    loss, lse = _loss_terms(logits, labels, real, n_valid, n_real, z_loss_coeff)
    if not want_grads:
        return loss, None
    # d loss / d logits = valid / n_valid * (softmax - onehot) + z * real / n_real * softmax / lse
    pick_weight = (labels != -100).astype(F32) / n_valid
    softmax_weight = pick_weight
    if z_loss_coeff > 0:
        softmax_weight = softmax_weight + z_loss_coeff * real.astype(F32) / (n_real * lse)
    g = jnp.exp(logits - lse[:, None]) * softmax_weight[:, None]
    onehot = jnp.arange(logits.shape[-1])[None, :] == labels[:, None]
    g = jnp.where(onehot, g - pick_weight[:, None], g).astype(h.dtype)
    dh = jnp.dot(g, kernel.astype(h.dtype).T, preferred_element_type=F32)
    dkernel = jnp.dot(h.T, g, preferred_element_type=F32)
    return loss, (dh, dkernel)


def _head_scan(hidden: Array, kernel: Array, labels: Array, z_loss_coeff: float, block_tokens: int,
               want_grads: bool, n_valid: Optional[Array]) -> Tuple[Array, Optional[Tuple[Array, Array]]]:
    """:func:`lm_head_loss` (and its gradients) as a ``lax.scan`` over blocks of positions. Block ``j`` holds the
    positions ``j mod n``: each device of a mesh splitting T (``sequence``) computes its share of every block."""
    batch, length, embed = hidden.shape
    block = max(1, min(length, block_tokens // batch))
    n = -(-length // block)
    pad = n * block - length
    real = jnp.pad(jnp.ones((batch, length), bool), ((0, 0), (0, pad)))
    labels = jnp.pad(labels, ((0, 0), (0, pad)), constant_values=-100)
    n_valid = jnp.sum(labels != -100) if n_valid is None else n_valid
    n_real = batch * length

    def blocks(x: Array) -> Array:  # [B, block * n, ...] -> [n, B * block, ...]: step j takes positions j mod n
        x = jnp.moveaxis(x.reshape(batch, block, n, *x.shape[2:]), 2, 0)
        return x.reshape(n, batch * block, *x.shape[3:])

    xs = (blocks(jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))), blocks(labels), blocks(real))

    def step(carry: Any, x: Tuple[Array, Array, Array]) -> Tuple[Any, Optional[Array]]:
        """carry: the loss so far, and with ``want_grads`` also d loss / d kernel so far; ys: d loss / d h."""
        loss, grads = _head_block(x[0], kernel, x[1], x[2], n_valid, n_real, z_loss_coeff, want_grads)
        if grads is None:
            return carry + loss, None
        return (carry[0] + loss, carry[1] + grads[1]), grads[0]

    zero = jnp.zeros((), F32)
    carry, dh = jax.lax.scan(step, (zero, jnp.zeros(kernel.shape, F32)) if want_grads else zero, xs)
    if not want_grads:
        return carry, None
    loss, dkernel = carry
    dh = jnp.moveaxis(dh.reshape(n, batch, block, embed), 0, 2).reshape(batch, n * block, embed)[:, :length]
    return loss, (dh.astype(hidden.dtype), dkernel.astype(kernel.dtype))


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def lm_head_loss(hidden: Array, kernel: Array, labels: Array, z_loss_coeff: float = 0.0,
                 block_tokens: int = 4096, n_valid: Optional[Array] = None) -> Array:
    """``next_token_loss(hidden @ kernel, labels, z_loss_coeff)`` without the whole ``[B, T, vocab]`` logits.

    hidden ``[B, T, E]``, kernel ``[E, vocab]``, labels ``[B, T]`` (-100 ignored). Positions go in blocks of
    about ``block_tokens`` (``B x block`` rows); under differentiation each block computes its gradients in
    the forward pass (the loss is the end of the graph), so the backward pass only scales them: the logits are
    neither kept nor recomputed, and memory is ``block_tokens x vocab`` instead of ``B x T x vocab``.
    ``n_valid`` (``[]``) replaces the count of valid labels that divides the cross-entropy sum: the trainer
    passes its share of the whole batch's count, so that accumulated microbatches equal one big batch.
    """
    return _head_scan(hidden, kernel, labels, z_loss_coeff, block_tokens, False, n_valid)[0]


def _lm_head_loss_fwd(hidden: Array, kernel: Array, labels: Array, z_loss_coeff: float, block_tokens: int,
                      n_valid: Optional[Array]) -> Tuple[Array, Tuple[Array, Array]]:
    loss, grads = _head_scan(hidden, kernel, labels, z_loss_coeff, block_tokens, True, n_valid)
    return loss, grads


def _lm_head_loss_bwd(z_loss_coeff: float, block_tokens: int, grads: Tuple[Array, Array],
                      ct: Array) -> Tuple[Array, Array, None, None]:
    dh, dkernel = grads
    # labels and n_valid: no cotangent
    return (ct * dh).astype(dh.dtype), (ct * dkernel).astype(dkernel.dtype), None, None


lm_head_loss.defvjp(_lm_head_loss_fwd, _lm_head_loss_bwd)


def sequence_classification_loss(logits: Array, labels: Array, problem_type: str) -> Array:
    """The reference's loss for ``problem_type``: regression (MSE), single- or multi-label classification."""
    logits = logits.astype(F32)
    if problem_type == "regression":
        if logits.shape[-1] == 1:
            return jnp.mean(jnp.square(jnp.squeeze(logits) - jnp.squeeze(labels).astype(F32)))
        return jnp.mean(jnp.square(logits - labels.astype(F32)))
    if problem_type == "single_label_classification":
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, labels.reshape(-1, 1).astype(jnp.int32), axis=-1)[:, 0]
        return jnp.mean(lse - picked)
    if problem_type == "multi_label_classification":
        y = labels.astype(F32)
        return jnp.mean(jnp.maximum(logits, 0) - logits * y + jnp.log1p(jnp.exp(-jnp.abs(logits))))
    raise ValueError(f"problem_type={problem_type!r} is invalid: must be regression, "
                     "single_label_classification or multi_label_classification")


def head_loss(head: str, config: NucleusXConfig, out: Array, labels: Array) -> Array:
    """The reference's loss of a head: shifted cross-entropy (plus z-loss) for the causal LM; regression,
    single- or multi-label classification (``config.problem_type``, else inferred as the reference does)."""
    if head == "causal_lm":
        return causal_lm_loss(out, labels, config.z_loss_coeff)
    problem = config.problem_type
    if problem is None:
        if config.num_labels == 1:
            problem = "regression"
        elif jnp.issubdtype(labels.dtype, jnp.integer):
            problem = "single_label_classification"
        else:
            problem = "multi_label_classification"
    return sequence_classification_loss(out, labels, problem)
