"""nucleusx-jax: NucleusX (RetNet with SwiGLU and RMSNorm) in JAX/Flax.

The core needs no transformers: ``nucleusx_jax.from_pretrained(path)`` loads our model directories and PyTorch
ones. The transformers 4.x Flax API (``FlaxAutoModel*``, ``FlaxNucleusX*``) is the adapter
:mod:`nucleusx_jax.hf` (``pip install nucleusx-jax[hf]``); importing it registers ``nucleus_x`` with the Auto
classes.
"""

from .configuration import ForwardMode, NucleusXConfig, RetentionImpl
from .model import NucleusX, Output, from_pretrained
from .modeling import RunOptions
from .retention import RetentionState

__all__ = [
    "ForwardMode",
    "NucleusX",
    "NucleusXConfig",
    "Output",
    "RetentionImpl",
    "RetentionState",
    "RunOptions",
    "from_pretrained",
]
