"""The NumPy backend — the reference every other backend is tested against.

Written for obviousness, not speed: one axis at a time, windows from
:mod:`anypool._bins`, sums accumulated in float64 (so float16/float32 results are
the correctly rounded means), maxima by gather and the PyTorch selection rule.
"""

from __future__ import annotations

import numpy as np

from .. import _bins
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
    return acc.astype(x.dtype)


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
