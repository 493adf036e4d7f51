"""The JAX backend: exact PyTorch windows, jit/grad/vmap/sharding-safe, written for XLA.

Every spatial axis is pooled separately (a window is a product of per-axis
windows).  Along one axis of length ``L`` pooled to ``O`` (windows from
:mod:`anypool._bins`):

- ``O == L``: nothing to do; ``L % O == 0``: a reshape to ``(O, L // O)`` and a
  reduction (``O == 1`` is the global pool);
- otherwise every window has length ``k`` or ``k + 1`` (``k`` the shortest), so
  the window reductions come from a *doubling table* — sliding reductions of
  width 1, 2, 4, ... built by ``log2(k)`` elementwise steps on shifted slices —
  read at the ``O`` window starts.  Max takes two overlapping power-of-two
  blocks, sum the binary decomposition of ``k`` plus the ``k+1``-th element where
  a window is long.  Only slices, elementwise ops and small gathers: XLA fuses
  them into one pass, and NaN/inf behave exactly (no ``0 * inf``).

Gradients are custom VJPs: average pooling is linear, so its backward is ``Aᵀ g``
with the averaging matrix ``A`` per axis (a broadcast on divisible axes); max
pooling routes each output gradient to its argmax (PyTorch's first maximum /
last NaN): a gather over each input's covering outputs (a broadcast where every
axis divides); on XLA:CPU, where a gather is much slower, non-divisible pools keep
a scatter-add per spatial plane (batch and channel axes stay batch dimensions).
The indexed forward takes the plain maxima and finds each one's offset with one
integer ``min`` over the gathered windows.

Indices are flat offsets into the spatial plane, int64 when ``jax_enable_x64`` is
on and int32 otherwise (JAX has no int64 then; int32 is exact for planes below
2**31 elements).  float16/bfloat16 average in float32.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .. import _args, _bins
from .._args import PoolSpec

name = "jax"


def is_array(x) -> bool:
    return isinstance(x, jax.Array)  # tracers under jit/grad/vmap are jax.Arrays too


def shape(x) -> tuple[int, ...]:
    return tuple(x.shape)


def dtype_name(x) -> str:
    return jnp.dtype(x.dtype).name


def is_floating(x) -> bool:
    return bool(jnp.issubdtype(x.dtype, jnp.floating))


def is_tracing() -> bool:
    """Whether a tracer runs that must see the argument checks (none for this backend: shapes are concrete)."""
    return False


def supports_dtype(dtype: str) -> bool:
    """Whether ``from_numpy`` can make this dtype now (float64 needs ``jax_enable_x64``)."""
    return dtype != "float64" or bool(jax.config.jax_enable_x64)


def from_numpy(a: np.ndarray, dtype: str) -> jax.Array:
    # without x64 JAX would silently compute in float32
    _args.require_supported(dtype, supports_dtype(dtype), "from_numpy", "jax (float64 needs jax_enable_x64)")
    return jnp.asarray(a, dtype=jnp.bfloat16 if dtype == "bfloat16" else dtype)


def to_numpy(x) -> np.ndarray:
    return np.asarray(x)


def squeeze(x, axes):
    return jnp.squeeze(x, axis=tuple(axes))


def index_dtype():
    """int64 when ``jax_enable_x64`` is on, else int32 (the widest integer JAX then has)."""
    return jnp.int64 if jax.config.jax_enable_x64 else jnp.int32


def _acc_dtype(dtype):
    return jnp.float32 if jnp.dtype(dtype).itemsize < 4 else dtype


def _axes(spec: PoolSpec):
    return list(zip(spec.spatial_axes, spec.input_size, spec.output_size))


def _slice(x, start: int, stop: int, axis: int):
    return lax.slice_in_dim(x, start, stop, axis=axis)


def _take(x, index: np.ndarray, axis: int):
    return jnp.take(x, jnp.asarray(index), axis=axis, mode="clip", indices_are_sorted=True)


def _along(v: np.ndarray, axis: int, ndim: int, dtype) -> jax.Array:
    shape = [1] * ndim
    shape[axis] = -1
    return jnp.asarray(v.reshape(shape), dtype=dtype)


def _blocks(x, axis: int, length: int, k: int):
    """``(x.shape[axis] - k + 1, ...)``: the sliding sums of width ``k`` along ``axis``.

    Built from doubling sums (width 1, 2, 4, ...) over the binary digits of ``k``.
    """
    total, offset, table, width = None, 0, x, 1
    while True:
        if k & width:
            part = _slice(table, offset, offset + length - k + 1, axis)
            total = part if total is None else total + part
            offset += width
        if width * 2 > k:
            return total
        n = table.shape[axis]
        table = _slice(table, 0, n - width, axis) + _slice(table, width, n, axis)
        width *= 2


# ---------------------------------------------------------------- average


# A divisible axis with windows up to this long sums its k strided slices (x[r::k], one fused
# elementwise loop) instead of reshaping to (O, k) and reducing: XLA:CPU's reduction over a
# middle axis measured 1.3-7x slower (e.g. (32,512,14,14)→7 2.8 → 0.4 ms) on jax 0.10.2.
_STRIDED_SUM_MAX = 64


def _strided(combine, x, axis: int, length: int, k: int):
    """``combine`` over ``x[r::k]``, ``r < k``, along ``axis``: each of the ``L / k`` consecutive windows
    of width ``k`` reduced by one fused elementwise loop."""
    total = lax.slice_in_dim(x, 0, length, stride=k, axis=axis)
    for r in range(1, k):
        total = combine(total, lax.slice_in_dim(x, r, length, stride=k, axis=axis))
    return total


def _avg_axis(x, axis: int, length: int, out: int):
    if out == length:
        return x
    fixed = _bins.fixed_pool(length, out)
    if fixed and fixed[0] <= _STRIDED_SUM_MAX:
        return _strided(jnp.add, x, axis, length, fixed[0]) / fixed[0]
    if fixed:
        k = fixed[0]
        return jnp.mean(x.reshape(x.shape[:axis] + (out, k) + x.shape[axis + 1:]), axis=axis + 1)
    b = _bins.axis_bins(length, out)
    k = int(b.lengths.min())
    sums = _take(_blocks(x, axis, length, k), b.starts, axis)
    long = b.lengths > k
    if long.any():  # the (k+1)-th element of the long windows; where, not a product, keeps inf/NaN exact
        extra = _take(x, np.minimum(b.starts + k, length - 1), axis)
        sums = sums + jnp.where(_along(long, axis, x.ndim, bool), extra, 0)
    return sums / _along(b.lengths, axis, x.ndim, x.dtype)


def _avg_axis_grad(g, axis: int, length: int, out: int):
    """``Aᵀ g`` along ``axis``: each input receives the mean's share of every window covering it.

    As a gather of the ``max_cover`` covering outputs (``_bins`` covering range), not a GEMM with the
    averaging matrix: O(L) rather than O(L·O) work, measured 1.7-3x faster on the benchmark's
    non-divisible cases (e.g. 1000→333) and never slower."""
    if out == length:
        return g
    fixed = _bins.fixed_pool(length, out)
    if fixed:
        return _repeat(g / fixed[0], axis, fixed[0])
    b = _bins.axis_bins(length, out)
    share = g / _along(b.lengths, axis, g.ndim, g.dtype)
    first, last = b.cover()
    total = _take(share, first, axis)
    for c in range(1, _bins.max_cover(length, out)):  # where, not a product: an inf share stays where it belongs
        total = total + jnp.where(_along(first + c <= last, axis, g.ndim, bool),
                                  _take(share, np.minimum(first + c, last), axis), 0)
    return total


def _divisible(spec: PoolSpec) -> bool:
    return all(_bins.fixed_pool(length, out) for _, length, out in _axes(spec))


def _global(spec: PoolSpec) -> bool:
    return all(out == 1 for out in spec.output_size)


def _split(spec: PoolSpec):
    """The shape with every spatial axis (all divisible) as ``(O, L // O)``, and the window axes:
    one reduction over all of them instead of one per axis (a global pool is a single ``mean``)."""
    shape = list(spec.shape)
    for axis, length, out in reversed(_axes(spec)):
        shape[axis:axis + 1] = [out, length // out]
    return tuple(shape), tuple(axis + d + 1 for d, axis in enumerate(spec.spatial_axes))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _avg(x, spec: PoolSpec):
    acc = x.astype(_acc_dtype(x.dtype))
    if _global(spec):  # one mean; other divisible pools measured faster axis by axis
        shape, k_axes = _split(spec)
        return jnp.mean(acc.reshape(shape), axis=k_axes).astype(x.dtype)
    for axis, length, out in _axes(spec):
        acc = _avg_axis(acc, axis, length, out)
    return acc.astype(x.dtype)


def _avg_fwd(x, spec):
    return _avg(x, spec), jnp.zeros((), x.dtype)  # the backward needs only the dtype


def _avg_bwd(spec, dtype_carrier, g):
    g = g.astype(_acc_dtype(g.dtype))
    if _global(spec):  # a broadcast of g / window size
        shape, k_axes = _split(spec)
        size = math.prod(length // out for _, length, out in _axes(spec))
        w = jnp.broadcast_to(jnp.expand_dims(g / jnp.asarray(size, g.dtype), k_axes), shape)
        return (w.reshape(spec.shape).astype(dtype_carrier.dtype),)
    for axis, length, out in reversed(_axes(spec)):
        g = _avg_axis_grad(g, axis, length, out)
    return (g.astype(dtype_carrier.dtype),)


_avg.defvjp(_avg_fwd, _avg_bwd)


def avg_pool(x, spec: PoolSpec, valid_sizes=None, keep=None):
    """Mean over each window: ``(…S…) → (…output_size…)`` in ``x``'s dtype (f16/bf16 accumulate in f32)."""
    if 0 in spec.output_size:
        return jnp.zeros(spec.output_shape, x.dtype)
    if valid_sizes is not None:
        return _avg_valid(x, spec, valid_sizes, keep)
    return _avg(x, spec)


# ---------------------------------------------------------------- max


def _cover_width(b: _bins.AxisBins) -> int:
    """The largest power of two ``w <= k`` (shortest window): blocks ``[s, s+w)`` and ``[e-w, e)``
    then cover every window (``2w > k`` and lengths are ``k`` or ``k + 1``)."""
    return 1 << (int(b.lengths.min()).bit_length() - 1)


def _max_over(x, axis: int):
    """``max`` over ``axis`` (dropped) as a halving tree of elementwise maxima, not ``jnp.max``:
    XLA:CPU fuses an elementwise op followed by a max reduction into a kernel that drops NaN
    (measured with jax 0.10.2 on float32 and bfloat16), while ``maximum`` keeps it."""
    while x.shape[axis] > 1:
        n = x.shape[axis]
        half = (n + 1) // 2  # the halves overlap by one element when n is odd: harmless for a max
        x = jnp.maximum(_slice(x, 0, half, axis), _slice(x, n - half, n, axis))
    return jnp.squeeze(x, axis)


def _max_axis(x, axis: int, length: int, out: int):
    if out == length:
        return x
    fixed = _bins.fixed_pool(length, out)
    if fixed:
        return _max_over(x.reshape(x.shape[:axis] + (out, fixed[0]) + x.shape[axis + 1:]), axis + 1)
    b = _bins.axis_bins(length, out)
    width = _cover_width(b)
    table, step = x, 1
    while step < width:  # sliding maxima of width 1, 2, 4, ... up to ``width``
        n = table.shape[axis]
        table = jnp.maximum(_slice(table, 0, n - step, axis), _slice(table, step, n, axis))
        step *= 2
    return jnp.maximum(_take(table, b.starts, axis), _take(table, b.ends - width, axis))


def _first_max(v, i, axis: int, k: int):
    """PyTorch's choice along ``axis`` (length ``k``) of ``v``, and the matching entries of ``i``.

    The maximum of the non-NaN values first (a plain reduction), then its position: the
    first element equal to it, or the last NaN when the window holds one.  Plain min/max reductions of int positions
    vectorise on XLA:CPU where a variadic (value, index) reduction does not.
    """
    floating = jnp.issubdtype(v.dtype, jnp.inexact)
    pos = lax.broadcasted_iota(jnp.int32, v.shape, axis)
    top = jnp.max(jnp.where(jnp.isnan(v), -jnp.inf, v) if floating else v, axis=axis, keepdims=True)
    pick = jnp.min(jnp.where(v == top, pos, k), axis=axis, keepdims=True)
    if floating:  # NaN decided explicitly, not by how a fused max treats it
        last_nan = jnp.max(jnp.where(jnp.isnan(v), pos, -1), axis=axis, keepdims=True)
        pick = jnp.where(last_nan >= 0, last_nan, pick)
    return (jnp.take_along_axis(v, pick, axis=axis).squeeze(axis),
            jnp.take_along_axis(i, pick, axis=axis).squeeze(axis))


def _windows(v, spec: PoolSpec):
    """``v`` with spatial axis ``d`` split into ``(O_d, K_d)`` (a reshape where the axis divides, else
    a gather of :func:`_bins.window_index`) and, per axis, its ``(O_d, K_d)`` input index table."""
    tables = []
    for d, (axis, length, out) in enumerate(_axes(spec)):
        a = axis + d
        fixed = _bins.fixed_pool(length, out)
        if fixed:
            index = np.arange(length, dtype=np.int64).reshape(out, fixed[0])
            v = v.reshape(v.shape[:a] + index.shape + v.shape[a + 1:])
        else:
            index = _bins.window_index(length, out)
            v = jnp.take(v, jnp.asarray(index.reshape(-1)), axis=a, mode="clip", indices_are_sorted=True)
            v = v.reshape(v.shape[:a] + index.shape + v.shape[a + 1:])
        tables.append((a, index))
    return v, tables


def _flat_offsets(tables, spec: PoolSpec, ndim: int):
    """The row-major flat spatial offset of every entry of a ``_windows``-shaped array (broadcastable)."""
    dtype = index_dtype()
    flat = jnp.zeros((), dtype)
    for d, (a, index) in enumerate(tables):
        shape = [1] * ndim
        shape[a], shape[a + 1] = index.shape
        flat = flat + jnp.asarray((index * math.prod(spec.input_size[d + 1:])).reshape(shape), dtype)
    return flat


# A channels_last pool whose axes all divide into windows up to this long finds its indices
# without the (O, k) reshape: its minor axis is C, and XLA:CPU's reduction over the middle k axes
# measured 5x slower than k strided minima ((32,512,14,14)→7 2.0 → 0.4 ms). With k = 32, and on
# NCHW, the strided form was slower. Global pools keep the reshape: their forward gained
# (10.7 → 2.4 ms) but value-and-grad lost (13.8 → 50.6 ms), with or without an
# optimization_barrier on the indices.
_STRIDED_ARGMAX_MAX = 8


def _argmax_key(w, vb, flat, big):
    """Per entry: its offset where it equals its window's max ``vb``, ``-offset`` for a NaN in a NaN
    window, else ``big``; ``|min|`` over a window is PyTorch's choice (first max, last NaN)."""
    key = jnp.where(w == vb, flat, big)
    if jnp.issubdtype(w.dtype, jnp.inexact):
        key = jnp.where(jnp.isnan(vb), jnp.where(jnp.isnan(w), -flat, big), key)
    return key


def _argmax_of(x, v, spec: PoolSpec):
    """The flat offset of PyTorch's choice in each window given the window maxima ``v``: one integer
    ``min`` of :func:`_argmax_key` over the gathered windows, with no (value, index) pairs and no
    gather of the result."""
    big = jnp.asarray(math.prod(spec.input_size), index_dtype())
    if spec.channels_last and _divisible(spec) and not _global(spec) and all(
            length // out <= _STRIDED_ARGMAX_MAX for _, length, out in _axes(spec)):
        vb = v
        for axis, length, out in _axes(spec):
            vb = _repeat(vb, axis, length // out)
        key = _argmax_key(x, vb, _plane(spec, x.shape), big)
        for axis, length, out in _axes(spec):
            key = _strided(jnp.minimum, key, axis, length, length // out)
        return jnp.abs(key)
    w, tables = _windows(x, spec)
    k_axes = tuple(a + 1 for a, _ in tables)
    key = _argmax_key(w, jnp.expand_dims(v, k_axes), _flat_offsets(tables, spec, w.ndim), big)
    return jnp.abs(jnp.min(key, axis=k_axes))


def _max_with_indices(x, spec: PoolSpec):
    v = _max_values(x, spec)
    return v, _argmax_of(x, v, spec)


def _plane(spec: PoolSpec, full_shape) -> jax.Array:
    """Flat spatial offset of every element, broadcast to ``full_shape``."""
    dtype = index_dtype()
    flat = jnp.zeros((), dtype)
    for n, axis in enumerate(spec.spatial_axes):
        stride = math.prod(spec.input_size[n + 1:])
        flat = flat + lax.broadcasted_iota(dtype, full_shape, axis) * stride
    return jnp.broadcast_to(flat, full_shape)


def _repeat(v, axis: int, k: int):
    """Each entry along ``axis`` repeated ``k`` times (a broadcast, no gather)."""
    v = jnp.broadcast_to(jnp.expand_dims(v, axis + 1), v.shape[:axis + 1] + (k,) + v.shape[axis + 1:])
    return v.reshape(v.shape[:axis] + (v.shape[axis] * k,) + v.shape[axis + 2:])


def _covers(g, spec: PoolSpec):
    """``g`` (output-shaped) with spatial axis ``d`` replaced by ``(L_d, C_d)``: for each input its
    ``C_d = max_cover`` covering outputs (``_bins`` covering range, clipped to the last one), and the
    static mask of the real ones.  A divisible axis has one cover per input: a broadcast."""
    mask = np.ones((1,) * (g.ndim + len(spec.spatial_axes)), bool)
    for d, (axis, length, out) in enumerate(_axes(spec)):
        a = axis + d
        fixed = _bins.fixed_pool(length, out)
        if fixed:
            g = jnp.expand_dims(_repeat(g, a, fixed[0]), a + 1)
            continue
        first, last = _bins.axis_bins(length, out).cover()
        c = np.arange(_bins.max_cover(length, out))
        index = np.minimum(first[:, None] + c, last[:, None])  # (L, C)
        g = jnp.take(g, jnp.asarray(index.reshape(-1)), axis=a, mode="clip", indices_are_sorted=True)
        g = g.reshape(g.shape[:a] + index.shape + g.shape[a + 1:])
        shape = [1] * mask.ndim
        shape[a], shape[a + 1] = index.shape
        mask = mask & (first[:, None] + c <= last[:, None]).reshape(shape)
    return g, mask, tuple(axis + d + 1 for d, axis in enumerate(spec.spatial_axes))


def _max_grad_gather(g, idx, spec: PoolSpec):
    """PyTorch's routing as a gather: input ``i`` sums the gradients of the covering outputs whose
    argmax is ``i`` (at most ``max_cover`` per axis).  Dense and deterministic, no scatter, and the
    batch and channel axes stay untouched (a batch-sharded input needs no collective)."""
    acc = _acc_dtype(g.dtype)
    gc, mask, c_axes = _covers(g.astype(acc), spec)
    ic, _, _ = _covers(idx, spec)
    here = jnp.expand_dims(_plane(spec, tuple(n for a, n in enumerate(gc.shape) if a not in c_axes)), c_axes)
    hit = ic == here if mask.all() else (ic == here) & mask
    return jnp.where(hit, gc, jnp.zeros((), acc)).sum(c_axes).astype(g.dtype)


def _max_grad(g, idx, spec: PoolSpec):
    """Where every axis divides, the gather is a broadcast and a compare (fastest everywhere).
    Otherwise XLA:CPU runs a gather per gathered element, 2-10x slower than the scatter of the
    ``O`` output gradients (measured on the benchmark cases), so the CPU scatters and every other
    platform (where a scatter-add is atomic, unordered float sums) gathers."""
    if _divisible(spec):
        return _max_grad_gather(g, idx, spec)
    return lax.platform_dependent(g, idx, cpu=functools.partial(_max_grad_scatter, spec=spec),
                                  default=functools.partial(_max_grad_gather, spec=spec))


def _max_grad_scatter(g, idx, spec: PoolSpec):
    """Scatter-add each output gradient to its argmax (PyTorch's routing).

    The scatter is written for one spatial plane and vmapped over the batch and
    channel axes, so they stay batch dimensions of the scatter: a batch-sharded
    input needs no collective.
    """
    spatial = set(spec.spatial_axes)
    other = [a for a in range(len(spec.shape)) if a not in spatial]
    lead = tuple(spec.shape[a] for a in other)
    plane = math.prod(spec.input_size)
    acc = _acc_dtype(g.dtype)
    g2 = jnp.moveaxis(g, other, range(len(other))).astype(acc).reshape(lead + (-1,))
    i2 = jnp.moveaxis(idx, other, range(len(other))).reshape(lead + (-1,))

    def scatter(i, v):
        return jnp.zeros((plane,), acc).at[i].add(v, mode="promise_in_bounds")

    for _ in lead:
        scatter = jax.vmap(scatter)
    gx = scatter(i2, g2).astype(g.dtype).reshape(lead + tuple(spec.input_size))
    return jnp.moveaxis(gx, range(len(other)), other)


def _max_values(x, spec: PoolSpec):
    for axis, length, out in _axes(spec):
        x = _max_axis(x, axis, length, out)
    return x


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _max(x, spec: PoolSpec):
    return _max_values(x, spec)


def _max_fwd(x, spec):
    v, idx = _max_with_indices(x, spec)
    return v, idx


def _max_bwd(spec, idx, g):
    return (_max_grad(g, idx, spec),)


_max.defvjp(_max_fwd, _max_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _max_indexed(x, spec: PoolSpec):
    return _max_with_indices(x, spec)


def _max_indexed_fwd(x, spec):
    v, idx = _max_with_indices(x, spec)
    return (v, idx), idx


def _max_indexed_bwd(spec, idx, cotangents):
    return (_max_grad(cotangents[0], idx, spec),)


_max_indexed.defvjp(_max_indexed_fwd, _max_indexed_bwd)


def max_pool(x, spec: PoolSpec, return_indices: bool = False, valid_sizes=None, keep=None):
    """Max over each window; with ``return_indices`` also the flat spatial offsets (see module doc)."""
    if 0 in spec.output_size:
        values = jnp.zeros(spec.output_shape, x.dtype)
        return (values, jnp.zeros(spec.output_shape, index_dtype())) if return_indices else values
    if valid_sizes is not None:
        values, indices = _max_valid(x, spec, valid_sizes, keep)
        return (values, indices) if return_indices else values
    if return_indices:
        return _max_indexed(x, spec)
    return _max(x, spec)


# ---------------------------------------------------------------- padded batches (valid_sizes)
# Sample ``i`` is pooled with the windows of its own ``(L_i, O_i)`` (``_bins`` expressions on
# the traced sizes, so one ``jit`` compile serves every batch composition): each axis gathers
# its per-sample ``(O, K)`` window table, ``K = ceil(padded / O) + 1`` bounding every sample's
# windows.  Only valid positions are ever gathered, so padding (even NaN) never reaches a value
# and its gradient is exactly 0 (autodiff of a gather).  Outputs ``j >= O_i`` are 0.

VALID_SIZES = True


def known_values(valid_sizes) -> np.ndarray | None:
    """The entries of ``valid_sizes`` for the range check (``None`` under ``jit``, where they are traced)."""
    return None if isinstance(valid_sizes, jax.core.Tracer) else np.asarray(valid_sizes)


def as_sizes(valid_sizes, x, rank: int) -> jax.Array:
    v = jnp.asarray(valid_sizes)
    return v.astype(index_dtype()).reshape(v.shape[0], rank)


def _at(t, axis: int, ndim: int):
    """A per-sample table ``(N, A)`` or ``(N, A, B)`` placed at axes 0 and ``axis`` (, ``axis + 1``)."""
    rest = tuple(t.shape[1:])
    return t.reshape((t.shape[0],) + (1,) * (axis - 1) + rest + (1,) * (ndim - axis - len(rest)))


def _gather_rows(y, axis: int, index):
    """``y`` with ``axis`` replaced by the two axes of ``index`` ``(N, A, B)``: sample ``n`` reads its own rows."""
    n, a, b = index.shape
    shape = list(y.shape)
    shape[axis] = a * b
    picked = jnp.take_along_axis(y, jnp.broadcast_to(_at(index.reshape(n, a * b), axis, y.ndim), shape), axis=axis)
    return picked.reshape(picked.shape[:axis] + (a, b) + picked.shape[axis + 1:])


def _sample_windows(lengths, outs, out_size: int, padded: int):
    """``(index (N, O, K), valid (N, O, K), window lengths (N, O), output present (N, O))`` of one axis."""
    j = jnp.arange(out_size, dtype=lengths.dtype)
    ell, o = lengths[:, None], outs[:, None]
    present = j < o
    start = jnp.where(present, _bins.start_expr(j, ell, o), 0)
    end = jnp.where(present, _bins.end_expr(j, ell, o), 1)
    k = jnp.arange(_bins.max_window_expr(padded, out_size), dtype=lengths.dtype)
    return jnp.minimum(start[..., None] + k, end[..., None] - 1), k < (end - start)[..., None], end - start, present


def _sample_outputs(valid_sizes, spec: PoolSpec, keep):
    """Per sample the valid output lengths: the output size, or ``L_i`` on an axis that keeps its size."""
    return jnp.stack([valid_sizes[:, d] if k else jnp.full_like(valid_sizes[:, d], o)
                      for d, (o, k) in enumerate(zip(spec.output_size, keep))], axis=1)


# one compiled program per call signature: eager, the many small ops would each compile on their own
@functools.partial(jax.jit, static_argnums=(1, 3))
def _avg_valid(x, spec: PoolSpec, valid_sizes, keep):
    outs = _sample_outputs(valid_sizes, spec, keep)
    y, divisor, present = x.astype(_acc_dtype(x.dtype)), None, None
    for d, (axis, length, out) in enumerate(_axes(spec)):
        index, valid, lengths, here = _sample_windows(valid_sizes[:, d], outs[:, d], out, length)
        g = _gather_rows(y, axis, index)
        y = jnp.where(_at(valid, axis, g.ndim), g, 0).sum(axis + 1)
        lengths, here = _at(lengths, axis, y.ndim), _at(here, axis, y.ndim)
        divisor = lengths if divisor is None else divisor * lengths
        present = here if present is None else present & here
    return jnp.where(present, y / divisor.astype(y.dtype), 0).astype(x.dtype)


@functools.partial(jax.jit, static_argnums=(1, 3))
def _max_valid(x, spec: PoolSpec, valid_sizes, keep):
    # last spatial axis first, as _max_with_indices: the row-major first max / last NaN
    outs = _sample_outputs(valid_sizes, spec, keep)
    v, idx, present = x, _plane(spec, x.shape), None
    for d, (axis, length, out) in reversed(list(enumerate(_axes(spec)))):
        index, _, _, here = _sample_windows(valid_sizes[:, d], outs[:, d], out, length)
        v, idx = _first_max(_gather_rows(v, axis, index), _gather_rows(idx, axis, index), axis + 1, index.shape[-1])
        here = _at(here, axis, v.ndim)
        present = here if present is None else present & here
    return jnp.where(present, v, jnp.zeros((), v.dtype)), jnp.where(present, idx, jnp.zeros((), idx.dtype))
# ---------------------------------------------------------------- more reductions (composed)
# avgmax / catavgmax reuse the pools above.  The power means (LP, GeM) gather each output's whole
# product window (every spatial axis as (O, K), the static window table of _bins) and reduce it,
# scaled by the window's largest |t| (held constant for the gradient: the mean is homogeneous in
# it) so that a large p neither overflows nor underflows; their gradients are JAX's own.


def _product_windows(v, spec: PoolSpec):
    """``v`` with spatial axis ``d`` as ``(O_d, K_d)``, the static validity mask and the K axes."""
    valid = []
    for d, (axis, length, out) in enumerate(_axes(spec)):
        a = axis + d
        index = _bins.window_index(length, out)
        v = jnp.take(v, jnp.asarray(index), axis=a)
        valid.append((a, np.arange(index.shape[1]) < _bins.axis_bins(length, out).lengths[:, None]))
    mask = np.ones((1,) * v.ndim, bool)
    for a, ok in valid:
        shape = [1] * v.ndim
        shape[a], shape[a + 1] = ok.shape
        mask = mask & ok.reshape(shape)
    return v, mask, tuple(a + 1 for a, _ in valid)


def _sample_product_windows(v, spec: PoolSpec, valid_sizes, keep):
    """:func:`_product_windows` for a padded batch: sample ``n`` reads its own windows.

    Also the output presence ``(N, 1.., O_d, 1, ..)`` (``False`` beyond a sample's output length)."""
    outs = _sample_outputs(valid_sizes, spec, keep)
    picked = []
    for d, (axis, length, out) in enumerate(_axes(spec)):
        index, valid, _, here = _sample_windows(valid_sizes[:, d], outs[:, d], out, length)
        v = _gather_rows(v, axis + d, index)
        picked.append((axis + d, valid, here))
    mask, present = None, None
    for a, valid, here in picked:
        m, h = _at(valid, a, v.ndim), _at(here, a, v.ndim)
        mask = m if mask is None else mask & m
        present = h if present is None else present & h
    return v, mask, tuple(a + 1 for a, _, _ in picked), present


def _power_mean(x, spec: PoolSpec, p, mean: bool, floor, valid_sizes=None, keep=None):
    if 0 in spec.output_size:
        return jnp.zeros(spec.output_shape, x.dtype)
    acc = _acc_dtype(x.dtype)
    if valid_sizes is None:
        w, mask, k = _product_windows(x.astype(acc), spec)
        present = None
    else:
        w, mask, k, present = _sample_product_windows(x.astype(acc), spec, valid_sizes, keep)
    t = w if floor is None else jnp.maximum(w, jnp.asarray(floor, acc))  # NaN stays NaN
    m = jnp.where(mask, jnp.abs(t), 0)
    for a in sorted(k, reverse=True):  # not jnp.max: see _max_over
        m = _max_over(m, a)
    m = lax.stop_gradient(jnp.expand_dims(m, k))
    scale = jnp.where(jnp.isfinite(m) & (m > 0), m, 1)
    kept = mask & (~jnp.isinf(m) | jnp.isinf(t))  # m = inf: only the infinite terms count, and the NaN ones
    p = jnp.asarray(p, acc)
    if floor is None:  # _args.fractional_power, for a p that is traced here (the padded batches' program)
        kept = kept | (mask & (t < 0) & (p != jnp.floor(p)))
    # the dropped terms' base is 1, not theirs: a zero base with p < 1 would give NaN gradients
    terms = jnp.where(kept, jnp.where(kept, t / scale, 1) ** p, 0)
    total = terms.sum(k, keepdims=True)
    if mean:
        total = total / mask.sum(k, keepdims=True).astype(acc)  # every spatial axis is gathered: (O, K) masks
    zero = total == 0  # the root has no derivative at 0: torch's lp_pool gives gradient 0 there
    root = jnp.where(zero, 0, jnp.where(zero, 1, total) ** (1 / p))
    y = (scale * root).squeeze(k)
    if present is not None:
        y = jnp.where(present.squeeze(k), y, 0)
    return y.astype(x.dtype)


# one compiled program per call signature, as _avg_valid
_power_mean_valid = jax.jit(_power_mean, static_argnums=(1, 3, 4, 6))


def lp_pool(x, spec: PoolSpec, norm_type: float, valid_sizes=None, keep=None):
    """``(Σ_window x^p)^(1/p)``, ``p = norm_type`` (torch's lp_pool conventions), accumulated in f32/f64."""
    if valid_sizes is not None:
        return _power_mean_valid(x, spec, float(norm_type), False, None, valid_sizes, keep)
    return _power_mean(x, spec, float(norm_type), False, None)


def gem_pool(x, spec: PoolSpec, p, eps: float, valid_sizes=None, keep=None):
    """``(mean_window max(x, eps)^p)^(1/p)``; a JAX-array ``p`` is differentiable."""
    if valid_sizes is not None:
        return _power_mean_valid(x, spec, p, True, float(eps), valid_sizes, keep)
    return _power_mean(x, spec, p, True, float(eps))


def avgmax_pool(x, spec: PoolSpec, valid_sizes=None, keep=None):
    """``0.5·(avg + max)`` of each window, rounded once (half types via float32)."""
    acc = _acc_dtype(x.dtype)
    avg, top = avg_pool(x.astype(acc), spec, valid_sizes, keep), max_pool(x, spec, False, valid_sizes, keep)
    return (0.5 * (avg + top.astype(acc))).astype(x.dtype)


def catavgmax_pool(x, spec: PoolSpec, valid_sizes=None, keep=None):
    """The averages, then the maxima, along the channel axis (``2C`` channels)."""
    return jnp.concatenate([avg_pool(x, spec, valid_sizes, keep), max_pool(x, spec, False, valid_sizes, keep)],
                           axis=spec.channel_axis)


def flatten(x):
    """Every axis after the first as one (timm's ``nn.Flatten(1)``)."""
    return x.reshape(x.shape[0], -1)

