"""nucleusx-jax: NucleusX (RetNet with SwiGLU and RMSNorm) in JAX/Flax.

The core needs no transformers: ``nucleusx_jax.from_pretrained(path)`` loads our model directories and PyTorch
ones. The transformers 4.x Flax API (``FlaxAutoModel*``, ``FlaxNucleusX*``) is the adapter
:mod:`nucleusx_jax.hf` (``pip install nucleusx-jax[hf]``); importing it registers ``nucleus_x`` with the Auto
classes. The PyTorch model is :mod:`nucleusx_jax.torch` (the ``[torch]`` extra, no JAX needed).

The names below are imported on first use, so that ``import nucleusx_jax.torch`` does not import JAX.
"""

import importlib
from typing import Any

_EXPORTS = {
    "ForwardMode": "configuration",
    "NucleusXConfig": "configuration",
    "RetentionImpl": "configuration",
    "NucleusX": "model",
    "Output": "model",
    "from_pretrained": "model",
    "RunOptions": "modeling",
    "RetentionState": "retention",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'nucleusx_jax' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
