"""NucleusX (RetNet with SwiGLU and RMSNorm) in PyTorch: the model, its CausalLM and SequenceClassification
heads, the three retention forms and a recurrent cache for ``generate``.

Shipped beside every PyTorch export as remote code (``trust_remote_code=True``): it imports torch, transformers
and its sibling ``configuration_nucleus_x`` only. Works on transformers 4.57 and 5.x. It computes what
nucleusx-jax's JAX model computes (``nucleusx_jax/retention.py``), which is the reference's (HF PR #27259)
except two documented fixes: the chunkwise form honours ``attention_mask``, and a chunkwise pass hands decoding
the exact recurrent state (the reference's is normalised per chunk).

Shapes: B batch, T length, E ``decoder_embed_dim``, H heads, K key head dim, V value head dim, C chunk size.
Retention runs in float32 whatever the weights' dtype.

The cache (:class:`NucleusXCache`) holds per layer ``kv`` ``[B, H, V, K]`` (``sum_t w_t v_t k_t^T /
sqrt(scale)``, ``w_t = gamma**(L - t)`` over the real tokens, ``L`` the last) and ``scale`` ``[B, H, 1, 1]``
(``sum_t w_t``), plus ``seqlen``, the tokens seen including padding (the next rotation position); indexing a
layer gives the reference's ``(prev_key_value, scale, seqlen)``.
"""

import math
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_outputs import SequenceClassifierOutputWithPast

from .configuration_nucleus_x import FORWARD_MODES, NucleusXConfig

TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5
# transformers 5 renamed the cache argument and output field ``past_key_values`` to ``cache``
CACHE_NAME = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
F32 = torch.float32


# ------------------------------------------------------------------------------------------- tables
def angle_table(key_head_dim: int) -> torch.Tensor:
    """Rotation frequencies ``[K]`` float32: ``1 / 10000**linspace(0, 1, K/2)``, each repeated twice."""
    angle = torch.pow(10000.0, torch.linspace(0.0, 1.0, key_head_dim // 2, dtype=F32)).reciprocal()
    return torch.repeat_interleave(angle, 2)


def log_decay_table(num_heads: int, use_lm_decay: bool) -> torch.Tensor:
    """Per-head ``log(gamma)`` ``[H]`` float32: ``gamma_h = 1 - 2**(-5 - h)``, or with ``use_lm_decay``
    ``1 - exp(x)``, ``x`` spaced evenly from ``log(1/32)`` to ``log(1/512)``."""
    if use_lm_decay:
        bounds = torch.log(torch.tensor([1 / 32, 1 / 512], dtype=F32))
        return torch.log(1 - torch.exp(torch.linspace(bounds[0], bounds[1], num_heads, dtype=F32)))
    return torch.log(1 - torch.pow(2.0, -5.0 - torch.arange(num_heads, dtype=F32)))


def rotate(x: torch.Tensor, positions: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Rotate pairs ``(x[2i], x[2i+1])`` of x ``[B, H, T, K]`` by ``positions * angle``; positions ``[T]``."""
    theta = positions.to(F32)[:, None] * angle  # [T, K]
    pairs = x.unflatten(-1, (-1, 2))
    turned = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return x * torch.cos(theta) + turned * torch.sin(theta)


def powers(exponent: torch.Tensor, log_decay: torch.Tensor) -> torch.Tensor:
    """``gamma_h ** exponent`` where ``exponent >= 0``, else 0; adds a leading H axis."""
    ld = log_decay.reshape((-1,) + (1,) * exponent.dim())
    return torch.where(exponent >= 0, torch.exp(exponent.clamp(min=0).to(F32) * ld), 0.0)


# --------------------------------------------------------------------------------------- the forms
def parallel_retention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor,
                       mask: Optional[torch.Tensor]) -> torch.Tensor:
    """``(q k^T * D) v``, rows of ``q k^T * D`` divided by ``max(|row sum|, 1)``; D ``[., H, T, T]`` is
    ``gamma**(i-j)`` for ``j <= i`` (and ``mask[j]``), each row divided by the square root of its sum.
    q, k ``[B, H, T, K]``, v ``[B, H, T, V]``, mask ``[B, T]`` or None -> ``[B, H, T, V]``."""
    pos = torch.arange(q.shape[2], device=q.device)
    d = powers(pos[:, None] - pos[None, :], log_decay)[None]  # [1, H, T, T]
    if mask is not None:
        d = d * mask.to(F32)[:, None, None, :]
    row = d.sum(-1, keepdim=True)
    d = torch.where(row > 0, d / torch.sqrt(torch.where(row > 0, row, 1.0)), 0.0)
    r = (q @ k.transpose(-1, -2)) * d
    r = r / r.detach().sum(-1, keepdim=True).abs().clamp(min=1.0)
    return r @ v


def decayed_products(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor,
                     chunk_size: int) -> torch.Tensor:
    """``sum_{j <= i} gamma**(i - j) (q_i . k_j) v_j`` for every ``i``, chunk by chunk (inside a chunk directly,
    across chunks through the carried ``[K, V]`` states; every power of gamma has a non-negative exponent).
    q, k ``[B, H, T, K]``, v ``[B, H, T, V]`` -> ``[B, H, T, V]``."""
    length, c = q.shape[2], chunk_size
    n = -(-length // c)

    def chunks(x: torch.Tensor) -> torch.Tensor:  # [B, H, T, D] -> [B, H, N, C, D]
        return F.pad(x, (0, 0, 0, n * c - length)).unflatten(2, (n, c))

    qc, kc, vc = chunks(q), chunks(k), chunks(v)
    pos, steps = torch.arange(c, device=q.device), torch.arange(n, device=q.device)
    inner = ((qc @ kc.transpose(-1, -2)) * powers(pos[:, None] - pos[None, :], log_decay)[:, None]) @ vc
    chunk_kv = (kc * powers(c - 1 - pos, log_decay)[:, None, :, None]).transpose(-1, -2) @ vc  # [B, H, N, K, V]
    before = torch.einsum("hnm,bhmkv->bhnkv", powers(steps[:, None] - steps[None, :] - 1, log_decay * c), chunk_kv)
    cross = (qc * powers(pos + 1, log_decay)[:, None, :, None]) @ before
    return (inner + cross).flatten(2, 3)[:, :, :length]


def exact_chunkwise_retention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor,
                              chunk_size: int, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """:func:`parallel_retention`'s function, chunk by chunk (``chunkwise_normalization="exact"``): row ``i``
    is ``A_i / sqrt(S_i)`` divided by ``max(|Z_i| / sqrt(S_i), 1)``, with ``A`` the decayed products with v,
    ``Z`` those with ``v = 1`` (the row sum of ``q k^T * D``) and ``S_i = sum_{j <= i, real} gamma**(i - j)``.
    Nothing of size ``T x T`` is built. Shapes as :func:`parallel_retention`."""
    batch, heads, length, _ = q.shape
    real = q.new_ones(batch, length) if mask is None else mask.to(F32)
    k = k * real[:, None, :, None]  # padding contributes nothing
    ones = q.new_ones(batch, heads, length, 1)
    az = decayed_products(q, k, torch.cat([v, ones], -1), log_decay, chunk_size)
    row = decayed_products(ones, real[:, None, :, None].expand(batch, heads, length, 1), ones, log_decay,
                           chunk_size)
    root = torch.sqrt(torch.where(row > 0, row, 1.0))
    a, z = az[..., :-1] / root, az[..., -1:] / root
    return torch.where(row > 0, a / z.detach().abs().clamp(min=1.0), 0.0)


def chunkwise_retention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor,
                        chunk_size: int, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """The reference's chunkwise rows (``chunkwise_normalization="reference"``). Exact retention inside chunks of C tokens plus the state carried across them (the last chunk is padded
    inside). Rows are divided by the larger of the chunk's ``sum_j |q k^T * D|`` (at least 1) and the
    incoming state's largest column sum (at least 1), as the reference does. Nothing of size ``T x T`` is
    built. Shapes as :func:`parallel_retention`."""
    batch, heads, length, _ = q.shape
    c, n = chunk_size, -(-length // chunk_size)
    if mask is not None:  # padding contributes nothing
        keep = mask.to(F32)[:, None, :, None]
        k, v = k * keep, v * keep

    def chunks(x: torch.Tensor) -> torch.Tensor:  # [B, H, T, D] -> [B, H, N, C, D]
        return F.pad(x, (0, 0, 0, n * c - length)).unflatten(2, (n, c))

    qc, kc, vc = chunks(q), chunks(k), chunks(v)
    pos = torch.arange(c, device=q.device)
    d = powers(pos[:, None] - pos[None, :], log_decay)  # [H, C, C]
    row = d.sum(-1)  # [H, C]
    s_c = row[:, -1:]  # [H, 1]: sum_{i<C} gamma**i
    inner_decay = (d / torch.sqrt(row)[..., None])[:, None]  # [H, 1, C, C]
    query_decay = powers(pos + 1, log_decay) * s_c / torch.sqrt(row)  # [H, C]
    value_decay = d[:, -1, :] / s_c  # [H, C]

    qk = (qc @ kc.transpose(-1, -2)) * inner_decay  # [B, H, N, C, C]
    inner_out = qk @ vc
    chunk_kv = (kc * value_decay[:, None, :, None]).transpose(-1, -2) @ vc  # [B, H, N, K, V]
    # the state entering chunk n: sum_{m<n} gamma**(C (n-1-m)) chunk_kv[m]
    steps = torch.arange(n, device=q.device)
    carry = powers(steps[:, None] - steps[None, :] - 1, log_decay * c)  # [H, N, N]
    before = torch.einsum("hnm,bhmkv->bhnkv", carry, chunk_kv)
    cross_scale = before.detach().abs().sum(-2).amax(-1).clamp(min=1.0)[..., None, None]  # [B, H, N, 1, 1]
    inner_scale = qk.detach().abs().sum(-1, keepdim=True).clamp(min=1.0)  # [B, H, N, C, 1]
    cross_out = (qc * query_decay[:, None, :, None]) @ before
    out = (inner_out + cross_out) / torch.maximum(inner_scale, cross_scale)
    return out.flatten(2, 3)[:, :, :length]


def final_state(k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor,
                mask: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The state ``(kv [B, H, V, K], scale [B, H, 1, 1])`` a whole-sequence pass leaves, equal to running
    :func:`recurrent_step` over it: token ``t`` weighs ``gamma**(L - t)`` (``L`` the row's last real token),
    padding nothing."""
    batch, _, length, _ = k.shape
    pos = torch.arange(length, device=k.device)
    real = torch.ones(batch, length, dtype=torch.bool, device=k.device) if mask is None else mask.bool()
    last = torch.where(real, pos[None], -1).amax(-1)  # [B]
    w = powers(last[:, None] - pos[None], log_decay)  # [H, B, T]
    w = torch.where(real[None], w, 0.0).transpose(0, 1)  # [B, H, T]
    scale = w.sum(-1)[..., None, None]
    w = w / torch.sqrt(scale[..., 0].clamp(min=1e-30))
    kv = (v * w[..., None]).transpose(-1, -2) @ k
    return kv, scale


def recurrent_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor, kv: torch.Tensor, scale: torch.Tensor,
    mask: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One token: q, k ``[B, H, K]``, v ``[B, H, V]``, mask ``[B]`` -> (``[B, H, V]``, kv, scale).

    ``scale <- scale * gamma + 1``, ``kv <- kv * sqrt(old / new scale) * gamma + v k^T / sqrt(new scale)``; a
    padding token (mask 0) leaves kv and scale unchanged."""
    gamma = torch.exp(log_decay)[None, :, None, None]
    real = (torch.ones(q.shape[0], dtype=torch.bool, device=q.device) if mask is None else mask.bool())
    real = real[:, None, None, None]
    new_scale = torch.where(real, scale * gamma + 1.0, scale)
    safe = torch.where(new_scale > 0, new_scale, 1.0)
    carry = torch.where(real, torch.sqrt(scale) * gamma / torch.sqrt(safe), 1.0)
    added = torch.where(real & (new_scale > 0), v[..., :, None] * k[..., None, :] / torch.sqrt(safe), 0.0)
    kv = kv * carry + added
    return torch.einsum("bhk,bhvk->bhv", q, kv), kv, new_scale


# ------------------------------------------------------------------------------------------- the cache
class NucleusXCache:
    """The recurrent state of every layer (see the module docstring). ``generate`` reorders it for beam
    search through :meth:`reorder_cache`; ``cache[i]`` is layer ``i`` as ``(kv, scale, seqlen)``."""

    is_croppable = False  # transformers 5 asks

    def __init__(self, layers: List[Tuple[torch.Tensor, torch.Tensor]], seqlen: int):
        self.layers = layers
        self.seqlen = seqlen

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        kv, scale = self.layers[i]
        return kv, scale, torch.tensor(self.seqlen, device=kv.device)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens processed, padding included."""
        return self.seqlen

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Keep rows ``beam_idx`` (in place), as beam search asks."""
        self.layers = [(kv.index_select(0, beam_idx.to(kv.device)), scale.index_select(0, beam_idx.to(kv.device)))
                       for kv, scale in self.layers]


# ------------------------------------------------------------------------------------------- modules
class NucleusXRMSNorm(nn.Module):
    """RMSNorm over the last axis in float32; without weight it is the per-head group norm."""

    def __init__(self, dim: int, eps: float, weight: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if weight else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.to(F32)
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight is not None:
            y = y * self.weight.to(F32)
        return y.to(x.dtype)


class NucleusXRelPos(nn.Module):
    """The buffers ``angle`` ``[K]`` and ``decay`` (``log gamma``) ``[H]`` of the reference's state dict."""

    def __init__(self, config: NucleusXConfig):
        super().__init__()
        self.register_buffer("angle", angle_table(config.key_head_dim))
        self.register_buffer("decay", log_decay_table(config.decoder_retention_heads, config.use_lm_decay))


def _linear(n_in: int, n_out: int, init: Tuple[str, float]) -> nn.Linear:
    """A bias-free Linear remembering its initialisation (``("xavier", gain)`` or ``("normal", std)``)."""
    layer = nn.Linear(n_in, n_out, bias=False)
    layer.nucleus_x_init = init
    return layer


def deepnorm_beta(config: NucleusXConfig) -> float:
    """DeepNet's initial weight scale ``(8 L)**-0.25`` with ``deepnorm``, else 1."""
    return math.pow(8.0 * config.decoder_layers, -0.25) if config.deepnorm else 1.0


class NucleusXMultiScaleRetention(nn.Module):
    """Projections, rotation, one retention form, per-head RMSNorm, swish gate, output projection."""

    def __init__(self, config: NucleusXConfig):
        super().__init__()
        self.config = config
        e, v, gain, beta = config.decoder_embed_dim, config.decoder_value_embed_dim, config.initializer_factor, \
            deepnorm_beta(config)
        self.q_proj = _linear(e, e, ("xavier", gain))
        self.k_proj = _linear(e, e, ("xavier", gain))
        self.v_proj = _linear(e, v, ("xavier", gain * beta))
        self.g_proj = _linear(e, v, ("xavier", gain))
        self.out_proj = _linear(v, e, ("xavier", gain * beta))
        self.group_norm = NucleusXRMSNorm(config.value_head_dim, config.groupnorm_eps, weight=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rel_pos: NucleusXRelPos,
                mask: Optional[torch.Tensor], state: Optional[Tuple[torch.Tensor, torch.Tensor]], mode: str,
                chunk_size: int, want_state: bool) -> Tuple[torch.Tensor, Optional[Tuple[torch.Tensor, torch.Tensor]]]:
        """x ``[B, T, E]``, positions ``[T]``, mask ``[B, T]`` or None, state ``(kv, scale)`` or None ->
        (``[B, T, E]``, the new state when ``want_state`` or in recurrent mode)."""
        cfg = self.config
        batch, length, _ = x.shape
        heads, kdim, vdim = cfg.decoder_retention_heads, cfg.key_head_dim, cfg.value_head_dim

        def split(t: torch.Tensor, d: int) -> torch.Tensor:  # [B, T, H*d] -> [B, H, T, d] float32
            return t.to(F32).view(batch, length, heads, d).transpose(1, 2)

        angle, log_decay = rel_pos.angle.to(F32), rel_pos.decay.to(F32)
        q = rotate(split(self.q_proj(x), kdim), positions, angle)
        k = rotate(split(self.k_proj(x), kdim) * kdim**-0.5, positions, angle)
        v = split(self.v_proj(x), vdim)
        new_state = None
        if mode == "recurrent":
            kv, scale = state if state is not None else (
                x.new_zeros(batch, heads, vdim, kdim, dtype=F32), x.new_zeros(batch, heads, 1, 1, dtype=F32))
            outs = []
            for t in range(length):  # the recurrent form: one token at a time
                out, kv, scale = recurrent_step(q[:, :, t], k[:, :, t], v[:, :, t], log_decay, kv, scale,
                                                None if mask is None else mask[:, t])
                outs.append(out)
            out, new_state = torch.stack(outs, 2), (kv, scale)
        else:
            if mode == "parallel":
                out = parallel_retention(q, k, v, log_decay, mask)
            else:
                exact = self.config.chunkwise_normalization == "exact"
                form = exact_chunkwise_retention if exact else chunkwise_retention
                out = form(q, k, v, log_decay, chunk_size, mask)
            if want_state:
                new_state = final_state(k, v, log_decay, mask)
        normed = self.group_norm(out).transpose(1, 2).reshape(batch, length, heads * vdim)
        gated = F.silu(self.g_proj(x).to(F32)) * normed
        return self.out_proj(gated.to(x.dtype)), new_state


class NucleusXGLU(nn.Module):
    """``fc2(act(fc1(x)) * gate(x))`` with activation dropout and dropout."""

    def __init__(self, config: NucleusXConfig):
        super().__init__()
        e, f, std, beta = config.decoder_embed_dim, config.decoder_ffn_embed_dim, config.initializer_range, \
            deepnorm_beta(config)
        self.fc1 = _linear(e, f, ("normal", std * beta))
        self.fc2 = _linear(f, e, ("normal", std * beta))
        self.gate = _linear(e, f, ("normal", std))
        self.activation = ACT2FN[config.activation_fn]
        self.activation_dropout = nn.Dropout(config.activation_dropout)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.activation(self.fc1(x).to(F32)).to(x.dtype) * self.gate(x)
        return self.dropout(self.fc2(self.activation_dropout(h)))


class NucleusXDecoderLayer(nn.Module):
    """Retention block then GLU block, each ``residual * alpha + drop_path(block)``, pre- or post-norm."""

    def __init__(self, config: NucleusXConfig, drop_path_rate: float):
        super().__init__()
        self.config = config
        self.retention = NucleusXMultiScaleRetention(config)  # in the reference's state-dict order
        self.retention_rms_norm = NucleusXRMSNorm(config.decoder_embed_dim, config.rms_norm_eps)
        self.ffn = NucleusXGLU(config)
        self.final_rms_norm = NucleusXRMSNorm(config.decoder_embed_dim, config.rms_norm_eps)
        self.dropout = nn.Dropout(config.dropout)
        self.drop_path_rate = drop_path_rate
        self.alpha = math.pow(2.0 * config.decoder_layers, 0.25) if config.deepnorm else 1.0

    def drop_path(self, x: torch.Tensor) -> torch.Tensor:
        """Stochastic depth in training: zero a sample's branch with probability ``drop_path_rate``."""
        if not self.training or self.drop_path_rate == 0.0:
            return x
        keep = 1.0 - self.drop_path_rate
        return x * torch.bernoulli(x.new_full((x.shape[0],) + (1,) * (x.dim() - 1), keep)) / keep

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rel_pos: NucleusXRelPos,
                mask: Optional[torch.Tensor], state: Optional[Tuple[torch.Tensor, torch.Tensor]], mode: str,
                chunk_size: int, want_state: bool) -> Tuple[torch.Tensor, Optional[Tuple[torch.Tensor, torch.Tensor]]]:
        pre = self.config.decoder_normalize_before
        h = self.retention_rms_norm(x) if pre else x
        h, new_state = self.retention(h, positions, rel_pos, mask, state, mode, chunk_size, want_state)
        x = x * self.alpha + self.drop_path(self.dropout(h))
        if not pre:
            x = self.retention_rms_norm(x)
        h = self.final_rms_norm(x) if pre else x
        x = x * self.alpha + self.drop_path(self.ffn(h))
        if not pre:
            x = self.final_rms_norm(x)
        return x, new_state


# ------------------------------------------------------------------------------------------- models
class NucleusXPreTrainedModel(PreTrainedModel):
    """Weight initialisation (the reference's scheme) and what transformers needs to know."""

    config_class = NucleusXConfig
    base_model_prefix = "model"
    _no_split_modules = ["NucleusXDecoderLayer"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            kind, value = getattr(module, "nucleus_x_init", ("normal", self.config.initializer_range))
            if kind == "xavier":
                nn.init.xavier_uniform_(module.weight, gain=value)
            else:
                nn.init.normal_(module.weight, mean=0.0, std=value)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if module.padding_idx is not None and not getattr(module.weight, "_is_hf_initialized", False):
                module.weight[module.padding_idx].zero_()  # (transformers 5 flags loaded weights)
        elif isinstance(module, NucleusXRMSNorm) and module.weight is not None:
            nn.init.ones_(module.weight)
        elif isinstance(module, NucleusXRelPos):
            module.angle.copy_(angle_table(self.config.key_head_dim))
            module.decay.copy_(log_decay_table(self.config.decoder_retention_heads, self.config.use_lm_decay))


class NucleusXModel(NucleusXPreTrainedModel):
    """The decoder: scaled embedding (optionally RMS-normed), the layers, the final RMSNorm (pre-norm).

    ``forward(input_ids, attention_mask=None, past_key_values / cache=None, use_cache=None,
    output_hidden_states=None, return_dict=None, forward_mode=None, recurrent_chunk_size=None)``.
    ``attention_mask`` ``[B, T]`` marks left padding with 0; with a cache it may cover the cached tokens too
    (its last T columns are used). ``forward_mode`` and ``recurrent_chunk_size`` default to the config's.
    """

    def __init__(self, config: NucleusXConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.decoder_embed_dim, config.pad_token_id)
        self.embed_scale = 1.0 if config.no_scale_embedding else math.sqrt(config.decoder_embed_dim)
        if config.rms_norm_embedding:
            self.rms_norm_embedding = NucleusXRMSNorm(config.decoder_embed_dim, config.rms_norm_eps)
        else:
            self.rms_norm_embedding = None
        rates = torch.linspace(0, config.drop_path_rate, config.decoder_layers).tolist()
        self.layers = nn.ModuleList(NucleusXDecoderLayer(config, rate) for rate in rates)
        self.rms_norm = (NucleusXRMSNorm(config.decoder_embed_dim, config.rms_norm_eps)
                         if config.decoder_normalize_before else None)
        self.rel_pos = NucleusXRelPos(config)
        self.dropout = nn.Dropout(config.dropout)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: Optional[torch.Tensor] = None,
        past_key_values: Optional[NucleusXCache] = None,
        cache: Optional[NucleusXCache] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        forward_mode: Optional[str] = None,
        recurrent_chunk_size: Optional[int] = None,
    ) -> Union[Tuple, BaseModelOutputWithPast]:
        cfg = self.config
        state = _one_cache(past_key_values, cache)
        mode = forward_mode if forward_mode is not None else cfg.forward_mode
        if mode not in FORWARD_MODES:
            raise ValueError(f"forward_mode={mode!r} is invalid: must be one of {', '.join(FORWARD_MODES)}")
        chunk = recurrent_chunk_size if recurrent_chunk_size is not None else cfg.recurrent_chunk_size
        if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
            raise ValueError(f"recurrent_chunk_size={chunk!r} is invalid: must be an integer >= 1")
        if state is not None and mode != "recurrent":
            raise ValueError(f"a cache continues in forward_mode='recurrent' only, got forward_mode={mode!r}")
        use_cache = use_cache if use_cache is not None else cfg.use_cache
        output_hidden_states = output_hidden_states if output_hidden_states is not None else cfg.output_hidden_states
        return_dict = return_dict if return_dict is not None else cfg.return_dict
        batch, length = input_ids.shape
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[0] != batch or attention_mask.shape[1] < length:
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected [{batch}, n] "
                                 f"with n >= {length} (input_ids has shape {(batch, length)})")
            attention_mask = attention_mask[:, attention_mask.shape[1] - length:]

        x = self.embed_tokens(input_ids) * self.embed_scale
        if self.rms_norm_embedding is not None:
            x = self.rms_norm_embedding(x)
        x = self.dropout(x)
        offset = state.seqlen if state is not None else 0
        positions = torch.arange(offset, offset + length, device=x.device)
        hidden, new_layers = [], []
        for i, layer in enumerate(self.layers):
            if output_hidden_states:
                hidden.append(x)
            x, new = layer(x, positions, self.rel_pos, attention_mask, None if state is None else state.layers[i],
                           mode, chunk, use_cache)
            new_layers.append(new)
        if self.rms_norm is not None:
            x = self.rms_norm(x)
        out_cache = NucleusXCache(new_layers, offset + length) if use_cache else None
        hidden_states = tuple(hidden) + (x,) if output_hidden_states else None
        if not return_dict:
            return tuple(t for t in (x, out_cache, hidden_states) if t is not None)
        return BaseModelOutputWithPast(last_hidden_state=x, hidden_states=hidden_states, **{CACHE_NAME: out_cache})


def _one_cache(past_key_values: Optional[NucleusXCache], cache: Optional[NucleusXCache]) -> Optional[NucleusXCache]:
    """The cache given under either name (``past_key_values``: transformers 4; ``cache``: transformers 5)."""
    if past_key_values is not None and cache is not None:
        raise ValueError("pass the cache once: as past_key_values or as cache, not both")
    state = past_key_values if past_key_values is not None else cache
    if state is not None and not isinstance(state, NucleusXCache):
        raise ValueError(f"the cache must be the NucleusXCache a previous call returned, got {type(state).__name__}")
    return state


def _cache_of(outputs: Union[BaseModelOutputWithPast, Tuple]) -> Optional[NucleusXCache]:
    return getattr(outputs, CACHE_NAME)


class NucleusXForCausalLM(NucleusXPreTrainedModel, GenerationMixin):
    """The decoder plus the LM head (tied to the embedding with ``tie_word_embeddings``).

    ``forward`` takes :class:`NucleusXModel`'s arguments plus ``labels`` ``[B, T]`` (-100 ignored): the loss
    is the mean next-token cross-entropy plus ``z_loss_coeff * mean(log(logsumexp(logits)))``. ``generate``
    runs the prompt in the config's ``forward_mode`` and every new token in recurrent mode.
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"} if TRANSFORMERS_5 else ["lm_head.weight"]

    def __init__(self, config: NucleusXConfig):
        super().__init__(config)
        self.model = NucleusXModel(config)
        self.lm_head = _linear(config.decoder_embed_dim, config.vocab_size,
                               ("normal", config.lm_head_initializer_range))
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the retention state is not a key/value cache

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: Optional[torch.Tensor] = None,
        past_key_values: Optional[NucleusXCache] = None,
        cache: Optional[NucleusXCache] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        forward_mode: Optional[str] = None,
        recurrent_chunk_size: Optional[int] = None,
    ) -> Union[Tuple, CausalLMOutputWithPast]:
        outputs = self.model(input_ids, attention_mask, past_key_values, cache, use_cache, output_hidden_states,
                             True, forward_mode, recurrent_chunk_size)
        logits = self.lm_head(outputs.last_hidden_state)
        loss = None if labels is None else causal_lm_loss(logits, labels, self.config.z_loss_coeff)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if not return_dict:
            return tuple(t for t in (loss, logits, _cache_of(outputs), outputs.hidden_states) if t is not None)
        return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                      **{CACHE_NAME: _cache_of(outputs)})

    def prepare_inputs_for_generation(
        self, input_ids: torch.LongTensor, past_key_values: Optional[NucleusXCache] = None,
        attention_mask: Optional[torch.Tensor] = None, use_cache: bool = True, cache: Optional[NucleusXCache] = None,
        **kwargs,
    ) -> dict:
        """The prompt in the config's forward mode; with a cache, the last token in recurrent mode."""
        state = _one_cache(past_key_values, cache)
        if state is not None:
            input_ids = input_ids[:, -1:]
        mode = "recurrent" if state is not None else self.config.forward_mode
        return {"input_ids": input_ids, "attention_mask": attention_mask, CACHE_NAME: state, "use_cache": use_cache,
                "forward_mode": mode}


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, z_loss_coeff: float) -> torch.Tensor:
    """Mean cross-entropy of ``logits[:, :-1]`` ``[B, T, vocab]`` against ``labels[:, 1:]`` (-100 ignored), plus
    ``z_loss_coeff * mean(log(logsumexp))`` over every shifted position."""
    shift = logits[:, :-1].to(F32).flatten(0, 1)
    loss = F.cross_entropy(shift, labels[:, 1:].flatten().to(shift.device), ignore_index=-100)
    if z_loss_coeff > 0:
        loss = loss + z_loss_coeff * torch.log(torch.logsumexp(shift, -1)).mean()
    return loss


class NucleusXForSequenceClassification(NucleusXPreTrainedModel):
    """The decoder plus a bias-free ``score`` head pooled at the token before the first ``pad_token_id`` (the
    last token when there is none). ``labels`` give the loss of ``config.problem_type`` (inferred as
    transformers does when unset)."""

    def __init__(self, config: NucleusXConfig):
        super().__init__(config)
        self.model = NucleusXModel(config)
        self.score = _linear(config.decoder_embed_dim, config.num_labels, ("normal", config.lm_head_initializer_range))
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: Optional[torch.Tensor] = None,
        past_key_values: Optional[NucleusXCache] = None,
        cache: Optional[NucleusXCache] = None,
        labels: Optional[torch.Tensor] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        forward_mode: Optional[str] = None,
        recurrent_chunk_size: Optional[int] = None,
    ) -> Union[Tuple, SequenceClassifierOutputWithPast]:
        outputs = self.model(input_ids, attention_mask, past_key_values, cache, use_cache, output_hidden_states,
                             True, forward_mode, recurrent_chunk_size)
        scores = self.score(outputs.last_hidden_state)  # [B, T, labels]
        length = input_ids.shape[1]
        if self.config.pad_token_id is None:
            index = torch.full((input_ids.shape[0],), length - 1, device=scores.device)
        else:
            index = (input_ids == self.config.pad_token_id).int().argmax(-1) - 1
            index = torch.where(index < 0, index + length, index).to(scores.device)
        logits = scores[torch.arange(input_ids.shape[0], device=scores.device), index]
        loss = None if labels is None else sequence_classification_loss(logits, labels, self.config)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if not return_dict:
            return tuple(t for t in (loss, logits, _cache_of(outputs), outputs.hidden_states) if t is not None)
        return SequenceClassifierOutputWithPast(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                                **{CACHE_NAME: _cache_of(outputs)})


def sequence_classification_loss(logits: torch.Tensor, labels: torch.Tensor, config: NucleusXConfig) -> torch.Tensor:
    """The loss of ``config.problem_type``: regression (MSE), single- or multi-label classification; unset:
    regression for one label, single-label for integer labels, else multi-label."""
    problem = config.problem_type
    if problem is None:
        problem = ("regression" if config.num_labels == 1 else "single_label_classification"
                   if labels.dtype in (torch.long, torch.int) else "multi_label_classification")
    logits, labels = logits.to(F32), labels.to(logits.device)
    if problem == "regression":
        return F.mse_loss(logits.squeeze(), labels.squeeze().to(F32)) if config.num_labels == 1 \
            else F.mse_loss(logits, labels.to(F32))
    if problem == "single_label_classification":
        return F.cross_entropy(logits.view(-1, config.num_labels), labels.view(-1))
    if problem == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(logits, labels.to(F32))
    raise ValueError(f"problem_type={problem!r} is invalid: must be regression, single_label_classification or "
                     "multi_label_classification")
