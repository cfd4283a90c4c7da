"""Pallas kernels. :mod:`.chunkwise`: fused chunkwise retention (forward and backward)."""

from .chunkwise import (LAYOUTS, chunkwise_carry, chunkwise_retention, default_layout, sharded_chunkwise_carry,
                        sharded_chunkwise_retention, target_platform)

__all__ = ["LAYOUTS", "chunkwise_carry", "chunkwise_retention", "default_layout", "sharded_chunkwise_carry",
           "sharded_chunkwise_retention", "target_platform"]
