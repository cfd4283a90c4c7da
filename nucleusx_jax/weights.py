"""The single torch <-> flax name and layout map, and reading PyTorch checkpoint directories.

PyTorch key                                  flax path                                 layout
``model.embed_tokens.weight``                ``model/embed_tokens/embedding``          same
``model.layers.N.<...>_proj.weight``         ``model/layers_N/<...>_proj/kernel``      transposed
``model.layers.N.ffn.{fc1,fc2,gate}.weight`` ``model/layers_N/ffn/{...}/kernel``       transposed
``*rms_norm*.weight``                        ``*rms_norm*/weight``                     same
``lm_head.weight`` / ``score.weight``        ``lm_head/kernel`` / ``score/kernel``     transposed
``model.rel_pos.{angle,decay}``              (buffers: checked against the config, regenerated on export)

Layer layouts: files (ours and PyTorch's) always hold one tensor per layer. With the config's ``scan_layers``
the flax model keeps each layer parameter as one array ``model/layers/<...>`` with a leading ``[L]`` axis
(row ``i`` is ``layers_i``); :func:`stack_layers` and :func:`unstack_layers` convert at the edges (loading,
saving, exporting, converting), :func:`to_layout` picks the one a config needs.

Tied embeddings: with ``tie_word_embeddings`` the flax model has no ``lm_head``; a ``lm_head.weight`` in
the checkpoint must then equal the embedding.

A bare ``NucleusXModel`` checkpoint has the same keys without ``model.`` (flax paths without ``model/``).
"""

import logging
import os
import re
from typing import Any, Callable, Collection, Dict, Iterator, List, Mapping, Optional, Tuple

import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from . import retention
from .configuration import NucleusXConfig, names
from .modeling import LAYERS
from .tensorio import CheckpointError, CheckpointReader  # noqa: F401  (CheckpointError is re-exported)

logger = logging.getLogger(__name__)
Path = Tuple[str, ...]
LAYER_NAME = re.compile(rf"^{LAYERS}_(\d+)$")
BUFFERS = ("model.rel_pos.angle", "model.rel_pos.decay")
HEAD_KEYS = {"causal_lm": ("lm_head.weight",), "sequence_classification": ("score.weight",), "base": ()}


def torch_key_to_flax(key: str) -> Tuple[Path, bool]:
    """Map a PyTorch state-dict key to ``(flax path, transpose?)``. Buffers are not parameters: see BUFFERS."""
    parts = re.sub(r"\.(\d+)\.", r"_\1.", key).split(".")
    *module, leaf = parts
    if leaf != "weight" or not module:
        raise CheckpointError(f"unexpected PyTorch key {key!r}: NucleusX keys end in '.weight'")
    owner = module[-1]
    if owner == "embed_tokens":
        return tuple(module) + ("embedding",), False
    if "rms_norm" in owner:
        return tuple(module) + ("weight",), False
    return tuple(module) + ("kernel",), True


def flax_path_to_torch(path: Path) -> Tuple[str, bool]:
    """Inverse of :func:`torch_key_to_flax`: ``(PyTorch key, transpose?)``."""
    *module, leaf = path
    key = ".".join(re.sub(r"^layers_(\d+)$", r"layers.\1", m) for m in module) + ".weight"
    return key, leaf == "kernel"


def unstack_leaf(path: Path, value: Any) -> List[Tuple[Path, Any]]:
    """One parameter in per-layer form: a stacked ``(..., "layers", ...)`` ``[L, ...]`` becomes ``L`` pairs
    ``((..., "layers_<i>", ...), value[i])``; any other parameter is returned as it is."""
    if LAYERS not in path:
        return [(path, value)]
    at = path.index(LAYERS)
    return [(path[:at] + (f"{LAYERS}_{i}",) + path[at + 1:], value[i]) for i in range(value.shape[0])]


def unstack_layers(params: Mapping) -> dict:
    """A parameter tree with the layers in per-layer form (``layers_<i>`` subtrees): the scanned layout's
    stacked ``layers`` leaves ``[L, ...]`` are split; a per-layer tree comes back as it is. Numpy or jax
    leaves; slices are views where the array type allows."""
    return unflatten_dict({p: v for path, value in flatten_dict(dict(params)).items()
                           for p, v in unstack_leaf(path, value)})


def stack_layers(params: Mapping) -> dict:
    """A parameter tree in the scanned layout: every ``layers_<i>`` subtree's leaves stacked into one
    ``layers`` leaf ``[L, ...]`` (row ``i`` from ``layers_i``; numpy leaves give numpy, jax leaves jax). A
    stacked tree comes back as it is; layer numbers that are not ``0 .. L-1`` raise :class:`CheckpointError`."""
    out: Dict[Path, Any] = {}
    groups: Dict[Path, Dict[int, Any]] = {}
    for path, value in flatten_dict(dict(params)).items():
        at = next((j for j, part in enumerate(path) if LAYER_NAME.match(part)), None)
        if at is None:
            out[path] = value
        else:
            groups.setdefault(path[:at] + (LAYERS,) + path[at + 1:], {})[int(path[at][len(LAYERS) + 1:])] = value
    for path, rows in groups.items():
        if sorted(rows) != list(range(len(rows))):
            raise CheckpointError(f"{'/'.join(path)}: layers {sorted(rows)} are not 0 .. {len(rows) - 1}")
        values = [rows[i] for i in range(len(rows))]
        out[path] = (np.stack if all(isinstance(v, np.ndarray) for v in values) else jnp.stack)(values)
    return unflatten_dict(out)


def to_layout(params: Mapping, scan_layers: bool) -> dict:
    """``params`` in the layout of a config with ``scan_layers`` (:func:`stack_layers` or :func:`unstack_layers`)."""
    return stack_layers(params) if scan_layers else unstack_layers(params)


def rel_pos_buffers(config: NucleusXConfig, prefix: str = "model.", like_torch: bool = True) -> Dict[str, np.ndarray]:
    """The ``rel_pos`` buffers (float32) the PyTorch model derives from ``config``: ``angle`` ``[K]``, ``decay`` ``[H]``.

    ``like_torch``: compute them with the float32 torch operations the PyTorch model's constructor uses, so
    they equal its buffers bit for bit (needs torch; without it the tables of :mod:`retention` are used, which
    can differ in the last float32 bits: two ulp at most, and a warning says so).
    """
    names = (prefix + "rel_pos.angle", prefix + "rel_pos.decay")
    heads = config.decoder_retention_heads
    torch = None
    if like_torch:
        try:
            import torch
        except ImportError:
            logger.warning("torch is not installed: the rel_pos buffers come from nucleusx_jax.retention's "
                           "tables, which can differ from the PyTorch model's in the last two float32 bits")
    if torch is None:
        return dict(zip(names, (retention.angle_table(config.key_head_dim),
                                retention.log_decay_table(heads, config.use_lm_decay))))
    f32 = torch.float32
    angle = torch.pow(10000.0, torch.linspace(0.0, 1.0, config.key_head_dim // 2, dtype=f32)).reciprocal()
    if config.use_lm_decay:
        bounds = torch.log(torch.tensor([1 / 32, 1 / 512], dtype=f32))
        decay = torch.log(1 - torch.exp(torch.linspace(bounds[0], bounds[1], heads, dtype=f32)))
    else:
        decay = torch.log(1 - torch.pow(2.0, -5.0 - torch.arange(heads, dtype=f32)))
    return dict(zip(names, (torch.repeat_interleave(angle, 2).numpy(), decay.numpy())))


def check_buffers(key: str, value: np.ndarray, config: NucleusXConfig) -> None:
    """Raise naming ``key`` if a ``rel_pos`` buffer disagrees with what ``config`` implies, beyond the rounding
    of its dtype (float32: 1e-5 relative; 16-bit buffers, possibly computed in 16 bits: 3e-2)."""
    prefix = key[:-len("rel_pos.angle")] if key.endswith("rel_pos.angle") else key[:-len("rel_pos.decay")]
    expected = rel_pos_buffers(config, prefix, like_torch=False)[key]
    rtol = 1e-5 if np.dtype(value.dtype).itemsize >= 4 else 3e-2
    found = np.asarray(value, np.float32)
    if found.shape != expected.shape or not np.allclose(found, expected, rtol=rtol, atol=rtol * 1e-1):
        raise CheckpointError(
            f"buffer {key} (shape {list(found.shape)}, values {np.round(found[:4], 6).tolist()}...) disagrees "
            f"with the config (decoder_embed_dim={config.decoder_embed_dim}, decoder_retention_heads="
            f"{config.decoder_retention_heads}, use_lm_decay={config.use_lm_decay}), which implies shape "
            f"{list(expected.shape)} values {np.round(expected[:4], 6).tolist()}..."
        )


def infer_head(keys: Collection[str]) -> str:
    """Which model a PyTorch state dict's keys come from: ``sequence_classification`` (has ``score.weight``),
    ``causal_lm`` (``model.`` keys) or ``base`` (a bare ``NucleusXModel``)."""
    if "score.weight" in keys:
        return "sequence_classification"
    return "causal_lm" if any(k.startswith("model.") for k in keys) else "base"


def check_torch_keys(
    shapes: Mapping[str, Tuple[int, ...]],
    config: NucleusXConfig,
    head: str,
    allow_missing_head: bool = False,
    display: Optional[Callable[[str], str]] = None,
) -> List[str]:
    """Check a state dict's parameter keys and shapes (buffers excluded) against ``config``.

    With tied embeddings ``lm_head.weight`` may be present or absent. Raises :class:`CheckpointError` listing
    every missing, unexpected and wrong-shaped key (named by ``display(key)`` where given, e.g. flax paths);
    returns the missing head keys when ``allow_missing_head``.
    """
    expected = expected_torch_shapes(config, head)
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    show = display or (lambda k: k)
    allowed = set(expected) | ({"lm_head.weight"} if config.tie_word_embeddings else set())
    unexpected = sorted(show(k) for k in shapes if k not in allowed)
    wrong = [f"{show(k)}: checkpoint {list(shapes[k])}, config expects {list(s)}"
             for k, s in expected.items() if k in shapes and tuple(shapes[k]) != s]
    if config.tie_word_embeddings and "lm_head.weight" in shapes and tuple(shapes["lm_head.weight"]) != (
            config.vocab_size, config.decoder_embed_dim):
        wrong.append(f"{show('lm_head.weight')}: checkpoint {list(shapes['lm_head.weight'])}, config expects "
                     f"{[config.vocab_size, config.decoder_embed_dim]}")
    missing = [k for k in expected if k not in shapes]
    head_missing = [k for k in missing if k in HEAD_KEYS[head]]
    missing = [show(k) for k in missing if k not in HEAD_KEYS[head]]
    problems = []  # each list cut to its first few entries: the message stays short whatever the checkpoint
    if missing:
        problems.append(f"missing keys: {names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {names(unexpected)}")
    if wrong:
        problems.append(f"wrong shapes: {names(wrong, 5)}")
    if head_missing and not allow_missing_head:
        problems.append(f"missing head keys: {names([show(k) for k in head_missing])}")
    if problems:
        raise CheckpointError("checkpoint does not match the NucleusX config: " + "; ".join(problems))
    return head_missing


def expected_torch_shapes(config: NucleusXConfig, head: str) -> Dict[str, Tuple[int, ...]]:
    """Every parameter key of the PyTorch model (buffers excluded) with its shape, for ``head`` in
    ``causal_lm``, ``sequence_classification`` or ``base`` (keys without the ``model.`` prefix)."""
    e, v, f = config.decoder_embed_dim, config.decoder_value_embed_dim, config.decoder_ffn_embed_dim
    shapes: Dict[str, Tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, e)}
    if config.rms_norm_embedding:
        shapes["model.rms_norm_embedding.weight"] = (e,)
    for i in range(config.decoder_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "retention.q_proj.weight": (e, e), p + "retention.k_proj.weight": (e, e),
            p + "retention.v_proj.weight": (v, e), p + "retention.g_proj.weight": (v, e),
            p + "retention.out_proj.weight": (e, v), p + "retention_rms_norm.weight": (e,),
            p + "ffn.fc1.weight": (f, e), p + "ffn.fc2.weight": (e, f), p + "ffn.gate.weight": (f, e),
            p + "final_rms_norm.weight": (e,),
        })
    if config.decoder_normalize_before:
        shapes["model.rms_norm.weight"] = (e,)
    if head == "causal_lm":
        shapes["lm_head.weight"] = (config.vocab_size, e)
    elif head == "sequence_classification":
        shapes["score.weight"] = (config.num_labels, e)
    if head == "base":
        shapes = {k[len("model."):]: s for k, s in shapes.items()}
    return shapes


def state_dict_to_params(
    tensors: Iterator[Tuple[str, np.ndarray]], config: NucleusXConfig, head: str, allow_missing_head: bool = False
) -> Tuple[dict, List[str]]:
    """Build the flax ``params`` tree (in the layout of ``config.scan_layers``) from ``(key, array)`` pairs of
    a PyTorch NucleusX state dict.

    Accepts checkpoints of any head for any ``head`` (the decoder weights are shared): a ``model.`` prefix is
    added or removed as needed and the other head's weights are ignored. Returns ``(params, missing head
    keys)``; missing head keys are an error unless ``allow_missing_head``. Every other missing, unexpected
    or wrong-shaped key raises :class:`CheckpointError` listing them.
    """
    full_head = "causal_lm" if head == "base" else head
    tied = config.tie_word_embeddings
    state: Dict[str, np.ndarray] = {}
    for key, value in tensors:
        if not key.startswith(("model.", "lm_head.", "score.")):
            key = "model." + key  # a bare NucleusXModel checkpoint
        if key in BUFFERS:
            check_buffers(key, value, config)
        elif key not in HEAD_KEYS["causal_lm"] + HEAD_KEYS["sequence_classification"] or key in HEAD_KEYS[head]:
            state[key] = value  # the other head's weights (and for the bare model both heads') are ignored
    shapes = {k: v.shape for k, v in state.items()}
    head_missing = check_torch_keys(shapes, config, full_head, allow_missing_head or head == "base")
    head_missing = [k for k in head_missing if k in HEAD_KEYS[head]]
    lm_head = state.pop("lm_head.weight") if tied and "lm_head.weight" in state else None
    params: dict = {}
    for key, value in state.items():
        path, transpose = torch_key_to_flax(key)
        if head == "base":
            path = path[1:]
        node = params
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = np.ascontiguousarray(value.T) if transpose else value
    if lm_head is not None:
        emb = params["model"]["embed_tokens"]["embedding"] if head != "base" else params["embed_tokens"]["embedding"]
        if not np.array_equal(np.asarray(lm_head), np.asarray(emb)):
            raise CheckpointError("lm_head.weight differs from model.embed_tokens.weight although "
                                  "tie_word_embeddings=True")
    return to_layout(params, config.scan_layers), head_missing


# ----------------------------------------------------------------------------------------- reading files
TORCH_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def find_torch_weights(directory: str) -> Optional[str]:
    """The first PyTorch weights file of an HF model directory (safetensors preferred), or None."""
    for name in TORCH_FILES:
        if os.path.isfile(os.path.join(directory, name)):
            return os.path.join(directory, name)
    return None


def iter_torch_tensors(path: str) -> Iterator[Tuple[str, np.ndarray]]:
    """Stream ``(key, numpy array)`` from a safetensors/.bin file or a sharded ``*.index.json``.

    Tensors are read one at a time (see :mod:`nucleusx_jax.tensorio`), so memory stays near the largest
    tensor. bfloat16 stays bfloat16 (``ml_dtypes``).
    """
    with CheckpointReader(path) as reader:
        for key in reader.index:
            yield key, reader.read(key)
