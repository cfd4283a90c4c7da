"""Flax linen modules of NucleusX: norms, multi-scale retention, GLU, decoder layer, model and heads.

The modules are thin layers over :mod:`nucleusx_jax.retention`. Parameter names mirror the PyTorch
state dict (``layers.3.retention.q_proj.weight`` is ``layers_3/retention/q_proj/kernel`` here; with the config's
``scan_layers`` the layers run under ``nn.scan`` and that is row 3 of ``layers/retention/q_proj/kernel``
``[L, E, E]``), and every parameter carries logical axis names (``layers``, ``embed``, ``heads``, ``mlp``,
``vocab``, ``norm``) for sharding.

How a call runs (forward form, chunk size, kernel, returned state, hidden states, dropout) travels as one
frozen, hashable :class:`RunOptions`, keyword-only; its defaults come from the config.

Shapes: B batch, T length, E ``decoder_embed_dim``, H heads, K key head dim, V value head dim.
"""

import dataclasses
import math
from functools import partial
from typing import Any, Optional, Sequence, Tuple, Union

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from . import kernels
from . import retention as ret
from . import sequence_parallel
from .activations import ACTIVATIONS
from .configuration import ForwardMode, NucleusXConfig, RetentionImpl
from .losses import lm_head_loss
from .types import Array, Cache, CarriedCache

F32 = jnp.float32
# logical names of the residual stream [B, T, E]; a no-op outside ``nn.logical_axis_rules`` (see sharding.py)
ACTIVATION_AXES = ("batch", "length", "act_embed")
# the decoder layers' name: ``layers_<i>`` each, or with ``scan_layers`` one ``layers`` whose parameters are
# stacked on a leading axis of that logical name (see :mod:`nucleusx_jax.weights` for the conversions)
LAYERS = "layers"


@flax.struct.dataclass
class RunOptions:
    """How one call runs; frozen and hashable, with no array leaves (so ``jit`` and ``nn.remat`` treat it as
    static). Build it with :meth:`from_config`: the config is the one source of every default.

    ``mode``: the retention form; ``chunk_size``: the chunkwise form's chunk length; ``impl``: the chunkwise
    kernel; ``return_state``: return each layer's recurrent state (the cache); ``hidden_states``: return every
    layer's input and the final output; ``deterministic``: no dropout or drop path.

    These are the package's one name of each knob; ``forward_mode``, ``recurrent_chunk_size`` and ``use_cache``
    (the same three) stay at the public edge: ``config.json``, ``NucleusX.__call__``, the HF adapter.
    """

    mode: ForwardMode = flax.struct.field(pytree_node=False)
    chunk_size: int = flax.struct.field(pytree_node=False)
    impl: RetentionImpl = flax.struct.field(pytree_node=False, default=RetentionImpl.XLA)
    return_state: bool = flax.struct.field(pytree_node=False, default=False)
    hidden_states: bool = flax.struct.field(pytree_node=False, default=False)
    deterministic: bool = flax.struct.field(pytree_node=False, default=True)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", ForwardMode.parse(self.mode))
        object.__setattr__(self, "impl", RetentionImpl.parse(self.impl))
        chunk = self.chunk_size
        if not isinstance(chunk, (int, np.integer)) or isinstance(chunk, bool) or chunk < 1:
            raise ValueError(f"chunk_size={chunk!r} is invalid: must be an integer >= 1")
        object.__setattr__(self, "chunk_size", int(chunk))
        for name in ("return_state", "hidden_states", "deterministic"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: must be True or False")
            object.__setattr__(self, name, bool(getattr(self, name)))

    @classmethod
    def from_config(cls, config: NucleusXConfig, **overrides: Any) -> "RunOptions":
        """The config's ``forward_mode``, ``recurrent_chunk_size`` and ``retention_impl``, then ``overrides``
        (field names of this class; an unknown name is a ``TypeError``)."""
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(f"unknown run option(s) {unknown}; valid: "
                            f"{', '.join(f.name for f in dataclasses.fields(cls))}")
        base = dict(mode=config.forward_mode, chunk_size=config.recurrent_chunk_size, impl=config.retention_impl)
        return cls(**{**base, **overrides})


def _param_init(init: Any, axes: Sequence[str]) -> Any:
    return nn.with_logical_partitioning(init, tuple(axes))


def xavier_uniform(gain: float) -> Any:
    """torch ``xavier_uniform_`` with ``gain`` (flax kernels are ``[in, out]``, fans are symmetric)."""
    return nn.initializers.variance_scaling(gain**2, "fan_avg", "uniform")


def deepnorm_init_scale(config: NucleusXConfig) -> float:
    """DeepNet's ``beta = (8 L)^(-1/4)`` for a decoder-only stack with ``deepnorm``, else 1. As torchscale's
    RetNet decoder (the reference's intent), the initial ``v_proj``, ``out_proj``, ``fc1`` and ``fc2`` weights
    are multiplied by it, once."""
    return math.pow(8.0 * config.decoder_layers, -0.25) if config.deepnorm else 1.0


def scaled(init: Any, factor: float) -> Any:
    """``init`` times ``factor``."""
    if factor == 1.0:
        return init
    return lambda key, shape, dtype=F32: init(key, shape, dtype) * jnp.asarray(factor, dtype)


def embedding_init(std: float, pad_token_id: Optional[int]) -> Any:
    """Normal(0, std) rows, with the padding row zeroed like torch's ``padding_idx``."""

    def init(key: Array, shape: Tuple[int, ...], dtype: Any = F32) -> Array:
        w = std * jax.random.normal(key, shape, dtype)
        return w if pad_token_id is None else w.at[pad_token_id].set(0)

    return init


class RMSNorm(nn.Module):
    """RMSNorm over the last axis, computed in float32; ``use_weight=False`` gives the per-head group norm."""

    eps: float
    use_weight: bool = True
    dtype: Any = F32
    param_dtype: Any = F32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        y = x.astype(F32)
        y = y * jax.lax.rsqrt(jnp.mean(jnp.square(y), axis=-1, keepdims=True) + self.eps)
        if self.use_weight:
            w = self.param("weight", _param_init(nn.initializers.ones, ("norm",)), (x.shape[-1],), self.param_dtype)
            y = y * w.astype(F32)
        return y.astype(self.dtype)


class DropPath(nn.Module):
    """Stochastic depth: zero a whole sample's branch with probability ``rate`` (a float or ``[]`` array, so
    a scanned layer stack can pass each layer's), rescale the rest."""

    @nn.compact
    def __call__(self, x: Array, rate: Any, deterministic: bool) -> Array:
        if deterministic:
            return x
        keep = 1.0 - rate
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(mask, x / keep, 0.0).astype(x.dtype)


class Dense(nn.Dense):
    """A bias-free ``nn.Dense`` applied to the input flattened to ``[N, in]``.

    Same parameters; on XLA:CPU this keeps the backward pass's weight-gradient transposes two-dimensional,
    which are several times faster than the three-dimensional ones of a ``[B, T, in]`` input (NOTES.md).
    """

    def __call__(self, x: Array) -> Array:
        y = super().__call__(x.reshape(-1, x.shape[-1]))
        return y.reshape(*x.shape[:-1], self.features)


def _dense(features: int, name: str, init: Any, axes: Sequence[str], dtype: Any, param_dtype: Any) -> nn.Dense:
    return Dense(features, use_bias=False, dtype=dtype, param_dtype=param_dtype, name=name,
                 kernel_init=_param_init(init, axes))


class MultiScaleRetention(nn.Module):
    """Projections, rotation, one of the three retention forms, per-head RMSNorm, swish gate, output."""

    config: NucleusXConfig
    dtype: Any = F32
    param_dtype: Any = F32

    @nn.compact
    def __call__(
        self,
        x: Array,
        positions: Array,
        mask: Optional[Array],
        state: Optional[ret.RetentionState],
        segment_ids: Optional[Array],
        *,
        options: RunOptions,
    ) -> Tuple[Array, Optional[ret.RetentionState]]:
        """x ``[B, T, E]``, positions ``[T]`` or ``[B, T]``, mask and segment_ids ``[B, T]`` ->
        ``([B, T, E], state or None)``. ``state``: a :class:`~nucleusx_jax.retention.RetentionState` (recurrent
        form), or a :class:`~nucleusx_jax.retention.CarriedState` (chunkwise form: the window continues it and
        hands on its own CarriedState)."""
        cfg = self.config
        heads, kdim, vdim = cfg.decoder_retention_heads, cfg.key_head_dim, cfg.value_head_dim
        embed, value = cfg.decoder_embed_dim, cfg.decoder_value_embed_dim
        init = xavier_uniform(cfg.initializer_factor)
        beta = deepnorm_init_scale(cfg)
        proj = lambda n, name, axes, scale=1.0: _dense(  # noqa: E731
            n, name, scaled(init, scale), axes, self.dtype, self.param_dtype)
        q = proj(embed, "q_proj", ("embed", "heads"))(x)
        k = proj(embed, "k_proj", ("embed", "heads"))(x)
        v = proj(value, "v_proj", ("embed", "heads"), beta)(x)
        g = proj(value, "g_proj", ("embed", "heads"))(x)
        batch, length = x.shape[:2]
        split = lambda t, d: t.reshape(batch, length, heads, d).transpose(0, 2, 1, 3)  # noqa: E731
        q, k, v = split(q, kdim), split(k, kdim) * (kdim**-0.5), split(v, vdim)
        angle = jnp.asarray(ret.angle_table(kdim))
        log_decay = jnp.asarray(ret.log_decay_table(heads, cfg.use_lm_decay))
        q, k = ret.rotate(q, positions, angle), ret.rotate(k, positions, angle)

        new_state, norm = None, cfg.chunkwise_normalization
        if isinstance(state, ret.CarriedState):  # a window continuing the one before it (chunkwise only)
            if options.mode is not ForwardMode.CHUNKWISE:
                raise ValueError(f"a CarriedState cache needs forward_mode='chunkwise', got {options.mode.value!r}")
            if sequence_parallel.sequence_size() > 1:
                out, new_state = sequence_parallel.chunkwise_carry(q, k, v, log_decay, options.chunk_size, state, mask,
                                                                   segment_ids, norm, impl=options.impl)
            else:
                carry = kernels.sharded_chunkwise_carry if options.impl is RetentionImpl.PALLAS else ret.chunkwise_carry
                out, new_state = carry(q, k, v, log_decay, options.chunk_size, state, mask, segment_ids, norm)
        elif options.mode is ForwardMode.RECURRENT:
            if state is None:
                state = ret.empty_state(batch, heads, kdim, vdim)
            out, new_state = ret.recurrent_retention(q, k, v, log_decay, state, mask, segment_ids)
        else:
            if options.mode is ForwardMode.PARALLEL:
                out = ret.parallel_retention(q, k, v, log_decay, mask, segment_ids)
            elif sequence_parallel.sequence_size() > 1:  # T split over the mesh's `sequence` axis
                out = sequence_parallel.chunkwise_retention(q, k, v, log_decay, options.chunk_size, mask,
                                                            segment_ids, norm, impl=options.impl)
            elif options.impl is RetentionImpl.PALLAS:
                out = kernels.sharded_chunkwise_retention(q, k, v, log_decay, options.chunk_size, mask,
                                                          segment_ids, norm)
            else:
                out = ret.chunkwise_retention(q, k, v, log_decay, options.chunk_size, mask, segment_ids, norm)
            if options.return_state:
                new_state = ret.final_state(k, v, log_decay, mask, segment_ids)
        normed = RMSNorm(cfg.groupnorm_eps, use_weight=False, dtype=self.dtype, name="group_norm")(out)
        normed = normed.transpose(0, 2, 1, 3).reshape(batch, length, value)
        gated = (jax.nn.silu(g.astype(F32)) * normed.astype(F32)).astype(self.dtype)
        out = proj(embed, "out_proj", ("heads", "embed"), beta)(gated)
        return out, (new_state if options.return_state else None)


class GLU(nn.Module):
    """``fc2(act(fc1(x)) * gate(x))`` with activation dropout and output dropout."""

    config: NucleusXConfig
    dtype: Any = F32
    param_dtype: Any = F32

    @nn.compact
    def __call__(self, x: Array, deterministic: bool) -> Array:
        cfg = self.config
        init = nn.initializers.normal(cfg.initializer_range)
        deep = scaled(init, deepnorm_init_scale(cfg))
        ffn, embed = cfg.decoder_ffn_embed_dim, cfg.decoder_embed_dim
        gate = _dense(ffn, "gate", init, ("embed", "mlp"), self.dtype, self.param_dtype)(x)
        h = _dense(ffn, "fc1", deep, ("embed", "mlp"), self.dtype, self.param_dtype)(x)
        h = ACTIVATIONS[cfg.activation_fn](h.astype(F32)).astype(self.dtype) * gate
        h = nn.Dropout(cfg.activation_dropout)(h, deterministic=deterministic)
        h = _dense(embed, "fc2", deep, ("mlp", "embed"), self.dtype, self.param_dtype)(h)
        return nn.Dropout(cfg.dropout)(h, deterministic=deterministic)


def drop_path_rates(config: NucleusXConfig) -> np.ndarray:
    """Each layer's stochastic-depth rate ``[L]``: 0 rising linearly to ``drop_path_rate`` (the reference's)."""
    return np.linspace(0, config.drop_path_rate, config.decoder_layers)


class DecoderLayer(nn.Module):
    """Retention block then GLU block, each residual (``residual * alpha + x``), pre- or post-norm.

    What differs between layers is passed in (``drop_path_rate``), so one layer can be scanned over depth."""

    config: NucleusXConfig
    dtype: Any = F32
    param_dtype: Any = F32

    @nn.compact
    def __call__(
        self,
        x: Array,
        positions: Array,
        mask: Optional[Array],
        state: Optional[ret.RetentionState],
        segment_ids: Optional[Array],
        drop_path_rate: Any,
        *,
        options: RunOptions,
    ) -> Tuple[Array, Optional[ret.RetentionState]]:
        """x ``[B, T, E]``, positions ``[T]`` or ``[B, T]``, mask and segment_ids ``[B, T]``, this layer's
        ``drop_path_rate`` (float or ``[]``) -> ``([B, T, E], state or None)``."""
        cfg = self.config
        deterministic = options.deterministic
        alpha = math.pow(2.0 * cfg.decoder_layers, 0.25) if cfg.deepnorm else 1.0
        no_drop_path = deterministic or cfg.drop_path_rate == 0.0
        drop_path = partial(DropPath(), rate=drop_path_rate, deterministic=no_drop_path)
        norm_kw = dict(eps=cfg.rms_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)
        pre = cfg.decoder_normalize_before
        retention_norm = RMSNorm(name="retention_rms_norm", **norm_kw)
        final_norm = RMSNorm(name="final_rms_norm", **norm_kw)

        residual = x
        h = retention_norm(x) if pre else x
        h, new_state = MultiScaleRetention(cfg, self.dtype, self.param_dtype, name="retention")(
            h, positions, mask, state, segment_ids, options=options
        )
        h = nn.Dropout(cfg.dropout)(h, deterministic=deterministic)
        x = residual * alpha + drop_path(h)
        if not pre:
            x = retention_norm(x)

        residual = x
        h = final_norm(x) if pre else x
        h = GLU(cfg, self.dtype, self.param_dtype, name="ffn")(h, deterministic)
        x = residual * alpha + drop_path(h)
        if not pre:
            x = final_norm(x)
        return x.astype(self.dtype), new_state


class NucleusXModule(nn.Module):
    """The decoder: embedding (scaled, optionally RMS-normed), the layers, the final RMSNorm (pre-norm).

    ``gradient_checkpointing`` rematerialises each layer in the backward pass; ``remat_policy`` names a
    ``jax.checkpoint_policies`` member deciding what is saved (None: nothing, recompute the whole layer).
    With ``config.scan_layers`` the layers are one ``nn.scan`` (compile time independent of depth), remat
    applying inside it per layer; the cache and hidden states are per-layer tuples either way.
    """

    config: NucleusXConfig
    dtype: Any = F32
    param_dtype: Any = F32
    gradient_checkpointing: bool = False
    remat_policy: Optional[str] = None

    def setup(self) -> None:
        cfg = self.config
        self.embed_tokens = nn.Embed(
            cfg.vocab_size, cfg.decoder_embed_dim, dtype=self.dtype, param_dtype=self.param_dtype,
            embedding_init=_param_init(embedding_init(cfg.initializer_range, cfg.pad_token_id), ("vocab", "embed")),
        )
        norm_kw = dict(eps=cfg.rms_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)
        self.rms_norm_embedding = RMSNorm(**norm_kw) if cfg.rms_norm_embedding else None
        layer_cls = DecoderLayer
        if self.gradient_checkpointing:
            policy = getattr(jax.checkpoint_policies, self.remat_policy) if self.remat_policy else None
            # RunOptions has no array leaves: static. Under scan the loop already keeps XLA from merging the
            # recomputation into the forward pass, so CSE prevention is not needed there.
            layer_cls = nn.remat(DecoderLayer, policy=policy, prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:  # one layer whose parameters have a leading [L] axis, named "layers"
            self.layers = layer_cls(cfg, self.dtype, self.param_dtype, name=LAYERS)
        else:
            self.layers = [layer_cls(cfg, self.dtype, self.param_dtype, name=f"{LAYERS}_{i}")
                           for i in range(cfg.decoder_layers)]
        self.rms_norm = RMSNorm(**norm_kw) if cfg.decoder_normalize_before else None
        self.embed_dropout = nn.Dropout(cfg.dropout)

    def __call__(
        self,
        input_ids: Array,
        attention_mask: Optional[Array] = None,
        past_key_values: Optional[Cache] = None,
        segment_ids: Optional[Array] = None,
        *,
        options: Optional[RunOptions] = None,
    ) -> Tuple[Array, Optional[Union[Cache, CarriedCache]], Optional[Tuple[Array, ...]]]:
        """input_ids ``[B, T]``, attention_mask ``[B, T]`` (0 marks left padding), past_key_values (one state
        per layer: :class:`~nucleusx_jax.retention.RetentionState` for the recurrent form,
        :class:`~nucleusx_jax.retention.CarriedState` for the chunkwise one, whose windows so continue one
        another exactly; a row whose window begins with padding starts a new document there), segment_ids
        ``[B, T]`` (documents packed in a row, 0 = padding; see :mod:`nucleusx_jax.retention`) -> (last hidden
        state ``[B, T, E]``, cache, hidden states).

        With segment_ids, rotation positions restart at 0 in each document (the first continues the cache's
        position) and the cache returned is that of each row's last document.

        ``options`` default to :meth:`RunOptions.from_config`. The cache is returned with
        ``options.return_state``; the hidden states with ``options.hidden_states``, following the reference:
        the embedding output, each layer's input after it, and the final normalised output (L + 1 arrays).
        """
        cfg = self.config
        options = options if options is not None else RunOptions.from_config(cfg)
        deterministic = options.deterministic
        scale = 1.0 if cfg.no_scale_embedding else math.sqrt(cfg.decoder_embed_dim)
        x = self.embed_tokens(input_ids) * scale
        if self.rms_norm_embedding is not None:
            x = self.rms_norm_embedding(x)
        x = nn.with_logical_constraint(self.embed_dropout(x, deterministic=deterministic), ACTIVATION_AXES)
        offset = 0 if past_key_values is None else _position_offset(past_key_values[0], attention_mask, segment_ids)
        if segment_ids is not None:
            starts = sequence_parallel.segment_starts(segment_ids)
            positions = ret.segment_positions(segment_ids, offset, attention_mask, starts)[0]  # [B, T]
        elif jnp.ndim(offset):  # a cache left by segments holds a position per row: [B, T]
            positions = offset[:, None] + jnp.arange(input_ids.shape[1])
        else:  # [T]
            positions = offset + jnp.arange(input_ids.shape[1])

        def step(layer: nn.Module, x: Array, per_layer: Tuple[Any, Any]) -> Tuple[Array, Tuple[Any, Any]]:
            """One layer: x ``[B, T, E]``, (its state or None, its drop-path rate) -> (output, (new state or
            None, its input x when hidden states are wanted))."""
            state, rate = per_layer
            y, new_state = layer(x, positions, attention_mask, state, segment_ids, rate, options=options)
            return nn.with_logical_constraint(y, ACTIVATION_AXES), (new_state, x if options.hidden_states else None)

        rates = drop_path_rates(cfg)
        if cfg.scan_layers:
            past = None if past_key_values is None else jax.tree.map(lambda *s: jnp.stack(s), *past_key_values)
            scan = nn.scan(step, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                           length=cfg.decoder_layers, metadata_params={nn.PARTITION_NAME: LAYERS})
            x, stacked = scan(self.layers, x, (past, jnp.asarray(rates, F32)))
            per_layer = [jax.tree.map(lambda a: a[i], stacked) for i in range(cfg.decoder_layers)]
        else:
            per_layer = []
            for i, layer in enumerate(self.layers):
                state = past_key_values[i] if past_key_values is not None else None
                x, out = step(layer, x, (state, float(rates[i])))
                per_layer.append(out)
        if self.rms_norm is not None:
            x = self.rms_norm(x)
        cache = tuple(out[0] for out in per_layer) if options.return_state else None
        hidden = tuple(out[1] for out in per_layer) + (x,) if options.hidden_states else None
        return x, cache, hidden

    def attend(self, x: Array) -> Array:
        """Logits through the (tied) embedding matrix: ``[B, T, E] -> [B, T, vocab]`` (on ``[N, E]``, like
        :class:`Dense`)."""
        return self.embed_tokens.attend(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)


def _position_offset(state: Any, mask: Optional[Array], segment_ids: Optional[Array]) -> Array:
    """The rotation position the call's first document continues from: a RetentionState's ``seqlen``
    (``[]`` or ``[B]``); a CarriedState's ``count`` ``[B]``, or 0 where the window's first token is padding
    (then, as in :func:`~nucleusx_jax.retention.chunkwise_carry`, the row starts a new document)."""
    if not isinstance(state, ret.CarriedState):
        return state.seqlen
    real = ret.real_tokens(mask, segment_ids)
    return state.count if real is None else jnp.where(real[:, 0], state.count, 0)


class NucleusXForCausalLMModule(nn.Module):
    """Decoder plus the LM head (or the tied embedding when ``tie_word_embeddings``)."""

    config: NucleusXConfig
    dtype: Any = F32
    param_dtype: Any = F32
    gradient_checkpointing: bool = False
    remat_policy: Optional[str] = None

    def setup(self) -> None:
        cfg = self.config
        self.model = NucleusXModule(cfg, self.dtype, self.param_dtype, self.gradient_checkpointing,
                                    self.remat_policy)
        if not cfg.tie_word_embeddings:
            self.lm_head = _dense(cfg.vocab_size, "lm_head", nn.initializers.normal(cfg.lm_head_initializer_range),
                                  ("embed", "vocab"), self.dtype, self.param_dtype)

    def __call__(self, input_ids: Array, attention_mask: Optional[Array] = None,
                 past_key_values: Optional[Cache] = None, segment_ids: Optional[Array] = None, *,
                 options: Optional[RunOptions] = None) -> Tuple[Array, Any, Any]:
        """Same arguments as :class:`NucleusXModule`; returns (logits ``[B, T, vocab]``, cache, hidden)."""
        x, cache, hidden = self.model(input_ids, attention_mask, past_key_values, segment_ids, options=options)
        return self.lm_logits(x), cache, hidden

    def lm_logits(self, x: Array) -> Array:
        """The LM head on hidden states: ``[..., E] -> [..., vocab]`` (the tied embedding when tied)."""
        return self.model.attend(x) if self.config.tie_word_embeddings else self.lm_head(x)

    def next_token_loss(self, input_ids: Array, labels: Array, attention_mask: Optional[Array] = None,
                        segment_ids: Optional[Array] = None, *, options: Optional[RunOptions] = None,
                        z_loss_coeff: Optional[float] = None, n_valid: Optional[Array] = None) -> Array:
        """:func:`~nucleusx_jax.losses.next_token_loss` of the logits of ``input_ids`` ``[B, T]`` against
        ``labels`` ``[B, T]``, computed by :func:`~nucleusx_jax.losses.lm_head_loss` (the ``[B, T, vocab]`` logits
        never exist whole). ``z_loss_coeff`` defaults to the config's; ``n_valid`` (see ``lm_head_loss``) to the
        count of valid labels; other arguments as :class:`NucleusXModule`."""
        x, _, _ = self.model(input_ids, attention_mask, segment_ids=segment_ids, options=options)
        return self._head_loss(x, labels, z_loss_coeff, n_valid)

    def carried_next_token_loss(self, input_ids: Array, labels: Array, past_key_values: CarriedCache,
                                segment_ids: Optional[Array] = None, *, options: RunOptions,
                                n_valid: Optional[Array] = None) -> Tuple[Array, CarriedCache]:
        """(:meth:`next_token_loss`, the next :class:`~nucleusx_jax.retention.CarriedState` cache) of a window
        ``[B, T]`` continuing ``past_key_values`` (one CarriedState per layer); ``options`` chunkwise with
        ``return_state``. Gradients reach the incoming states."""
        if options.mode is not ForwardMode.CHUNKWISE or not options.return_state:
            raise ValueError(f"carried_next_token_loss needs options with mode=chunkwise and return_state=True, got "
                             f"mode={options.mode.value} and return_state={options.return_state}")
        x, cache, _ = self.model(input_ids, None, past_key_values, segment_ids, options=options)
        return self._head_loss(x, labels, None, n_valid), cache

    def _head_loss(self, x: Array, labels: Array, z_loss_coeff: Optional[float], n_valid: Optional[Array]) -> Array:
        """:func:`~nucleusx_jax.losses.lm_head_loss` of the hidden states ``x`` ``[B, T, E]`` (``z_loss_coeff``
        None: the config's)."""
        z_loss_coeff = self.config.z_loss_coeff if z_loss_coeff is None else z_loss_coeff
        if self.is_initializing():  # create the head's parameters, as __call__ does
            self.lm_logits(x[:, :1])
        if self.config.tie_word_embeddings:
            kernel = self.model.embed_tokens.embedding.T
        else:
            kernel = nn.meta.unbox(self.lm_head.variables["params"]["kernel"])
        return lm_head_loss(x, kernel, labels, z_loss_coeff, 4096, n_valid)


class NucleusXForSequenceClassificationModule(nn.Module):
    """Decoder plus a bias-free ``score`` head, pooled at the token before the first pad (or the last)."""

    config: NucleusXConfig
    dtype: Any = F32
    param_dtype: Any = F32
    gradient_checkpointing: bool = False
    remat_policy: Optional[str] = None

    def setup(self) -> None:
        cfg = self.config
        self.model = NucleusXModule(cfg, self.dtype, self.param_dtype, self.gradient_checkpointing,
                                    self.remat_policy)
        self.score = _dense(cfg.num_labels, "score", nn.initializers.normal(cfg.lm_head_initializer_range),
                            ("embed", None), self.dtype, self.param_dtype)

    def __call__(self, input_ids: Array, attention_mask: Optional[Array] = None,
                 past_key_values: Optional[Cache] = None, segment_ids: Optional[Array] = None, *,
                 options: Optional[RunOptions] = None) -> Tuple[Array, Any, Any]:
        """Same arguments as :class:`NucleusXModule`; returns (pooled logits ``[B, num_labels]``, cache, hidden)."""
        x, cache, hidden = self.model(input_ids, attention_mask, past_key_values, segment_ids, options=options)
        logits = self.score(x)
        pad = self.config.pad_token_id
        if pad is None:
            index = jnp.full((input_ids.shape[0],), -1)
        else:
            index = jnp.argmax(input_ids == pad, axis=-1) - 1
        index = jnp.where(index < 0, index + input_ids.shape[1], index)
        return logits[jnp.arange(input_ids.shape[0]), index], cache, hidden
