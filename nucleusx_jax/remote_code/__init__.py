"""The PyTorch NucleusX as transformers remote code, and the fixer that ships it beside a checkpoint.

``configuration_nucleus_x.py`` and ``modeling_nucleus_x.py`` import transformers and torch only (and each
other, relatively), so a PyTorch model directory that carries them, with ``auto_map`` in ``config.json``, loads
with ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` and no package of ours.
:mod:`nucleusx_jax.torch` imports the same files as a package and registers them with the Auto classes. This
module imports neither torch nor jax.
"""

import json
import os
import tempfile
from typing import List

CODE_FILES = ("configuration_nucleus_x.py", "modeling_nucleus_x.py")
AUTO_MAP = {
    "AutoConfig": "configuration_nucleus_x.NucleusXConfig",
    "AutoModel": "modeling_nucleus_x.NucleusXModel",
    "AutoModelForCausalLM": "modeling_nucleus_x.NucleusXForCausalLM",
    "AutoModelForSequenceClassification": "modeling_nucleus_x.NucleusXForSequenceClassification",
}
TORCH_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def _replace(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a temporary file beside it, fsynced, renamed over it."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix="-" + os.path.basename(path))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read_config(directory: str) -> dict:
    """``<directory>/config.json`` of a NucleusX model; ``ValueError`` when it is missing or not NucleusX."""
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{directory} has no config.json: expected a NucleusX model directory")
    with open(path) as f:
        try:
            config = json.load(f)
        except ValueError as e:
            raise ValueError(f"{path} is not readable JSON: {e}") from e
    if not isinstance(config, dict) or config.get("model_type") != "nucleus_x":
        found = config.get("model_type") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{path} has model_type={found!r}; expected 'nucleus_x'")
    return config


def write_config(directory: str, config: dict) -> None:
    """``config.json`` as transformers writes it (sorted keys, two-space indent), atomically."""
    _replace(os.path.join(directory, "config.json"), (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())


def add_code(directory: str) -> List[str]:
    """Ship the PyTorch code in the PyTorch NucleusX model ``directory``, in place: the two code files, then
    ``auto_map`` in ``config.json``, each file replaced atomically (a reader sees the old file or the new one;
    ``auto_map`` appears only once the files it names are there). The weights are not touched. Returns the
    paths written. ``ValueError`` for a directory without a NucleusX ``config.json`` or PyTorch weights."""
    config = read_config(directory)
    if not any(os.path.isfile(os.path.join(directory, name)) for name in TORCH_WEIGHTS):
        raise ValueError(f"{directory} holds no PyTorch weights (expected one of {', '.join(TORCH_WEIGHTS)}); "
                         "convert a flax model with --to torch first")
    written = []
    for name in CODE_FILES:
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), name), "rb") as f:
            _replace(os.path.join(directory, name), f.read())
        written.append(os.path.join(directory, name))
    write_config(directory, {**config, "auto_map": dict(AUTO_MAP)})
    return written + [os.path.join(directory, "config.json")]


def remove_auto_map(directory: str) -> None:
    """Drop ``auto_map`` from ``config.json`` (for a directory that does not ship the code), if present."""
    config = read_config(directory)
    if "auto_map" in config:
        del config["auto_map"]
        write_config(directory, config)
