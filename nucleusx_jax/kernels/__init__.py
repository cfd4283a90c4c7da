"""Pallas kernels. :mod:`.chunkwise`: fused chunkwise retention (forward and backward)."""

from .chunkwise import LAYOUTS, chunkwise_retention, default_layout

__all__ = ["LAYOUTS", "chunkwise_retention", "default_layout"]
