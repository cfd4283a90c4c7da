"""The one loader of a causal LM for inference: :func:`load`, used by the generate CLI, evaluation
(``NucleusXLM(pretrained=...)``) and serving (``load_backend``).

It sits beside :mod:`nucleusx_jax.runtime`, not in it: the core model's ``generate`` uses the runtime (through
:mod:`nucleusx_jax.decode`), so the runtime cannot import the model's loading without a cycle.
"""

from typing import Any

from .model import NucleusX, compute_dtype, from_pretrained


def load(path: Any, *, dtype: str = "float32") -> NucleusX:
    """The causal LM at ``path``: whatever :func:`nucleusx_jax.model.from_pretrained` accepts (a local flax or
    PyTorch model directory, ``gs://...``, ``hf://org/name`` or a Hub id), computing in ``dtype`` (a name in
    ``model.COMPUTE_DTYPES``, checked before anything is read)."""
    return from_pretrained(path, compute_dtype(dtype))
