"""Pretrain NucleusX: ``python train.py --config configs/tiny.yaml [--set section.key=value ...]``.

A shim for checkouts: the trainer's command line is :mod:`nucleusx_jax.train.__main__` (installed as
``nucleusx-train``; also ``python -m nucleusx_jax.train``).
"""

import sys

from nucleusx_jax.train.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
