"""Framework layers: ``anypool.layers.torch``, ``anypool.layers.keras``, ``anypool.layers.flax``."""
