"""The TensorFlow backend: eager, ``tf.function`` and SavedModel, static or unknown spatial sizes.

Along a spatial axis of length ``L`` pooled to ``O`` (windows from :mod:`anypool._bins`,
never re-derived here), output ``j`` reduces ``[floor(j·L/O), ceil((j+1)·L/O))``.
TensorFlow's generic reductions and element-wise ops are slow on CPU for these
shapes, its (oneDNN) pooling kernels are not, so there are two routes:

* fast, static sizes (:func:`_pooled`): ``avg_pool``/``max_pool`` with kernel =
  stride = ``L/O`` for even windows, otherwise per axis a gather of each window's
  first ``l`` rows + a pool of ``l`` + the last row of the windows one longer;
  averaging matrices (GEMMs) for channels_first uneven averages and for small planes;
* exact, everything else (:func:`_max_general`, :func:`_avg_general`): gathered
  ``(O, K)`` windows with PyTorch's pick (first max, last NaN) and masked IEEE sums;
  for unknown sizes the geometry is built in the graph from ``_bins.*_expr``.

The fast route switches to the exact one at run time when it could be wrong (a NaN
for max: pooling kernels skip NaN; a non-finite average: ``0·inf`` in a GEMM), under
one custom gradient.  Max gradients go to PyTorch's argmax.  float16/bfloat16
average in float32.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from .. import _args, _bins
from .._args import PoolSpec

name = "tensorflow"

try:  # anypool is plain graph-building Python: AutoGraph has nothing to convert (and warns trying)
    from tensorflow.python.autograph.core import config as _autograph_config

    _autograph_config.CONVERSION_RULES = (_autograph_config.DoNotConvert("anypool"),
                                          *_autograph_config.CONVERSION_RULES)
except (ImportError, AttributeError):  # a private API: without it only the warning returns
    pass


def is_array(x) -> bool:
    return isinstance(x, (tf.Tensor, tf.Variable))


def shape(x) -> tuple[int | None, ...]:
    return tuple(x.shape.as_list())


def dtype_name(x) -> str:
    return x.dtype.name


def is_floating(x) -> bool:
    return x.dtype.is_floating


def is_tracing() -> bool:
    """Whether a tracer runs that must see the argument checks (none for this backend: shapes are concrete)."""
    return False


def from_numpy(a: np.ndarray, dtype: str) -> tf.Tensor:
    return tf.cast(tf.constant(a), dtype)


def to_numpy(x) -> np.ndarray:
    return x.numpy()


def squeeze(x, axes):
    return tf.squeeze(x, axis=list(axes))


# ---------------------------------------------------------------- geometry helpers


def _dims(x) -> list:
    """Each dimension as a Python int when static, else a scalar int64 tensor."""
    dynamic = None
    dims = []
    for i, d in enumerate(x.shape.as_list()):
        if d is None:
            dynamic = tf.shape(x, out_type=tf.int64) if dynamic is None else dynamic
            d = dynamic[i]
        dims.append(d)
    return dims


def _shape(dims) -> tf.Tensor:
    """A shape tensor of ``dims`` (Python ints and scalar tensors, as :func:`_dims` gives)."""
    return tf.stack([tf.cast(d, tf.int64) for d in dims])


def _prod(dims) -> object:
    static = math.prod(d for d in dims if isinstance(d, int))
    out = static
    for d in dims:
        if not isinstance(d, int):
            out = d * out
    return out


def _is_identity(length, out) -> bool:
    """``O == L`` (or ``None``: keep the size): every window is one element."""
    return out is None or (isinstance(length, int) and length == out)


def _bounds(length, out: int):
    """Window starts and ends, shape ``(O,)`` int64, built in the graph from ``_bins``."""
    j = tf.range(out, dtype=tf.int64)
    return _bins.start_expr(j, length, out), _bins.end_expr(j, length, out)


def _window_index(length, out: int) -> tf.Tensor:
    """``(O, K)`` gather indices (rows padded by repeating their last index)."""
    if isinstance(length, int):
        return tf.constant(_bins.window_index(length, out))
    starts, ends = _bounds(length, out)
    k = tf.range(_bins.max_window_expr(length, out), dtype=tf.int64)
    return tf.minimum(starts[:, None] + k[None, :], ends[:, None] - 1)


def _averaging_matrix(length, out: int, dtype: tf.DType) -> tf.Tensor:
    """``(O, L)``: ``1/len(j)`` inside window ``j``."""
    if isinstance(length, int):
        return tf.constant(_bins.averaging_matrix(length, out, dtype.name))
    starts, ends = _bounds(length, out)
    i = tf.range(length, dtype=tf.int64)
    inside = (i[None, :] >= starts[:, None]) & (i[None, :] < ends[:, None])
    return tf.cast(inside, dtype) / tf.cast(ends - starts, dtype)[:, None]


def _order(spec: PoolSpec) -> list[int]:
    """Spatial positions, the most-reducing axis first (later axes then see less data)."""
    def ratio(k):
        length, out = spec.input_size[k], spec.output_size[k]
        return 0.0 if length is None or out is None else -length / max(out, 1)
    return sorted(range(spec.rank), key=ratio)


# ---------------------------------------------------------------- average


def _avg_general(x, spec: PoolSpec):
    """Mean over each window, for sizes known only at run time.

    The averaging-matrix GEMM multiplies every input of a row by a weight, so a
    single inf or NaN would spill into windows that do not hold it (``0·inf``).
    When the (small) output is not all finite, it is recomputed exactly with
    gathered windows and masked sums — IEEE sums, so ``inf``/``NaN`` land as in PyTorch.
    """
    x = tf.convert_to_tensor(x)
    acc = x if x.dtype in (tf.float32, tf.float64) else tf.cast(x, tf.float32)
    out, used_matrix = _avg_axes(acc, spec, exact=False)
    if used_matrix:
        out = tf.cond(tf.reduce_all(tf.math.is_finite(out)), lambda: out, lambda: _avg_axes(acc, spec, exact=True)[0])
    return tf.cast(out, x.dtype)


def _avg_axes(acc, spec: PoolSpec, exact: bool, last_first: bool = False):
    used_matrix = False
    # last_first: the last axis of a channels_first tensor is contiguous, one plain GEMM
    for k in reversed(range(spec.rank)) if last_first else _order(spec):
        axis, out = spec.spatial_axes[k], spec.output_size[k]
        dims = _dims(acc)
        length = dims[axis]
        if _is_identity(length, out):
            continue
        before, after = _prod(dims[:axis]), _prod(dims[axis + 1:])
        fixed = isinstance(length, int) and _bins.fixed_pool(length, out)
        if fixed:
            # equal windows: a free reshape and a contiguous mean
            acc = tf.reduce_mean(tf.reshape(acc, [before, out, fixed[0], after]), axis=2)
        elif exact:
            starts, ends = _bounds(length, out)
            window = _window_index(length, out)  # (O, K), rows padded with repeats: masked out
            inside = tf.range(tf.shape(window, out_type=tf.int64)[1])[None, :] < (ends - starts)[:, None]
            t = tf.gather(tf.reshape(acc, [before, length, after]), window, axis=1)
            acc = tf.reduce_sum(tf.where(inside[None, :, :, None], t, tf.zeros((), acc.dtype)), axis=2)
            acc = acc / tf.cast(ends - starts, acc.dtype)[None, :, None]
        else:
            used_matrix = True
            a = _averaging_matrix(length, out, acc.dtype)
            if isinstance(after, int) and after == 1:
                acc = tf.matmul(tf.reshape(acc, [before, length]), a, transpose_b=True)
            else:
                acc = tf.einsum("ol,blr->bor", a, tf.reshape(acc, [before, length, after]))
        acc = tf.reshape(acc, dims[:axis] + [out] + dims[axis + 1:])
    return acc, used_matrix


# ---------------------------------------------------------------- max


@tf.custom_gradient
def _routed_max(t):
    """``reduce_max`` over axis 2 of ``(B, O, K, R)``; the gradient goes to the picked position only."""
    def grad(g):
        pick = _pick(t)
        k = tf.range(tf.shape(t, out_type=tf.int64)[2], dtype=tf.int64)[None, None, :, None]
        return tf.where(k == pick, g[:, :, None, :], tf.zeros((), g.dtype))
    return tf.reduce_max(t, axis=2), grad


def _pick(t) -> tf.Tensor:
    """PyTorch's choice along axis 2 of ``(B, O, K, R)`` (keepdims): first max, or last NaN."""
    size = tf.shape(t, out_type=tf.int64)[2]
    k = tf.range(size, dtype=tf.int64)[None, None, :, None]
    best = tf.reduce_max(t, axis=2, keepdims=True)
    first_max = tf.reduce_min(tf.where(t == best, k, size), axis=2, keepdims=True)
    if not t.dtype.is_floating:
        return first_max
    # a NaN max means the window holds NaN: PyTorch reports its last one
    last_nan = tf.reduce_max(tf.where(tf.math.is_nan(t), k, tf.constant(-1, tf.int64)), axis=2, keepdims=True)
    return tf.where(tf.math.is_nan(best), last_nan, first_max)


def _select(t, pick) -> tf.Tensor:
    """``t[b, o, pick[b, o, 0, r], r]`` for ``t`` of shape ``(B, O, K, R)``."""
    k = tf.range(tf.shape(t, out_type=tf.int64)[2], dtype=tf.int64)[None, None, :, None]
    return tf.reduce_sum(tf.where(k == pick, t, tf.zeros((), t.dtype)), axis=2)


def _max_general(x, spec: PoolSpec, return_indices: bool = False):
    """Max by gathered windows, exact everywhere (NaN, ties, unknown sizes); also the indices.

    Axes are reduced from the last spatial axis to the first, each keeping
    PyTorch's rule (first max, last NaN); composed this way they select exactly the
    row-major first max (or last NaN) of the product window.  ``positions[k]``
    holds, per output, the chosen input index along spatial axis ``k``.
    """
    x = tf.convert_to_tensor(x)
    values = x
    positions: dict[int, tf.Tensor] = {}
    kept: set[int] = set()  # identity axes: their position is an iota, broadcast, not gathered
    for k in reversed(range(spec.rank)):
        axis, out = spec.spatial_axes[k], spec.output_size[k]
        dims = _dims(values)
        length = dims[axis]
        before, after = _prod(dims[:axis]), _prod(dims[axis + 1:])
        new_dims = dims[:axis] + [out] + dims[axis + 1:]
        if _is_identity(length, out):
            if return_indices:
                shape = [1] * len(dims)
                shape[axis] = -1
                positions[k] = tf.reshape(tf.range(length, dtype=tf.int64), shape)
                kept.add(k)
            continue
        fixed = isinstance(length, int) and _bins.fixed_pool(length, out)
        if fixed:
            window = None
            t = tf.reshape(values, [before, out, fixed[0], after])
        else:
            window = _window_index(length, out)
            t = tf.gather(tf.reshape(values, [before, length, after]), window, axis=1)  # (B, O, K, R)
        values = tf.reshape(_routed_max(t), new_dims)
        if not return_indices:
            continue
        pick = _pick(t)
        for m, pos in list(positions.items()):  # earlier choices along later axes follow the pick
            if m in kept:
                continue  # does not vary along this axis: unaffected by the pick
            p = tf.reshape(pos, [before, length, after])
            p = tf.reshape(p, [before, out, fixed[0], after]) if fixed else tf.gather(p, window, axis=1)
            positions[m] = tf.reshape(_select(p, pick), new_dims)
        if fixed:
            chosen = tf.range(out, dtype=tf.int64)[None, :, None] * fixed[0] + pick[:, :, 0, :]
        else:
            starts, ends = _bounds(length, out)
            chosen = tf.minimum(starts[None, :, None] + pick[:, :, 0, :], ends[None, :, None] - 1)
        positions[k] = tf.reshape(chosen, new_dims)
    if not return_indices:
        return values
    dims = _dims(x)
    flat, stride = tf.zeros((), tf.int64), tf.ones((), tf.int64)
    for k in reversed(range(spec.rank)):
        flat = flat + positions[k] * stride
        stride = stride * tf.cast(dims[spec.spatial_axes[k]], tf.int64)
    return values, tf.broadcast_to(flat, tf.shape(values, out_type=tf.int64))


# ---------------------------------------------------------------- public entry points


def _empty(x, spec: PoolSpec):
    """The 0-size result of an ``output_size`` holding 0, taken from a 0-length slice of ``x`` so
    that its gradient is zeros (and no window formula divides by ``O = 0`` at run time)."""
    dims = _dims(x)
    axis = spec.spatial_axes[spec.output_size.index(0)]
    for k, out in zip(spec.spatial_axes, spec.output_size):
        if out is not None:
            dims[k] = out
    nothing = tf.gather(x, tf.zeros([0], tf.int64), axis=axis)
    return tf.reshape(nothing, _shape(dims))


def avg_pool(x, spec: PoolSpec, valid_sizes=None, keep=None):
    """Mean over each window: ``(…, L, …) → (…, O, …)`` per spatial axis."""
    x = tf.convert_to_tensor(x)
    if 0 in spec.output_size:
        return _empty(x, spec)
    if valid_sizes is not None:
        return _avg_valid(x, spec, valid_sizes, keep)
    if not _static(spec):
        return _avg_general(x, spec)
    plane, out_plane = math.prod(spec.input_size), math.prod(spec.output_size)
    if plane * out_plane <= _KRON_MAX and not all(_bins.fixed_pool(L, o) for L, o in zip(spec.input_size,
                                                                                       spec.output_size)):
        # small planes (e.g. 5x5 -> 7x7): one product of the whole plane with the Kronecker
        # product of the axes' averaging matrices, instead of a handful of small ops per axis
        def kron(t):
            acc = t if t.dtype in (tf.float32, tf.float64) else tf.cast(t, tf.float32)
            return tf.cast(_avg_kron(acc, spec), t.dtype)

        return _switched(x, kron, lambda t: _pooled(t, spec, "avg"),
                         lambda y: tf.logical_not(tf.reduce_all(tf.math.is_finite(y))), check_grad=True)
    if not spec.channels_last and not _nchw_pool(spec, tf.float32) and max(spec.output_size) <= _MATRIX_MAX_OUT:
        # channels_first, uneven windows, small outputs: GEMMs with the averaging matrices beat
        # moving the channels last; a non-finite result means inf/NaN met a 0 weight -> exact route
        def fast(t):
            acc = t if t.dtype in (tf.float32, tf.float64) else tf.cast(t, tf.float32)
            return tf.cast(_avg_axes(acc, spec, exact=False, last_first=True)[0], t.dtype)

        return _switched(x, fast, lambda t: _pooled(t, spec, "avg"),
                         lambda y: tf.logical_not(tf.reduce_all(tf.math.is_finite(y))), check_grad=True)
    return _pooled(x, spec, "avg")


# Planes with (input plane) x (output plane) up to this size average by one Kronecker matrix.
_KRON_MAX = 2048


def _avg_kron(acc, spec: PoolSpec):
    """``(…, H·W…, …) @ kron(A_h, A_w, …)ᵀ`` over the flattened spatial plane."""
    matrix = np.ones((1, 1))
    for length, out in zip(spec.input_size, spec.output_size):
        matrix = np.kron(matrix, _bins.averaging_matrix(length, out))
    matrix = tf.constant(matrix.astype(acc.dtype.as_numpy_dtype))  # (O-plane, L-plane)
    dims = _dims(acc)
    first, last = spec.spatial_axes[0], spec.spatial_axes[-1]
    before, after = _prod(dims[:first]), _prod(dims[last + 1:])
    plane = math.prod(spec.input_size)
    if isinstance(after, int) and after == 1:
        out = tf.matmul(tf.reshape(acc, [before, plane]), matrix, transpose_b=True)
    else:
        out = tf.einsum("pq,bqr->bpr", matrix, tf.reshape(acc, [before, plane, after]))
    return tf.reshape(out, dims[:first] + list(spec.output_size) + dims[last + 1:])


# Above this output length per axis the averaging-matrix GEMMs cost more than gather + pool.
_MATRIX_MAX_OUT = 16


def max_pool(x, spec: PoolSpec, return_indices: bool = False, valid_sizes=None, keep=None):
    """Max over each window; with ``return_indices`` also int64 flat offsets into the spatial plane
    (first max on ties, last NaN in a window holding NaN, as PyTorch)."""
    x = tf.convert_to_tensor(x)
    if 0 in spec.output_size:
        values = _empty(x, spec)
        return (values, tf.zeros_like(values, tf.int64)) if return_indices else values
    if valid_sizes is not None:
        values, indices = _max_valid(x, spec, valid_sizes, keep)
        return (values, indices) if return_indices else values
    if return_indices or not _static(spec) or not x.dtype.is_floating:
        return _max_general(x, spec, return_indices)
    # TensorFlow's pooling kernels skip NaN; a NaN anywhere makes the sum NaN (so does
    # inf - inf: a false alarm that merely takes the exact route), one cheap read.
    has_nan = tf.math.is_nan(tf.reduce_sum(tf.cast(x, tf.float32) if x.dtype.size < 4 else x))
    plane, out_plane = math.prod(spec.input_size), math.prod(spec.output_size)
    even = all(_bins.fixed_pool(L, o) for L, o in zip(spec.input_size, spec.output_size))
    if plane * out_plane <= _KRON_MAX and not even:
        return _switched(x, lambda t: _max_small(t, spec), lambda t: _max_general(t, spec), lambda y: has_nan,
                         check_grad=True)
    return _switched(x, lambda t: _pooled(t, spec, "max"), lambda t: _max_general(t, spec), lambda y: has_nan)


def _max_small(x, spec: PoolSpec):
    """Small planes, no NaN: every product window gathered at once over the flattened plane.

    ``index`` ``(O-plane, K)`` lists each product window's positions in non-decreasing
    row-major order (the axes' repeat-padded lists, multiplied out), so the first max
    along ``K`` is PyTorch's argmax.  The gradient puts ``g`` at that position and
    adds the copies back with a static 0/1 ``(plane, O-plane·K)`` matrix (a GEMM;
    ``g`` is finite here — the caller routes a non-finite one to the exact route).
    """
    if not spec.channels_last:  # gathers of whole channel vectors beat gathers of single numbers
        lead = int(spec.batched)
        perm = [*range(lead), *range(lead + 1, len(spec.shape)), lead]
        moved = tf.transpose(x, perm)
        cl = _args.pool_spec(moved.shape.as_list(), spec.output_size, spec.rank, "channels_last")
        return tf.transpose(_max_small(moved, cl), np.argsort(perm))
    index = np.zeros((1, 1), np.int64)
    for length, out in zip(spec.input_size, spec.output_size):
        window = _bins.window_index(length, out)  # (O, K)
        index = (index[:, None, :, None] * length + window[None, :, None, :]).reshape(
            index.shape[0] * out, index.shape[1] * window.shape[1])
    plane, (out_plane, k) = math.prod(spec.input_size), index.shape
    dims = _dims(x)
    first, last = spec.spatial_axes[0], spec.spatial_axes[-1]
    before, after = _prod(dims[:first]), _prod(dims[last + 1:])
    scatter = np.zeros((plane, out_plane * k), x.dtype.as_numpy_dtype)
    scatter[index.reshape(-1), np.arange(out_plane * k)] = 1

    flat = isinstance(after, int) and after == 1  # channels_first: reduce the innermost axis

    @tf.custom_gradient
    def small(v):  # (B, plane, R) -> (B, O-plane, R), or (B, plane) -> (B, O-plane)
        t = tf.gather(v, index, axis=1)  # (B, O-plane, K, R) or (B, O-plane, K)
        y = tf.reduce_max(t, axis=2)

        def grad(g):
            pos = tf.range(k)[None, None, :] if flat else tf.range(k)[None, None, :, None]
            g_k = g[:, :, None] if flat else g[:, :, None, :]
            pick = tf.reduce_min(tf.where(t == (y[:, :, None] if flat else y[:, :, None, :]), pos, k), axis=2,
                                 keepdims=True)
            routed = tf.where(pos == pick, g_k, tf.zeros((), g.dtype))
            if flat:
                return tf.matmul(tf.reshape(routed, [before, out_plane * k]), scatter, transpose_b=True)
            return tf.einsum("im,bmr->bir", scatter, tf.reshape(routed, [before, out_plane * k, after]))

        return y, grad

    scatter = tf.constant(scatter)
    y = small(tf.reshape(x, [before, plane] if flat else [before, plane, after]))
    return tf.reshape(y, dims[:first] + list(spec.output_size) + dims[last + 1:])


def _switched(x, fast, exact, use_exact, check_grad: bool = False):
    """``exact(x)`` where ``use_exact(fast(x))`` holds, else ``fast(x)``; gradients likewise.

    The ``tf.cond`` sits inside ``tf.custom_gradient`` because a differentiated
    ``cond`` keeps the untaken branch's intermediates alive (as zeros); here each
    branch differentiates itself.  ``check_grad``: a non-finite output gradient
    also takes the exact route (the matrix transpose would spread it).
    """
    def branch_grad(fn, g):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = fn(x)
        return tape.gradient(y, x, output_gradients=g)

    @tf.custom_gradient
    def switched(x):
        y_fast = fast(x)
        exact_route = use_exact(y_fast)

        def grad(g):
            route = exact_route
            if check_grad:
                route = tf.logical_or(route, tf.logical_not(tf.reduce_all(tf.math.is_finite(g))))
            return tf.cond(route, lambda: branch_grad(exact, g), lambda: branch_grad(fast, g))

        return tf.cond(exact_route, lambda: exact(x), lambda: y_fast), grad

    return switched(x)


# ---------------------------------------------------------------- fast path: TensorFlow's pooling kernels


def _static(spec: PoolSpec) -> bool:
    return all(isinstance(s, int) for s in spec.input_size) and all(o is not None and o >= 1 for o in spec.output_size)


def _pooled(x, spec: PoolSpec, op: str, nchw: bool = True):
    """Static sizes: TensorFlow's (oneDNN) pooling kernels on a channels-last view.

    All axes divisible: one ``avg_pool``/``max_pool`` with kernel = stride = ``L/O``.
    Otherwise, axis by axis on a ``(P, L, Q, C)`` view: let ``l`` be the shortest
    window; gather the first ``l`` inputs of every window (contiguous rows, so a
    copy of whole ``Q·C`` slices) and pool them with kernel = stride = ``l``; the
    windows one longer (every window has length ``l`` or ``l + 1``) add their last
    input.  For max, ties go to the earlier positions (``tf.maximum``'s gradient
    favours its first argument), so gradients route to PyTorch's argmax.
    """
    dtype = x.dtype
    t = x if op == "max" or dtype in (tf.float32, tf.float64) else tf.cast(x, tf.float32)
    rank = spec.rank
    pool = tf.nn.avg_pool if op == "avg" else tf.nn.max_pool
    if nchw and _nchw_pool(spec, t.dtype):  # oneDNN pools NCHW in place: no transposes
        return _pooled_nchw(x, t, spec, op, pool)
    if not spec.batched:
        t = t[None]
    if not spec.channels_last:
        t = tf.transpose(t, [0, *range(2, rank + 2), 1])
    sizes, outs = list(spec.input_size), spec.output_size
    if rank <= 2 and all(_bins.fixed_pool(L, o) for L, o in zip(sizes, outs)):
        kernel = [_bins.fixed_pool(L, o)[0] for L, o in zip(sizes, outs)]
        if any(k > 1 for k in kernel):
            t = pool(t, kernel, kernel, "VALID")
    else:
        n, c = _dims(t)[0], t.shape[-1]
        # max: last axis first, so that per-axis "first max" composes to the row-major first
        for k in _order(spec) if op == "avg" else reversed(range(rank)):
            length, out = sizes[k], outs[k]
            if length == out:
                continue
            before, after = math.prod(sizes[:k]), math.prod(sizes[k + 1:])
            v = tf.reshape(t, [n * before if isinstance(n, int) else n * before, length, after, c])
            v = _pool_axis(v, length, out, op, pool)
            sizes[k] = out
            t = tf.reshape(v, [n, *sizes, c])
    if not spec.channels_last:
        t = tf.transpose(t, [0, rank + 1, *range(1, rank + 1)])
    if not spec.batched:
        t = t[0]
    return tf.cast(t, dtype)


def _pooled_nchw(x, t, spec: PoolSpec, op: str, pool):
    """The NCHW pool; its gradient is the channels-last route's (oneDNN has no eager NCHW pool gradient)."""
    kernel = [_bins.fixed_pool(L, o)[0] for L, o in zip(spec.input_size, spec.output_size)]

    @tf.custom_gradient
    def pooled(_):
        def grad(g):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = _pooled(x, spec, op, nchw=False)
            return tape.gradient(y, x, output_gradients=g)

        return tf.cast(pool(t, kernel, kernel, "VALID", data_format="NCHW"), x.dtype), grad

    return pooled(x)


def _nchw_pool(spec: PoolSpec, dtype: tf.DType) -> bool:
    """A batched channels_first 2-D job with even windows, and a TensorFlow whose CPU pools take NCHW
    (oneDNN's; float32 and bfloat16 only)."""
    return (not spec.channels_last and spec.batched and spec.rank == 2 and _ONEDNN
            and dtype in (tf.float32, tf.bfloat16)
            and all(_bins.fixed_pool(L, o) for L, o in zip(spec.input_size, spec.output_size)))


def _onednn() -> bool:
    try:  # TensorFlow's own CPU pools are NHWC only; its oneDNN ones also take NCHW
        from tensorflow.python.util import _pywrap_util_port

        return bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):
        return False


_ONEDNN = _onednn()


def _pool_axis(v, length: int, out: int, op: str, pool):
    """Pool axis 1 of ``v`` ``(P, L, Q, C)`` from ``L`` to ``O``: see :func:`_pooled`."""
    fixed = _bins.fixed_pool(length, out)
    if fixed:
        return pool(v, [fixed[0], 1], [fixed[0], 1], "VALID")
    b = _bins.axis_bins(length, out)
    short = int(b.lengths.min())
    firsts = (b.starts[:, None] + np.arange(short)).reshape(-1)
    t = _gather_rows(v, firsts)  # (P, O·l, Q, C)
    if short > 1:
        t = pool(t, [short, 1], [short, 1], "VALID")
    longer = b.lengths > short
    if not longer.any():
        return t
    extra = _gather_rows(v, np.minimum(b.starts + short, length - 1))  # (P, O, Q, C)
    mask = tf.constant(longer[None, :, None, None])
    if op == "max":
        return tf.maximum(t, tf.where(mask, extra, tf.constant(-np.inf, v.dtype)))
    total = t * short + tf.where(mask, extra, tf.zeros((), v.dtype))
    return total / tf.constant(b.lengths.astype(v.dtype.as_numpy_dtype)[None, :, None, None])


def _gather_rows(v, index: np.ndarray):
    """``tf.gather(v, index, axis=1)`` whose gradient is a gather too.

    TensorFlow's own gradient of a gather along axis 1 transposes the whole
    gradient and runs a segment sum; here each input row ``i`` sums the (few)
    gathered rows that copied it, listed in a static ``(L, M)`` table whose padding
    points at an appended zero row.
    """
    length = v.shape[1]
    counts = np.bincount(index, minlength=length)
    order = np.argsort(index, kind="stable")
    table = np.full((length, max(int(counts.max()), 1)), len(index), np.int64)
    rank_in_row = np.arange(len(index)) - np.repeat(np.cumsum(counts) - counts, counts)
    table[index[order], rank_in_row] = order

    @tf.custom_gradient
    def gather(v):
        def grad(g):
            padded = tf.concat([g, tf.zeros_like(g[:, :1])], axis=1)
            total = tf.gather(padded, table[:, 0], axis=1)
            for m in range(1, table.shape[1]):
                total = total + tf.gather(padded, table[:, m], axis=1)
            return total
        return tf.gather(v, index, axis=1), grad

    return gather(v)


# ---------------------------------------------------------------- padded batches (valid_sizes)
# Sample ``i`` is pooled with the windows of its own ``(L_i, O_i)``, built in the graph from
# ``_bins.*_expr`` on the (possibly symbolic) sizes: one ``tf.function`` trace serves every batch
# composition and unknown spatial sizes.  Each axis gathers its per-sample ``(O, K)`` window
# table (``tf.gather(..., batch_dims=1)``, ``K = ceil(padded / O) + 1`` bounding every
# sample's windows), so padding (even NaN) is never read and gets gradient 0.  Outputs
# ``j >= O_i`` are 0.

VALID_SIZES = True


def known_values(valid_sizes) -> np.ndarray | None:
    """The entries of ``valid_sizes`` for the range check (``None`` in a graph where they are run-time values)."""
    return tf.get_static_value(valid_sizes)


def as_sizes(valid_sizes, x, rank: int) -> tf.Tensor:
    return tf.reshape(tf.cast(tf.convert_to_tensor(valid_sizes), tf.int64), [-1, rank])


def _at(t, axis: int, ndim: int) -> tf.Tensor:
    """A per-sample table ``(N, A)`` placed at axes 0 and ``axis`` of an ``ndim`` tensor."""
    for _ in range(axis - 1):
        t = tf.expand_dims(t, 1)
    for _ in range(ndim - axis - 1):
        t = tf.expand_dims(t, -1)
    return t


def _sample_windows(lengths, outs, out_size, padded):
    """``(index (N, O, K), valid (N, O, K), window lengths (N, O), output present (N, O))`` of one axis."""
    j = tf.range(out_size, dtype=tf.int64)[None, :]
    ell, o = lengths[:, None], outs[:, None]
    present = j < o
    start = tf.where(present, _bins.start_expr(j, ell, o), tf.zeros((), tf.int64))
    end = tf.where(present, _bins.end_expr(j, ell, o), tf.ones((), tf.int64))
    k = tf.range(_bins.max_window_expr(padded, out_size), dtype=tf.int64)
    index = tf.minimum(start[..., None] + k, end[..., None] - 1)
    return index, k < (end - start)[..., None], end - start, present


def _sample_gather(y, axis: int, index):
    """``y`` viewed ``(N, B, L, R)`` around ``axis``, each sample gathering its ``(O, K)`` rows: ``(N·B, O, K, R)``."""
    dims = _dims(y)
    n, before, after = dims[0], _prod(dims[1:axis]), _prod(dims[axis + 1:])
    t = tf.reshape(y, [n, before, dims[axis], after])
    o, k = tf.shape(index, out_type=tf.int64)[1], tf.shape(index, out_type=tf.int64)[2]
    g = tf.gather(t, tf.reshape(index, [n, -1]), axis=2, batch_dims=1)  # (N, B, O·K, R)
    return tf.reshape(g, [n * before, o, k, after])


def _sample_outputs(valid_sizes, spec: PoolSpec, keep, dims):
    outs = [valid_sizes[:, d] if kept else tf.fill(tf.shape(valid_sizes[:, d]), tf.constant(o, tf.int64))
            for d, (o, kept) in enumerate(zip(spec.output_size, keep))]
    return tf.stack(outs, axis=1), [dims[a] if kept or o is None else o
                                    for a, o, kept in zip(spec.spatial_axes, spec.output_size, keep)]


def _avg_valid(x, spec: PoolSpec, valid_sizes, keep):
    y = x if x.dtype in (tf.float32, tf.float64) else tf.cast(x, tf.float32)
    outs, out_sizes = _sample_outputs(valid_sizes, spec, keep, _dims(x))
    divisor, present = None, None
    for d, axis in enumerate(spec.spatial_axes):
        dims = _dims(y)
        index, valid, lengths, here = _sample_windows(valid_sizes[:, d], outs[:, d], out_sizes[d], dims[axis])
        g = _sample_gather(y, axis, index)
        mask = tf.repeat(valid, _prod(dims[1:axis]), axis=0)[..., None]  # (N·B, O, K, 1)
        y = tf.reshape(tf.reduce_sum(tf.where(mask, g, tf.zeros((), g.dtype)), axis=2),
                       dims[:axis] + [out_sizes[d]] + dims[axis + 1:])
        lengths, here = _at(tf.cast(lengths, y.dtype), axis, len(dims)), _at(here, axis, len(dims))
        divisor = lengths if divisor is None else divisor * lengths
        present = here if present is None else present & here
    return tf.cast(tf.where(present, y / divisor, tf.zeros((), y.dtype)), x.dtype)


def _max_valid(x, spec: PoolSpec, valid_sizes, keep):
    # last spatial axis first, as _max_general: the row-major first max / last NaN
    dims = _dims(x)
    outs, out_sizes = _sample_outputs(valid_sizes, spec, keep, dims)
    flat, stride = tf.zeros((), tf.int64), tf.ones((), tf.int64)
    for axis in reversed(spec.spatial_axes):
        shape = [1] * len(dims)
        shape[axis] = -1
        flat = flat + tf.reshape(tf.range(dims[axis], dtype=tf.int64), shape) * stride
        stride = stride * tf.cast(dims[axis], tf.int64)
    values, idx, present = x, tf.broadcast_to(flat, tf.shape(x, out_type=tf.int64)), None
    for d in reversed(range(spec.rank)):
        axis, dims = spec.spatial_axes[d], _dims(values)
        index, _, _, here = _sample_windows(valid_sizes[:, d], outs[:, d], out_sizes[d], dims[axis])
        t = _sample_gather(values, axis, index)
        pick = _pick(t)
        new_dims = dims[:axis] + [out_sizes[d]] + dims[axis + 1:]
        values = tf.reshape(_select(t, pick), new_dims)
        idx = tf.reshape(_select(_sample_gather(idx, axis, index), pick), new_dims)
        here = _at(here, axis, len(dims))
        present = here if present is None else present & here
    return tf.where(present, values, tf.zeros((), values.dtype)), tf.where(present, idx, tf.zeros((), idx.dtype))
# --- more reductions (composed) ------------------------------------------------------------------
# avgmax / catavgmax reuse the pools above (any spatial sizes, known or not).  The power means
# (LP, GeM) gather each output's whole product window (every spatial axis as (O, K), _bins' static
# window table) and reduce it, scaled by the window's largest |t| (held constant for the gradient:
# the mean is homogeneous in it) so that a large p neither overflows nor underflows.  They need
# the spatial sizes when the graph is built.


def _acc(dtype: tf.DType) -> tf.DType:
    return tf.float32 if dtype.size < 4 else dtype


def _power_mean(x, spec: PoolSpec, p, mean: bool, floor, function: str):
    x = tf.convert_to_tensor(x)
    if 0 in spec.output_size:
        return _empty(x, spec)
    if not _static(spec):
        raise _args.static_spatial_size(spec, function)
    acc = _acc(x.dtype)
    w = tf.cast(x, acc)
    masks = []
    for d, (axis, length, out) in enumerate(zip(spec.spatial_axes, spec.input_size, spec.output_size)):
        index = _bins.window_index(length, out)
        w = tf.gather(w, index, axis=axis + d)  # spatial axis d becomes (O_d, K_d)
        masks.append(np.arange(index.shape[1]) < _bins.axis_bins(length, out).lengths[:, None])
    # as (before, prod O, after, prod K): TensorFlow's elementwise kernels broadcast only up to
    # rank 5, and a 3-D pool's product window has rank 8
    first, rank = spec.spatial_axes[0], spec.rank
    o_axes = [first + 2 * d for d in range(rank)]
    k_axes = [first + 2 * d + 1 for d in range(rank)]
    ndim = len(w.shape)
    perm = list(range(first)) + o_axes + list(range(first + 2 * rank, ndim)) + k_axes
    dims = _dims(x)
    after = _prod(dims[spec.spatial_axes[-1] + 1:])
    n_out, n_window = math.prod(spec.output_size), math.prod(m.shape[1] for m in masks)
    w = tf.reshape(tf.transpose(w, perm), tf.stack([tf.constant(-1, tf.int64), n_out, tf.cast(after, tf.int64),
                                                    n_window]))
    mask = np.ones((1,) * (2 * rank), bool)
    for d, ok in enumerate(masks):  # (O_1, ..., O_r, K_1, ..., K_r)
        shape = [1] * (2 * rank)
        shape[d], shape[rank + d] = ok.shape
        mask = mask & ok.reshape(shape)
    mask = mask.reshape(1, n_out, 1, n_window)
    count = tf.constant(mask.sum(axis=3, keepdims=True), acc)
    mask = tf.constant(mask)
    t = w if floor is None else tf.where(w < floor, tf.constant(floor, acc), w)  # NaN stays NaN
    m = tf.stop_gradient(tf.reduce_max(tf.where(mask, tf.abs(t), tf.zeros_like(t)), axis=3, keepdims=True))
    scale = tf.where(tf.math.is_finite(m) & (m > 0), m, tf.ones_like(m))
    keep = mask & (tf.logical_not(tf.math.is_inf(m)) | tf.math.is_inf(t))  # m = inf: the infinite terms,
    if _args.fractional_power(p, floor):  # and the NaN ones
        keep = keep | (mask & (t < 0))
    p = tf.constant(p, acc) if isinstance(p, (int, float)) else tf.cast(p, acc)  # (a float cast via float32 rounds)
    terms = tf.where(keep, tf.pow(t / scale, p), tf.zeros_like(t))
    total = tf.reduce_sum(terms, axis=3, keepdims=True)
    if mean:
        total = total / count
    zero = tf.equal(total, 0)  # the root has no derivative at 0: torch's lp_pool gives gradient 0 there
    root = tf.where(zero, tf.zeros_like(total), tf.pow(tf.where(zero, tf.ones_like(total), total), 1 / p))
    out_dims = dims[:first] + list(spec.output_size) + dims[spec.spatial_axes[-1] + 1:]
    return tf.cast(tf.reshape(scale * root, _shape(out_dims)), x.dtype)


def _power_mean_valid(x, spec: PoolSpec, p, mean: bool, floor, valid_sizes, keep):
    """The power mean of a padded batch: each sample's own product windows (``_sample_windows`` per
    axis), reduced as :func:`_power_mean`; any spatial sizes, known or not."""
    x = tf.convert_to_tensor(x)
    if 0 in spec.output_size:
        return _empty(x, spec)
    acc = _acc(x.dtype)
    dims = _dims(x)
    outs, out_sizes = _sample_outputs(valid_sizes, spec, keep, dims)
    w, mask, present = tf.cast(x, acc), None, None
    for d, axis in enumerate(spec.spatial_axes):
        at = axis + d  # spatial axis d of w; the earlier ones are already (O, K)
        here_dims = _dims(w)
        index, valid, _, here = _sample_windows(valid_sizes[:, d], outs[:, d], out_sizes[d], here_dims[at])
        k = tf.shape(index, out_type=tf.int64)[2]
        w = tf.reshape(_sample_gather(w, at, index), _shape(here_dims[:at] + [out_sizes[d], k] + here_dims[at + 1:]))
        # the product window's (N, prod O, prod K) mask and (N, prod O) presence, one axis at a time
        mask = valid if mask is None else tf.reshape(mask[:, :, None, :, None] & valid[:, None, :, None, :],
                                                     [tf.shape(valid)[0], -1, tf.shape(mask)[2] * tf.shape(valid)[2]])
        present = here if present is None else tf.reshape(present[:, :, None] & here[:, None, :],
                                                          [tf.shape(here)[0], -1])
    first, rank = spec.spatial_axes[0], spec.rank
    ndim = len(w.shape)
    perm = (list(range(first)) + [first + 2 * d for d in range(rank)] + list(range(first + 2 * rank, ndim))
            + [first + 2 * d + 1 for d in range(rank)])
    # as (N, before, prod O, after, prod K): rank 5, as TensorFlow's broadcasting kernels need
    n, before, after = dims[0], _prod(dims[1:first]), _prod(dims[spec.spatial_axes[-1] + 1:])
    window = tf.cast(tf.shape(mask)[2], tf.int64)
    w = tf.reshape(tf.transpose(w, perm), _shape([n, before, _prod(out_sizes), after, window]))
    mask = mask[:, None, :, None, :]
    t = w if floor is None else tf.where(w < floor, tf.constant(floor, acc), w)  # NaN stays NaN
    m = tf.stop_gradient(tf.reduce_max(tf.where(mask, tf.abs(t), tf.zeros_like(t)), axis=4, keepdims=True))
    scale = tf.where(tf.math.is_finite(m) & (m > 0), m, tf.ones_like(m))
    kept = mask & (tf.logical_not(tf.math.is_inf(m)) | tf.math.is_inf(t))
    if _args.fractional_power(p, floor):
        kept = kept | (mask & (t < 0))
    p = tf.constant(p, acc) if isinstance(p, (int, float)) else tf.cast(p, acc)
    # the dropped terms' base is 1, not theirs: a zero base with p < 1 would give NaN gradients
    terms = tf.where(kept, tf.pow(tf.where(kept, t / scale, tf.ones_like(t)), p), tf.zeros_like(t))
    total = tf.reduce_sum(terms, axis=4, keepdims=True)
    if mean:
        total = total / tf.reduce_sum(tf.cast(mask, acc), axis=4, keepdims=True)
    zero = tf.equal(total, 0)
    root = tf.where(zero, tf.zeros_like(total), tf.pow(tf.where(zero, tf.ones_like(total), total), 1 / p))
    y = tf.where(present[:, None, :, None, None], scale * root, tf.zeros_like(root))
    out_dims = dims[:first] + out_sizes + dims[spec.spatial_axes[-1] + 1:]
    return tf.cast(tf.reshape(y, _shape(out_dims)), x.dtype)


def lp_pool(x, spec: PoolSpec, norm_type: float, valid_sizes=None, keep=None):
    """``(Σ_window x^p)^(1/p)``, ``p = norm_type`` (torch's lp_pool conventions); static spatial sizes
    unless ``valid_sizes`` is given."""
    if valid_sizes is not None:
        return _power_mean_valid(x, spec, float(norm_type), False, None, valid_sizes, keep)
    return _power_mean(x, spec, float(norm_type), False, None, "adaptive_lp_pool")


def gem_pool(x, spec: PoolSpec, p, eps: float, valid_sizes=None, keep=None):
    """``(mean_window max(x, eps)^p)^(1/p)``; a ``tf.Variable`` ``p`` gets a gradient."""
    if valid_sizes is not None:
        return _power_mean_valid(x, spec, p, True, float(eps), valid_sizes, keep)
    return _power_mean(x, spec, p, True, float(eps), "adaptive_gem_pool")


def avgmax_pool(x, spec: PoolSpec, valid_sizes=None, keep=None):
    """``0.5·(avg + max)`` of each window, rounded once (half types via float32)."""
    x = tf.convert_to_tensor(x)
    acc = _acc(x.dtype)
    mean = avg_pool(tf.cast(x, acc), spec, valid_sizes, keep)
    return tf.cast(0.5 * (mean + tf.cast(max_pool(x, spec, False, valid_sizes, keep), acc)), x.dtype)


def catavgmax_pool(x, spec: PoolSpec, valid_sizes=None, keep=None):
    """The averages, then the maxima, along the channel axis (``2C`` channels)."""
    return tf.concat([avg_pool(x, spec, valid_sizes, keep), max_pool(x, spec, False, valid_sizes, keep)],
                     axis=spec.channel_axis)


def flatten(x):
    """Every axis after the first as one (timm's ``nn.Flatten(1)``)."""
    x = tf.convert_to_tensor(x)
    return tf.reshape(x, tf.stack([tf.shape(x)[0], -1]))
