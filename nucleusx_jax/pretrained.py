"""A model directory on disk: ``config.json`` with the weights, written and read.

Writes ``flax_model.msgpack`` (sharded above a size, with an index): the layout transformers' Flax models save
and load. Reads those or PyTorch weights (safetensors preferred, then ``.bin``, sharded or not), from a local
directory, a URL (``gs://bucket/model``, see :mod:`.storage`) or the Hugging Face Hub (``hf://org/name``).
The model object (:mod:`.model`) builds on these; nothing here imports it or the converter.
"""

import logging
import os
import re
import shutil
import tempfile
from typing import Any, Iterator, NamedTuple, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from . import storage, weights
from .configuration import CONFIG_FILE, NucleusXConfig, short
from .tensorio import FORMATS, CheckpointReader, CheckpointWriter, TensorInfo
from .types import Params

logger = logging.getLogger(__name__)
FLAX_FILES = ("flax_model.msgpack", "flax_model.msgpack.index.json")

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30, "TIB": 2**40}


def parse_size(size: Union[int, str]) -> int:
    """Bytes from an int or a string like ``"5GB"`` (powers of 1000) or ``"2GiB"`` (powers of 1024)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(size))
    unit = match.group(2).upper() if match else None
    if isinstance(size, bool) or unit not in _UNITS or float(match.group(1)) * _UNITS[unit] < 1:
        raise ValueError(f"max_shard_size={size!r} is invalid: give a positive number of bytes or a size like "
                         "'5GB', '500MB' or '2GiB'")
    return int(float(match.group(1)) * _UNITS[unit])


def save(directory: Union[str, os.PathLike], config: NucleusXConfig, params: Params,
                  max_shard_size: Union[int, str] = "5GB") -> str:
    """``config.json`` plus the params as (sharded) ``flax_model.msgpack`` in ``directory``; see
    :meth:`nucleusx_jax.model.NucleusX.save_pretrained`."""
    directory = storage.absolute(directory)
    flat = {"/".join(k): np.asarray(v) for k, v in flatten_dict(weights.unstack_layers(params)).items()}
    parent = None if storage.is_url(directory) else os.path.dirname(directory)
    if parent is not None:
        os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.partial-", dir=parent)
    try:
        writer = CheckpointWriter(tmp, FORMATS["msgpack"], [(k, TensorInfo(v.shape, v.dtype)) for k, v in flat.items()],
                                  parse_size(max_shard_size))
        for name in writer.order:
            writer.write(name, flat[name])
        writer.close()
        config.save_pretrained(tmp)
        storage.makedirs(directory)
        # stale weights of an earlier save (other sharding) go; weights first, config.json last
        storage.publish_dir(tmp, directory, marker=CONFIG_FILE, stale=lambda name: name.startswith("flax_model"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def find_flax_weights(directory: str) -> Optional[str]:
    """The flax weights file (or shard index) of a model directory, or None."""
    return next((os.path.join(directory, n) for n in FLAX_FILES if os.path.isfile(os.path.join(directory, n))), None)


def load_params(directory: str, config: NucleusXConfig, head: str, *, from_pt: bool = False) -> Tuple[dict, list]:
    """The params of ``head`` from a model directory: flax weights (``flax_model.msgpack``, sharded or not) or
    PyTorch ones (safetensors preferred, then ``.bin``; sharded or not; only these with ``from_pt``). Keys and
    shapes are checked against ``config`` (:func:`nucleusx_jax.weights.state_dict_to_params`); returns
    ``(params, missing head keys)``, e.g. a classification head loaded from a causal-LM checkpoint."""
    flax_file = None if from_pt else find_flax_weights(directory)
    torch_file = weights.find_torch_weights(directory)
    if flax_file is not None:
        tensors = _flax_as_torch_tensors(flax_file)
    elif torch_file is not None:
        tensors = weights.iter_torch_tensors(torch_file)
    else:
        raise FileNotFoundError(f"{directory} holds no weights: expected one of "
                                f"{', '.join(FLAX_FILES + weights.TORCH_FILES)}")
    return weights.state_dict_to_params(tensors, config, head, allow_missing_head=True)


def _flax_as_torch_tensors(path: str) -> Iterator[Tuple[str, np.ndarray]]:
    """Stream a flax weights file (either layer layout) as ``(PyTorch key, array in PyTorch layout)``, one
    tensor (or stacked layer tensor) at a time."""
    with CheckpointReader(path) as reader:
        for name in reader.index:
            for path, value in weights.unstack_leaf(tuple(name.split("/")), reader.read(name)):
                key, transpose = weights.flax_path_to_torch(path)
                yield key, (value.T if transpose else value)


HUB_PREFIX = "hf://"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def looks_local(path: str) -> bool:
    """Whether ``path`` names a local file rather than a Hub repo id: anything but ``org/name``, or an
    ``org/name`` whose ``org`` is a local directory (``runs/tiny`` where ``runs/`` exists)."""
    return not _HUB_ID.match(path) or os.path.isdir(path.split("/")[0])


def resolve(path: Union[str, os.PathLike]) -> str:
    """A local model directory for ``path``: the directory itself, or a Hugging Face Hub repo downloaded
    into the local hub cache (needs ``huggingface_hub``). A Hub id is ``hf://org/name``, or ``org/name``
    when no such local directory exists and ``org`` is not a local directory either; any other path that
    does not exist is ``FileNotFoundError``, without asking the Hub."""
    path = os.fspath(path)
    repo = path[len(HUB_PREFIX):] if path.startswith(HUB_PREFIX) else None
    if repo is None and os.path.isdir(path):
        return path
    if repo is None and (os.path.exists(path) or looks_local(path)):
        what = "is a file, not a model directory" if os.path.exists(path) else "does not exist"
        raise FileNotFoundError(f"{short(path, 200)} {what} (a Hugging Face Hub model is hf://org/name, or "
                                "org/name where no local directory org/ exists)")
    repo = path if repo is None else repo
    if not _HUB_ID.match(repo):
        raise ValueError(f"{short(path, 200)} is not a Hugging Face Hub repo id: expected hf://org/name")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise FileNotFoundError(f"{path!r} is not a local directory; loading it from the Hugging Face Hub needs "
                                "huggingface_hub (pip install huggingface_hub)") from e
    return snapshot_download(repo, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.msgpack", "*.model"])


class Loaded(NamedTuple):
    """What :func:`load` read: the directory it read (a temporary copy is gone by now), the config with the
    overrides, the head's parameters as device arrays, and the head's keys the checkpoint lacks."""

    directory: str
    config: NucleusXConfig
    params: Params
    head_missing: list


def load(path: Union[str, os.PathLike], head: str, **config_overrides: Any) -> Loaded:
    """The config and ``head``'s parameters of a model directory: local, a URL (downloaded into a temporary
    directory first) or a Hub id (see :func:`resolve`); ``config_overrides`` replace ``config.json`` fields."""
    if storage.is_url(path) and not os.fspath(path).startswith(HUB_PREFIX):
        with tempfile.TemporaryDirectory(prefix="nucleusx-model-") as local:
            storage.download_dir(os.fspath(path), local)
            return load(local, head, **config_overrides)._replace(directory=os.fspath(path))
    directory = resolve(path)
    config = NucleusXConfig.from_pretrained(directory, **config_overrides)
    params, head_missing = load_params(directory, config, head)
    return Loaded(directory, config, jax.tree.map(jnp.asarray, params), head_missing)


def fill_missing(params: Params, random_params: Params) -> dict:
    """``params`` plus the entries of ``random_params`` it lacks."""
    flat = flatten_dict(dict(params))
    for key, value in flatten_dict(dict(random_params)).items():
        flat.setdefault(key, value)
    return unflatten_dict(flat)
