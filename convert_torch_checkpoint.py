"""Convert NucleusX checkpoints between PyTorch and flax model directories (see nucleusx_jax.convert).

A shim for checkouts: the same command line is ``nucleusx-convert`` and ``python -m nucleusx_jax.convert``.

    python convert_torch_checkpoint.py SRC DST --to {flax,torch} [--dtype {float32,bfloat16,float16}]
        [--max-shard-size 5GB] [--overwrite] [--step N] [--torch-format {safetensors,bin}] [--no-code]
    python convert_torch_checkpoint.py DIR --add-code   # ship the PyTorch code in an existing PyTorch export
"""

import sys

from nucleusx_jax.convert import main

if __name__ == "__main__":
    sys.exit(main())
