"""The single torch <-> flax name and layout map, and reading PyTorch checkpoint directories.

PyTorch key                                  flax path                                 layout
``model.embed_tokens.weight``                ``model/embed_tokens/embedding``          same
``model.layers.N.<...>_proj.weight``         ``model/layers_N/<...>_proj/kernel``      transposed
``model.layers.N.ffn.{fc1,fc2,gate}.weight`` ``model/layers_N/ffn/{...}/kernel``       transposed
``*rms_norm*.weight``                        ``*rms_norm*/weight``                     same
``lm_head.weight`` / ``score.weight``        ``lm_head/kernel`` / ``score/kernel``     transposed
``model.rel_pos.{angle,decay}``              (buffers: checked against the config, regenerated on export)

Tied embeddings: with ``tie_word_embeddings`` the flax model has no ``lm_head``; a ``lm_head.weight`` in
the checkpoint must then equal the embedding.
"""

import json
import os
import re
from typing import Dict, Iterator, List, Mapping, Optional, Tuple

import numpy as np

from . import retention
from .configuration import NucleusXConfig

Path = Tuple[str, ...]
BUFFERS = ("model.rel_pos.angle", "model.rel_pos.decay")
HEAD_KEYS = {"causal_lm": ("lm_head.weight",), "sequence_classification": ("score.weight",), "base": ()}


class CheckpointError(ValueError):
    """A checkpoint does not match the model or its config; the message lists what is wrong."""


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


def rel_pos_buffers(config: NucleusXConfig) -> Dict[str, np.ndarray]:
    """The ``model.rel_pos`` buffers the PyTorch model derives from ``config``."""
    return {
        "model.rel_pos.angle": retention.angle_table(config.key_head_dim),
        "model.rel_pos.decay": retention.log_decay_table(config.decoder_retention_heads, config.use_lm_decay),
    }


def check_buffers(key: str, value: np.ndarray, config: NucleusXConfig) -> None:
    """Raise if a ``rel_pos`` buffer disagrees with what ``config`` implies (beyond float32 rounding)."""
    expected = rel_pos_buffers(config)[key]
    value = np.asarray(value, np.float32)
    if value.shape != expected.shape or not np.allclose(value, expected, rtol=1e-5, atol=1e-6):
        raise CheckpointError(
            f"buffer {key} (shape {list(value.shape)}) disagrees with the config "
            f"(decoder_embed_dim={config.decoder_embed_dim}, decoder_retention_heads="
            f"{config.decoder_retention_heads}, use_lm_decay={config.use_lm_decay}) which implies shape "
            f"{list(expected.shape)} values {np.round(expected[:4], 6).tolist()}..."
        )


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
    """Build the flax ``params`` tree from ``(key, array)`` pairs of a PyTorch NucleusX state dict.

    Accepts checkpoints of any head for any ``head`` (the decoder weights are shared): a ``model.`` prefix is
    added or removed as needed and the other head's weights are ignored. Returns ``(params, missing head
    keys)``; missing head keys are an error unless ``allow_missing_head``. Every other missing, unexpected
    or wrong-shaped key raises :class:`CheckpointError` listing them.
    """
    expected = expected_torch_shapes(config, "causal_lm" if head == "base" else head)
    tied = config.tie_word_embeddings
    if tied:
        expected.pop("lm_head.weight", None)
    params: dict = {}
    seen, unexpected, wrong = set(), [], []
    lm_head = None
    for key, value in tensors:
        if not key.startswith(("model.", "lm_head.", "score.")):
            key = "model." + key  # a bare NucleusXModel checkpoint
        if key in BUFFERS:
            check_buffers(key, value, config)
            continue
        if key in ("lm_head.weight", "score.weight") and key not in expected and not (tied and key == "lm_head.weight"):
            continue  # the other head's weights
        if tied and key == "lm_head.weight":
            lm_head = value
            continue
        if key not in expected:
            unexpected.append(key)
            continue
        if tuple(value.shape) != expected[key]:
            wrong.append(f"{key}: checkpoint {list(value.shape)}, config expects {list(expected[key])}")
            continue
        path, transpose = torch_key_to_flax(key)
        if head == "base":
            path = path[1:]
        node = params
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = np.ascontiguousarray(value.T) if transpose else value
        seen.add(key)
    missing = sorted(set(expected) - seen)
    head_missing = [k for k in missing if k in HEAD_KEYS[head]]
    missing = [k for k in missing if k not in HEAD_KEYS[head]]
    problems = []
    if missing:
        problems.append(f"missing keys: {missing}")
    if unexpected:
        problems.append(f"unexpected keys: {sorted(unexpected)}")
    if wrong:
        problems.append(f"wrong shapes: {wrong}")
    if head_missing and not allow_missing_head:
        problems.append(f"missing head keys: {head_missing}")
    if problems:
        raise CheckpointError("checkpoint does not match the NucleusX config: " + "; ".join(problems))
    if lm_head is not None:
        emb = params["model"]["embed_tokens"]["embedding"] if head != "base" else params["embed_tokens"]["embedding"]
        if not np.array_equal(np.asarray(lm_head), np.asarray(emb)):
            raise CheckpointError("lm_head.weight differs from model.embed_tokens.weight although "
                                  "tie_word_embeddings=True")
    return params, head_missing


def params_to_state_dict(params: Mapping, config: NucleusXConfig, head: str) -> Iterator[Tuple[str, np.ndarray]]:
    """Yield ``(PyTorch key, array)`` in torch layout for a flax ``params`` tree, buffers included.

    With tied embeddings ``lm_head.weight`` is not yielded (safetensors stores it once, as the reference)."""
    from flax.traverse_util import flatten_dict

    flat = flatten_dict(dict(params))
    for path, value in flat.items():
        full = path if head != "base" else ("model",) + path
        key, transpose = flax_path_to_torch(full)
        arr = np.asarray(value)
        yield key, (np.ascontiguousarray(arr.T) if transpose else arr)
    yield from rel_pos_buffers(config).items()


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

    Tensors are read one at a time (safetensors ``safe_open``; ``torch.load(mmap=True)`` for ``.bin``),
    so memory stays near the largest tensor. bfloat16 stays bfloat16 (``ml_dtypes``).
    """
    if path.endswith(".index.json"):
        with open(path) as f:
            weight_map = json.load(f)["weight_map"]
        base = os.path.dirname(path)
        for shard in sorted(set(weight_map.values())):
            yield from iter_torch_tensors(os.path.join(base, shard))
        return
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="numpy") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)
        return
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"reading {path} needs PyTorch: pip install 'nucleusx-jax[torch]'") from e
    state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    for key in list(state):
        yield key, torch_to_numpy(state.pop(key))


def torch_to_numpy(t: "object") -> np.ndarray:
    """A CPU torch tensor as numpy without changing its dtype (bfloat16 via ``ml_dtypes``)."""
    import ml_dtypes
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()
