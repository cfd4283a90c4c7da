"""Convert NucleusX checkpoints between PyTorch and flax model directories, one tensor at a time.

``convert(src, dst, to="flax")`` reads a PyTorch directory (``config.json`` with ``model.safetensors``,
``pytorch_model.bin`` or their sharded forms) and writes what ``FlaxAutoModelForCausalLM.from_pretrained``
loads natively: ``config.json`` with ``flax_model.msgpack`` (or ``flax_model-0000i-of-0000n.msgpack`` shards
and ``flax_model.msgpack.index.json``). ``to="torch"`` goes back: ``model.safetensors`` (default) or
``pytorch_model.bin``, with the keys, order, layout and dtypes the PyTorch model saves: the ``rel_pos``
buffers are regenerated from the config, and with tied embeddings ``lm_head.weight`` is left out of
safetensors and shares the embedding's storage in ``.bin``. A PyTorch ``dst`` also ships the PyTorch model's
code with ``auto_map`` (:mod:`nucleusx_jax.remote_code`), so stock transformers loads it, unless ``code=False``.

Everything is checked before the first byte is written: the key set and shapes against the config (every
missing, unexpected or wrong-shaped key is listed), the buffers against the config, tied weights, dtypes.
Output goes to a temporary directory next to ``dst`` (``.<name>.partial-<host>-<pid>-*``) that is renamed to
``dst`` at the end; on any error it is removed, so ``dst`` is never left half written. A partial directory
left by a killed conversion on this host is removed at the next start; one from another host, or an
``.<name>.old-*`` holding the previous ``dst`` of an interrupted overwrite, is reported (logged). ``dst``
may not be ``src``, contain it or be a symlink into it; an existing ``dst`` inside ``src`` is not replaced.

Memory: one source tensor and its converted copy at a time (``.bin`` output holds one shard, as
``torch.save`` needs the whole shard; a training run, or a flax file in the scanned layout, is read whole);
see ``benchmarks/convert_memory.py``. Files written always hold one tensor per layer (``scan_layers``: see
:mod:`nucleusx_jax.weights`).
"""

import argparse
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import ml_dtypes
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from tqdm.auto import tqdm

from . import checks, remote_code, runs, storage, weights
from .pretrained import FLAX_FILES, find_flax_weights, parse_size
from .cli import reports_user_errors
from .configuration import NucleusXConfig
from .tensorio import FORMATS, CheckpointError, CheckpointReader, CheckpointWriter, TensorInfo, process_start, umask

DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}
FLOAT_DTYPES = set(DTYPES.values()) | {np.dtype(np.float64)}
TORCH_FORMATS = ("safetensors", "bin")
logger = logging.getLogger(__name__)
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json")


@dataclass(frozen=True)
class Summary:
    """What :func:`convert` wrote: tensors and bytes written, parameters (buffers and tied copies excluded)."""

    dst: str
    tensors: int
    parameters: int
    bytes: int
    seconds: float

    def __str__(self) -> str:
        rate = self.bytes / 1e9 / max(self.seconds, 1e-9)
        return (f"{self.tensors} tensors, {self.parameters:,} parameters, {self.bytes / 1e9:.3f} GB in "
                f"{self.seconds:.1f} s ({rate:.2f} GB/s) -> {self.dst}")


@dataclass(frozen=True)
class _Item:
    """One output tensor: where it comes from and what it becomes."""

    out: str  # name in the output file
    info: TensorInfo  # output shape and dtype
    src: Optional[str] = None  # name in the source; None for a regenerated buffer or an alias
    transpose: bool = False
    alias: Optional[str] = None  # output name of the tensor whose storage this one shares (tied .bin)
    value: Optional[np.ndarray] = None  # a regenerated buffer
    is_param: bool = True


def _parse_dtype(dtype: Optional[str]) -> Optional[np.dtype]:
    if dtype is None:
        return None
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported: choose one of {', '.join(DTYPES)} (or none to keep "
                         "the source dtype)")
    return DTYPES[dtype]


def _load_config(src: str) -> NucleusXConfig:
    path = os.path.join(src, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{src} has no config.json: SRC must be a NucleusX model directory")
    try:
        with open(path) as f:
            model_type = json.load(f).get("model_type")
    except ValueError as e:
        raise CheckpointError(f"{path} is not readable JSON: {e}") from e
    if model_type != NucleusXConfig.model_type:
        raise CheckpointError(f"{path} has model_type={model_type!r}; this converter handles "
                              f"{NucleusXConfig.model_type!r}")
    return NucleusXConfig.from_pretrained(src)


def _find_source(src: str, to: str, step: Optional[int]) -> Optional[str]:
    """The weights file (or index) to read, or None for a training run directory (``to="torch"``)."""
    torch_file = weights.find_torch_weights(src)
    flax_file = find_flax_weights(src)
    if to == "flax":
        if step is not None:
            raise ValueError("step selects a training checkpoint, which only --to torch reads")
        if torch_file is None:
            hint = "; it holds flax weights: convert them with --to torch" if flax_file else ""
            raise CheckpointError(f"{src} holds no PyTorch weights (expected one of "
                                  f"{', '.join(weights.TORCH_FILES)}){hint}")
        return torch_file
    if runs.is_run_dir(src):
        return None
    if step is not None:
        raise ValueError(f"step={step} selects a training checkpoint, but {src} is not a training run directory "
                         "(config.json and checkpoints/<step>)")
    if flax_file is None:
        hint = "; it holds PyTorch weights: convert them with --to flax" if torch_file else ""
        raise CheckpointError(f"{src} holds no flax weights (expected one of {', '.join(FLAX_FILES)}) and is not "
                              f"a training run directory (checkpoints/<step>){hint}")
    return flax_file


class _ParamsReader:
    """A parameter tree in memory (a restored training checkpoint) behind the :class:`CheckpointReader`
    interface: names are ``/``-joined paths."""

    def __init__(self, params: Mapping, path: str):
        self.path = path
        self._flat = {"/".join(k): v for k, v in flatten_dict(dict(params)).items()}
        self.index = {k: TensorInfo(tuple(v.shape), np.dtype(v.dtype)) for k, v in self._flat.items()}

    def read(self, name: str) -> np.ndarray:
        return np.array(self._flat[name])

    def close(self) -> None:
        self._flat = {}

    def __enter__(self) -> "_ParamsReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open_training_run(src: str, step: Optional[int]) -> Tuple[NucleusXConfig, _ParamsReader]:
    """The model config and float32 parameters of a trainer run (``step`` or the latest complete one).

    orbax restores the whole parameter tree, so this source holds the parameters in memory, one tensor per
    layer whichever layout the run trained in."""
    try:
        config, params = runs.restore_params(src, step)
    except FileNotFoundError as e:
        raise CheckpointError(str(e)) from e
    return config, _ParamsReader(weights.unstack_layers(params), src)


def _per_layer(reader: CheckpointReader, src: str) -> Union[CheckpointReader, _ParamsReader]:
    """``reader``; or, for a flax file in the scanned layout (stacked ``layers`` tensors, which transformers'
    ``save_pretrained`` writes for a scanned model), its tensors in memory, one per layer."""
    if not any(weights.LAYERS in name.split("/") for name in reader.index):
        return reader
    with reader:
        params = unflatten_dict({tuple(name.split("/")): reader.read(name) for name in reader.index})
    return _ParamsReader(weights.unstack_layers(params), src)


def _check_dtypes(index: Dict[str, TensorInfo]) -> None:
    bad = {name: str(info.dtype) for name, info in index.items() if info.dtype not in FLOAT_DTYPES}
    if bad:
        raise CheckpointError(f"unsupported dtype: NucleusX weights are floating point (float16, bfloat16, float32, "
                              f"float64), but {bad}")


def _out_info(info: TensorInfo, transpose: bool, dtype: Optional[np.dtype]) -> TensorInfo:
    return TensorInfo(info.shape[::-1] if transpose else info.shape, dtype if dtype is not None else info.dtype)


Reader = Union[CheckpointReader, _ParamsReader]


def _plan_to_flax(reader: CheckpointReader, config: NucleusXConfig, dtype: Optional[np.dtype]) -> List[_Item]:
    """Check a PyTorch state dict against ``config`` and list the flax tensors to write (state-dict order)."""
    index = reader.index
    _check_dtypes(index)
    head = weights.infer_head(index)
    prefix = "" if head == "base" else "model."
    buffers = [prefix + "rel_pos.angle", prefix + "rel_pos.decay"]
    weights.check_torch_keys({k: i.shape for k, i in index.items() if k not in buffers}, config, head)
    for key in buffers:
        if key in index:
            weights.check_buffers(key, reader.read(key), config)
    tied = config.tie_word_embeddings and "lm_head.weight" in index
    if tied and not np.array_equal(reader.read("lm_head.weight"), reader.read(prefix + "embed_tokens.weight")):
        raise CheckpointError("lm_head.weight differs from model.embed_tokens.weight although the config has "
                              "tie_word_embeddings=True")
    items = []
    for key in weights.expected_torch_shapes(config, head):
        if key in index and not (tied and key == "lm_head.weight"):  # tied: lm_head is not a flax parameter
            path, transpose = weights.torch_key_to_flax(key)
            items.append(_Item("/".join(path), _out_info(index[key], transpose, dtype), key, transpose))
    return items


def _plan_to_torch(
    reader: Reader, config: NucleusXConfig, dtype: Optional[np.dtype], torch_format: str
) -> List[_Item]:
    """Check a flax parameter tree against ``config`` and list the PyTorch tensors to write (state-dict order)."""
    index = reader.index
    _check_dtypes(index)
    shapes: Dict[str, Tuple[int, ...]] = {}
    names: Dict[str, str] = {}  # torch key -> flax name, for messages and reading
    strays: Dict[str, Tuple[int, ...]] = {}
    for name, info in index.items():
        path = tuple(name.split("/"))
        key, transpose = weights.flax_path_to_torch(path)
        try:
            known = weights.torch_key_to_flax(key) == (path, transpose) and key not in names
        except CheckpointError:
            known = False
        if known:
            shapes[key], names[key] = (info.shape[::-1] if transpose else info.shape), name
        else:
            strays[name] = info.shape
    head = weights.infer_head(shapes)
    def display(key: str) -> str:  # name keys as the flax file does
        return names.get(key) or (key if key in strays else "/".join(weights.torch_key_to_flax(key)[0]))

    weights.check_torch_keys({**shapes, **strays}, config, head, display=display)
    prefix = "" if head == "base" else "model."
    embed = prefix + "embed_tokens.weight"
    items, tail = [], []
    for key in weights.expected_torch_shapes(config, head):
        if key in names:
            src = names[key]
            transpose = weights.torch_key_to_flax(key)[1]
            item = _Item(key, _out_info(index[src], transpose, dtype), src, transpose)
        elif key == "lm_head.weight" and torch_format == "bin":  # tied: the reference's .bin shares storage
            item = _Item(key, items[0].info, alias=embed, is_param=False)
        else:  # tied lm_head in safetensors: stored once, as the embedding
            continue
        (tail if key in weights.HEAD_KEYS[head] else items).append(item)
    buffer_dtype = items[0].info.dtype  # the buffers follow the model's dtype, as model.to(dtype) does
    for key, value in weights.rel_pos_buffers(config, prefix).items():
        items.append(_Item(key, TensorInfo(value.shape, buffer_dtype), value=value.astype(buffer_dtype), is_param=False))
    return items + tail


def _check_destination(src: str, dst: str, overwrite: bool) -> None:
    """Refuse a ``dst`` (absolute paths) whose writing or replacing would touch ``src``."""
    real_src, real_dst = os.path.realpath(src), os.path.realpath(dst)

    def inside(path: str, directory: str) -> bool:
        return os.path.commonpath([path, directory]) == directory

    if real_dst == real_src:
        raise ValueError(f"DST {dst} is SRC {src}" + (" (through a symlink)" if dst != src else "")
                         + "; write to a new directory")
    if inside(real_src, real_dst):
        raise ValueError(f"DST {dst} contains SRC {src}; replacing it would delete the source: write to a new "
                         "directory")
    if os.path.islink(dst) and inside(real_dst, real_src):
        raise ValueError(f"DST {dst} is a symlink into SRC {src}; write to a new directory")
    if overwrite and os.path.lexists(dst) and inside(real_dst, real_src):
        raise ValueError(f"DST {dst} is inside SRC {src}; replacing it would change the source: write to a new "
                         "directory")


def _partial_prefix(dst: str) -> str:
    return f".{os.path.basename(dst)}.partial-"


def _clean_stale_outputs(dst: str) -> None:
    """Remove the partial outputs next to ``dst`` of conversions killed on this host; log other leftovers."""
    parent, name = os.path.dirname(dst), os.path.basename(dst)
    host = socket.gethostname()
    for entry in sorted(os.listdir(parent)):
        path = os.path.join(parent, entry)
        if entry.startswith(_partial_prefix(dst)):
            owner = entry[len(_partial_prefix(dst)):].rsplit("-", 2)  # host, pid, mkdtemp's suffix
            pid = int(owner[1]) if len(owner) == 3 and owner[1].isdigit() else None
            if pid is not None and owner[0] == host and process_start(pid) is None:
                shutil.rmtree(path, ignore_errors=True)
                logger.warning("removed %s, the partial output of a conversion that was killed (pid %d)", path, pid)
            else:
                logger.warning("%s is the partial output of a conversion that runs or was killed on %s; delete "
                               "it if none runs", path, owner[0] if pid is not None else "an unknown host")
        elif entry.startswith(f".{name}.old-"):
            logger.warning("%s holds the previous %s of an interrupted --overwrite: check it, then delete it",
                           path, dst)


def _commit(tmp: str, dst: str) -> None:
    """Move the finished ``tmp`` to ``dst``, replacing what is there."""
    if os.path.lexists(dst):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.old-", dir=os.path.dirname(dst))
        os.rename(dst, os.path.join(old, "previous"))
        os.rename(tmp, dst)
        shutil.rmtree(old)
    else:
        os.rename(tmp, dst)


def convert(
    src: str,
    dst: str,
    to: str,
    dtype: Optional[str] = None,
    max_shard_size: Union[int, str] = "5GB",
    overwrite: bool = False,
    step: Optional[int] = None,
    torch_format: str = "safetensors",
    progress: bool = True,
    code: bool = True,
) -> Summary:
    """Convert the model directory ``src`` into ``dst`` (``to``: ``flax`` or ``torch``); see the module docstring.

    ``dtype`` (``float32``, ``bfloat16``, ``float16``) casts every tensor; by default each keeps its source
    dtype. Files above ``max_shard_size`` (bytes or ``"5GB"``) are sharded with an ``*.index.json``.
    ``torch_format``: ``safetensors`` or ``bin`` for ``to="torch"``. ``code``: a PyTorch ``dst`` ships the
    PyTorch model's code with ``auto_map`` (:func:`nucleusx_jax.remote_code.add_code`); without it, and in a
    flax ``dst``, ``config.json`` has no ``auto_map``. Raises :class:`CheckpointError` for a bad
    checkpoint, ``FileExistsError`` if ``dst`` exists without ``overwrite``, ``ValueError`` for bad arguments.
    """
    if storage.is_url(dst) or (storage.is_url(src) and not runs.is_run_dir(src)):
        return _convert_staged(src, dst, to, dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite,
                               step=step, torch_format=torch_format, progress=progress)
    start = time.perf_counter()
    checks.choice("to", to, ("flax", "torch"))
    checks.choice("torch_format", torch_format, TORCH_FORMATS)
    target = _parse_dtype(dtype)
    max_bytes = parse_size(max_shard_size)
    src, dst = storage.absolute(src), os.path.abspath(dst)
    if not storage.isdir(src):
        raise FileNotFoundError(f"SRC {src} is not a directory")
    _check_destination(src, dst, overwrite)
    if os.path.lexists(dst) and not overwrite:
        raise FileExistsError(f"DST {dst} already exists; pass overwrite=True (--overwrite) to replace it")
    source = _find_source(src, to, step)
    if source is None:
        config, reader = _open_training_run(src, step)
    else:
        config, reader = _load_config(src), _per_layer(CheckpointReader(source), src)
    with reader:
        if to == "flax":
            items, fmt = _plan_to_flax(reader, config, target), FORMATS["msgpack"]
        else:
            items, fmt = _plan_to_torch(reader, config, target, torch_format), FORMATS[torch_format]
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        _clean_stale_outputs(dst)
        tmp = tempfile.mkdtemp(prefix=f"{_partial_prefix(dst)}{socket.gethostname()}-{os.getpid()}-",
                               dir=os.path.dirname(dst))
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes it private; DST gets the usual permissions
        try:
            writer = CheckpointWriter(tmp, fmt, [(it.out, it.info) for it in items], max_bytes)
            by_name = {it.out: it for it in items}
            shared = {it.alias for it in items if it.alias}
            kept: Dict[str, np.ndarray] = {}
            with tqdm(total=writer.total_bytes, unit="B", unit_scale=True, disable=not progress,
                      desc=f"{os.path.basename(src)} -> {to}") as bar:
                for name in writer.order:
                    item = by_name[name]
                    if item.alias:
                        arr = kept.pop(item.alias)
                    elif item.value is not None:
                        arr = item.value
                    else:
                        arr = reader.read(item.src)
                        arr = arr.T if item.transpose else arr
                        arr = arr.astype(item.info.dtype, order="C", copy=item.transpose or arr.dtype != item.info.dtype)
                    if name in shared:
                        kept[name] = arr
                    writer.write(name, arr)
                    bar.set_postfix_str(name, refresh=False)
                    bar.update(arr.nbytes)
                    del arr
            writer.close()
            if source is None:  # a training run's config.json (what its checkpoints hold)
                config.save_pretrained(tmp)
            for side in SIDE_FILES:
                if storage.isfile(os.path.join(src, side)) and not os.path.isfile(os.path.join(tmp, side)):
                    with open(os.path.join(tmp, side), "wb") as f:
                        f.write(storage.read_bytes(os.path.join(src, side)))
            if to == "torch" and code:
                remote_code.add_code(tmp)
            else:
                remote_code.remove_auto_map(tmp)
            _commit(tmp, dst)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return Summary(dst, len(items), sum(it.info.size for it in items if it.is_param), writer.total_bytes,
                   time.perf_counter() - start)


def _convert_staged(src: str, dst: str, to: str, *, overwrite: bool, **options: object) -> Summary:
    """:func:`convert` with a URL ``dst`` or a URL model directory ``src`` (see :mod:`.storage`), through a local
    temporary directory: the source model directory is downloaded there (a training run directory is read by
    orbax in place), the output is written there and then published to ``dst``, ``config.json`` last."""
    src, dst = storage.absolute(src), storage.absolute(dst)
    if src == dst:
        raise ValueError(f"DST {dst} is SRC {src}; write to a new directory")
    if storage.exists(dst) and not overwrite:
        raise FileExistsError(f"DST {dst} already exists; pass overwrite=True (--overwrite) to replace it")
    with tempfile.TemporaryDirectory(prefix="nucleusx-convert-") as tmp:
        local_src = src
        if storage.is_url(src) and not runs.is_run_dir(src):
            if not storage.isfile(os.path.join(src, "config.json")):
                raise CheckpointError(f"{src} has no config.json: SRC must be a NucleusX model directory or a "
                                      "training run directory")
            local_src = os.path.join(tmp, "src")
            storage.download_dir(src, local_src)
        local_dst = os.path.join(tmp, "dst") if storage.is_url(dst) else dst
        summary = convert(local_src, local_dst, to, overwrite=overwrite, **options)
        if local_dst != dst:
            storage.publish_dir(local_dst, dst, marker="config.json")
    return replace(summary, dst=dst)


@reports_user_errors
def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line (``nucleusx-convert``, ``python -m nucleusx_jax.convert`` or, in a checkout,
    ``convert_torch_checkpoint.py``); returns 0 (a user error exits with status 2)."""
    parser = argparse.ArgumentParser(
        prog="python -m nucleusx_jax.convert",
        description="Convert NucleusX checkpoints between PyTorch and flax model directories, tensor by tensor.")
    parser.add_argument("src", help="source model directory (config.json and weights)")
    parser.add_argument("dst", nargs="?", help="destination directory (must not exist unless --overwrite)")
    parser.add_argument("--to", choices=("flax", "torch"), help="the format to write")
    parser.add_argument("--dtype", choices=tuple(DTYPES), help="cast every tensor (default: keep the source dtype)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest file before sharding (default 5GB)")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    parser.add_argument("--step", type=int, help="training step to export (training run directories)")
    parser.add_argument("--torch-format", default="safetensors", choices=TORCH_FORMATS,
                        help="file format of --to torch (default safetensors)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--no-code", action="store_true",
                        help="--to torch: leave out the PyTorch modeling code (and auto_map) shipped by default")
    parser.add_argument("--add-code", action="store_true",
                        help="add the PyTorch modeling code and auto_map to the existing PyTorch NucleusX directory "
                             "SRC, in place (no DST, no --to; the weights are not touched)")
    args = parser.parse_args(argv)
    if args.add_code:
        if args.dst is not None or args.to is not None or args.no_code:
            parser.error("--add-code changes SRC in place: give no DST, --to or --no-code")
        written = remote_code.add_code(args.src)
        print(f"added the PyTorch code to {args.src}: {', '.join(os.path.basename(p) for p in written)}")
        return 0
    if args.dst is None or args.to is None:
        parser.error("give SRC, DST and --to (or --add-code SRC)")
    if args.no_code and args.to != "torch":
        parser.error("--no-code applies to --to torch only")
    summary = convert(args.src, args.dst, args.to, args.dtype, args.max_shard_size, args.overwrite, args.step,
                      args.torch_format, progress=not args.quiet, code=not args.no_code)
    print(f"converted {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
