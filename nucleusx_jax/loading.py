"""The one loader of a causal LM for inference: :func:`load`, used by the generate CLI, evaluation
(``NucleusXLM(pretrained=...)``) and serving (``load_backend``).

It sits beside :mod:`nucleusx_jax.runtime`, not in it: the core model's ``generate`` uses the runtime (through
:mod:`nucleusx_jax.decode`), so the runtime cannot import the model's loading without a cycle.
"""

from typing import Any

from .configuration import NucleusXConfig
from .model import NucleusX, compute_dtype, from_pretrained

# Inference runs the decoder layers one by one, whatever the model trained with: under ``scan_layers`` the
# per-layer states are stacked into the scan's input and its output, two more copies of every state (the 7B
# server's decode step on one v5p chip plans 69.3 GiB so, 28.9 GiB unrolled; docs/tpu.md).
INFERENCE_CONFIG = {"scan_layers": False}


def inference_config(config: NucleusXConfig) -> NucleusXConfig:
    """``config`` as inference runs it (:data:`INFERENCE_CONFIG`); the same function, the same weights."""
    return config.replace(**INFERENCE_CONFIG)


def load(path: Any, *, dtype: str = "float32") -> NucleusX:
    """The causal LM at ``path``: whatever :func:`nucleusx_jax.model.from_pretrained` accepts (a local flax or
    PyTorch model directory, ``gs://...``, ``hf://org/name`` or a Hub id), computing in ``dtype`` (a name in
    ``model.COMPUTE_DTYPES``, checked before anything is read), with :data:`INFERENCE_CONFIG`."""
    return from_pretrained(path, compute_dtype(dtype), **INFERENCE_CONFIG)
