"""The NumPy backend — the reference every other backend is tested against.

Written for obviousness, not speed: one axis at a time, windows from
:mod:`anypool._bins`, sums accumulated in float64 (so float16/float32 results are
the correctly rounded means), maxima by gather and the PyTorch selection rule.
"""

from __future__ import annotations

import numpy as np

from .. import _args, _bins
from .._args import PoolSpec

name = "numpy"
VALID_SIZES = True  # pools padded batches (``valid_sizes``)


def is_array(x) -> bool:
    return isinstance(x, (np.ndarray, np.generic))


def shape(x) -> tuple[int, ...]:
    return np.shape(x)


def dtype_name(x) -> str:
    return np.asarray(x).dtype.name


def is_floating(x) -> bool:
    dtype = np.asarray(x).dtype
    return np.issubdtype(dtype, np.floating) or dtype.name == "bfloat16"


def is_tracing() -> bool:
    """Whether a tracer runs that must see the argument checks (none for this backend: shapes are concrete)."""
    return False


def from_numpy(a: np.ndarray, dtype: str) -> np.ndarray:
    return a.astype(dtype)


def to_numpy(x) -> np.ndarray:
    return np.asarray(x)


def squeeze(x, axes):
    return np.squeeze(x, axis=tuple(axes))


def known_values(valid_sizes) -> np.ndarray:
    """The entries of ``valid_sizes`` (for the range check; a tracing backend may not know them)."""
    return np.asarray(valid_sizes)


def as_sizes(valid_sizes, x, rank: int) -> np.ndarray:
    """Checked ``valid_sizes`` as an int64 array ``(N, rank)``."""
    return np.asarray(valid_sizes, dtype=np.int64).reshape(-1, rank)


def avg_pool(x: np.ndarray, spec: PoolSpec, valid_sizes=None, keep=None) -> np.ndarray:
    """Mean over each window; float64 accumulation, result in ``x.dtype``."""
    x = np.asarray(x)
    if valid_sizes is not None:
        return _per_sample(x, spec, valid_sizes, keep, lambda crop, s: avg_pool(crop, s))
    return _avg64(x, spec).astype(x.dtype)


def _avg64(x: np.ndarray, spec: PoolSpec) -> np.ndarray:
    """The window means in float64 (not rounded to ``x.dtype``)."""
    acc = x.astype(np.float64)
    for axis, length, out in zip(spec.spatial_axes, spec.input_size, spec.output_size):
        b = _bins.axis_bins(length, out)
        if out == 0:
            acc = np.take(acc, b.starts, axis=axis)
            continue
        # reduceat over interleaved (start, end) pairs sums each [start, end); one
        # padding element keeps every index in range when a window ends at L.
        pad = [(0, 0)] * acc.ndim
        pad[axis] = (0, 1)
        edges = np.stack([b.starts, b.ends], axis=1).ravel()
        with np.errstate(invalid="ignore"):  # inf - inf in a window is NaN, as in PyTorch
            sums = np.add.reduceat(np.pad(acc, pad), edges, axis=axis)
        sums = np.take(sums, np.arange(0, 2 * out, 2), axis=axis)
        acc = sums / _along(b.lengths, axis, acc.ndim)
    return acc


def max_pool(x: np.ndarray, spec: PoolSpec, return_indices: bool = False, valid_sizes=None, keep=None):
    """Max over each window; indices are flat offsets into the spatial plane.

    PyTorch's rule, ``take = (v > best) or isnan(v)`` scanned in row-major order:
    ties keep the first position, a window with NaN reports its last NaN.  Applied
    axis by axis from the last spatial axis to the first it selects exactly the
    row-major first maximum (or last NaN) of the product window.
    """
    x = np.asarray(x)
    if valid_sizes is not None:
        return _per_sample(x, spec, valid_sizes, keep, lambda crop, s: max_pool(crop, s, return_indices),
                           indices=return_indices)
    values = x
    index = None
    if return_indices:
        plane = np.arange(int(np.prod(spec.input_size)), dtype=np.int64).reshape(spec.input_size)
        index = np.broadcast_to(_expand(plane, spec), x.shape)
    for axis, length, out in reversed(list(zip(spec.spatial_axes, spec.input_size, spec.output_size))):
        window = _bins.window_index(length, out)  # (O, K)
        gathered = np.take(values, window, axis=axis)  # axis -> (O, K)
        if not return_indices:
            values = gathered.max(axis=axis + 1) if out else np.take(values, np.zeros(0, np.int64), axis=axis)
            continue
        pick = _pick(gathered, axis + 1)
        values = np.take_along_axis(gathered, pick, axis=axis + 1).squeeze(axis + 1)
        index = np.take_along_axis(np.take(index, window, axis=axis), pick, axis=axis + 1).squeeze(axis + 1)
    return (values, np.ascontiguousarray(index)) if return_indices else values


def _pick(gathered: np.ndarray, axis: int) -> np.ndarray:
    """Position along ``axis`` chosen by PyTorch's rule (keepdims)."""
    if gathered.shape[axis] == 0:
        return np.zeros(gathered.shape[:axis] + (1,) + gathered.shape[axis + 1:], np.int64)
    first_max = np.argmax(gathered, axis=axis, keepdims=True)  # NaN-free windows: first max
    if not np.issubdtype(gathered.dtype, np.inexact):
        return first_max
    nan = np.isnan(gathered)
    k = gathered.shape[axis]
    last_nan = k - 1 - np.argmax(np.flip(nan, axis=axis), axis=axis, keepdims=True)
    return np.where(nan.any(axis=axis, keepdims=True), last_nan, first_max)


def _along(v: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


def _expand(plane: np.ndarray, spec: PoolSpec) -> np.ndarray:
    """``plane`` (the spatial shape) with size-1 axes where ``x`` has batch/channel axes."""
    shape = [1] * len(spec.shape)
    for axis, size in zip(spec.spatial_axes, spec.input_size):
        shape[axis] = size
    return plane.reshape(shape)


def avg_pool_grad(grad_out: np.ndarray, spec: PoolSpec) -> np.ndarray:
    """Reference gradient of :func:`avg_pool`: ``Aᵀ @ g`` along every spatial axis (float64)."""
    g = np.asarray(grad_out, dtype=np.float64)
    for axis, length, out in zip(spec.spatial_axes, spec.input_size, spec.output_size):
        a = _bins.averaging_matrix(length, out)  # (O, L)
        g = np.moveaxis(np.tensordot(a.T, g, axes=([1], [axis])), 0, axis)
    return g


def max_pool_grad(grad_out: np.ndarray, indices: np.ndarray, spec: PoolSpec) -> np.ndarray:
    """Reference gradient of :func:`max_pool`: each ``g`` added at its argmax (float64)."""
    plane = int(np.prod(spec.input_size))
    spatial = set(spec.spatial_axes)
    other = [a for a in range(len(spec.shape)) if a not in spatial]
    g = np.moveaxis(np.asarray(grad_out, np.float64), other, range(len(other)))
    idx = np.moveaxis(indices, other, range(len(other)))
    lead = g.shape[: len(other)]
    rows, cols = int(np.prod(lead)), int(np.prod(spec.output_size))
    g, idx = g.reshape(rows, cols), idx.reshape(rows, cols)
    out = np.zeros((idx.shape[0], plane))
    np.add.at(out, (np.arange(idx.shape[0])[:, None], idx), g)
    out = out.reshape(lead + tuple(spec.input_size))
    return np.moveaxis(out, range(len(other)), other)


# --- padded batches: the definition itself, one cropped sample at a time ----------------------


def _crop_spec(spec: PoolSpec, sizes, keep) -> tuple[PoolSpec, tuple[int, ...]]:
    """The spec of one sample cropped to ``sizes`` (batch of 1), and its output size."""
    shape = list(spec.shape)
    shape[0] = 1
    for axis, size in zip(spec.spatial_axes, sizes):
        shape[axis] = int(size)
    out = tuple(int(s) if k else o for s, o, k in zip(sizes, spec.output_size, keep))
    return PoolSpec(tuple(shape), spec.spatial_axes, tuple(int(s) for s in sizes), out, spec.channels_last, True), out


def _crop(a: np.ndarray, spec: PoolSpec, i: int, sizes) -> np.ndarray:
    """Sample ``i`` of ``a`` (batch axis kept) cut to the leading ``sizes`` of the spatial axes."""
    index = [slice(None)] * a.ndim
    index[0] = slice(i, i + 1)
    for axis, size in zip(spec.spatial_axes, sizes):
        index[axis] = slice(0, int(size))
    return a[tuple(index)]


def _per_sample(x, spec: PoolSpec, valid_sizes, keep, pool, indices: bool = False):
    """``pool`` on each sample cropped to its valid region, written into zeros of the padded output shape.

    Indices into a crop's plane become offsets into the padded plane.
    """
    values = np.zeros(spec.output_shape, x.dtype)
    index = np.zeros(spec.output_shape, np.int64) if indices else None
    for i, sizes in enumerate(np.asarray(valid_sizes)):
        crop_spec, out = _crop_spec(spec, sizes, keep)
        result = pool(_crop(x, spec, i, sizes), crop_spec)
        _crop(values, spec, i, out)[...] = result[0] if indices else result
        if indices:
            coords = np.unravel_index(result[1], tuple(int(s) for s in sizes))
            _crop(index, spec, i, out)[...] = np.ravel_multi_index(coords, spec.input_size)
    return (values, index) if indices else values


def avg_pool_grad_valid(grad_out: np.ndarray, spec: PoolSpec, valid_sizes, keep) -> np.ndarray:
    """Reference gradient of :func:`avg_pool` with ``valid_sizes`` (float64): the crop's gradient, 0 on padding."""
    g = np.zeros(spec.shape)
    for i, sizes in enumerate(np.asarray(valid_sizes)):
        crop_spec, out = _crop_spec(spec, sizes, keep)
        _crop(g, spec, i, sizes)[...] = avg_pool_grad(_crop(np.asarray(grad_out), spec, i, out), crop_spec)
    return g
# --- more reductions over the same windows -----------------------------------------------------
# Each is computed over the gathered product window (every spatial axis split into (O, K), a
# validity mask for the rows shorter than K): slow and memory-hungry, and obviously right.


def _product_windows(x: np.ndarray, spec: PoolSpec):
    """``(v, mask, k_axes)``: float64 ``x`` with spatial axis ``d`` replaced by ``(O_d, K_d)``."""
    v = np.asarray(x, dtype=np.float64)
    mask = np.ones((1,) * (v.ndim + spec.rank), bool)
    k_axes = []
    for d, (axis, length, out) in enumerate(zip(spec.spatial_axes, spec.input_size, spec.output_size)):
        a = axis + d  # each earlier spatial axis became two
        index = _bins.window_index(length, out)
        v = np.take(v, index, axis=a)
        valid = np.arange(index.shape[1]) < _bins.axis_bins(length, out).lengths[:, None]
        shape = [1] * mask.ndim
        shape[a], shape[a + 1] = valid.shape
        mask = mask & valid.reshape(shape)
        k_axes.append(a + 1)
    return v, np.broadcast_to(mask, v.shape), tuple(k_axes)


def _empty(x: np.ndarray, spec: PoolSpec) -> np.ndarray | None:
    return np.zeros(spec.output_shape, x.dtype) if 0 in spec.output_size else None


def _power_mean(x: np.ndarray, spec: PoolSpec, p: float, mean: bool, floor: float | None) -> np.ndarray:
    """``(Σ_w t^p)^(1/p)`` (``mean``: ``(mean_w t^p)^(1/p)``), ``t = x`` or ``max(x, floor)``, float64.

    Scaled by the window's ``m = max |t|`` — ``m · (Σ (t/m)^p)^(1/p)``, which is the same number
    but neither overflows for a large ``p`` nor underflows for a small window.  A window with
    ``m = inf`` is ``(Σ_{|t| = inf} t^p)^(1/p)`` (finite terms cannot matter, unless they are NaN:
    :func:`anypool._args.fractional_power`); ``m = NaN`` gives NaN.
    """
    v, mask, k_axes = _product_windows(x, spec)
    if floor is not None:
        v = np.maximum(v, floor)  # NaN stays NaN, as torch.clamp
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        m = np.max(np.where(mask, np.abs(v), 0.0), axis=k_axes, keepdims=True)
        scaled = np.isfinite(m) & (m > 0)
        scale = np.where(scaled, m, 1.0)
        keep = mask & (~np.isinf(m) | np.isinf(v))  # m = inf: only the infinite terms count, and
        if _args.fractional_power(p, floor):  # the NaN ones
            keep |= mask & (v < 0)
        terms = np.where(keep, np.power(v / scale, p), 0.0)
        total = terms.sum(axis=k_axes, keepdims=True)
        if mean:
            total = total / mask.sum(axis=k_axes, keepdims=True)
        out = scale * np.power(total, 1.0 / p)
    return out.squeeze(k_axes)


def lp_pool(x: np.ndarray, spec: PoolSpec, norm_type: float, valid_sizes=None, keep=None) -> np.ndarray:
    """``(Σ_w x^p)^(1/p)`` with ``p = norm_type`` (torch.pow's signs: a negative ``x`` with a
    non-integer ``p`` is NaN, as in ``torch.nn.functional.lp_pool2d``); float64, rounded once."""
    x = np.asarray(x)
    if valid_sizes is not None:
        return _per_sample(x, spec, valid_sizes, keep, lambda crop, s: lp_pool(crop, s, norm_type))
    empty = _empty(x, spec)
    return empty if empty is not None else _power_mean(x, spec, float(norm_type), False, None).astype(x.dtype)


def gem_pool(x: np.ndarray, spec: PoolSpec, p, eps: float, valid_sizes=None, keep=None) -> np.ndarray:
    """Generalised mean ``(mean_w max(x, eps)^p)^(1/p)``; float64, rounded once."""
    x = np.asarray(x)
    if valid_sizes is not None:
        return _per_sample(x, spec, valid_sizes, keep, lambda crop, s: gem_pool(crop, s, p, eps))
    empty = _empty(x, spec)
    return empty if empty is not None else _power_mean(x, spec, float(p), True, float(eps)).astype(x.dtype)


def avgmax_pool(x: np.ndarray, spec: PoolSpec, valid_sizes=None, keep=None) -> np.ndarray:
    """``0.5 · (avg + max)`` of each window (timm's avgmax), float64, rounded once."""
    x = np.asarray(x)
    if valid_sizes is not None:
        return _per_sample(x, spec, valid_sizes, keep, avgmax_pool)
    empty = _empty(x, spec)
    if empty is not None:
        return empty
    with np.errstate(invalid="ignore"):
        return (0.5 * (_avg64(x, spec) + max_pool(x, spec).astype(np.float64))).astype(x.dtype)


def catavgmax_pool(x: np.ndarray, spec: PoolSpec, valid_sizes=None, keep=None) -> np.ndarray:
    """``concat([avg, max], channel axis)`` (timm's catavgmax): the channel axis doubles."""
    x = np.asarray(x)
    valid = {} if valid_sizes is None else {"valid_sizes": valid_sizes, "keep": keep}
    return np.concatenate([avg_pool(x, spec, **valid), max_pool(x, spec, **valid)], axis=spec.channel_axis)


def flatten(x):
    """Every axis after the first as one (timm's ``nn.Flatten(1)``)."""
    x = np.asarray(x)
    return x.reshape(x.shape[0], -1)
