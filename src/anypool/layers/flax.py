"""Flax NNX modules: thin wrappers over :mod:`anypool`'s functions (PyTorch's exact windows).

``data_format`` defaults to ``"channels_last"`` as everywhere in Flax: inputs are
``(N, *S, C)`` or unbatched ``(*S, C)``.  The spatial rank is the length of
``output_size`` (an int output size needs ``spatial_dims``); the global pools
reduce every spatial axis of a batch.  None of these but AdaptiveGeMPool (its ``p``) has
parameters or state, so they work unchanged inside ``nnx.jit``, ``nnx.grad`` and ``nnx.vmap``.  ``__call__(x,
valid_sizes=None)`` also pools padded batches (``valid_sizes`` ``(N, k)``: each sample's
unpadded spatial size; traced under ``jit``).

    import anypool.layers.flax as apf
    pool = apf.AdaptiveAvgPool((7, 7))             # (N, H, W, C) -> (N, 7, 7, C)
    head = apf.GlobalAvgPool()                     # (N, H, W, C) -> (N, C)

More reductions over the same windows (no ``valid_sizes``): :class:`AdaptiveLPPool`,
:class:`AdaptiveGeMPool` (``p`` an ``nnx.Param``, learnt with the model, unless
``p_trainable=False``), :class:`AdaptiveAvgMaxPool`, :class:`AdaptiveCatAvgMaxPool` and timm's
:class:`SelectAdaptivePool2d`.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

import anypool

from .. import _args

__all__ = ["AdaptiveAvgPool", "AdaptiveMaxPool", "GlobalAvgPool", "GlobalMaxPool",
           "AdaptiveLPPool", "AdaptiveGeMPool", "AdaptiveAvgMaxPool", "AdaptiveCatAvgMaxPool", "SelectAdaptivePool2d"]


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


# --- more reductions over the same windows -------------------------------------------------------


class AdaptiveLPPool(_Adaptive):
    """LP pooling ``(Σ_window x^p)^(1/p)``, ``p = norm_type`` a positive float, over the adaptive
    windows (:func:`anypool.adaptive_lp_pool`; torch's ``lp_pool`` signs); shapes as :class:`AdaptiveAvgPool`."""

    def __init__(self, norm_type: float, output_size, *, spatial_dims: int | None = None,
                 data_format: str = "channels_last"):
        argument = f"{type(self).__name__}(norm_type)"
        if _args.positive_exponent(norm_type, argument) is None:
            raise _args.number_expected(norm_type, argument)
        super().__init__(output_size, spatial_dims=spatial_dims, data_format=data_format)
        self.norm_type = float(norm_type)

    def __call__(self, x, valid_sizes=None):
        return anypool.adaptive_lp_pool(x, self.norm_type, self._size(), data_format=self.data_format,
                                        valid_sizes=valid_sizes)


class AdaptiveGeMPool(_Adaptive):
    """Generalised-mean pooling ``(mean_window max(x, eps)^p)^(1/p)`` (:func:`anypool.adaptive_gem_pool`);
    shapes as :class:`AdaptiveAvgPool`.

    ``p`` is a scalar ``nnx.Param`` (float32, initial value ``p``), so ``nnx.grad`` and an
    ``nnx.Optimizer(..., wrt=nnx.Param)`` train it; ``p_trainable=False`` keeps it a fixed float.
    """

    def __init__(self, output_size, p: float = 3.0, eps: float = 1e-6, *, p_trainable: bool = True,
                 spatial_dims: int | None = None, data_format: str = "channels_last"):
        name = type(self).__name__
        if _args.positive_exponent(p, f"{name}(p)") is None:
            raise _args.number_expected(p, f"{name}(p)")
        self.eps = _args.positive_eps(eps, f"{name}(eps)")
        super().__init__(output_size, spatial_dims=spatial_dims, data_format=data_format)
        self.p = nnx.Param(jnp.asarray(float(p), jnp.float32)) if p_trainable else float(p)

    def __call__(self, x, valid_sizes=None):
        p = self.p[...] if isinstance(self.p, nnx.Param) else self.p
        return anypool.adaptive_gem_pool(x, self._size(), p=p, eps=self.eps, data_format=self.data_format,
                                         valid_sizes=valid_sizes)


class AdaptiveAvgMaxPool(_Adaptive):
    """timm's avgmax: ``0.5·(avg + max)`` of each window (:func:`anypool.adaptive_avgmax_pool`);
    shapes as :class:`AdaptiveAvgPool`."""

    def __call__(self, x, valid_sizes=None):
        return anypool.adaptive_avgmax_pool(x, self._size(), data_format=self.data_format, valid_sizes=valid_sizes)


class AdaptiveCatAvgMaxPool(_Adaptive):
    """timm's catavgmax: the window averages, then the maxima, along the channel axis
    (:func:`anypool.adaptive_catavgmax_pool`): ``(N, *S, C) → (N, *output_size, 2C)``."""

    def __call__(self, x, valid_sizes=None):
        return anypool.adaptive_catavgmax_pool(x, self._size(), data_format=self.data_format,
                                               valid_sizes=valid_sizes)


class SelectAdaptivePool2d(nnx.Module):
    """timm's ``SelectAdaptivePool2d`` (:func:`anypool.select_adaptive_pool2d`) on a batch ``(N, H, W, C)``
    (channels_last by default, as in Flax).

    ``pool_type``: ``'avg'``, ``'max'``, ``'avgmax'``, ``'catavgmax'`` (``2C`` channels), ``'fast…'`` (a
    global pool: ``output_size`` must be 1; ``'fast'`` is avg) or ``''`` (no pooling); ``flatten`` flattens
    every axis after the batch axis.  ``feat_mult()`` is the channel factor, ``is_identity()`` whether it pools.
    """

    def __init__(self, output_size=1, pool_type: str = "fast", flatten: bool = False, *,
                 data_format: str = "channels_last"):
        name = type(self).__name__
        kind = _args.pool_type(pool_type, name)
        if kind.startswith("fast"):
            _args.fast_output_size(output_size, kind, name)
        _args.check_data_format(data_format, name)
        self.output_size = tuple(output_size) if isinstance(output_size, (list, tuple)) else output_size
        self.pool_type = pool_type or ""
        self.flatten = bool(flatten)
        self.data_format = data_format

    def __call__(self, x, valid_sizes=None):
        return anypool.select_adaptive_pool2d(x, self.pool_type, self.output_size, self.flatten,
                                              data_format=self.data_format, valid_sizes=valid_sizes)

    def is_identity(self) -> bool:
        return not self.pool_type

    def feat_mult(self) -> int:
        return _args.feat_mult(self.pool_type.lower())
