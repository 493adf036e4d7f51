"""Framework layers: ``anypool.layers.torch`` (torch.nn), ``anypool.layers.keras``, ``anypool.layers.flax``."""
