"""nucleusx-jax: NucleusX (RetNet with SwiGLU and RMSNorm) in JAX/Flax.

Importing the package registers ``nucleus_x`` with transformers' ``AutoConfig`` and the Flax auto classes.
"""

from transformers import (
    AutoConfig,
    FlaxAutoModel,
    FlaxAutoModelForCausalLM,
    FlaxAutoModelForSequenceClassification,
)

from .configuration import NucleusXConfig
from .hf import (
    FlaxNucleusXForCausalLM,
    FlaxNucleusXForSequenceClassification,
    FlaxNucleusXModel,
    FlaxNucleusXPreTrainedModel,
)
from .retention import RetentionState

AutoConfig.register("nucleus_x", NucleusXConfig, exist_ok=True)
FlaxAutoModel.register(NucleusXConfig, FlaxNucleusXModel, exist_ok=True)
FlaxAutoModelForCausalLM.register(NucleusXConfig, FlaxNucleusXForCausalLM, exist_ok=True)
FlaxAutoModelForSequenceClassification.register(NucleusXConfig, FlaxNucleusXForSequenceClassification, exist_ok=True)

__all__ = [
    "NucleusXConfig",
    "FlaxNucleusXModel",
    "FlaxNucleusXForCausalLM",
    "FlaxNucleusXForSequenceClassification",
    "FlaxNucleusXPreTrainedModel",
    "RetentionState",
]
