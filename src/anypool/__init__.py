"""anypool — exact adaptive pooling (PyTorch's windows) for NumPy, PyTorch, JAX and TensorFlow.

Every function takes an array of any supported framework and returns one of the
same framework.  Layouts: ``data_format="channels_first"`` takes ``(N, C, *S)`` or
unbatched ``(C, *S)``; ``"channels_last"`` takes ``(N, *S, C)`` or ``(*S, C)``.
Along a spatial axis of length ``L`` pooled to ``O``, output ``j`` reduces input
``[floor(j·L/O), ceil((j+1)·L/O))`` (see :func:`bins`).

``output_size`` is an int (every axis) or one entry per spatial axis; an entry
``None`` keeps that axis' size, ``0`` gives an empty axis.

Padded batches: ``valid_sizes``, integers of shape ``(N, k)`` (``k`` spatial axes; ``(N,)``
for 1-D), gives each sample's unpadded size — its valid region is the leading
``valid_sizes[i]`` positions of every spatial axis.  Output ``i`` is then the pooling of
sample ``i`` cropped to that region, alone (``L = valid_sizes[i][axis]`` above); max
indices stay flat offsets into the padded plane, and the padding gets gradient 0.  A
``None`` output entry keeps the axis: sample ``i`` is valid over its own length, 0 beyond.
"""

from __future__ import annotations

import sys as _sys

import numpy as _np

from . import _args, _dispatch
from ._args import OutputSize
from ._bins import AxisBins, bins

if "torch" in _sys.modules:
    # torch.compile cannot trace an import: load the backend (and register its ops) now,
    # not on the first call, which may be inside a compiled function
    from .backends import torch as _torch_backend  # noqa: F401

__version__ = "0.1.0"

__all__ = [
    "adaptive_avg_pool", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
    "adaptive_max_pool", "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d",
    "global_avg_pool", "global_max_pool", "bins", "AxisBins",
    "adaptive_lp_pool", "adaptive_lp_pool1d", "adaptive_lp_pool2d", "adaptive_lp_pool3d",
    "adaptive_gem_pool", "adaptive_gem_pool1d", "adaptive_gem_pool2d", "adaptive_gem_pool3d",
    "adaptive_avgmax_pool", "adaptive_avgmax_pool1d", "adaptive_avgmax_pool2d", "adaptive_avgmax_pool3d",
    "adaptive_catavgmax_pool", "adaptive_catavgmax_pool1d", "adaptive_catavgmax_pool2d", "adaptive_catavgmax_pool3d",
    "select_adaptive_pool2d",
]


def _pool(x, output_size: OutputSize, rank: int, data_format: str, function: str, reduce: str,
          return_indices: bool = False, batched=None, valid_sizes=None):
    """Check the call, pick the backend and run it; returns ``(result, spec)``."""
    backend = _dispatch.backend_for(x, function)
    spec = _args.pool_spec(backend.shape(x), output_size, rank, data_format, function=function, batched=batched,
                           cache=not backend.is_tracing())
    valid = {} if valid_sizes is None else _valid(backend, x, valid_sizes, spec, output_size, function)
    if reduce == "avg":
        _args.require_floating(backend.dtype_name(x), backend.is_floating(x), function)
        return backend.avg_pool(x, spec, **valid), spec
    return backend.max_pool(x, spec, return_indices, **valid), spec


def _valid(backend, x, valid_sizes, spec, output_size, function: str) -> dict:
    """``valid_sizes`` checked and in ``x``'s framework: the keywords for the backend's pool."""
    if not getattr(backend, "VALID_SIZES", False):
        raise _args.valid_sizes_unsupported(backend.name, function)
    if backend.is_array(valid_sizes):
        shape, dtype = backend.shape(valid_sizes), backend.dtype_name(valid_sizes)
        values = None if backend.is_tracing() else backend.known_values(valid_sizes)
    else:
        try:
            valid_sizes = _np.asarray(valid_sizes)
        except (TypeError, ValueError):
            raise _args.valid_sizes_not_array(valid_sizes, function) from None
        shape, dtype, values = valid_sizes.shape, valid_sizes.dtype.name, valid_sizes
    _args.check_valid_sizes(shape, dtype, _args.is_integer_dtype(dtype), values, spec, function)
    return {"valid_sizes": backend.as_sizes(valid_sizes, x, spec.rank),
            "keep": _args.kept_axes(output_size, spec.rank)}


def _avg(x, output_size, rank, data_format, function, valid_sizes=None):
    return _pool(x, output_size, rank, data_format, function, "avg", valid_sizes=valid_sizes)[0]


def _max(x, output_size, rank, data_format, return_indices, function, valid_sizes=None):
    return _pool(x, output_size, rank, data_format, function, "max", return_indices, valid_sizes=valid_sizes)[0]


def adaptive_avg_pool(x, output_size, *, data_format: str = "channels_first", valid_sizes=None):
    """Adaptive average pooling over ``len(output_size)`` spatial axes (any N ≥ 1).

    ``x``: ``(N, C, *S)`` / ``(C, *S)`` (channels_first) or ``(N, *S, C)`` / ``(*S, C)``
    (channels_last), floating.  Returns the same layout with ``S`` replaced by
    ``output_size``.  float16/bfloat16 accumulate in float32 (NumPy: float64).
    """
    rank = _args.output_rank(output_size, "adaptive_avg_pool")
    return _avg(x, output_size, rank, data_format, "adaptive_avg_pool", valid_sizes)


def adaptive_max_pool(x, output_size, *, return_indices: bool = False, data_format: str = "channels_first",
                      valid_sizes=None):
    """Adaptive max pooling over ``len(output_size)`` spatial axes (any N ≥ 1).

    Shapes as :func:`adaptive_avg_pool`.  NaN propagates.  With ``return_indices``
    also returns int64 flat offsets into the input's spatial plane (row-major), of
    the output's shape: ties pick the first position, a window holding NaN its last NaN.
    """
    rank = _args.output_rank(output_size, "adaptive_max_pool")
    return _max(x, output_size, rank, data_format, return_indices, "adaptive_max_pool", valid_sizes)


def adaptive_avg_pool1d(x, output_size: OutputSize, *, data_format: str = "channels_first", valid_sizes=None):
    """1-D :func:`adaptive_avg_pool`: ``(N, C, L)``/``(C, L)`` → ``(N, C, O)``/``(C, O)``."""
    return _avg(x, output_size, 1, data_format, "adaptive_avg_pool1d", valid_sizes)


def adaptive_avg_pool2d(x, output_size: OutputSize, *, data_format: str = "channels_first", valid_sizes=None):
    """2-D :func:`adaptive_avg_pool`: ``(N, C, H, W)`` → ``(N, C, *output_size)``."""
    return _avg(x, output_size, 2, data_format, "adaptive_avg_pool2d", valid_sizes)


def adaptive_avg_pool3d(x, output_size: OutputSize, *, data_format: str = "channels_first", valid_sizes=None):
    """3-D :func:`adaptive_avg_pool`: ``(N, C, D, H, W)`` → ``(N, C, *output_size)``."""
    return _avg(x, output_size, 3, data_format, "adaptive_avg_pool3d", valid_sizes)


def adaptive_max_pool1d(x, output_size: OutputSize, *, return_indices: bool = False,
                        data_format: str = "channels_first", valid_sizes=None):
    """1-D :func:`adaptive_max_pool`."""
    return _max(x, output_size, 1, data_format, return_indices, "adaptive_max_pool1d", valid_sizes)


def adaptive_max_pool2d(x, output_size: OutputSize, *, return_indices: bool = False,
                        data_format: str = "channels_first", valid_sizes=None):
    """2-D :func:`adaptive_max_pool`."""
    return _max(x, output_size, 2, data_format, return_indices, "adaptive_max_pool2d", valid_sizes)


def adaptive_max_pool3d(x, output_size: OutputSize, *, return_indices: bool = False,
                        data_format: str = "channels_first", valid_sizes=None):
    """3-D :func:`adaptive_max_pool`."""
    return _max(x, output_size, 3, data_format, return_indices, "adaptive_max_pool3d", valid_sizes)


def _global(x, data_format: str, keepdims: bool, function: str, reduce: str, valid_sizes=None):
    backend = _dispatch.backend_for(x, function)
    rank = max(len(backend.shape(x)) - 2, 1)  # a tensor of rank < 3 fails the layout check
    out, spec = _pool(x, 1, rank, data_format, function, reduce, batched=True, valid_sizes=valid_sizes)
    return out if keepdims else backend.squeeze(out, spec.spatial_axes)


def global_avg_pool(x, *, data_format: str = "channels_first", keepdims: bool = False,
                    valid_sizes=None):
    """Mean over every spatial axis of a batch: ``(N, C, *S)`` or ``(N, *S, C)`` → ``(N, C)``.

    With ``keepdims`` the spatial axes stay, of length 1 (like Keras'
    ``GlobalAveragePooling2D(keepdims=True)``).  Raises on an empty spatial axis.
    """
    return _global(x, data_format, keepdims, "global_avg_pool", "avg", valid_sizes)


def global_max_pool(x, *, data_format: str = "channels_first", keepdims: bool = False,
                    valid_sizes=None):
    """Max over every spatial axis of a batch; shapes as :func:`global_avg_pool`."""
    return _global(x, data_format, keepdims, "global_max_pool", "max", valid_sizes)


# --- more reductions over the same windows -----------------------------------------------------


def _reduction(x, output_size, rank, data_format, function, reduce, batched=None, valid_sizes=None, **params):
    """Check the call and run the backend's ``<reduce>_pool(x, spec, **params)``."""
    backend = _dispatch.backend_for(x, function)
    spec = _args.pool_spec(backend.shape(x), output_size, rank, data_format, function=function, batched=batched,
                           cache=not backend.is_tracing())
    _args.require_floating(backend.dtype_name(x), backend.is_floating(x), function)
    run = getattr(backend, f"{reduce}_pool", None)
    if run is None:
        raise _args.unsupported_reduction(function, backend.name)
    valid = {} if valid_sizes is None else _valid(backend, x, valid_sizes, spec, output_size, function)
    return run(x, spec, **params, **valid)


def _lp(x, norm_type, output_size, rank, data_format, function, valid_sizes):
    if _args.positive_exponent(norm_type, f"{function}(norm_type)") is None:
        raise _args.number_expected(norm_type, f"{function}(norm_type)")
    return _reduction(x, output_size, rank, data_format, function, "lp", valid_sizes=valid_sizes,
                      norm_type=float(norm_type))


def _gem(x, output_size, p, eps, rank, data_format, function, valid_sizes):
    number = _args.positive_exponent(p, f"{function}(p)")
    eps = _args.positive_eps(eps, f"{function}(eps)")
    return _reduction(x, output_size, rank, data_format, function, "gem", valid_sizes=valid_sizes,
                      p=p if number is None else number, eps=eps)


def adaptive_lp_pool(x, norm_type: float, output_size, *, data_format: str = "channels_first", valid_sizes=None):
    """Adaptive power-average (LP) pooling: ``(Σ_window x^p)^(1/p)``, ``p = norm_type`` (any spatial rank).

    As ``torch.nn.functional.lp_pool2d`` over the adaptive windows: ``x^p`` with torch.pow's
    signs (a negative ``x`` with a non-integer ``p`` gives NaN; an odd integer ``p`` keeps the
    sign, and a negative sum then has a NaN root unless ``p = 1``), and where the sum is 0 the
    gradient is 0.  ``norm_type``: a positive finite float.  Computed as ``m·(Σ (x/m)^p)^(1/p)``
    with ``m`` the window's largest ``|x|``, so a large ``p`` does not overflow.
    Shapes as :func:`adaptive_avg_pool`; floating input only.
    """
    rank = _args.output_rank(output_size, "adaptive_lp_pool")
    return _lp(x, norm_type, output_size, rank, data_format, "adaptive_lp_pool", valid_sizes)


def adaptive_lp_pool1d(x, norm_type: float, output_size: OutputSize, *,
                       data_format: str = "channels_first", valid_sizes=None):
    """1-D :func:`adaptive_lp_pool`."""
    return _lp(x, norm_type, output_size, 1, data_format, "adaptive_lp_pool1d", valid_sizes)


def adaptive_lp_pool2d(x, norm_type: float, output_size: OutputSize, *,
                       data_format: str = "channels_first", valid_sizes=None):
    """2-D :func:`adaptive_lp_pool`."""
    return _lp(x, norm_type, output_size, 2, data_format, "adaptive_lp_pool2d", valid_sizes)


def adaptive_lp_pool3d(x, norm_type: float, output_size: OutputSize, *,
                       data_format: str = "channels_first", valid_sizes=None):
    """3-D :func:`adaptive_lp_pool`."""
    return _lp(x, norm_type, output_size, 3, data_format, "adaptive_lp_pool3d", valid_sizes)


def adaptive_gem_pool(x, output_size, p=3.0, eps: float = 1e-6, *,
                      data_format: str = "channels_first", valid_sizes=None):
    """Generalised-mean (GeM) pooling: ``(mean_window max(x, eps)^p)^(1/p)`` (any spatial rank).

    ``p``: a positive finite float, or a one-value tensor/array of ``x``'s framework, which
    then gets a gradient (a learnable ``p``).  ``eps``: a positive float (NaN stays NaN).
    Shapes as :func:`adaptive_avg_pool`; floating input only; large ``p`` does not overflow.
    """
    rank = _args.output_rank(output_size, "adaptive_gem_pool")
    return _gem(x, output_size, p, eps, rank, data_format, "adaptive_gem_pool", valid_sizes)


def adaptive_gem_pool1d(x, output_size: OutputSize, p=3.0, eps: float = 1e-6, *,
                        data_format: str = "channels_first", valid_sizes=None):
    """1-D :func:`adaptive_gem_pool`."""
    return _gem(x, output_size, p, eps, 1, data_format, "adaptive_gem_pool1d", valid_sizes)


def adaptive_gem_pool2d(x, output_size: OutputSize, p=3.0, eps: float = 1e-6, *,
                        data_format: str = "channels_first", valid_sizes=None):
    """2-D :func:`adaptive_gem_pool`."""
    return _gem(x, output_size, p, eps, 2, data_format, "adaptive_gem_pool2d", valid_sizes)


def adaptive_gem_pool3d(x, output_size: OutputSize, p=3.0, eps: float = 1e-6, *,
                        data_format: str = "channels_first", valid_sizes=None):
    """3-D :func:`adaptive_gem_pool`."""
    return _gem(x, output_size, p, eps, 3, data_format, "adaptive_gem_pool3d", valid_sizes)


def adaptive_avgmax_pool(x, output_size, *, data_format: str = "channels_first", valid_sizes=None):
    """timm's avgmax: ``0.5 · (avg + max)`` over each window, rounded once (any spatial rank).

    Shapes as :func:`adaptive_avg_pool`; floating input only.
    """
    rank = _args.output_rank(output_size, "adaptive_avgmax_pool")
    return _reduction(x, output_size, rank, data_format, "adaptive_avgmax_pool", "avgmax", valid_sizes=valid_sizes)


def adaptive_avgmax_pool1d(x, output_size: OutputSize, *, data_format: str = "channels_first", valid_sizes=None):
    """1-D :func:`adaptive_avgmax_pool`."""
    return _reduction(x, output_size, 1, data_format, "adaptive_avgmax_pool1d", "avgmax", valid_sizes=valid_sizes)


def adaptive_avgmax_pool2d(x, output_size: OutputSize = 1, *, data_format: str = "channels_first", valid_sizes=None):
    """2-D :func:`adaptive_avgmax_pool` (timm's ``adaptive_avgmax_pool2d``)."""
    return _reduction(x, output_size, 2, data_format, "adaptive_avgmax_pool2d", "avgmax", valid_sizes=valid_sizes)


def adaptive_avgmax_pool3d(x, output_size: OutputSize, *, data_format: str = "channels_first", valid_sizes=None):
    """3-D :func:`adaptive_avgmax_pool`."""
    return _reduction(x, output_size, 3, data_format, "adaptive_avgmax_pool3d", "avgmax", valid_sizes=valid_sizes)


def adaptive_catavgmax_pool(x, output_size, *, data_format: str = "channels_first", valid_sizes=None):
    """timm's catavgmax: the window averages and maxima concatenated along the channel axis.

    ``C`` channels become ``2C``: the averages first, then the maxima (any spatial rank).
    """
    rank = _args.output_rank(output_size, "adaptive_catavgmax_pool")
    return _reduction(x, output_size, rank, data_format, "adaptive_catavgmax_pool", "catavgmax",
                      valid_sizes=valid_sizes)


def adaptive_catavgmax_pool1d(x, output_size: OutputSize, *, data_format: str = "channels_first", valid_sizes=None):
    """1-D :func:`adaptive_catavgmax_pool`."""
    return _reduction(x, output_size, 1, data_format, "adaptive_catavgmax_pool1d", "catavgmax", valid_sizes=valid_sizes)


def adaptive_catavgmax_pool2d(x, output_size: OutputSize = 1, *, data_format: str = "channels_first", valid_sizes=None):
    """2-D :func:`adaptive_catavgmax_pool` (timm's ``adaptive_catavgmax_pool2d``)."""
    return _reduction(x, output_size, 2, data_format, "adaptive_catavgmax_pool2d", "catavgmax", valid_sizes=valid_sizes)


def adaptive_catavgmax_pool3d(x, output_size: OutputSize, *, data_format: str = "channels_first", valid_sizes=None):
    """3-D :func:`adaptive_catavgmax_pool`."""
    return _reduction(x, output_size, 3, data_format, "adaptive_catavgmax_pool3d", "catavgmax", valid_sizes=valid_sizes)


def select_adaptive_pool2d(x, pool_type: str = "avg", output_size: OutputSize = 1, flatten: bool = False, *,
                           data_format: str = "channels_first", valid_sizes=None):
    """timm's selectable pooling of a batch ``(N, C, H, W)`` (or ``(N, H, W, C)``).

    ``pool_type``: ``'avg'``, ``'max'``, ``'avgmax'``, ``'catavgmax'`` (``2C`` channels), the
    ``'fast…'`` spellings of the same (global pools: ``output_size`` must be 1; ``'fast'`` is
    avg), or ``''`` for no pooling.  ``flatten`` then flattens every axis after the batch axis,
    as timm's ``nn.Flatten(1)``.  ``valid_sizes``: ``(N, 2)``, as :func:`adaptive_avg_pool`.
    """
    function = "select_adaptive_pool2d"
    kind = _args.pool_type(pool_type, function)
    backend = _dispatch.backend_for(x, function)
    if kind:
        if kind.startswith("fast"):
            _args.fast_output_size(output_size, kind, function)
            kind = kind.removeprefix("fast") or "avg"
        x = _pool(x, output_size, 2, data_format, function, kind, batched=True, valid_sizes=valid_sizes)[0] \
            if kind in ("avg", "max") else \
            _reduction(x, output_size, 2, data_format, function, kind, batched=True, valid_sizes=valid_sizes)
    return backend.flatten(x) if flatten else x
