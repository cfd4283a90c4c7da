"""``NucleusXConfig``: the reference's config (model_type ``nucleus_x``), with validation."""

import enum
from typing import Any, Union

from transformers import PretrainedConfig

from .activations import ACTIVATIONS


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


FORWARD_MODES = tuple(m.value for m in ForwardMode)
RETENTION_IMPLS = tuple(m.value for m in RetentionImpl)


class NucleusXConfig(PretrainedConfig):
    """Configuration of a NucleusX model; fields, defaults and ``attribute_map`` equal the PyTorch reference's.

    The defaults describe NucleusX-7B. ``deepnorm=True`` switches the layers to post-norm
    (``decoder_normalize_before=False``) exactly as the reference does. Invalid values raise ``ValueError``
    naming the field, the value and what is allowed.
    """

    model_type = "nucleus_x"
    attribute_map = {
        "hidden_size": "decoder_embed_dim",
        "intermediate_size": "decoder_ffn_embed_dim",
        "num_attention_heads": "decoder_retention_heads",
        "num_hidden_layers": "decoder_layers",
    }

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
        **kwargs: Any,
    ):
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
        if self.deepnorm:
            self.decoder_normalize_before = False
        super().__init__(
            bos_token_id=bos_token_id,
            pad_token_id=pad_token_id,
            eos_token_id=eos_token_id,
            use_cache=use_cache,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self.validate()

    @property
    def key_head_dim(self) -> int:
        """Per-head query/key width: ``decoder_embed_dim // decoder_retention_heads``."""
        return self.decoder_embed_dim // self.decoder_retention_heads

    @property
    def value_head_dim(self) -> int:
        """Per-head value width: ``decoder_value_embed_dim // decoder_retention_heads``."""
        return self.decoder_value_embed_dim // self.decoder_retention_heads

    def validate(self) -> None:
        """Raise ``ValueError`` for any field outside what the model can run."""

        def bad(field: str, allowed: str) -> ValueError:
            return ValueError(f"NucleusXConfig.{field}={getattr(self, field)!r} is invalid: {allowed}")

        for field in ("vocab_size", "decoder_embed_dim", "decoder_value_embed_dim", "decoder_ffn_embed_dim",
                      "decoder_layers", "decoder_retention_heads"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise bad(field, "must be an integer >= 1")
        heads = self.decoder_retention_heads
        for field in ("decoder_embed_dim", "decoder_value_embed_dim"):
            if getattr(self, field) % heads:
                raise bad(field, f"must be divisible by decoder_retention_heads={heads}")
        if self.key_head_dim % 2:
            raise bad("decoder_embed_dim", f"decoder_embed_dim // decoder_retention_heads = {self.key_head_dim} "
                      "(the key head dim) must be even for the rotation")
        if self.forward_mode not in FORWARD_MODES:
            raise bad("forward_mode", f"must be one of {', '.join(FORWARD_MODES)}")
        if self.retention_impl not in RETENTION_IMPLS:
            raise bad("retention_impl", f"must be one of {', '.join(RETENTION_IMPLS)}")
        if self.activation_fn not in ACTIVATIONS:
            raise bad("activation_fn", f"must be one of {', '.join(sorted(ACTIVATIONS))}")
        chunk = self.recurrent_chunk_size
        if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
            raise bad("recurrent_chunk_size", "must be an integer >= 1")
        for field in ("dropout", "activation_dropout", "drop_path_rate"):
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise bad(field, "must be a probability in [0, 1)")
        for field in ("rms_norm_eps", "groupnorm_eps"):
            if not getattr(self, field) > 0:
                raise bad(field, "must be > 0")
        if self.z_loss_coeff < 0:
            raise bad("z_loss_coeff", "must be >= 0")
