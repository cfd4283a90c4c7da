"""The core model object: a config, its parameters and one compiled call; loading, saving and generation.
No transformers needed.

    model = nucleusx_jax.from_pretrained("path/to/dir")       # our flax dirs or PyTorch ones (safetensors/.bin)
    out = model(input_ids, forward_mode="chunkwise")           # out.logits [B, T, vocab]
    model.generate(input_ids, max_new_tokens=32)               # [B, T + 32]
    model.save_pretrained("out/")                              # config.json + flax_model.msgpack

Reading and writing model directories is :mod:`nucleusx_jax.pretrained`'s job; the losses are
:mod:`nucleusx_jax.losses`'.

The call takes the same arguments as the HF adapter's (``nucleusx_jax.hf``): it validates them on the host
(clear ``ValueError``), then runs one jit-compiled function, compiled once per input shape and option set.
"""

import logging
import os
from typing import Any, Iterator, NamedTuple, Optional, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from . import checks, decode, documents, modeling, pretrained
from .configuration import NucleusXConfig
from .inputs import HEADS, check_inputs
from .losses import head_loss
from .types import Array, Cache, Params

logger = logging.getLogger(__name__)
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
MODULES = {"base": modeling.NucleusXModule, "causal_lm": modeling.NucleusXForCausalLMModule,
           "sequence_classification": modeling.NucleusXForSequenceClassificationModule}


class Output(NamedTuple):
    """What a call returns. ``logits``: ``[B, T, vocab]`` (causal LM), ``[B, num_labels]`` (classification),
    None for the bare decoder, whose output is ``last_hidden_state`` ``[B, T, E]``; ``loss`` when labels are
    given; ``past_key_values`` (one state per layer) with ``use_cache``; ``hidden_states`` (L + 1 arrays
    ``[B, T, E]``) with ``output_hidden_states``."""

    logits: Optional[Array]
    past_key_values: Optional[Cache]
    loss: Optional[Array]
    hidden_states: Optional[Tuple[Array, ...]]
    last_hidden_state: Optional[Array]


class NucleusX:
    """A NucleusX model: ``config``, ``params`` (a nested dict of arrays), ``module`` (the linen module of
    ``head``: ``causal_lm``, ``base`` or ``sequence_classification``).

    ``dtype`` is the compute dtype (parameters keep theirs); ``params=None`` initialises them randomly from
    ``seed`` (the reference's init schemes) unless ``init=False``.
    """

    def __init__(self, config: NucleusXConfig, params: Optional[Params] = None, *, head: str = "causal_lm",
                 dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, gradient_checkpointing: bool = False,
                 remat_policy: Optional[str] = None, seed: int = 0, init: bool = True):
        if not isinstance(config, NucleusXConfig):
            raise TypeError(f"config must be a nucleusx_jax.NucleusXConfig, got {type(config).__name__}")
        self.config, self.head = config, checks.choice("head", head, HEADS)
        self.module = MODULES[head](config, dtype=dtype, param_dtype=param_dtype,
                                    gradient_checkpointing=gradient_checkpointing, remat_policy=remat_policy)
        self.params = params if params is not None or not init else self.init_params(jax.random.PRNGKey(seed))
        self._forward = jax.jit(self._apply, static_argnames=("options", "with_loss"))

    @property
    def dtype(self) -> Any:
        """The compute dtype."""
        return self.module.dtype

    def init_params(self, rng: Array, input_shape: Tuple[int, int] = (1, 1)) -> Params:
        """Random parameters (the reference's init schemes)."""
        ids = jnp.zeros(input_shape, jnp.int32)
        params_rng, dropout_rng = jax.random.split(rng)
        return nn.meta.unbox(self.module.init({"params": params_rng, "dropout": dropout_rng}, ids)["params"])

    def _apply(self, params: Params, input_ids: Array, attention_mask: Optional[Array],
               past_key_values: Optional[Cache], segment_ids: Optional[Array], labels: Optional[Array],
               dropout_rng: Optional[Array], *, options: modeling.RunOptions, with_loss: bool) -> Output:
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
        params: Optional[Params] = None,
        *,
        output_hidden_states: bool = False,
        dropout_rng: Optional[Array] = None,
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
        is given, else ``config.forward_mode``. ``chunkwise`` with ``past_key_values`` continues a cache of
        :class:`~nucleusx_jax.retention.CarriedState` (start from :func:`nucleusx_jax.runtime.empty_carried_cache`)
        and returns the next one: windows run so give the logits of one pass over their concatenation; such a
        cache also continues in recurrent mode. ``use_cache`` defaults to whether ``past_key_values`` is given.
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

    def save_pretrained(self, directory: Union[str, os.PathLike], params: Optional[Params] = None,
                        max_shard_size: Union[int, str] = "5GB") -> str:
        """Write ``config.json`` and ``flax_model.msgpack`` (sharded above ``max_shard_size``, with an index) into
        ``directory``: the layout transformers' Flax models save and load, one tensor per layer whatever
        ``config.scan_layers`` (see :mod:`nucleusx_jax.weights`). Written into a temporary directory first; each
        file then replaces its old version by rename. Returns the directory."""
        params = jax.device_get(params if params is not None else self.params)
        return pretrained.save(directory, self.config, params, max_shard_size)


def from_pretrained(path: Union[str, os.PathLike], dtype: Any = None, *, head: str = "causal_lm",
                    **config_overrides: Any) -> NucleusX:
    """Load a NucleusX model directory: ours (``flax_model.msgpack``) or a PyTorch one (``model.safetensors``,
    ``pytorch_model.bin``, sharded or not), local or a hub repo id. ``dtype``: the compute dtype (default
    float32; parameters keep the checkpoint's). ``config_overrides`` replace ``config.json`` fields.
    Head weights the checkpoint lacks (a classification head from a causal LM) are initialised randomly,
    with a warning. A URL (``gs://bucket/model``, see :mod:`.storage`) is downloaded to a temporary directory;
    ``hf://org/name`` and Hub ids: see :func:`nucleusx_jax.pretrained.resolve`."""
    loaded = pretrained.load(path, head, **config_overrides)
    model = NucleusX(loaded.config, loaded.params, head=head, dtype=jnp.float32 if dtype is None else dtype)
    if loaded.head_missing:
        logger.warning("%s: %s not in %s; initialised randomly (train them before use)", head, loaded.head_missing,
                       loaded.directory)
        model.params = pretrained.fill_missing(model.params, model.init_params(jax.random.PRNGKey(0)))
    return model


def compute_dtype(name: str) -> Any:
    """The compute dtype called ``name`` (a key of ``COMPUTE_DTYPES``); anything else is a ValueError."""
    return COMPUTE_DTYPES[checks.choice("dtype", name, COMPUTE_DTYPES)]
