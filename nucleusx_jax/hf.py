"""The transformers 4.x Flax adapter (the ``[hf]`` extra): importing this module registers ``nucleus_x`` with
``AutoConfig`` and the ``FlaxAutoModel*`` classes.

Each ``FlaxNucleusX*`` is a thin ``FlaxPreTrainedModel`` over the core :class:`~nucleusx_jax.model.NucleusX`:
the call, the input checks and the compiled function are the core's; this layer adds the HF config and output
classes, ``config.output_hidden_states`` / ``config.return_dict`` defaults, HF loading (hub, ``from_pt``) and the
``FlaxGenerationMixin`` hooks (the prompt once, then one recurrent step per new token).

``model(input_ids, attention_mask=None, forward_mode=None, recurrent_chunk_size=None, past_key_values=None,
use_cache=None, output_hidden_states=None, labels=None, params=None, dropout_rng=None, train=False,
return_dict=None)``.
"""

import logging
import os
from typing import Any, Dict, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
from flax.core.frozen_dict import freeze, unfreeze
from transformers import (
    AutoConfig,
    FlaxAutoModel,
    FlaxAutoModelForCausalLM,
    FlaxAutoModelForSequenceClassification,
    PretrainedConfig,
)
from transformers.modeling_flax_utils import FlaxPreTrainedModel
from transformers.utils import ModelOutput

from . import configuration, modeling, runtime, weights
from .checks import shape_of
from .inputs import check_prompt
from .model import NucleusX
from .pretrained import fill_missing, find_flax_weights, load_params
from .remote_code import configuration_nucleus_x
from .types import Cache

logger = logging.getLogger(__name__)
# transformers' linen module names for the models below (its common Flax tests look them up here)
FlaxNucleusXModule = modeling.NucleusXModule
FlaxNucleusXForCausalLMModule = modeling.NucleusXForCausalLMModule
FlaxNucleusXForSequenceClassificationModule = modeling.NucleusXForSequenceClassificationModule


# One config class for both frameworks (the PyTorch remote code's, which needs neither torch nor JAX): AutoConfig
# then serves FlaxAutoModel* here and AutoModel* of nucleusx_jax.torch alike, whichever was imported last.
NucleusXConfig = configuration_nucleus_x.NucleusXConfig


def to_core(config: PretrainedConfig) -> configuration.NucleusXConfig:
    """The core config of a transformers config: the model fields and what the heads read (labels, problem
    type), validated by the core."""
    values = config.to_dict()
    keep = set(configuration.MODEL_FIELDS) | {"id2label", "label2id", "problem_type"}
    return configuration.NucleusXConfig(**{k: v for k, v in values.items() if k in keep})


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
class FlaxNucleusXSequenceClassifierOutput(FlaxNucleusXCausalLMOutput):
    """Output of :class:`FlaxNucleusXForSequenceClassification`: the same fields, ``logits`` ``[B, num_labels]``."""


class FlaxNucleusXPreTrainedModel(FlaxPreTrainedModel):
    """Shared HF glue over the core model: init, the call, loading PyTorch checkpoints."""

    config_class = NucleusXConfig
    base_model_prefix = "model"
    module_class: type = None
    head: str = "base"

    def __init__(
        self,
        config: Any,
        input_shape: Tuple[int, int] = (1, 1),
        seed: int = 0,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        _do_init: bool = True,
        gradient_checkpointing: bool = False,
    ):
        if isinstance(config, configuration.NucleusXConfig):
            config = NucleusXConfig(**config.to_dict())
        self.core = NucleusX(to_core(config), head=self.head, dtype=dtype, param_dtype=param_dtype,
                             gradient_checkpointing=gradient_checkpointing, init=False)
        super().__init__(config, self.core.module, input_shape=input_shape, seed=seed, dtype=dtype, _do_init=_do_init)

    def init_weights(self, rng: jax.Array, input_shape: Tuple[int, int], params: Any = None) -> Any:
        """Random parameters (the reference's init schemes); with ``params``, fill only what it lacks."""
        random_params = self.core.init_params(rng, input_shape)
        if params is None:
            return random_params
        self._missing_keys = set()
        filled = fill_missing(unfreeze(params), random_params)
        return freeze(filled) if isinstance(params, flax.core.FrozenDict) else filled

    def enable_gradient_checkpointing(self) -> None:
        """Rematerialise each decoder layer in the backward pass."""
        self.core = NucleusX(self.core.config, head=self.head, dtype=self.dtype, param_dtype=self.module.param_dtype,
                             gradient_checkpointing=True, init=False)
        self._module = self.core.module

    def _wrap(self, out: Any) -> ModelOutput:
        return FlaxNucleusXOutput(out.last_hidden_state, out.past_key_values, out.hidden_states)

    def __call__(
        self,
        input_ids: Any,
        attention_mask: Any = None,
        forward_mode: Optional[str] = None,
        recurrent_chunk_size: Optional[int] = None,
        past_key_values: Any = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        labels: Any = None,
        params: Any = None,
        dropout_rng: Optional[jax.Array] = None,
        train: bool = False,
        return_dict: Optional[bool] = None,
        segment_ids: Any = None,
    ) -> Any:
        """The core call (:meth:`nucleusx_jax.model.NucleusX.__call__`, including ``segment_ids`` for packed
        documents) with HF outputs. ``output_hidden_states`` and ``return_dict`` default to the config's."""
        hidden = self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        out = self.core(input_ids, attention_mask, forward_mode, recurrent_chunk_size, past_key_values, use_cache,
                        labels, params if params is not None else self.params, output_hidden_states=bool(hidden),
                        dropout_rng=dropout_rng, train=train, segment_ids=segment_ids)
        output = self._wrap(out)
        return output if (self.config.return_dict if return_dict is None else return_dict) else output.to_tuple()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *model_args: Any, **kwargs: Any) -> Any:
        """HF ``from_pretrained``; PyTorch NucleusX directories (``from_pt=True``, or a directory holding only
        PyTorch weights) and every local directory of a ``scan_layers`` config (whose files hold one tensor per
        layer, or a stacked layout saved by this class) load through the core's
        :func:`nucleusx_jax.pretrained.load_params`, tied embeddings included."""
        path = os.fspath(pretrained_model_name_or_path)
        from_pt = kwargs.get("from_pt", False)
        is_dir = os.path.isdir(path)
        has_flax = is_dir and find_flax_weights(path) is not None
        config = kwargs.get("config")
        if config is None and is_dir and os.path.isfile(os.path.join(path, configuration.CONFIG_FILE)):
            config = configuration.NucleusXConfig.from_pretrained(path)
        scan = kwargs.get("scan_layers", getattr(config, "scan_layers", False))
        if not is_dir or not (from_pt or not has_flax or scan):
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        if not has_flax and weights.find_torch_weights(path) is None:
            raise FileNotFoundError(f"{path} holds no PyTorch weights: expected one of {', '.join(weights.TORCH_FILES)}")
        kwargs.pop("from_pt", None)
        config = kwargs.pop("config", None)
        do_init = kwargs.pop("_do_init", True)
        dtype = kwargs.pop("dtype", jnp.float32)
        for hub_only in ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder",
                         "ignore_mismatched_sizes", "proxies", "trust_remote_code", "_from_auto", "adapter_kwargs",
                         "_commit_hash", "_from_pipeline"):
            kwargs.pop(hub_only, None)
        if config is None:
            config, kwargs = cls.config_class.from_pretrained(path, return_unused_kwargs=True, **kwargs)
        model = cls(config, *model_args, dtype=dtype, _do_init=False, **kwargs)
        params, head_missing = load_params(path, model.core.config, cls.head, from_pt=from_pt or not has_flax)
        if head_missing:
            logger.warning("%s: %s not in %s; initialised randomly (train them before use)",
                           cls.__name__, head_missing, path)
            params = model.init_weights(model.key, model.input_shape, params)
        params = jax.tree.map(jnp.asarray, params)
        if not do_init:
            return model, params
        model._is_initialized = True  # built with _do_init=False to skip a random init; params come from disk
        model.params = params
        return model


class FlaxNucleusXModel(FlaxNucleusXPreTrainedModel):
    """The bare decoder: returns ``last_hidden_state``."""

    module_class = FlaxNucleusXModule
    head = "base"


class FlaxNucleusXForCausalLM(FlaxNucleusXPreTrainedModel):
    """NucleusX with its LM head; ``labels`` give the shifted cross-entropy (plus z-loss)."""

    module_class = FlaxNucleusXForCausalLMModule
    head = "causal_lm"

    def _wrap(self, out: Any) -> ModelOutput:
        return FlaxNucleusXCausalLMOutput(out.loss, out.logits, out.past_key_values, out.hidden_states)

    def prepare_inputs_for_generation(
        self,
        input_ids: Any,
        max_length: int,
        attention_mask: Any = None,
        recurrent_chunk_size: Optional[int] = None,
        prompt_chunkwise_threshold: Optional[int] = None,
    ) -> Dict[str, Any]:
        """``FlaxGenerationMixin`` hook: the keyword arguments of the first model call, on the prompt ``[B, T]``.

        A prompt of T > 1 tokens runs once in the form of :func:`nucleusx_jax.runtime.prompt_form` (parallel, or
        chunkwise when T exceeds ``prompt_chunkwise_threshold``, default ``4 * recurrent_chunk_size``) and leaves
        the recurrent state. The mixin runs a one-token prompt inside its loop: a recurrent step from the empty
        state.
        """
        mode, chunk_size = check_prompt(self.core.config, input_ids, attention_mask, chunk_size=recurrent_chunk_size,
                                        threshold=prompt_chunkwise_threshold)
        batch, length = shape_of(input_ids)
        if max_length <= length:
            raise ValueError(f"max_length={max_length} leaves no new token after the prompt of {length} tokens: "
                             "max_new_tokens must be >= 1")
        if length > 1:
            return {"attention_mask": attention_mask, "forward_mode": mode, "recurrent_chunk_size": chunk_size,
                    "use_cache": True}
        mask = jnp.ones((batch, 1), jnp.int32) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
        return {"attention_mask": mask, "past_key_values": runtime.empty_cache(self.core.config, batch)}

    def update_inputs_for_generation(self, model_outputs: Any, model_kwargs: Dict[str, Any]) -> Dict[str, Any]:
        """``FlaxGenerationMixin`` hook: the next call is one recurrent step on the state just returned; the
        token it feeds was generated, so it is real (mask 1). The state's size never depends on the length."""
        del model_kwargs
        past = model_outputs.past_key_values
        return {"attention_mask": jnp.ones((past[0].kv.shape[0], 1), jnp.int32), "past_key_values": past}


class FlaxNucleusXForSequenceClassification(FlaxNucleusXPreTrainedModel):
    """NucleusX with a ``score`` head pooled like the reference; ``labels`` ``[B]`` give the loss."""

    module_class = FlaxNucleusXForSequenceClassificationModule
    head = "sequence_classification"

    def _wrap(self, out: Any) -> ModelOutput:
        return FlaxNucleusXSequenceClassifierOutput(out.loss, out.logits, out.past_key_values, out.hidden_states)


AutoConfig.register(NucleusXConfig.model_type, NucleusXConfig, exist_ok=True)
FlaxAutoModel.register(NucleusXConfig, FlaxNucleusXModel, exist_ok=True)
FlaxAutoModelForCausalLM.register(NucleusXConfig, FlaxNucleusXForCausalLM, exist_ok=True)
FlaxAutoModelForSequenceClassification.register(NucleusXConfig, FlaxNucleusXForSequenceClassification, exist_ok=True)
