"""NucleusXConfig for transformers (PyTorch and Flax alike): the reference's ``config.json`` fields, defaults and
``attribute_map``, validated.

Shipped beside every PyTorch export as remote code (``trust_remote_code=True``), so it imports transformers
only. Works on transformers 4.57 and 5.x.
"""

from typing import Any

from transformers import PretrainedConfig

FORWARD_MODES = ("parallel", "chunkwise", "recurrent")
RETENTION_IMPLS = ("xla", "pallas")
CHUNKWISE_NORMALIZATIONS = ("exact", "reference")
# the parameter-free activations of transformers.activations that both frameworks compute (ACT2FN names)
ACTIVATIONS = ("gelu", "gelu_python", "gelu_10", "gelu_new", "gelu_pytorch_tanh", "gelu_python_tanh", "gelu_fast",
               "gelu_accurate", "quick_gelu", "laplace", "leaky_relu", "linear", "mish", "relu", "relu2", "relu6",
               "sigmoid", "silu", "swish", "tanh")


class NucleusXConfig(PretrainedConfig):
    """Configuration of a NucleusX model (model_type ``nucleus_x``); the defaults describe NucleusX-7B.

    ``retention_impl`` and ``scan_layers`` are the JAX implementation's (its chunkwise kernel and layer layout);
    PyTorch ignores them. ``chunkwise_normalization``: ``"exact"`` (the chunkwise form equals the parallel one for
    every chunk size) or ``"reference"`` (the PyTorch reference's chunk-dependent rows). ``deepnorm=True`` switches to post-norm (``decoder_normalize_before=False``). A value
    outside what the model runs raises ``ValueError`` naming the field, the value and what is allowed.
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
        scan_layers: bool = False,
        chunkwise_normalization: str = "exact",
        **kwargs: Any,
    ):
        self.vocab_size = vocab_size
        self.initializer_factor = initializer_factor
        self.initializer_range = initializer_range
        self.lm_head_initializer_range = lm_head_initializer_range
        self.forward_mode = forward_mode
        self.activation_fn = activation_fn
        self.dropout = dropout
        self.activation_dropout = activation_dropout
        self.drop_path_rate = drop_path_rate
        self.decoder_embed_dim = decoder_embed_dim
        self.decoder_value_embed_dim = decoder_value_embed_dim
        self.decoder_ffn_embed_dim = decoder_ffn_embed_dim
        self.decoder_layers = decoder_layers
        self.decoder_retention_heads = decoder_retention_heads
        self.decoder_normalize_before = False if deepnorm else decoder_normalize_before
        self.rms_norm_embedding = rms_norm_embedding
        self.no_scale_embedding = no_scale_embedding
        self.recurrent_chunk_size = recurrent_chunk_size
        self.use_lm_decay = use_lm_decay
        self.z_loss_coeff = z_loss_coeff
        self.deepnorm = deepnorm
        self.rms_norm_eps = rms_norm_eps
        self.groupnorm_eps = groupnorm_eps
        self.retention_impl = retention_impl
        self.scan_layers = scan_layers
        self.chunkwise_normalization = chunkwise_normalization
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)
        # transformers 5 keeps neither of these on the base config: set here for both versions
        self.use_cache = use_cache
        self.tie_word_embeddings = tie_word_embeddings
        self.validate_nucleus_x()

    @property
    def key_head_dim(self) -> int:
        """Per-head query/key width: ``decoder_embed_dim // decoder_retention_heads``."""
        return self.decoder_embed_dim // self.decoder_retention_heads

    @property
    def value_head_dim(self) -> int:
        """Per-head value width: ``decoder_value_embed_dim // decoder_retention_heads``."""
        return self.decoder_value_embed_dim // self.decoder_retention_heads

    def validate_nucleus_x(self) -> None:
        """Raise ``ValueError`` for any model field outside what the model can run."""

        def bad(field: str, allowed: str) -> ValueError:
            return ValueError(f"NucleusXConfig.{field}={getattr(self, field)!r} is invalid: {allowed}")

        for field in ("vocab_size", "decoder_embed_dim", "decoder_value_embed_dim", "decoder_ffn_embed_dim",
                      "decoder_layers", "decoder_retention_heads", "recurrent_chunk_size"):
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
        if self.chunkwise_normalization not in CHUNKWISE_NORMALIZATIONS:
            raise bad("chunkwise_normalization", f"must be one of {', '.join(CHUNKWISE_NORMALIZATIONS)}")
        if not isinstance(self.scan_layers, bool):
            raise bad("scan_layers", "must be true or false")
        if self.activation_fn not in ACTIVATIONS:
            raise bad("activation_fn", f"must be one of {', '.join(sorted(ACTIVATIONS))}")
        for field in ("dropout", "activation_dropout", "drop_path_rate"):
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise bad(field, "must be a probability in [0, 1)")
        for field in ("rms_norm_eps", "groupnorm_eps"):
            if not getattr(self, field) > 0:
                raise bad(field, "must be > 0")
        if self.z_loss_coeff < 0:
            raise bad("z_loss_coeff", "must be >= 0")
