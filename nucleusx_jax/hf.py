"""transformers ``FlaxPreTrainedModel`` wrappers: the public call signature, input checks, loading.

``model(input_ids, attention_mask=None, forward_mode=None, recurrent_chunk_size=None, past_key_values=None,
use_cache=None, output_hidden_states=False, labels=None, params=None, dropout_rng=None, train=False,
segment_ids=None)``
validates its inputs outside jit (clear ``ValueError``), then runs one jit-compiled function, compiled once
per input shape and option set. :class:`FlaxNucleusXForCausalLM` also carries the ``FlaxGenerationMixin``
hooks (the prompt once, then one recurrent step per new token; see :mod:`nucleusx_jax.generate`).
"""

import logging
import os
from typing import Any, Dict, Optional, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core.frozen_dict import freeze, unfreeze
from flax.traverse_util import flatten_dict, unflatten_dict
from transformers.modeling_flax_utils import FlaxPreTrainedModel
from transformers.utils import ModelOutput

from . import documents, modeling, retention, weights
from .configuration import FORWARD_MODES, NucleusXConfig

logger = logging.getLogger(__name__)
Cache = Tuple[retention.RetentionState, ...]


@flax.struct.dataclass
class FlaxNucleusXOutput(ModelOutput):
    """Output of :class:`FlaxNucleusXModel`: ``last_hidden_state`` ``[B, T, E]``."""

    last_hidden_state: jax.Array = None
    past_key_values: Optional[Cache] = None
    hidden_states: Optional[Tuple[jax.Array, ...]] = None


@flax.struct.dataclass
class FlaxNucleusXCausalLMOutput(ModelOutput):
    """Output of :class:`FlaxNucleusXForCausalLM`: ``logits`` ``[B, T, vocab]``, ``loss`` when labels given."""

    loss: Optional[jax.Array] = None
    logits: jax.Array = None
    past_key_values: Optional[Cache] = None
    hidden_states: Optional[Tuple[jax.Array, ...]] = None


@flax.struct.dataclass
class FlaxNucleusXSequenceClassifierOutput(ModelOutput):
    """Output of :class:`FlaxNucleusXForSequenceClassification`: ``logits`` ``[B, num_labels]``."""

    loss: Optional[jax.Array] = None
    logits: jax.Array = None
    past_key_values: Optional[Cache] = None
    hidden_states: Optional[Tuple[jax.Array, ...]] = None


def _shape(x: Any) -> Tuple[int, ...]:
    return tuple(np.shape(x))


def check_inputs(
    config: NucleusXConfig,
    input_ids: Any,
    attention_mask: Any,
    forward_mode: str,
    chunk_size: Any,
    past_key_values: Any,
    labels: Any,
    head: str,
    *,
    segment_ids: Any = None,
) -> Optional[Cache]:
    """Validate a call's inputs on the host; returns ``past_key_values`` as :class:`RetentionState` tuples."""
    if forward_mode not in FORWARD_MODES:
        raise ValueError(f"forward_mode={forward_mode!r} is invalid: must be one of {', '.join(FORWARD_MODES)}")
    if not isinstance(chunk_size, (int, np.integer)) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"recurrent_chunk_size={chunk_size!r} is invalid: must be an integer >= 1")
    if np.ndim(input_ids) != 2:
        raise ValueError(f"input_ids must have rank 2 [batch, length], got shape {_shape(input_ids)}")
    # Traced ids (inside a jit or the generation loop) have shapes but no values: only their values go unchecked.
    concrete = not isinstance(input_ids, jax.core.Tracer)
    ids = np.asarray(input_ids) if concrete else input_ids
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must hold integer token ids, got dtype {ids.dtype}")
    if ids.shape[1] == 0:
        raise ValueError("input_ids is empty: length 0; give at least one token")
    bad = ids[(ids < 0) | (ids >= config.vocab_size)] if concrete else np.zeros(0)
    if bad.size:
        raise ValueError(f"input_ids holds token ids outside [0, vocab_size={config.vocab_size}): "
                         f"{sorted(set(bad.tolist()))[:10]}")
    if attention_mask is not None and _shape(attention_mask) != ids.shape:
        raise ValueError(f"attention_mask has shape {_shape(attention_mask)} but input_ids has shape "
                         f"{ids.shape}; they must be equal")
    if segment_ids is not None:
        if isinstance(segment_ids, jax.core.Tracer):
            if _shape(segment_ids) != ids.shape:
                raise ValueError(f"segment_ids has shape {_shape(segment_ids)} but input_ids has shape {ids.shape}; "
                                 "they must be equal")
        else:
            retention.check_segment_ids(np.asarray(segment_ids), ids.shape)
            if attention_mask is not None and not isinstance(attention_mask, jax.core.Tracer) and (
                    (np.asarray(attention_mask) != 0) != (np.asarray(segment_ids) != 0)).any():
                raise ValueError("attention_mask and segment_ids disagree: padding must have attention_mask 0 and "
                                 "segment id 0, every other token a non-zero segment id (or leave attention_mask out)")
    if labels is not None and head == "causal_lm" and _shape(labels) != ids.shape:
        raise ValueError(f"labels must have the shape of input_ids {ids.shape}, got {_shape(labels)}")
    if labels is not None and head == "sequence_classification" and _shape(labels)[:1] != ids.shape[:1]:
        raise ValueError(f"labels must have shape [batch={ids.shape[0]}] or [batch, num_labels], got {_shape(labels)}")
    if labels is not None and head == "base":
        raise ValueError("the bare FlaxNucleusXModel takes no labels; use FlaxNucleusXForCausalLM")
    if past_key_values is None:
        return None
    if forward_mode != "recurrent":
        raise ValueError(f"past_key_values is only used by forward_mode='recurrent', got {forward_mode!r}; "
                         "run the prompt without past_key_values or continue in recurrent mode")
    h, kd, vd = config.decoder_retention_heads, config.key_head_dim, config.value_head_dim
    batch = ids.shape[0]
    if len(past_key_values) != config.decoder_layers:
        raise ValueError(f"past_key_values has {len(past_key_values)} layers but this model has "
                         f"decoder_layers={config.decoder_layers}: it comes from a different config")
    states = []
    for i, layer in enumerate(past_key_values):
        if len(layer) != 3:
            raise ValueError(f"past_key_values[{i}] must be (kv, scale, seqlen), got {len(layer)} items")
        kv, scale, seqlen = layer
        if _shape(kv) != (batch, h, vd, kd):
            raise ValueError(f"past_key_values[{i}] kv has shape {_shape(kv)} but this model and batch expect "
                             f"{(batch, h, vd, kd)} [batch, heads, value_head_dim, key_head_dim]: "
                             "it comes from a different config or batch")
        if _shape(scale) not in ((batch, h, 1, 1), (1, h, 1, 1)):
            raise ValueError(f"past_key_values[{i}] scale has shape {_shape(scale)}, expected {(batch, h, 1, 1)}")
        if _shape(seqlen) not in ((), (1,), (batch,)):
            raise ValueError(f"past_key_values[{i}] seqlen has shape {_shape(seqlen)}, expected () or ({batch},) "
                             "(a position per row, left by segment_ids): it comes from a different batch")
        states.append(retention.RetentionState(
            jnp.asarray(kv, jnp.float32),
            jnp.broadcast_to(jnp.asarray(scale, jnp.float32), (batch, h, 1, 1)),
            jnp.asarray(seqlen, jnp.int32).reshape(() if _shape(seqlen) in ((), (1,)) else (batch,)),
        ))
    return tuple(states)


def prompt_forward_mode(
    config: NucleusXConfig, length: int, recurrent_chunk_size: Optional[int] = None, threshold: Optional[int] = None
) -> Tuple[str, int]:
    """How generation runs a prompt of ``length`` tokens once: ``(forward_mode, chunk_size)``.

    Parallel mode, or chunkwise when ``length > threshold`` (default ``4 * recurrent_chunk_size``).
    """
    chunk = recurrent_chunk_size if recurrent_chunk_size is not None else config.recurrent_chunk_size
    if threshold is None:
        threshold = 4 * chunk
    if not isinstance(threshold, (int, np.integer)) or isinstance(threshold, bool) or threshold < 1:
        raise ValueError(f"prompt_chunkwise_threshold={threshold!r} is invalid: must be an integer >= 1")
    return ("chunkwise" if length > threshold else "parallel"), chunk


class FlaxNucleusXPreTrainedModel(FlaxPreTrainedModel):
    """Shared HF glue: init, the validated and jit-compiled call, and loading PyTorch checkpoints."""

    config_class = NucleusXConfig
    base_model_prefix = "model"
    module_class: type = None
    head: str = "base"

    def __init__(
        self,
        config: NucleusXConfig,
        input_shape: Tuple[int, int] = (1, 1),
        seed: int = 0,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        _do_init: bool = True,
        gradient_checkpointing: bool = False,
        **kwargs: Any,
    ):
        del kwargs  # transformers' loaders pass hub options (adapter_kwargs, _from_auto, ...) that do not apply
        module = self.module_class(config=config, dtype=dtype, param_dtype=param_dtype,
                                   gradient_checkpointing=gradient_checkpointing)
        super().__init__(config, module, input_shape=input_shape, seed=seed, dtype=dtype, _do_init=_do_init)
        self._forward = jax.jit(self._apply, static_argnames=(
            "forward_mode", "chunk_size", "use_cache", "output_hidden_states", "train", "z_loss_coeff"))

    def init_weights(self, rng: jax.Array, input_shape: Tuple[int, int], params: Any = None) -> Any:
        """Random parameters (the reference's init schemes); with ``params``, fill only what it lacks."""
        ids = jnp.zeros(input_shape, jnp.int32)
        params_rng, dropout_rng = jax.random.split(rng)
        random_params = nn.meta.unbox(self.module.init({"params": params_rng, "dropout": dropout_rng}, ids)["params"])
        if params is None:
            return random_params
        random_flat, given = flatten_dict(unfreeze(random_params)), flatten_dict(unfreeze(params))
        for key in set(random_flat) - set(given):
            given[key] = random_flat[key]
        self._missing_keys = set()
        return freeze(unflatten_dict(given)) if isinstance(params, flax.core.FrozenDict) else unflatten_dict(given)

    def enable_gradient_checkpointing(self) -> None:
        """Rematerialise each decoder layer in the backward pass."""
        self._module = self.module_class(config=self.config, dtype=self.dtype, param_dtype=self.module.param_dtype,
                                         gradient_checkpointing=True)

    def _apply(
        self,
        params: Any,
        input_ids: jax.Array,
        attention_mask: Optional[jax.Array],
        past_key_values: Optional[Cache],
        segment_ids: Optional[jax.Array],
        labels: Optional[jax.Array],
        dropout_rng: Optional[jax.Array],
        forward_mode: str,
        chunk_size: int,
        use_cache: bool,
        output_hidden_states: bool,
        train: bool,
        z_loss_coeff: float,
    ) -> Dict[str, Any]:
        rngs = {"dropout": dropout_rng} if dropout_rng is not None else {}
        options = modeling.RunOptions(mode=forward_mode, chunk_size=chunk_size, impl=self.config.retention_impl,
                                      return_state=use_cache, hidden_states=output_hidden_states,
                                      deterministic=not train)
        out, cache, hidden = self.module.apply(
            {"params": params}, input_ids, attention_mask, past_key_values, segment_ids, options=options, rngs=rngs)
        loss = None
        if labels is not None and segment_ids is not None and self.head == "causal_lm":
            # no document predicts the first token of the next one
            labels = jnp.concatenate([labels[:, :1], documents.next_token_targets(labels, segment_ids)], axis=1)
        if labels is not None:
            loss = self._loss(out, labels, z_loss_coeff)
        return {"out": out, "cache": cache, "hidden": hidden, "loss": loss}

    def _loss(self, out: jax.Array, labels: jax.Array, z_loss_coeff: float) -> jax.Array:
        raise NotImplementedError  # the heads define their loss; check_inputs refuses labels for the bare model

    def _wrap(self, result: Dict[str, Any]) -> ModelOutput:
        return FlaxNucleusXOutput(result["out"], result["cache"], result["hidden"])

    def __call__(
        self,
        input_ids: Any,
        attention_mask: Any = None,
        forward_mode: Optional[str] = None,
        recurrent_chunk_size: Optional[int] = None,
        past_key_values: Any = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: bool = False,
        labels: Any = None,
        params: Any = None,
        dropout_rng: Optional[jax.Array] = None,
        train: bool = False,
        return_dict: bool = True,
        segment_ids: Any = None,
    ) -> Any:
        """Run the model. Shapes: input_ids, attention_mask and segment_ids ``[B, T]`` (0 marks padding).

        ``segment_ids`` (1, 2, ... per document, each one contiguous run; 0 = padding) keeps documents packed
        in a row apart: each gets the numbers it gets alone, positions restarting at 0; the returned cache is
        each row's last document (continue it in recurrent mode); with ``labels`` no document is asked to
        predict the first token of the next. With ``past_key_values``, the first segment continues the cache.

        ``forward_mode``: ``parallel``, ``chunkwise`` (chunks of ``recurrent_chunk_size``) or ``recurrent``
        (T recurrent steps continuing from ``past_key_values``); default ``recurrent`` when ``past_key_values``
        is given, else ``config.forward_mode``. ``use_cache`` defaults to whether ``past_key_values`` is given.
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
        result = self._forward(
            params if params is not None else self.params,
            jnp.asarray(input_ids, jnp.int32),
            None if attention_mask is None else jnp.asarray(attention_mask, jnp.int32),
            past,
            None if segment_ids is None else jnp.asarray(segment_ids, jnp.int32),
            None if labels is None else jnp.asarray(labels),
            dropout_rng,
            forward_mode=mode,
            chunk_size=int(chunk),
            use_cache=bool(use_cache),
            output_hidden_states=bool(output_hidden_states),
            train=bool(train),
            z_loss_coeff=float(cfg.z_loss_coeff),
        )
        output = self._wrap(result)
        return output if return_dict else output.to_tuple()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *model_args: Any, **kwargs: Any) -> Any:
        """HF ``from_pretrained``; PyTorch NucleusX directories (``from_pt=True``, or a directory holding only
        PyTorch weights) load through :mod:`nucleusx_jax.weights`, tied embeddings included."""
        path = os.fspath(pretrained_model_name_or_path)
        from_pt = kwargs.get("from_pt", False)
        is_dir = os.path.isdir(path)
        has_flax = is_dir and any(os.path.isfile(os.path.join(path, n))
                                  for n in ("flax_model.msgpack", "flax_model.msgpack.index.json"))
        torch_file = weights.find_torch_weights(path) if is_dir else None
        if not is_dir or not (from_pt or not has_flax):
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        if torch_file is None:
            raise FileNotFoundError(f"{path} holds no PyTorch weights: expected one of {', '.join(weights.TORCH_FILES)}")
        kwargs.pop("from_pt", None)
        config = kwargs.pop("config", None)
        do_init = kwargs.pop("_do_init", True)
        dtype = kwargs.pop("dtype", jnp.float32)
        for hub_only in ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder",
                         "ignore_mismatched_sizes", "proxies", "trust_remote_code"):
            kwargs.pop(hub_only, None)
        if config is None:
            config, kwargs = cls.config_class.from_pretrained(path, return_unused_kwargs=True, **kwargs)
        model = cls(config, *model_args, dtype=dtype, _do_init=False, **kwargs)
        params, head_missing = weights.state_dict_to_params(
            weights.iter_torch_tensors(torch_file), config, cls.head, allow_missing_head=True)
        if head_missing:
            logger.warning("%s: %s not in %s; initialised randomly (train them before use)",
                           cls.__name__, head_missing, torch_file)
            params = model.init_weights(model.key, model.input_shape, params)
        params = jax.tree.map(jnp.asarray, params)
        if not do_init:
            return model, params
        model._is_initialized = True  # built with _do_init=False to skip a random init; params come from disk
        model.params = params
        return model


class FlaxNucleusXModel(FlaxNucleusXPreTrainedModel):
    """The bare decoder: returns ``last_hidden_state``."""

    module_class = modeling.NucleusXModule
    head = "base"


class FlaxNucleusXForCausalLM(FlaxNucleusXPreTrainedModel):
    """NucleusX with its LM head; ``labels`` give the shifted cross-entropy (plus z-loss)."""

    module_class = modeling.NucleusXForCausalLMModule
    head = "causal_lm"

    def _loss(self, out: jax.Array, labels: jax.Array, z_loss_coeff: float) -> jax.Array:
        return modeling.causal_lm_loss(out, labels, z_loss_coeff)

    def _wrap(self, result: Dict[str, Any]) -> ModelOutput:
        return FlaxNucleusXCausalLMOutput(result["loss"], result["out"], result["cache"], result["hidden"])

    def prepare_inputs_for_generation(
        self,
        input_ids: Any,
        max_length: int,
        attention_mask: Any = None,
        recurrent_chunk_size: Optional[int] = None,
        prompt_chunkwise_threshold: Optional[int] = None,
    ) -> Dict[str, Any]:
        """``FlaxGenerationMixin`` hook: the keyword arguments of the first model call, on the prompt ``[B, T]``.

        A prompt of T > 1 tokens runs once in parallel mode, or chunkwise when T exceeds
        ``prompt_chunkwise_threshold`` (default ``4 * recurrent_chunk_size``), and leaves the recurrent state.
        The mixin runs a one-token prompt inside its loop: a recurrent step from the empty state.
        """
        length = _shape(input_ids)[-1] if np.ndim(input_ids) else 0
        mode, chunk = prompt_forward_mode(self.config, length, recurrent_chunk_size, prompt_chunkwise_threshold)
        check_inputs(self.config, input_ids, attention_mask, mode, chunk, None, None, self.head)
        batch = _shape(input_ids)[0]
        if max_length <= length:
            raise ValueError(f"max_length={max_length} leaves no new token after the prompt of {length} tokens: "
                             "max_new_tokens must be >= 1")
        if length > 1:
            return {"attention_mask": attention_mask, "forward_mode": mode, "recurrent_chunk_size": chunk,
                    "use_cache": True}
        cfg = self.config
        state = retention.empty_state(batch, cfg.decoder_retention_heads, cfg.key_head_dim, cfg.value_head_dim)
        mask = jnp.ones((batch, 1), jnp.int32) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
        return {"attention_mask": mask, "past_key_values": (state,) * cfg.decoder_layers}

    def update_inputs_for_generation(self, model_outputs: Any, model_kwargs: Dict[str, Any]) -> Dict[str, Any]:
        """``FlaxGenerationMixin`` hook: the next call is one recurrent step on the state just returned; the
        token it feeds was generated, so it is real (mask 1). The state's size never depends on the length."""
        del model_kwargs
        past = model_outputs.past_key_values
        return {"attention_mask": jnp.ones((past[0].kv.shape[0], 1), jnp.int32), "past_key_values": past}


class FlaxNucleusXForSequenceClassification(FlaxNucleusXPreTrainedModel):
    """NucleusX with a ``score`` head pooled like the reference; ``labels`` ``[B]`` give the loss."""

    module_class = modeling.NucleusXForSequenceClassificationModule
    head = "sequence_classification"

    def _loss(self, out: jax.Array, labels: jax.Array, z_loss_coeff: float) -> jax.Array:
        problem = self.config.problem_type
        if problem is None:
            if self.config.num_labels == 1:
                problem = "regression"
            elif jnp.issubdtype(labels.dtype, jnp.integer):
                problem = "single_label_classification"
            else:
                problem = "multi_label_classification"
        return modeling.sequence_classification_loss(out, labels, problem)

    def _wrap(self, result: Dict[str, Any]) -> ModelOutput:
        return FlaxNucleusXSequenceClassifierOutput(result["loss"], result["out"], result["cache"], result["hidden"])
