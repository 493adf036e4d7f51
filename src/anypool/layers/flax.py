"""Flax NNX modules: thin wrappers over :mod:`anypool`'s functions (PyTorch's exact windows).

``data_format`` defaults to ``"channels_last"`` as everywhere in Flax: inputs are
``(N, *S, C)`` or unbatched ``(*S, C)``.  The spatial rank is the length of
``output_size`` (an int output size needs ``spatial_dims``); the global pools
reduce every spatial axis of a batch.  None of these has parameters or state, so
they work unchanged inside ``nnx.jit``, ``nnx.grad`` and ``nnx.vmap``.  ``__call__(x,
valid_sizes=None)`` also pools padded batches (``valid_sizes`` ``(N, k)``: each sample's
unpadded spatial size; traced under ``jit``).

    import anypool.layers.flax as apf
    pool = apf.AdaptiveAvgPool((7, 7))             # (N, H, W, C) -> (N, 7, 7, C)
    head = apf.GlobalAvgPool()                     # (N, H, W, C) -> (N, C)
"""

from __future__ import annotations

from flax import nnx

import anypool

from .. import _args

__all__ = ["AdaptiveAvgPool", "AdaptiveMaxPool", "GlobalAvgPool", "GlobalMaxPool"]


class _Adaptive(nnx.Module):
    _function = None

    def __init__(self, output_size, *, spatial_dims: int | None = None, data_format: str = "channels_last"):
        _args.check_data_format(data_format, type(self).__name__)
        if spatial_dims is None:
            spatial_dims = _args.output_rank(output_size, type(self).__name__)
        self.output_size = tuple(output_size) if isinstance(output_size, (list, tuple)) else output_size
        self.spatial_dims = int(spatial_dims)
        self.data_format = data_format

    def _size(self):
        size = self.output_size
        return size if isinstance(size, tuple) else (size,) * self.spatial_dims


class AdaptiveAvgPool(_Adaptive):
    """Adaptive average pooling: ``(N, *S, C) → (N, *output_size, C)`` (channels_last by default).

    ``output_size``: one entry per spatial axis (``None`` keeps that axis), or an int
    with ``spatial_dims``.  Output ``j`` of an axis of length ``L`` pooled to ``O`` is the
    mean over ``[floor(j·L/O), ceil((j+1)·L/O))``.
    """

    def __call__(self, x, valid_sizes=None):
        return anypool.adaptive_avg_pool(x, self._size(), data_format=self.data_format, valid_sizes=valid_sizes)


class AdaptiveMaxPool(_Adaptive):
    """Adaptive max pooling, shapes as :class:`AdaptiveAvgPool`; the gradient goes to each
    window's first maximum (PyTorch's rule).  ``return_indices=True`` also returns the flat
    spatial offsets of the maxima."""

    def __init__(self, output_size, *, spatial_dims: int | None = None, data_format: str = "channels_last",
                 return_indices: bool = False):
        super().__init__(output_size, spatial_dims=spatial_dims, data_format=data_format)
        self.return_indices = bool(return_indices)

    def __call__(self, x, valid_sizes=None):
        return anypool.adaptive_max_pool(x, self._size(), data_format=self.data_format,
                                         return_indices=self.return_indices, valid_sizes=valid_sizes)


class _Global(nnx.Module):
    def __init__(self, *, data_format: str = "channels_last", keepdims: bool = False):
        _args.check_data_format(data_format, type(self).__name__)
        self.data_format = data_format
        self.keepdims = bool(keepdims)


class GlobalAvgPool(_Global):
    """Mean over every spatial axis: ``(N, *S, C) → (N, C)`` (``keepdims``: ``(N, 1, …, 1, C)``)."""

    def __call__(self, x, valid_sizes=None):
        return anypool.global_avg_pool(x, data_format=self.data_format, keepdims=self.keepdims,
                                       valid_sizes=valid_sizes)


class GlobalMaxPool(_Global):
    """Max over every spatial axis: ``(N, *S, C) → (N, C)`` (``keepdims``: ``(N, 1, …, 1, C)``)."""

    def __call__(self, x, valid_sizes=None):
        return anypool.global_max_pool(x, data_format=self.data_format, keepdims=self.keepdims,
                                       valid_sizes=valid_sizes)
