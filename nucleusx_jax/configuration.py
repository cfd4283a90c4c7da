"""``NucleusXConfig``: the reference's config (model_type ``nucleus_x``), validated; no transformers needed.

``config.json`` is interchangeable with the PyTorch reference's: the same keys, defaults and
``attribute_map``. Besides the model fields the config keeps transformers' generic config keys
(``architectures``, ``id2label``, ``problem_type``, ...) as plain attributes and writes them back.
"""

import enum
import inspect
import json
import logging
import math
import numbers
import os
from typing import Any, Dict, Union

from .activations import ACTIVATIONS
from . import storage

logger = logging.getLogger(__name__)
CONFIG_FILE = "config.json"
# transformers' generic PretrainedConfig keys (4.x): accepted, kept and written back, never interpreted except
# num_labels / id2label / label2id / problem_type, which the sequence-classification head uses.
GENERIC_KEYS = frozenset("""
    _name_or_path _commit_hash _attn_implementation _attn_implementation_autoset add_cross_attention architectures
    auto_map bad_words_ids begin_suppress_tokens chunk_size_feed_forward cross_attention_hidden_size
    decoder_start_token_id
    diversity_penalty do_sample dtype torch_dtype early_stopping encoder_no_repeat_ngram_size
    exponential_decay_length_penalty finetuning_task forced_bos_token_id forced_eos_token_id id2label is_decoder
    is_encoder_decoder label2id length_penalty max_length min_length model_type no_repeat_ngram_size num_labels
    num_beam_groups num_beams num_return_sequences output_attentions output_hidden_states output_scores prefix
    problem_type pruned_heads remove_invalid_values repetition_penalty return_dict return_dict_in_generate
    sep_token_id suppress_tokens task_specific_params temperature tf_legacy_loss tie_encoder_decoder
    tokenizer_class top_k top_p torchscript transformers_version typical_p use_bfloat16
""".split())
GENERIC_DEFAULTS: Dict[str, Any] = {"problem_type": None, "id2label": {0: "LABEL_0", 1: "LABEL_1"},
                                    "label2id": {"LABEL_0": 0, "LABEL_1": 1}}
# what the sequence-classification head's loss can be (None: inferred from num_labels and the labels' dtype)
PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")
ATTRIBUTE_MAP = {
    "hidden_size": "decoder_embed_dim",
    "intermediate_size": "decoder_ffn_embed_dim",
    "num_attention_heads": "decoder_retention_heads",
    "num_hidden_layers": "decoder_layers",
}


class _Choice(str, enum.Enum):
    """A string enum whose :meth:`parse` names the bad value and the allowed ones."""

    @classmethod
    def parse(cls, value: Union[str, "_Choice"], name: str = "") -> "_Choice":
        try:
            return cls(value)
        except ValueError:
            allowed = ", ".join(m.value for m in cls)
            raise ValueError(f"{name or cls.__name__}={value!r} is invalid: must be one of {allowed}") from None


class ForwardMode(_Choice):
    """The three equivalent retention forms."""

    PARALLEL = "parallel"
    CHUNKWISE = "chunkwise"
    RECURRENT = "recurrent"


class RetentionImpl(_Choice):
    """The chunkwise form's implementation: plain XLA, or the Pallas kernel."""

    XLA = "xla"
    PALLAS = "pallas"


class ChunkwiseNormalization(_Choice):
    """How the chunkwise form normalises its rows: ``exact`` as the parallel form (the result does not depend
    on the chunk size), or ``reference``: the PyTorch reference's chunk-dependent rows, bit for bit."""

    EXACT = "exact"
    REFERENCE = "reference"

    def carries_z(self, segments: bool) -> bool:
        """Whether chunkwise windows normalised this way read (and so carry) the state's ``z``: all but
        ``reference`` windows without segments, whose normaliser reads ``kv`` alone."""
        return segments or self is not ChunkwiseNormalization.REFERENCE


FORWARD_MODES = tuple(m.value for m in ForwardMode)
RETENTION_IMPLS = tuple(m.value for m in RetentionImpl)
CHUNKWISE_NORMALIZATIONS = tuple(m.value for m in ChunkwiseNormalization)


class NucleusXConfig:
    """Configuration of a NucleusX model; fields, defaults and ``attribute_map`` equal the PyTorch reference's.

    The defaults describe NucleusX-7B. Three fields are ours, not the reference's (which keeps them as plain
    attributes): ``retention_impl`` (the chunkwise kernel), ``chunkwise_normalization`` (``exact``: chunkwise
    equals parallel and recurrent for every chunk size; ``reference``: the reference's chunk-dependent rows)
    and ``scan_layers`` (run the decoder layers under ``nn.scan``, parameters stacked on a leading ``layers``
    axis; files on disk always hold one tensor per layer, see :mod:`nucleusx_jax.weights`). ``deepnorm=True``
    switches the layers to post-norm (``decoder_normalize_before=False``) exactly as the reference does.
    Invalid values raise ``ValueError`` naming the field, the value and what is allowed; a keyword that is
    neither a field nor one of transformers' generic config keys (:data:`GENERIC_KEYS`) raises ``TypeError``.
    """

    model_type = "nucleus_x"
    attribute_map = ATTRIBUTE_MAP

    def __init__(
        self,
        vocab_size: int = 32000,
        initializer_factor: float = 2**-2.5,
        initializer_range: float = 0.02,
        lm_head_initializer_range: float = 4096**-0.5,
        pad_token_id: int = None,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        use_cache: bool = True,
        forward_mode: str = "parallel",
        activation_fn: str = "swish",
        dropout: float = 0.0,
        activation_dropout: float = 0.0,
        drop_path_rate: float = 0.0,
        decoder_embed_dim: int = 4096,
        decoder_value_embed_dim: int = 6912,
        decoder_ffn_embed_dim: int = 6912,
        decoder_layers: int = 32,
        decoder_retention_heads: int = 16,
        decoder_normalize_before: bool = True,
        rms_norm_embedding: bool = True,
        no_scale_embedding: bool = False,
        recurrent_chunk_size: int = 512,
        use_lm_decay: bool = False,
        z_loss_coeff: float = 0.0,
        deepnorm: bool = False,
        rms_norm_eps: float = 1e-6,
        groupnorm_eps: float = 1e-6,
        tie_word_embeddings: bool = False,
        retention_impl: str = "xla",
        chunkwise_normalization: str = "exact",
        scan_layers: bool = False,
        **generic: Any,
    ):
        unknown = set(generic) - GENERIC_KEYS
        if unknown:
            raise TypeError(f"NucleusXConfig got unknown field(s) {names(sorted(unknown))}; model fields: "
                            f"{', '.join(MODEL_FIELDS)}")
        if generic.get("model_type", self.model_type) != self.model_type:
            raise ValueError(f"model_type={short(generic['model_type'])} is invalid: this config is "
                             f"{self.model_type!r}")
        generic.pop("model_type", None)
        num_labels = generic.pop("num_labels", None)
        if num_labels is not None and (not isinstance(num_labels, int) or isinstance(num_labels, bool)
                                       or not 1 <= num_labels <= MAX_NUM_LABELS):
            raise ValueError(f"NucleusXConfig.num_labels={short(num_labels)} is invalid: must be an integer in "
                             f"[1, {MAX_NUM_LABELS}]")
        if num_labels is not None and "id2label" not in generic:  # as transformers stores it
            generic["id2label"] = {i: f"LABEL_{i}" for i in range(num_labels)}
            generic["label2id"] = {f"LABEL_{i}": i for i in range(num_labels)}
        if generic.get("problem_type") not in (None,) + PROBLEM_TYPES:
            raise ValueError(f"NucleusXConfig.problem_type={short(generic['problem_type'])} is invalid: must be "
                             f"one of {', '.join(PROBLEM_TYPES)} (or null: inferred)")
        if "id2label" in generic:
            labels = generic["id2label"]
            if not isinstance(labels, dict) or not 1 <= len(labels) <= MAX_NUM_LABELS or not all(
                    isinstance(k, int) or (isinstance(k, str) and k.strip().isdigit()) for k in labels):
                raise ValueError(f"NucleusXConfig.id2label={short(labels)} is invalid: must map label numbers "
                                 f"(at most {MAX_NUM_LABELS}) to names")
            generic["id2label"] = {int(k): v for k, v in labels.items()}
        object.__setattr__(self, "_generic", generic)
        self.vocab_size = vocab_size
        self.initializer_range = initializer_range
        self.initializer_factor = initializer_factor
        self.lm_head_initializer_range = lm_head_initializer_range
        self.use_lm_decay = use_lm_decay
        self.recurrent_chunk_size = recurrent_chunk_size
        self.forward_mode = forward_mode
        self.decoder_embed_dim = decoder_embed_dim
        self.decoder_value_embed_dim = decoder_value_embed_dim
        self.decoder_retention_heads = decoder_retention_heads
        self.decoder_ffn_embed_dim = decoder_ffn_embed_dim
        self.decoder_layers = decoder_layers
        self.decoder_normalize_before = decoder_normalize_before
        self.activation_fn = activation_fn
        self.dropout = dropout
        self.drop_path_rate = drop_path_rate
        self.activation_dropout = activation_dropout
        self.no_scale_embedding = no_scale_embedding
        self.rms_norm_embedding = rms_norm_embedding
        self.deepnorm = deepnorm
        self.rms_norm_eps = rms_norm_eps
        self.groupnorm_eps = groupnorm_eps
        self.z_loss_coeff = z_loss_coeff
        self.retention_impl = retention_impl
        self.chunkwise_normalization = chunkwise_normalization
        self.scan_layers = scan_layers
        self.bos_token_id = bos_token_id
        self.pad_token_id = pad_token_id
        self.eos_token_id = eos_token_id
        self.use_cache = use_cache
        self.tie_word_embeddings = tie_word_embeddings
        if self.deepnorm:
            self.decoder_normalize_before = False
        self.validate()

    def __getattr__(self, name: str) -> Any:
        """The reference's ``attribute_map`` aliases and the generic keys (with transformers' defaults for the
        ones the classification head reads)."""
        if name.startswith("__") or name == "_generic":
            raise AttributeError(name)
        if name in ATTRIBUTE_MAP:
            return getattr(self, ATTRIBUTE_MAP[name])
        if name in self._generic:
            return self._generic[name]
        if name in GENERIC_DEFAULTS:
            return dict(GENERIC_DEFAULTS[name]) if GENERIC_DEFAULTS[name] else None
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in GENERIC_KEYS and name not in MODEL_FIELDS:  # kept with the generic keys, so they are saved
            if name == "num_labels":
                self._generic["id2label"] = {i: f"LABEL_{i}" for i in range(value)}
                self._generic["label2id"] = {f"LABEL_{i}": i for i in range(value)}
            else:
                self._generic[name] = value
        else:
            super().__setattr__(ATTRIBUTE_MAP.get(name, name), value)

    @property
    def num_labels(self) -> int:
        """Outputs of the sequence-classification head: ``len(id2label)`` (2 by default, like transformers)."""
        return len(self.id2label)

    def to_dict(self) -> Dict[str, Any]:
        """Every model field, ``model_type`` and the generic keys given."""
        out = {name: getattr(self, name) for name in MODEL_FIELDS}
        out["model_type"] = self.model_type
        out.update(self._generic)
        if "id2label" in out:
            out["id2label"] = {str(k): v for k, v in out["id2label"].items()}
        return out

    def to_json_string(self) -> str:
        """``config.json`` text as transformers writes it: :meth:`to_dict` without the token ids that are None
        (its defaults), keys sorted, two-space indent."""
        values = {k: v for k, v in self.to_dict().items()
                  if not (k in ("pad_token_id", "bos_token_id", "eos_token_id") and v is None)}
        return json.dumps(values, indent=2, sort_keys=True) + "\n"

    def replace(self, **changes: Any) -> "NucleusXConfig":
        """A new validated config with ``changes`` applied."""
        return NucleusXConfig.from_dict({**NucleusXConfig.to_dict(self), **changes})

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "NucleusXConfig":
        """From a config dict (``config.json`` contents). Keys that are neither fields nor generic keys are kept
        (the reference keeps them too) with a warning naming them."""
        values = dict(values)
        strays = {k: values.pop(k) for k in list(values) if k not in MODEL_FIELDS and k not in GENERIC_KEYS}
        config = cls(**values)
        if strays:
            logger.warning("config keys %s are not NucleusX fields; kept as they are", names(sorted(strays)))
            config._generic.update(strays)
        return config

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike], **overrides: Any) -> "NucleusXConfig":
        """Read ``config.json`` from a model directory (or the file itself), then apply ``overrides``."""
        path = os.fspath(path)
        file = os.path.join(path, CONFIG_FILE) if storage.isdir(path) else path
        if not storage.isfile(file):
            raise FileNotFoundError(f"{path} has no {CONFIG_FILE}: expected a NucleusX model directory")
        values = read_config_json(file)
        if not isinstance(values, dict) or values.get("model_type") != cls.model_type:
            found = short(values.get("model_type")) if isinstance(values, dict) else type(values).__name__
            raise ValueError(f"{file} has model_type={found}; expected {cls.model_type!r}")
        return cls.from_dict({**values, **overrides})

    def save_pretrained(self, directory: Union[str, os.PathLike]) -> str:
        """Write ``<directory>/config.json`` (atomically); returns its path. ``auto_map`` (names the PyTorch code
        files a PyTorch export ships, :mod:`nucleusx_jax.remote_code`) is left out: our directories lack them."""
        path = os.path.join(os.fspath(directory), CONFIG_FILE)
        values = {k: v for k, v in json.loads(self.to_json_string()).items() if k != "auto_map"}
        storage.atomic_write(path, json.dumps(values, indent=2, sort_keys=True) + "\n")
        return path

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, NucleusXConfig) and NucleusXConfig.to_dict(self) == NucleusXConfig.to_dict(other)

    def __repr__(self) -> str:
        return f"NucleusXConfig {self.to_json_string()}"

    @property
    def key_head_dim(self) -> int:
        """Per-head query/key width: ``decoder_embed_dim // decoder_retention_heads``."""
        return self.decoder_embed_dim // self.decoder_retention_heads

    @property
    def value_head_dim(self) -> int:
        """Per-head value width: ``decoder_value_embed_dim // decoder_retention_heads``."""
        return self.decoder_value_embed_dim // self.decoder_retention_heads

    def validate(self) -> None:
        """Raise ``ValueError`` for any field outside what the model can run: a wrong type, a size beyond
        :data:`SIZE_LIMITS`, a bad choice. Checked before anything is allocated; messages stay short."""

        def bad(field: str, allowed: str) -> ValueError:
            return ValueError(f"NucleusXConfig.{field}={short(getattr(self, field))} is invalid: {allowed}")

        for field, high in SIZE_LIMITS.items():
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= high:
                raise bad(field, f"must be an integer in [1, {high}]")
        heads = self.decoder_retention_heads
        for field in ("decoder_embed_dim", "decoder_value_embed_dim"):
            if getattr(self, field) % heads:
                raise bad(field, f"must be divisible by decoder_retention_heads={heads}")
        if self.key_head_dim % 2:
            raise bad("decoder_embed_dim", f"decoder_embed_dim // decoder_retention_heads = {self.key_head_dim} "
                      "(the key head dim) must be even for the rotation")
        for field, allowed in (("forward_mode", FORWARD_MODES), ("retention_impl", RETENTION_IMPLS),
                               ("chunkwise_normalization", CHUNKWISE_NORMALIZATIONS),
                               ("activation_fn", tuple(sorted(ACTIVATIONS)))):
            if not isinstance(getattr(self, field), str) or getattr(self, field) not in allowed:
                raise bad(field, f"must be one of {', '.join(allowed)}")
        for field in BOOL_FIELDS:
            if not isinstance(getattr(self, field), bool):
                raise bad(field, "must be true or false")
        for field, (low, high, what) in NUMBER_RANGES.items():
            value = getattr(self, field)
            if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value) or not (
                    low(value) and high(value)):
                raise bad(field, f"must be {what}")
        for field in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, field)
            ids = value if isinstance(value, list) else [value]
            if value is not None and not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                raise bad(field, "must be a token id (an integer), a list of them, or null")


def short(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to about ``limit`` characters: error messages stay short whatever the value."""
    text = repr(value) if not isinstance(value, (list, dict, str)) or len(value) < limit else \
        f"{type(value).__name__} of length {len(value)}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def names(keys: Any, limit: int = 10) -> str:
    """A short list of the names ``keys`` (in their order): the first ``limit``, each cut, and how many more."""
    keys = [str(k) for k in keys]
    shown = [k if len(k) <= 120 else k[:117] + "..." for k in keys[:limit]]
    return str(shown) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def read_config_json(file: str) -> Any:
    """The JSON value in ``file``; too large, too deeply nested or unreadable JSON is one short ValueError."""
    size = storage.size(file)
    if size > MAX_CONFIG_BYTES:
        raise ValueError(f"{file} holds {size} bytes; a config.json is a few KB (at most {MAX_CONFIG_BYTES})")
    with storage.open_file(file, "r") as f:
        try:
            return json.load(f)
        except RecursionError:
            raise ValueError(f"{file} is nested too deeply to be a model config") from None
        except ValueError as e:
            raise ValueError(f"{file} is not valid JSON: {str(e)[:200]}") from None


# The largest value of each size field: far above any trained model, small enough that a typo or a hostile
# config.json is refused before anything is allocated (bigger models: raise these).
SIZE_LIMITS = {"vocab_size": 1 << 24, "decoder_embed_dim": 1 << 16, "decoder_value_embed_dim": 1 << 17,
               "decoder_ffn_embed_dim": 1 << 18, "decoder_layers": 1 << 12, "decoder_retention_heads": 1 << 12,
               "recurrent_chunk_size": 1 << 16}
MAX_NUM_LABELS = 1 << 16
MAX_CONFIG_BYTES = 1 << 24
BOOL_FIELDS = ("use_cache", "decoder_normalize_before", "rms_norm_embedding", "no_scale_embedding", "use_lm_decay",
               "deepnorm", "tie_word_embeddings", "scan_layers")
_ANY, _POSITIVE, _NON_NEGATIVE = (lambda v: True), (lambda v: v > 0), (lambda v: v >= 0)
NUMBER_RANGES = {  # field: (low check, high check, what is allowed)
    **dict.fromkeys(("dropout", "activation_dropout", "drop_path_rate"),
                    (_NON_NEGATIVE, lambda v: v < 1, "a probability in [0, 1)")),
    **dict.fromkeys(("rms_norm_eps", "groupnorm_eps"), (_POSITIVE, _ANY, "a finite number > 0")),
    **dict.fromkeys(("z_loss_coeff", "initializer_factor", "initializer_range", "lm_head_initializer_range"),
                    (_NON_NEGATIVE, _ANY, "a finite number >= 0")),
}


MODEL_FIELDS = tuple(p for p in inspect.signature(NucleusXConfig.__init__).parameters if p not in ("self", "generic"))
