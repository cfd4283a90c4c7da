"""The core model object: a config, its parameters and one compiled call; loading, saving and generation.
No transformers needed.

    model = nucleusx_jax.from_pretrained("path/to/dir")       # our flax dirs or PyTorch ones (safetensors/.bin)
    out = model(input_ids, forward_mode="chunkwise")           # out.logits [B, T, vocab]
    model.generate(input_ids, max_new_tokens=32)               # [B, T + 32]
    model.save_pretrained("out/")                              # config.json + flax_model.msgpack

The call takes the same arguments as the HF adapter's (``nucleusx_jax.hf``): it validates them on the host
(clear ``ValueError``), then runs one jit-compiled function, compiled once per input shape and option set.
"""

import logging
import os
import re
import shutil
import tempfile
from typing import Any, Iterator, NamedTuple, Optional, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from . import decode, documents, modeling, storage, weights
from .losses import head_loss
from .configuration import CONFIG_FILE, NucleusXConfig, short
from .convert import parse_size
from .inputs import HEADS, Cache, check_inputs
from .tensorio import FORMATS, CheckpointReader, CheckpointWriter, TensorInfo

logger = logging.getLogger(__name__)
FLAX_FILES = ("flax_model.msgpack", "flax_model.msgpack.index.json")
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
MODULES = {"base": modeling.NucleusXModule, "causal_lm": modeling.NucleusXForCausalLMModule,
           "sequence_classification": modeling.NucleusXForSequenceClassificationModule}


class Output(NamedTuple):
    """What a call returns. ``logits``: ``[B, T, vocab]`` (causal LM), ``[B, num_labels]`` (classification),
    None for the bare decoder, whose output is ``last_hidden_state`` ``[B, T, E]``; ``loss`` when labels are
    given; ``past_key_values`` (one state per layer) with ``use_cache``; ``hidden_states`` (L + 1 arrays
    ``[B, T, E]``) with ``output_hidden_states``."""

    logits: Optional[jax.Array]
    past_key_values: Optional[Cache]
    loss: Optional[jax.Array]
    hidden_states: Optional[Tuple[jax.Array, ...]]
    last_hidden_state: Optional[jax.Array]


class NucleusX:
    """A NucleusX model: ``config``, ``params`` (a nested dict of arrays), ``module`` (the linen module of
    ``head``: ``causal_lm``, ``base`` or ``sequence_classification``).

    ``dtype`` is the compute dtype (parameters keep theirs); ``params=None`` initialises them randomly from
    ``seed`` (the reference's init schemes) unless ``init=False``.
    """

    def __init__(self, config: NucleusXConfig, params: Any = None, *, head: str = "causal_lm", dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, gradient_checkpointing: bool = False,
                 remat_policy: Optional[str] = None, seed: int = 0, init: bool = True):
        if not isinstance(config, NucleusXConfig):
            raise TypeError(f"config must be a nucleusx_jax.NucleusXConfig, got {type(config).__name__}")
        if head not in HEADS:
            raise ValueError(f"head={head!r} is invalid: must be one of {', '.join(HEADS)}")
        self.config, self.head = config, head
        self.module = MODULES[head](config, dtype=dtype, param_dtype=param_dtype,
                                    gradient_checkpointing=gradient_checkpointing, remat_policy=remat_policy)
        self.params = params if params is not None or not init else self.init_params(jax.random.PRNGKey(seed))
        self._forward = jax.jit(self._apply, static_argnames=("options", "with_loss"))

    @property
    def dtype(self) -> Any:
        """The compute dtype."""
        return self.module.dtype

    def init_params(self, rng: jax.Array, input_shape: Tuple[int, int] = (1, 1)) -> Any:
        """Random parameters (the reference's init schemes)."""
        ids = jnp.zeros(input_shape, jnp.int32)
        params_rng, dropout_rng = jax.random.split(rng)
        return nn.meta.unbox(self.module.init({"params": params_rng, "dropout": dropout_rng}, ids)["params"])

    def _apply(self, params: Any, input_ids: jax.Array, attention_mask: Optional[jax.Array],
               past_key_values: Optional[Cache], segment_ids: Optional[jax.Array], labels: Optional[jax.Array],
               dropout_rng: Optional[jax.Array], *, options: modeling.RunOptions, with_loss: bool) -> Output:
        rngs = {"dropout": dropout_rng} if dropout_rng is not None else {}
        out, cache, hidden = self.module.apply({"params": params}, input_ids, attention_mask, past_key_values,
                                               segment_ids, options=options, rngs=rngs)
        if with_loss and segment_ids is not None and self.head == "causal_lm":
            # no document predicts the first token of the next one
            labels = jnp.concatenate([labels[:, :1], documents.next_token_targets(labels, segment_ids)], axis=1)
        loss = head_loss(self.head, self.config, out, labels) if with_loss else None
        if self.head == "base":
            return Output(None, cache, loss, hidden, out)
        return Output(out, cache, loss, hidden, None)

    def __call__(
        self,
        input_ids: Any,
        attention_mask: Any = None,
        forward_mode: Optional[str] = None,
        recurrent_chunk_size: Optional[int] = None,
        past_key_values: Any = None,
        use_cache: Optional[bool] = None,
        labels: Any = None,
        params: Any = None,
        *,
        output_hidden_states: bool = False,
        dropout_rng: Optional[jax.Array] = None,
        train: bool = False,
        segment_ids: Any = None,
    ) -> Output:
        """Run the model. input_ids, attention_mask and segment_ids ``[B, T]`` (0 marks padding).

        ``segment_ids`` (1, 2, ... per document, each one contiguous run; 0 = padding) keeps documents packed
        in a row apart: each gets the numbers it gets alone, positions restarting at 0; the returned cache is
        each row's last document (continue it in recurrent mode); with ``labels`` no document is asked to
        predict the first token of the next. With ``past_key_values``, the first segment continues the cache.

        ``forward_mode``: ``parallel``, ``chunkwise`` (chunks of ``recurrent_chunk_size``) or ``recurrent``
        (T recurrent steps continuing from ``past_key_values``); default ``recurrent`` when ``past_key_values``
        is given, else ``config.forward_mode``. ``use_cache`` defaults to whether ``past_key_values`` is given.
        ``train=True`` applies dropout and drop path (keyed by ``dropout_rng``).
        """
        cfg = self.config
        mode = forward_mode if forward_mode is not None else (
            "recurrent" if past_key_values is not None else cfg.forward_mode)
        use_cache = use_cache if use_cache is not None else past_key_values is not None
        chunk = recurrent_chunk_size if recurrent_chunk_size is not None else cfg.recurrent_chunk_size
        past = check_inputs(cfg, input_ids, attention_mask, mode, chunk, past_key_values, labels, self.head,
                            segment_ids=segment_ids)
        if train and dropout_rng is None and (cfg.dropout > 0 or cfg.activation_dropout > 0 or cfg.drop_path_rate > 0):
            raise ValueError("train=True with dropout/drop_path in the config needs dropout_rng=jax.random.key(...)")
        params = params if params is not None else self.params
        if params is None:
            raise ValueError("this model has no parameters: pass params=..., or build it with init=True")
        options = modeling.RunOptions.from_config(cfg, mode=mode, chunk_size=int(chunk), return_state=bool(use_cache),
                                                  hidden_states=bool(output_hidden_states), deterministic=not train)
        return self._forward(
            params, jnp.asarray(input_ids, jnp.int32),
            None if attention_mask is None else jnp.asarray(attention_mask, jnp.int32),
            past, None if segment_ids is None else jnp.asarray(segment_ids, jnp.int32),
            None if labels is None else jnp.asarray(labels), dropout_rng,
            options=options, with_loss=labels is not None)

    def generate(self, input_ids: Any, attention_mask: Any = None, **kwargs: Any) -> Any:
        """:func:`nucleusx_jax.decode.generate` on this model: prompt plus new tokens ``[B, T + max_new_tokens]``."""
        return decode.generate(self, input_ids, attention_mask, **kwargs)

    def stream(self, input_ids: Any, attention_mask: Any = None, **kwargs: Any) -> Iterator[np.ndarray]:
        """:func:`nucleusx_jax.decode.stream` on this model: the new tokens ``[B]`` one by one."""
        return decode.stream(self, input_ids, attention_mask, **kwargs)

    def save_pretrained(self, directory: Union[str, os.PathLike], params: Any = None,
                        max_shard_size: Union[int, str] = "5GB") -> str:
        """Write ``config.json`` and ``flax_model.msgpack`` (sharded above ``max_shard_size``, with an index) into
        ``directory``: the layout transformers' Flax models save and load, one tensor per layer whatever
        ``config.scan_layers`` (see :mod:`nucleusx_jax.weights`). Written into a temporary directory first; each
        file then replaces its old version by rename. Returns the directory."""
        params = jax.device_get(params if params is not None else self.params)
        return save_flax_dir(directory, self.config, params, max_shard_size)


def save_flax_dir(directory: Union[str, os.PathLike], config: NucleusXConfig, params: Any,
                  max_shard_size: Union[int, str] = "5GB") -> str:
    """``config.json`` plus the params as (sharded) ``flax_model.msgpack`` in ``directory``; see
    :meth:`NucleusX.save_pretrained`."""
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


def from_pretrained(path: Union[str, os.PathLike], dtype: Any = None, *, head: str = "causal_lm",
                    **config_overrides: Any) -> NucleusX:
    """Load a NucleusX model directory: ours (``flax_model.msgpack``) or a PyTorch one (``model.safetensors``,
    ``pytorch_model.bin``, sharded or not), local or a hub repo id. ``dtype``: the compute dtype (default
    float32; parameters keep the checkpoint's). ``config_overrides`` replace ``config.json`` fields.
    Head weights the checkpoint lacks (a classification head from a causal LM) are initialised randomly,
    with a warning. A URL (``gs://bucket/model``, see :mod:`.storage`) is downloaded to a temporary directory;
    ``hf://org/name`` and Hub ids: see :func:`resolve`."""
    if storage.is_url(path) and not os.fspath(path).startswith(HUB_PREFIX):
        with tempfile.TemporaryDirectory(prefix="nucleusx-model-") as local:
            storage.download_dir(os.fspath(path), local)
            return from_pretrained(local, dtype, head=head, **config_overrides)
    directory = resolve(path)
    config = NucleusXConfig.from_pretrained(directory, **config_overrides)
    params, head_missing = load_params(directory, config, head)
    model = NucleusX(config, jax.tree.map(jnp.asarray, params), head=head,
                     dtype=jnp.float32 if dtype is None else dtype)
    if head_missing:
        logger.warning("%s: %s not in %s; initialised randomly (train them before use)", head, head_missing,
                       directory)
        model.params = fill_missing(model.params, model.init_params(jax.random.PRNGKey(0)))
    return model


def compute_dtype(name: str) -> Any:
    """The compute dtype called ``name`` (a key of ``COMPUTE_DTYPES``); anything else is a ValueError."""
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"dtype={name!r} is invalid: must be one of {', '.join(COMPUTE_DTYPES)}")
    return COMPUTE_DTYPES[name]


def fill_missing(params: Any, random_params: Any) -> dict:
    """``params`` plus the entries of ``random_params`` it lacks."""
    flat = flatten_dict(dict(params))
    for key, value in flatten_dict(dict(random_params)).items():
        flat.setdefault(key, value)
    return unflatten_dict(flat)
