"""NucleusX in PyTorch (the ``[torch]`` extra): importing this module registers ``nucleus_x`` with
``AutoConfig``, ``AutoModel``, ``AutoModelForCausalLM`` and ``AutoModelForSequenceClassification``, so our
checkpoints load without ``trust_remote_code``. No JAX: the classes are the remote code of
:mod:`nucleusx_jax.remote_code`, the files every PyTorch export ships.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from ..remote_code import add_code
from ..remote_code.configuration_nucleus_x import NucleusXConfig
from ..remote_code.modeling_nucleus_x import (
    NucleusXCache,
    NucleusXForCausalLM,
    NucleusXForSequenceClassification,
    NucleusXModel,
    NucleusXPreTrainedModel,
)

AutoConfig.register(NucleusXConfig.model_type, NucleusXConfig, exist_ok=True)
AutoModel.register(NucleusXConfig, NucleusXModel, exist_ok=True)
AutoModelForCausalLM.register(NucleusXConfig, NucleusXForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(NucleusXConfig, NucleusXForSequenceClassification, exist_ok=True)

__all__ = ["NucleusXCache", "NucleusXConfig", "NucleusXForCausalLM", "NucleusXForSequenceClassification",
           "NucleusXModel", "NucleusXPreTrainedModel", "add_code"]
