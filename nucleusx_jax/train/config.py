"""The training YAML schema: sections ``model``, ``data``, ``optimizer``, ``schedule``, ``train``, ``mesh``,
``checkpoint``, ``logging``; validation with clear errors, ``--set section.key=value`` overrides.

``model`` holds :class:`~nucleusx_jax.NucleusXConfig` fields, or ``{path: some/config.json}`` (relative to the
working directory; other fields override the file's); it must give the dimensions (``MODEL_DIMENSIONS``).
Every other section is a dataclass below (``data`` is
:class:`~nucleusx_jax.train.data.DataConfig`). An unknown key raises an error listing the valid keys; a
value of the wrong type raises an error naming the expected type; a number outside its section's ``BOUNDS``
raises an error naming the key, the value and the allowed range (checked when a section is built). All of
these are :class:`ConfigError`.
"""

import dataclasses
import inspect
import math
import os
import re
import types
import typing
from typing import Any, ClassVar, Dict, List, Literal, Mapping, Optional, Sequence, Tuple

import yaml

from .. import checks, storage
from ..configuration import ChunkwiseNormalization, ForwardMode, NucleusXConfig, RetentionImpl, read_config_json
from .data import DataConfig


class ConfigError(ValueError, TypeError):
    """The training config is invalid (unknown key, wrong type, value out of range); the message names the
    key, the value and what is allowed. A ``TypeError`` too, for a value of the wrong type."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Bound:
    """The finite values a numeric setting allows: ``low``..``high`` (``*_open`` excludes the end point), plus
    the isolated values ``also``."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    also: Tuple[float, ...] = ()

    def __contains__(self, value: float) -> bool:
        if value in self.also:
            return True
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return math.isfinite(value) and above and below

    def __str__(self) -> str:
        def show(v: float) -> str:
            return f"{'-' if v < 0 else ''}infinity" if math.isinf(v) else (str(int(v)) if v == int(v) else repr(v))

        opening = "(" if self.low_open or math.isinf(self.low) else "["
        closing = ")" if self.high_open or math.isinf(self.high) else "]"
        return (f"{opening}{show(self.low)}, {show(self.high)}{closing}"
                + "".join(f" or {show(v)}" for v in self.also))


COUNT, POSITIVE_COUNT = Bound(low=0), Bound(low=1)  # ints >= 0, ints >= 1
POSITIVE = Bound(low=0, low_open=True)
FRACTION = Bound(low=0, high=1, high_open=True)  # [0, 1)


class _Bounded:
    """A config section whose numeric fields are checked against ``BOUNDS`` when it is built."""

    SECTION: ClassVar[str]
    BOUNDS: ClassVar[Mapping[str, Bound]]

    def __post_init__(self) -> None:
        for key, bound in self.BOUNDS.items():
            value = getattr(self, key)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if number and value not in bound:
                raise ConfigError(f"{self.SECTION}.{key}={value!r} is out of range: allowed {bound}")


@dataclasses.dataclass
class OptimizerConfig(_Bounded):
    """AdamW with global-norm clipping."""

    SECTION: ClassVar[str] = "optimizer"
    BOUNDS: ClassVar[Mapping[str, Bound]] = {"learning_rate": POSITIVE, "b1": FRACTION, "b2": FRACTION,
                                             "eps": POSITIVE, "weight_decay": COUNT, "clip_norm": COUNT}

    learning_rate: float = 3e-4
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_norms: bool = False  # apply weight decay to norm weights
    decay_embeddings: bool = False  # apply weight decay to the input embedding table
    clip_norm: float = 1.0  # 0 disables clipping


@dataclasses.dataclass
class ScheduleConfig(_Bounded):
    """Linear warmup to ``optimizer.learning_rate``, then ``decay`` down to ``min_lr_ratio`` times it."""

    SECTION: ClassVar[str] = "schedule"
    BOUNDS: ClassVar[Mapping[str, Bound]] = {"warmup_steps": COUNT, "min_lr_ratio": Bound(low=0, high=1)}

    warmup_steps: int = 100
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.1


@dataclasses.dataclass
class TrainConfig(_Bounded):
    """The run: length, batch, precision, eval cadence, failure policy.

    The forward form and chunk size are the model's: ``model.forward_mode`` (parallel or chunkwise) and
    ``model.recurrent_chunk_size``, also written to the exported config.json."""

    SECTION: ClassVar[str] = "train"
    BOUNDS: ClassVar[Mapping[str, Bound]] = {
        "steps": POSITIVE_COUNT, "global_batch": POSITIVE_COUNT, "grad_accum": POSITIVE_COUNT,
        "seed": Bound(low=0, high=2**32 - 1), "eval_every": COUNT,
        "eval_batches": POSITIVE_COUNT}

    run_dir: str = "runs/default"  # a local path or a URL such as gs://bucket/run (see nucleusx_jax.storage)
    steps: int = 1000
    global_batch: int = 8  # sequences per optimizer step, over all hosts
    grad_accum: int = 1  # microbatches per step (global_batch / grad_accum sequences each)
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype; parameters stay float32
    remat: Literal["none", "full", "dots", "dots_no_batch"] = "none"
    seed: int = 0  # parameter init and dropout
    eval_every: int = 100  # 0 disables periodic eval
    eval_batches: int = 4
    on_nonfinite: Literal["stop", "skip"] = "stop"
    # each row's window continues the retention state of the row's previous window (needs data.stream_rows and
    # model.forward_mode=chunkwise; docs/training.md)
    carry_state: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        checks.flag("train.carry_state", self.carry_state)


@dataclasses.dataclass
class MeshConfig(_Bounded):
    """Device mesh sizes; one axis may be -1 (all remaining devices). ``sequence`` splits every sequence along
    T over its devices (docs/sequence_parallel.md)."""

    SECTION: ClassVar[str] = "mesh"
    BOUNDS: ClassVar[Mapping[str, Bound]] = dict.fromkeys(("data", "fsdp", "tensor", "sequence"),
                                                          Bound(low=1, also=(-1,)))

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    sequence: int = 1


@dataclasses.dataclass
class CheckpointConfig(_Bounded):
    """orbax checkpoints in ``<run_dir>/checkpoints``; the final model in ``<run_dir>/hf`` (and ``/torch``)."""

    SECTION: ClassVar[str] = "checkpoint"
    BOUNDS: ClassVar[Mapping[str, Bound]] = {"every": COUNT, "max_to_keep": POSITIVE_COUNT}

    every: int = 100  # save every N steps (and at the end); 0: only at the end
    max_to_keep: int = 3
    async_save: bool = True
    resume: bool = True  # continue from the latest complete checkpoint in the run dir
    export_hf: bool = True
    export_torch: bool = False  # also <run_dir>/torch through nucleusx_jax.convert (needs torch; implies export_hf)


@dataclasses.dataclass
class WandbConfig:
    """Weights & Biases tracking of the metrics (the ``wandb`` extra), from process 0: ``project`` and an
    optional run ``name``. ``WANDB_MODE=offline`` and the other ``WANDB_*`` variables apply as usual."""

    project: str = ""
    name: Optional[str] = None

    def __post_init__(self) -> None:
        if not self.project:
            raise ConfigError("logging.wandb.project is required: the W&B project to log to")


@dataclasses.dataclass
class LoggingConfig(_Bounded):
    """Progress bar, metrics.jsonl, TensorBoard, loss plot, the final sample, a profile, W&B."""

    SECTION: ClassVar[str] = "logging"
    BOUNDS: ClassVar[Mapping[str, Bound]] = {"every": POSITIVE_COUNT, "peak_tflops_per_device": POSITIVE,
                                             "sample_tokens": COUNT}

    every: int = 10  # log/print metrics every N steps
    progress: bool = True
    tensorboard: bool = True
    plot: bool = True
    peak_tflops_per_device: Optional[float] = None  # for MFU; default: a table by device kind
    sample_prompt: str = "def "
    sample_tokens: int = 48  # 0: no sample at the end
    # [start, stop]: a jax.profiler trace of steps start + 1 .. stop (metrics' numbering) in <run_dir>/profile
    profile_steps: Optional[List[int]] = None
    wandb: Optional[WandbConfig] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        p = self.profile_steps
        if p is not None and not (len(p) == 2 and 0 <= p[0] < p[1]):
            raise ConfigError(f"logging.profile_steps={p!r} is invalid: expected [start, stop] with "
                              "0 <= start < stop (the steps after start up to stop are traced)")


@dataclasses.dataclass
class LmEvalConfig:
    """lm-evaluation-harness tasks run every ``every`` steps on the training mesh, their metrics logged beside
    the losses (split ``lm_eval``). Needs the ``eval`` extra. ``include_path``: a directory of local task YAMLs;
    ``limit``: documents per task; the rest as :class:`nucleusx_jax.eval.EvalOptions`."""

    tasks: List[str] = dataclasses.field(default_factory=list)
    every: int = 0  # 0 disables
    include_path: Optional[str] = None
    limit: Optional[int] = None
    num_fewshot: Optional[int] = None
    batch_size: int = 8
    max_length: int = 2048


SECTIONS: Dict[str, type] = {
    "data": DataConfig,
    "optimizer": OptimizerConfig,
    "schedule": ScheduleConfig,
    "train": TrainConfig,
    "mesh": MeshConfig,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
    "lm_eval": LmEvalConfig,
}
MODEL_PATH_KEY = "path"
MODEL_DIMENSIONS = ("vocab_size", "decoder_embed_dim", "decoder_value_embed_dim", "decoder_ffn_embed_dim",
                    "decoder_layers", "decoder_retention_heads")  # required: the model section must size the model
# keys that moved: the forward form and chunk size have one home, the model config
MOVED = {"train.forward_mode": "model.forward_mode", "train.chunk_size": "model.recurrent_chunk_size"}


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` as a float (YAML 1.1 wants ``1.0e-3``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+|\.[0-9_]+"
               r"(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)


def _yaml_load(text: str, where: str) -> Any:
    """``text`` parsed as YAML; a syntax error is a one-line :class:`ConfigError` naming ``where`` and the spot."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        spot = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where} is not valid YAML: {problem}{spot}") from None


@dataclasses.dataclass
class Config:
    """The whole run; ``model`` is the resolved dict of NucleusXConfig fields."""

    model: Dict[str, Any]
    data: DataConfig
    optimizer: OptimizerConfig
    schedule: ScheduleConfig
    train: TrainConfig
    mesh: MeshConfig
    checkpoint: CheckpointConfig
    logging: LoggingConfig
    lm_eval: LmEvalConfig = dataclasses.field(default_factory=LmEvalConfig)

    def model_config(self) -> NucleusXConfig:
        """The validated :class:`NucleusXConfig`."""
        return NucleusXConfig(**self.model)

    def to_dict(self) -> Dict[str, Any]:
        """Plain nested dict (YAML-serialisable) of the resolved config."""
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """The resolved config as YAML (what ``--config`` accepts)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin in (list, List):
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """``value`` checked against the annotation ``tp`` (ints are accepted as floats); raises naming ``tp``."""
    origin = typing.get_origin(tp)
    ok = True
    if origin is Literal:
        ok = value in typing.get_args(tp)
    elif origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return None
            if dataclasses.is_dataclass(arg) and isinstance(value, Mapping):
                return _section(where, arg, value)  # its own errors name the bad key
            if arg is not type(None):
                try:
                    return _coerce(value, arg, where)
                except ConfigError:
                    pass
        ok = False
    elif origin in (list, List):
        if isinstance(value, (list, tuple)):
            return [_coerce(v, typing.get_args(tp)[0], f"{where}[{i}]") for i, v in enumerate(value)]
        ok = False
    elif dataclasses.is_dataclass(tp):
        return _section(where, tp, value)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp in (bool, str):
        ok = isinstance(value, tp)
    if not ok:
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def _section(name: str, cls: type, values: Any) -> Any:
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        raise ConfigError(f"section '{name}': expected a mapping of keys to values, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(fields))
    moved = [f"{name}.{k} is now {MOVED[f'{name}.{k}']}" for k in unknown if f"{name}.{k}" in MOVED]
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in section '{name}'; valid keys: {', '.join(fields)}"
                          + "".join(f" ({m})" for m in moved))
    return cls(**{k: _coerce(v, hints[k], f"{name}.{k}") for k, v in values.items()})


def _model_fields() -> List[str]:
    """NucleusXConfig's named fields (not ``self``, nor its catch-all of transformers' generic keys)."""
    params = inspect.signature(NucleusXConfig.__init__).parameters.values()
    named = [p.name for p in params if p.name != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD]
    return named + ["num_labels", "problem_type"]


def resolve_model(values: Any) -> Dict[str, Any]:
    """``model`` section -> dict of NucleusXConfig fields (a ``path`` to a config.json, or to a directory
    holding one, is read; other keys override it). Unknown fields raise; NucleusXConfig validates the result."""
    if isinstance(values, str):
        values = {MODEL_PATH_KEY: values}
    if not isinstance(values, Mapping):
        raise ConfigError(f"section 'model': expected a mapping of NucleusXConfig fields or a path, "
                        f"got {type(values).__name__}")
    values = dict(values)
    valid = _model_fields()
    fields: Dict[str, Any] = {}
    if MODEL_PATH_KEY in values:
        path = _coerce(values.pop(MODEL_PATH_KEY), str, f"model.{MODEL_PATH_KEY}")
        if storage.isdir(path):
            path = os.path.join(path, "config.json")
        try:
            loaded = read_config_json(path)
        except ValueError as e:
            raise ConfigError(f"model.{MODEL_PATH_KEY}: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"model.{MODEL_PATH_KEY}: {path} holds a {type(loaded).__name__}, not a model config")
        fields = {k: v for k, v in loaded.items() if k in valid}
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in section 'model'; valid keys: {MODEL_PATH_KEY}, "
                         f"{', '.join(valid)}")
    defaults = inspect.signature(NucleusXConfig.__init__).parameters
    for key, value in values.items():
        default = defaults[key].default if key in defaults else None
        if default is not None and default is not inspect.Parameter.empty:
            value = _coerce(value, float if type(default) is float else type(default), f"model.{key}")
        fields[key] = value
    NucleusXConfig(**fields)  # validate now, with NucleusXConfig's messages
    missing = [k for k in MODEL_DIMENSIONS if k not in fields]
    if missing:  # NucleusXConfig's defaults are a 7B model: never the silent result of a forgotten key
        raise ConfigError(f"section 'model' does not give the model's dimensions {missing}: set them (configs/"
                          f"tiny.yaml shows a small model) or model.{MODEL_PATH_KEY}: a config.json holding them")
    return fields


def set_override(raw: Dict[str, Any], assignment: str) -> None:
    """Apply ``section.key=value`` to the raw dict; the value is parsed as YAML (``1e-3``, ``true``, ``[a, b]``)."""
    if "=" not in assignment or "." not in assignment.split("=", 1)[0]:
        raise ConfigError(f"--set {assignment!r} is invalid: expected section.key=value, e.g. train.steps=10")
    target, value = assignment.split("=", 1)
    section, key = target.split(".", 1)
    valid = ["model", *SECTIONS]
    if section not in valid:
        raise ConfigError(f"--set {assignment!r}: unknown section '{section}'; valid sections: {', '.join(valid)}")
    if not isinstance(raw.get(section), dict):
        raw[section] = {} if raw.get(section) is None else ({MODEL_PATH_KEY: raw[section]}
                                                            if isinstance(raw[section], str) else raw[section])
    *parents, key = key.split(".")
    node = raw[section]
    for parent in parents:  # a nested key: logging.wandb.project=...
        child = node.get(parent)
        if child is None:
            child = node[parent] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"--set {assignment!r}: {section}.{parent} is {child!r}, not a mapping")
        node = child
    node[key] = _yaml_load(value, f"--set {assignment!r}") if value != "" else ""


def parse_config(raw: Mapping[str, Any]) -> Config:
    """Validate a raw nested dict (from YAML) into a :class:`Config`."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"the config must be a mapping of sections, got {type(raw).__name__}")
    valid = ["model", *SECTIONS]
    unknown = sorted(set(raw) - set(valid))
    if unknown:
        raise ConfigError(f"unknown section(s) {unknown}; valid sections: {', '.join(valid)}")
    sections = {name: _section(name, cls, raw.get(name)) for name, cls in SECTIONS.items()}
    profile, steps = sections["logging"].profile_steps, sections["train"].steps
    if profile is not None and profile[1] > steps:
        raise ConfigError(f"logging.profile_steps={profile!r} is out of range: stop must be <= train.steps={steps}")
    cfg = Config(model=resolve_model(raw.get("model") or {}), **sections)
    check_carry_state(cfg)
    return cfg


def check_carry_state(cfg: Config) -> None:
    """``train.carry_state``'s needs across sections: stream rows (the only batches whose rows continue one
    another), the chunkwise form (the one that carries a state), and a kernel that takes an incoming state."""
    if not cfg.train.carry_state:
        return
    if not cfg.data.stream_rows:
        raise ConfigError("train.carry_state needs data.stream_rows: true: a row's state is carried into the row's "
                          "next window, and only stream rows continue the window before (other batches draw "
                          "windows at random)")
    model = cfg.model_config()
    mode = ForwardMode.parse(model.forward_mode)
    if mode is not ForwardMode.CHUNKWISE:
        raise ConfigError(f"train.carry_state needs model.forward_mode=chunkwise, got {mode.value}: the chunkwise "
                          "form is the one that continues a carried state")
    carries_z = ChunkwiseNormalization.parse(model.chunkwise_normalization).carries_z(
        cfg.data.reset_at_document_boundaries)
    if RetentionImpl.parse(model.retention_impl) is RetentionImpl.PALLAS and not carries_z:
        raise ConfigError("train.carry_state with model.retention_impl=pallas and model.chunkwise_normalization="
                          "reference needs data.reset_at_document_boundaries: true: without segments the Pallas "
                          "kernel takes no incoming state; use retention_impl=xla or chunkwise_normalization=exact")


def load_config(path: Optional[str], overrides: Sequence[str] = ()) -> Config:
    """Read the YAML at ``path`` (None: all defaults), apply ``--set`` overrides, validate."""
    raw: Dict[str, Any] = {}
    if path is not None:
        with storage.open_file(path, "r") as f:
            raw = _yaml_load(f.read(), path) or {}
    for assignment in overrides:
        set_override(raw, assignment)
    return parse_config(raw)
