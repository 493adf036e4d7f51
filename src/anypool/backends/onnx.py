"""Adaptive pooling as a graph of standard ONNX ops, exact for every input size, static or dynamic.

The graph builders behind :mod:`anypool.onnx` and the torch exporters' translations
(:mod:`anypool.backends.torch.export`); they need NumPy only (``onnx`` for
:func:`standalone_model`).  ``x`` has shape ``(N, C, *S)`` with ``len(output_size)``
spatial axes, and only standard ONNX ops are emitted (no custom domain).  The windows
are computed **in the graph** from the run-time input shape with the integer formulas
of :mod:`anypool._bins`::

    start(j) = (j * L) // O          end(j) = ((j + 1) * L + O - 1) // O

(the very same ``_bins.start_expr``/``end_expr`` functions, evaluated on ONNX int64
values), so one file is exact for every height/width it is fed.  Per spatial axis
(separable: a window is the product of per-axis windows):

- avg: every window has length ``k`` or ``k + 1`` (``k`` = the shortest), so one ``Gather``
  of ``start(j) + [0, k)`` and a ``ReduceSum``, plus the ``(k+1)``-th element where a window
  has one (``Where`` on a tensor ``k`` times smaller); one ``Div`` by the product of the
  window lengths at the end.  No ``MatMul`` with an averaging matrix: ``0 * inf`` would
  leak NaN into windows that do not hold the inf;
- max: ``Gather`` of ``idx[j, k] = min(start(j) + k, end(j) - 1)`` (a repeated last index
  never changes a max) and ``ReduceMax``, plus ``ReduceL1`` as the NaN detector (ONNX
  Runtime's ``ReduceMax``/``MaxPool`` skip NaN; ``|x|`` sums to NaN exactly when a window
  holds a NaN); with indices, PyTorch's rule — first maximum, or the last NaN, in
  row-major order — from ``ArgMax`` on the values and ``ArgMax(select_last_index=1)`` on
  ``IsNaN``, axis by axis from the last spatial axis to the first, carrying the int64
  flat index into the spatial plane.

A dynamic axis gets an ``If`` on ``L % O == 0``: when it divides at run time, a free
``Reshape`` to ``(O, L/O)`` and a ``ReduceSum`` instead of the gathers (avg; dynamo exporter
and standalone graphs — the TorchScript path always gathers).  Global axes (``O == 1``)
are plain reductions.  Axes whose length is static at export
time get constant windows; when it divides, a free ``Reshape`` to ``(O, L/O)`` and a
``ReduceSum`` (``AveragePool`` when every axis divides with a small kernel).
float16/bfloat16 are computed in float32 and cast back; float64 stays float64.

Padded batches (``valid_sizes``): ``build_avg_valid``/``build_max_valid`` take the per-sample
sizes as a graph value (e.g. a second model input), and build each sample's windows in the
graph from its own sizes (the dynamo exporter's translations only).

More reductions: :func:`build_power_mean` (LP, and GeM with a learnt ``p`` exported as its
value); avgmax is built from the avg and max graphs (the dynamo exporter's translations only).

Default opset: :data:`DEFAULT_OPSET` (20, the default of ``torch.onnx.export`` in torch
2.13).  The translations need opset >= 18 (dynamo exporter) / >= 13 (TorchScript exporter).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence

import numpy as np

from .. import _args, _bins

__all__ = ["DEFAULT_OPSET", "build_avg", "build_max", "build_avg_valid", "build_max_valid",
           "build_power_mean", "build_power_mean_valid", "standalone_model"]

DEFAULT_OPSET = 20
"""The ONNX opset ``export`` targets unless told otherwise (torch.onnx's own default in torch 2.13)."""

_AVG = "adaptive_avg_pool"
_NAMES = itertools.count()

_MAX = "adaptive_max_pool"

# ONNX TensorProto data types used below.
_FLOAT, _UINT8, _INT64, _BOOL, _FLOAT16, _DOUBLE, _BFLOAT16 = 1, 2, 7, 9, 10, 11, 16
_NUMPY = {_FLOAT: np.float32, _DOUBLE: np.float64, _INT64: np.int64}


# --------------------------------------------------------------------------- graph building
class _Emitter:
    """Emits ONNX nodes for one exporter: ``e("Op", *inputs, **attributes)``, ``e.const(array)``."""

    opset = 18

    def __call__(self, op_type: str, *inputs, **attributes):
        raise NotImplementedError

    def branch(self) -> _Emitter | None:
        """An emitter for an ``If`` branch (``None``: this exporter gets no ``If`` from us)."""
        return None

    def if_(self, cond, then: _Emitter, then_out, other: _Emitter, other_out, dtype: int, ndim: int):
        raise NotImplementedError

    def const(self, value: np.ndarray):
        raise NotImplementedError

    def reduce(self, op_type: str, x, axes: Sequence[int], keepdims: int = 0):
        """``ReduceSum``/``ReduceMax`` over ``axes`` (axes became an input in opset 13/18)."""
        if op_type == "ReduceSum" and self.opset >= 13 or self.opset >= 18:
            return self(op_type, x, self.const(np.asarray(axes, np.int64)), keepdims=keepdims)
        return self(op_type, x, axes=list(axes), keepdims=keepdims)

    def unsqueeze(self, x, axes: Sequence[int]):
        return self("Unsqueeze", x, self.const(np.asarray(axes, np.int64))) if axes else x

    def squeeze(self, x, axes: Sequence[int]):
        return self("Squeeze", x, self.const(np.asarray(axes, np.int64)))



class _Int:
    """A run-time int64 ONNX value with ``+ - * //``, so the ``_bins.*_expr`` formulas apply unchanged.

    ``//`` is ONNX ``Div``, which truncates; every operand here is >= 0, where that is floor division.
    """

    def __init__(self, e: _Emitter, value):
        self.e, self.value = e, value

    def _v(self, other):
        return other.value if isinstance(other, _Int) else self.e.const(np.asarray(other, np.int64))

    def _op(self, op_type, a, b):
        return _Int(self.e, self.e(op_type, a, b))

    def __add__(self, o):
        return self._op("Add", self.value, self._v(o))

    def __radd__(self, o):
        return self._op("Add", self._v(o), self.value)

    def __sub__(self, o):
        return self._op("Sub", self.value, self._v(o))

    def __mul__(self, o):
        return self._op("Mul", self.value, self._v(o))

    def __rmul__(self, o):
        return self._op("Mul", self._v(o), self.value)

    def __floordiv__(self, o):
        return self._op("Div", self.value, self._v(o))


class _Axis:
    """The windows of one spatial axis, as ONNX values (constants when ``length`` is a static int).

    ``index``: ``(O, K)`` gather indices, ``valid``: ``(O, K)`` bool ``k < len(j)``,
    ``starts``/``ends``/``lengths``: ``(O,)`` int64.
    """

    def __init__(self, e: _Emitter, length, out: int):
        self.e, self.length, self.out = e, length, out
        self.static = isinstance(length, int)
        if self.static:
            b = _bins.axis_bins(length, out)
            k = np.arange(_bins.max_window(length, out), dtype=np.int64)
            short = int(b.lengths.min()) if out else 0
            self._np = {"starts": b.starts, "ends": b.ends, "lengths": b.lengths,
                        "index": _bins.window_index(length, out), "valid": k < b.lengths[:, None],
                        "main": b.starts[:, None] + np.arange(short, dtype=np.int64),
                        "extra": np.minimum(b.starts + short, b.ends - 1), "has_extra": b.lengths > short}
            self.divisible = _bins.fixed_pool(length, out) is not None
            return
        self.divisible = False
        j = _Int(e, e.const(np.arange(out, dtype=np.int64)))
        starts = _bins.start_expr(j, length, out).value
        ends = _bins.end_expr(j, length, out).value
        lengths = e("Sub", ends, starts)
        # K = the longest window (exact, so divisible sizes gather no padding column)
        width = e.reduce("ReduceMax", lengths, [0]) if out else e.const(np.asarray(0, np.int64))
        k = e("Range", e.const(np.asarray(0, np.int64)), width, e.const(np.asarray(1, np.int64)))
        position = e("Add", e.unsqueeze(starts, [1]), k)  # (O, K)
        last = e.unsqueeze(e("Sub", ends, e.const(np.asarray(1, np.int64))), [1])
        self._values = {"starts": starts, "ends": ends, "lengths": lengths,
                        "index": e("Min", position, last), "valid": e("Less", position, e.unsqueeze(ends, [1]))}
        if out:
            short = e.reduce("ReduceMin", lengths, [0])
            self._values["main"] = e("Add", e.unsqueeze(starts, [1]),
                                     e("Range", e.const(np.asarray(0, np.int64)), short,
                                       e.const(np.asarray(1, np.int64))))
            self._values["extra"] = e("Min", e("Add", starts, short), e("Sub", ends, e.const(np.asarray(1, np.int64))))
            self._values["has_extra"] = e("Greater", lengths, short)

    def get(self, name: str):
        if self.static:
            if name not in getattr(self, "_consts", {}):
                self._consts = {**getattr(self, "_consts", {}), name: self.e.const(self._np[name])}
            return self._consts[name]
        return self._values[name]

    def all_same(self) -> bool:
        """Every window has the same length (static sizes only)."""
        return self.static and not self._np["has_extra"].any()

    def all_valid(self) -> bool:
        return self.static and bool(self._np["valid"].all())


_SMALL_KERNEL = 16  # ONNX Runtime's AveragePool is fast for small kernels only (measured: 2x2 yes, 7x7 no)


def _global_tail(axes: list[_Axis]) -> int:
    """The first axis of the run of global (``O == 1``) axes that ends the spatial axes."""
    k = len(axes)
    while k and axes[k - 1].out == 1:
        k -= 1
    return k


def _compute_dtype(dtype: int) -> int:
    return _DOUBLE if dtype == _DOUBLE else _FLOAT


def _lengths_of(e: _Emitter, x, ndim: int, static: Sequence[int | None], rank: int) -> list:
    """Each spatial length: the static int, or an ``_Int`` read from ``Shape(x)`` at run time."""
    shape = None
    sizes = []
    for i, s in enumerate(static):
        if s is not None:
            sizes.append(int(s))
            continue
        if shape is None:
            shape = e("Shape", x)
        sizes.append(_Int(e, e("Gather", shape, e.const(np.asarray(ndim - rank + i, np.int64)))))
    return sizes


def build_avg(e: _Emitter, x, output_size: Sequence[int], ndim: int, dtype: int,
              static: Sequence[int | None]):
    """Average pooling of ``x`` (``ndim`` dims, the last ``len(output_size)`` spatial)."""
    rank = len(output_size)
    compute = _compute_dtype(dtype)
    y = x if compute == dtype else e("Cast", x, to=compute)
    axes = [_Axis(e, length, out) for length, out in zip(_lengths_of(e, x, ndim, static, rank), output_size)]
    kernel = [a.length // a.out if a.static and a.divisible and a.out else 0 for a in axes]
    if all(kernel) and np.prod(kernel) <= _SMALL_KERNEL:  # a fixed pool, as PyTorch's own static export
        y = e("AveragePool", y, kernel_shape=kernel, strides=kernel)
        return y if compute == dtype else e("Cast", y, to=dtype)
    zero = e.const(np.zeros((), _NUMPY[compute]))
    pooled = _global_tail(axes)
    if pooled < rank:  # trailing global axes: one reduction over contiguous memory
        y = e.reduce("ReduceSum", y, list(range(ndim - rank + pooled, ndim)), keepdims=1)
    # static sizes that divide: a free Reshape (..., L, *rest) -> (..., O, L/O, *rest) and a ReduceSum
    sizes = [a.length for a in axes[:pooled]] + [1] * (rank - pooled)
    done = set()
    for i in reversed(range(pooled)):
        axis, a = axes[i], ndim - rank + i
        trailing = sizes[i + 1:]
        if not (kernel[i] and axis.out > 1 and all(isinstance(t, int) for t in trailing)):
            continue
        y = e("Reshape", y, e.const(np.asarray([0] * a + [axis.out, kernel[i]] + trailing, np.int64)))
        y = e.reduce("ReduceSum", y, [a + 1])
        sizes[i] = axis.out
        done.add(i)
    remaining = [i for i in range(pooled) if i not in done]
    dynamic = [i for i in remaining if not axes[i].static and axes[i].out > 1]
    then, other = e.branch(), e.branch()
    if dynamic and then is not None:
        # run time: when every dynamic size divides, free Reshapes (..., O, L/O, *rest) and ReduceSums,
        # last axis first as for static sizes; else the gathers
        divides = None
        for i in dynamic:
            d = e("Equal", e("Mod", axes[i].length.value, e.const(np.asarray(axes[i].out, np.int64))),
                  e.const(np.asarray(0, np.int64)))
            divides = d if divides is None else e("And", divides, d)
        y_then = _sum_axes(then, y, axes, ndim, remaining[::-1], set(dynamic), zero)
        y_else = _sum_axes(other, y, axes, ndim, remaining, set(), zero)
        y = e.if_(divides, then, y_then, other, y_else, compute, ndim)
    else:
        y = _sum_axes(e, y, axes, ndim, remaining, set(), zero)
    y = e("Div", y, _window_sizes(e, axes, compute))  # one division, broadcast over (O_1, ..., O_r)
    return y if compute == dtype else e("Cast", y, to=dtype)


def _window_sizes(e: _Emitter, axes: list[_Axis], compute: int):
    """The product of the window lengths, shape ``(O_1, ..., O_r)``, in ``compute``."""
    if all(axis.static for axis in axes):
        sizes = functools.reduce(np.multiply.outer, [axis._np["lengths"] for axis in axes])
        return e.const(np.asarray(sizes, _NUMPY[compute]))
    sizes = None
    for i, axis in enumerate(axes):
        lengths = e.unsqueeze(e("Cast", axis.get("lengths"), to=compute), list(range(1, len(axes) - i)))
        sizes = lengths if sizes is None else e("Mul", sizes, lengths)
    return sizes


def _sum_axes(e: _Emitter, y, axes: list[_Axis], ndim: int, order: list[int], reshape: set[int], zero):
    """Window sums along the axes in ``order``; ``reshape``: axes known (at run time) to divide.

    Gathers go first spatial axis first: a Gather along it copies whole rows (one along the
    last axis copies element by element); reshaped axes go last first (ReduceSum over the last axis).
    """
    for i in order:
        axis, a = axes[i], ndim - len(axes) + i
        if axis.out == 1:  # global along this axis: no gather
            y = e.reduce("ReduceSum", y, [a], keepdims=1)
        elif i in reshape:
            shape = e("Concat", e("Shape", y, start=0, end=a), e.const(np.asarray([axis.out, -1], np.int64)),
                      e("Shape", y, start=a + 1), axis=0)
            y = e.reduce("ReduceSum", e("Reshape", y, shape), [a + 1])
        else:
            y = _window_sums(e, y, axis, a, ndim - 1 - a, zero)
    return y


def _window_sums(e: _Emitter, y, axis: _Axis, a: int, rest: int, zero):
    """The sum of every window along axis ``a``: ``(..., L, *rest)`` -> ``(..., O, *rest)``.

    Every window has length k or k + 1 (k = the shortest): sum its first k inputs (one
    Gather, nothing to mask), then add the (k+1)-th where the window has one.
    """
    y_main = e.reduce("ReduceSum", e("Gather", y, axis.get("main"), axis=a), [a + 1])
    if axis.all_same():
        return y_main
    extra = e("Gather", y, axis.get("extra"), axis=a)
    return e("Add", y_main, e("Where", e.unsqueeze(axis.get("has_extra"), list(range(1, 1 + rest))), extra, zero))


def build_max(e: _Emitter, x, output_size: Sequence[int], ndim: int, dtype: int,
              static: Sequence[int | None], return_indices: bool = True):
    """Max pooling of ``x``; returns ``(values, int64 flat indices)`` (indices ``None`` unless asked)."""
    rank = len(output_size)
    compute = _compute_dtype(dtype)
    y = x if compute == dtype else e("Cast", x, to=compute)
    lengths = _lengths_of(e, x, ndim, static, rank)
    axes = [_Axis(e, length, out) for length, out in zip(lengths, output_size)]
    values = _max_values(e, y, axes, ndim)
    flat = _max_indices(e, y, axes, lengths, ndim) if return_indices else None
    return (values if compute == dtype else e("Cast", values, to=dtype)), flat


def _max_values(e: _Emitter, y, axes: list[_Axis], ndim: int):
    """Per axis, ``ReduceMax`` over the gathered windows.

    ONNX Runtime's ``ReduceMax`` may skip a NaN, so each window's ``ReduceL1`` (NaN exactly
    when the window holds a NaN: ``|±inf|`` sums to inf, never NaN) puts it back.
    """
    rank = len(axes)
    for i, axis in enumerate(axes):
        a = ndim - rank + i
        if axis.out == 1:
            g, over, keep = y, a, 1
        else:
            g, over, keep = e("Gather", y, axis.get("index"), axis=a), a + 1, 0
        l1 = e.reduce("ReduceL1", g, [over], keepdims=keep)
        y = e("Where", e("IsNaN", l1), l1, e.reduce("ReduceMax", g, [over], keepdims=keep))
    return y


def _max_indices(e: _Emitter, y, axes: list[_Axis], lengths: list, ndim: int):
    """int64 flat offsets into the spatial plane of PyTorch's pick: the first maximum, or the last NaN.

    Axis by axis from the last spatial axis to the first (the order that makes per-axis
    picks the row-major first max / last NaN), carrying the flat offset of each pick.
    """
    rank = len(axes)
    flat = None
    stride = 1  # product of the input lengths of the axes already pooled (int or _Int)
    for i in reversed(range(rank)):
        axis, a = axes[i], ndim - rank + i
        rest = ndim - 1 - a
        g = e("Gather", y, axis.get("index"), axis=a)  # (..., O, K, *rest)
        first_max = e("ArgMax", g, axis=a + 1, keepdims=1)
        last_nan = e("ArgMax", e("Cast", e("IsNaN", g), to=_UINT8), axis=a + 1, keepdims=1, select_last_index=1)
        any_nan = e("IsNaN", e.reduce("ReduceL1", g, [a + 1], keepdims=1))
        pick = e("Where", any_nan, last_nan, first_max)  # (..., O, 1, *rest)
        y = e.squeeze(e("GatherElements", g, pick, axis=a + 1), [a + 1])
        # absolute position along the axis; Min undoes the repeated last index of short windows
        shape_o = list(range(1, 1 + rest))
        position = e("Min", e("Add", e.unsqueeze(axis.get("starts"), shape_o), e.squeeze(pick, [a + 1])),
                     e.unsqueeze(e("Sub", axis.get("ends"), e.const(np.asarray(1, np.int64))), shape_o))
        offset = position if isinstance(stride, int) and stride == 1 else e(
            "Mul", position, stride.value if isinstance(stride, _Int) else e.const(np.asarray(stride, np.int64)))
        if flat is not None:
            carried = e.squeeze(e("GatherElements", e("Gather", flat, axis.get("index"), axis=a), pick, axis=a + 1),
                                [a + 1])
            offset = e("Add", offset, carried)
        flat = offset
        stride = stride * lengths[i] if isinstance(stride, int) and isinstance(lengths[i], int) else (
            _Int(e, e.const(np.asarray(stride, np.int64))) if isinstance(stride, int) else stride) * lengths[i]
    return flat


# --------------------------------------------------------------------------- padded batches (valid_sizes)
# ``anypool::adaptive_{avg,max}_pool_valid(x, sizes, output_size)``: ``sizes`` is the int64
# ``(N, 2k)`` graph value of per-sample valid input lengths, then valid output lengths.  Per
# axis, each sample's ``(O, K)`` window table is built in the graph from ``_bins.*_expr`` on
# its own ``(L_i, O_i)``, broadcast over the other axes and read with ``GatherElements``
# (never the padding); ``K = ceil(padded / O) + 1`` bounds every sample's windows.  Outputs
# ``j >= O_i`` are 0.


def _i64(e: _Emitter, v):
    return e.const(np.asarray(v, np.int64))


def _dim(e: _Emitter, y, axis: int):
    """``y.shape[axis]`` as a 1-element int64 value."""
    return e("Gather", e("Shape", y), _i64(e, [axis]))


def _sample_windows(e: _Emitter, sizes, d: int, rank: int, out, padded):
    """``(index (N, O, K), valid (N, O, K), lengths (N, O), present (N, O), O·K (1,), O (1,), K (1,))``.

    ``out``/``padded`` are ints or 1-element int64 values (``out`` int when static).
    """
    lengths_in = e.unsqueeze(e("Gather", sizes, _i64(e, d), axis=1), [1])  # (N, 1)
    lengths_out = e.unsqueeze(e("Gather", sizes, _i64(e, rank + d), axis=1), [1])
    o_val = _i64(e, [out]) if isinstance(out, int) else out
    j = e("Range", _i64(e, 0), e.squeeze(o_val, [0]), _i64(e, 1))
    ell, o = _Int(e, lengths_in), _Int(e, lengths_out)
    present = e("Less", j, lengths_out)  # (N, O)
    zero, one = _i64(e, 0), _i64(e, 1)
    start = e("Where", present, _bins.start_expr(_Int(e, j), ell, o).value, zero)
    end = e("Where", present, _bins.end_expr(_Int(e, j), ell, o).value, one)
    if isinstance(out, int) and isinstance(padded, int):
        k_val = _i64(e, [_bins.max_window_expr(padded, out)])
    else:
        pv = _Int(e, _i64(e, [padded]) if isinstance(padded, int) else padded)
        k_val = _bins.max_window_expr(pv, _Int(e, o_val)).value
    k = e("Range", zero, e.squeeze(k_val, [0]), one)
    index = e("Min", e("Add", e.unsqueeze(start, [2]), k), e.unsqueeze(e("Sub", end, one), [2]))
    lengths = e("Sub", end, start)
    valid = e("Less", k, e.unsqueeze(lengths, [2]))
    return index, valid, lengths, present, e("Mul", o_val, k_val), o_val, k_val


def _place(e: _Emitter, t, axis: int, ndim: int, width: int = 2):
    """A per-sample table ``(N, A)`` (``width`` 2) or ``(N, A, B)`` (3) at axes 0 and ``axis`` of ``ndim``."""
    return e.unsqueeze(t, list(range(1, axis)) + list(range(axis + width - 1, ndim)))


def _sample_gather(e: _Emitter, y, axis: int, ndim: int, index, ok, o, k):
    """``y`` with ``axis`` replaced by ``(O, K)``: each sample reads its own window rows (``GatherElements``)."""
    shape = e("Shape", y)
    before, after = e("Slice", shape, _i64(e, [0]), _i64(e, [axis])), e("Slice", shape, _i64(e, [axis + 1]),
                                                                          _i64(e, [ndim]))
    flat = e("Reshape", index, e("Concat", _i64(e, [0]), ok, axis=0))  # (N, O·K)
    flat = e("Expand", _place(e, flat, axis, ndim), e("Concat", before, ok, after, axis=0))
    return e("Reshape", e("GatherElements", y, flat, axis=axis), e("Concat", before, o, k, after, axis=0))


def _valid_output_sizes(e: _Emitter, x, output_size, ndim: int):
    """Each output length: the int, or (an axis that keeps its size, dynamic) ``Shape(x)`` there."""
    rank = len(output_size)
    return [o if isinstance(o, int) else _dim(e, x, ndim - rank + d) for d, o in enumerate(output_size)]


def build_avg_valid(e: _Emitter, x, sizes, output_size, ndim: int, dtype: int, static, mean: bool = True):
    """Average pooling of a padded batch ``x`` (``(N, C, *S)``) with per-sample ``sizes`` (the window
    sums where ``mean`` is false)."""
    rank = len(output_size)
    compute = _compute_dtype(dtype)
    y = x if compute == dtype else e("Cast", x, to=compute)
    zero = e.const(np.zeros((), _NUMPY[compute]))
    outs = _valid_output_sizes(e, x, output_size, ndim)
    divisor = present = None
    for d in range(rank):
        a = ndim - rank + d
        padded = static[d] if static[d] is not None else _dim(e, x, a)
        index, valid, lengths, here, ok, o, k = _sample_windows(e, sizes, d, rank, outs[d], padded)
        g = _sample_gather(e, y, a, ndim, index, ok, o, k)
        y = e.reduce("ReduceSum", e("Where", _place(e, valid, a, ndim + 1, 3), g, zero), [a + 1])
        lengths, here = _place(e, lengths, a, ndim), _place(e, here, a, ndim)
        divisor = lengths if divisor is None else e("Mul", divisor, lengths)
        present = here if present is None else e("And", present, here)
    y = e("Where", present, e("Div", y, e("Cast", divisor, to=compute)) if mean else y, zero)
    return y if compute == dtype else e("Cast", y, to=dtype)


def build_max_valid(e: _Emitter, x, sizes, output_size, ndim: int, dtype: int, static):
    """Max pooling of a padded batch with per-sample ``sizes``: ``(values, int64 flat indices into the padded plane)``.

    PyTorch's pick per axis, last spatial axis first: the first maximum, or the last NaN.
    """
    rank = len(output_size)
    compute = _compute_dtype(dtype)
    y = x if compute == dtype else e("Cast", x, to=compute)
    outs = _valid_output_sizes(e, x, output_size, ndim)
    spatial = e("Slice", e("Shape", x), _i64(e, [ndim - rank]), _i64(e, [ndim]))
    plane = e("Reshape", e("Range", _i64(e, 0), e.reduce("ReduceProd", spatial, [0]), _i64(e, 1)), spatial)
    flat = e("Expand", e.unsqueeze(plane, list(range(ndim - rank))), e("Shape", x))
    present = None
    for d in reversed(range(rank)):
        a = ndim - rank + d
        padded = static[d] if static[d] is not None else _dim(e, x, a)
        index, _, _, here, ok, o, k = _sample_windows(e, sizes, d, rank, outs[d], padded)
        g = _sample_gather(e, y, a, ndim, index, ok, o, k)  # (..., O, K, ...)
        first_max = e("ArgMax", g, axis=a + 1, keepdims=1)
        last_nan = e("ArgMax", e("Cast", e("IsNaN", g), to=_UINT8), axis=a + 1, keepdims=1, select_last_index=1)
        any_nan = e("IsNaN", e.reduce("ReduceL1", g, [a + 1], keepdims=1))
        pick = e("Where", any_nan, last_nan, first_max)
        y = e.squeeze(e("GatherElements", g, pick, axis=a + 1), [a + 1])
        flat = e.squeeze(e("GatherElements", _sample_gather(e, flat, a, ndim, index, ok, o, k), pick, axis=a + 1),
                         [a + 1])
        here = _place(e, here, a, ndim)
        present = here if present is None else e("And", present, here)
    y = e("Where", present, y, e.const(np.zeros((), _NUMPY[compute])))
    flat = e("Where", present, flat, _i64(e, 0))
    return (y if compute == dtype else e("Cast", y, to=dtype)), flat


def build_power_mean(e: _Emitter, x, output_size: Sequence[int], ndim: int, dtype: int,
                     static: Sequence[int | None], p, mean: bool, floor: float | None):
    """LP (``mean=False``: ``(Σ_w t^p)^(1/p)``) or GeM (``t = max(x, floor)``, ``(mean_w t^p)^(1/p)``).

    Computed in float64, scaled by each plane's largest finite ``|t|`` ``M`` (``M·(Σ (t/M)^p)^(1/p)``):
    no overflow for any ``p``; a window whose values are all below ``M·10^(-300/p)`` would underflow
    (the C++ kernels scale by each window's own maximum instead).  ``p``: a float or a one-value
    ONNX value (a learnt parameter, exported as its value).
    """
    rank = len(output_size)
    y = _floored(e, x, floor)
    scale, exponent = _scale_and_exponent(e, e.reduce("ReduceMax", e("Abs", y), list(range(ndim - rank, ndim)),
                                                      keepdims=1), p)
    total = build_avg(e, e("Pow", e("Div", y, scale), exponent), output_size, ndim, _DOUBLE, static)
    if not mean:
        axes = [_Axis(e, length, out) for length, out in zip(_lengths_of(e, x, ndim, static, rank), output_size)]
        total = e("Mul", total, _window_sizes(e, axes, _DOUBLE))
    root = e("Pow", total, e("Div", e.const(np.asarray(1.0)), exponent))
    return e("Cast", e("Mul", scale, root), to=dtype)


def _floored(e: _Emitter, x, floor: float | None):
    """``x`` in float64, ``max(x, floor)`` when a floor is given (Max(NaN, floor) may drop the NaN: Where keeps it)."""
    y = e("Cast", x, to=_DOUBLE)
    if floor is None:
        return y
    return e("Where", e("Less", y, e.const(np.asarray(floor))), e.const(np.asarray(floor)), y)


def _scale_and_exponent(e: _Emitter, big, p):
    """A power mean's scale, the plane's largest ``|t|`` ``big`` (1 where that is 0, NaN or inf), and ``p``
    as a float64 value."""
    bad = e("Or", e("Or", e("IsNaN", big), e("IsInf", big)), e("Equal", big, e.const(np.asarray(0.0))))
    exponent = e.const(np.asarray(float(p))) if isinstance(p, (int, float)) else e("Cast", p, to=_DOUBLE)
    return e("Where", bad, e.const(np.asarray(1.0)), big), exponent


def build_power_mean_valid(e: _Emitter, x, sizes, output_size, ndim: int, dtype: int, static, p, mean: bool,
                           floor: float | None):
    """:func:`build_power_mean` of a padded batch with per-sample ``sizes``: the scale is the largest
    ``|t|`` of each sample's valid region, and the window sums never read the padding."""
    rank = len(output_size)
    lengths = e("Slice", sizes, _i64(e, [0]), _i64(e, [rank]), _i64(e, [1]))
    whole = e("Concat", lengths, e("Expand", _i64(e, [[1] * rank]), e("Shape", lengths)), axis=1)  # one window
    y = _floored(e, x, floor)
    scale, exponent = _scale_and_exponent(e, build_max_valid(e, e("Abs", y), whole, [1] * rank, ndim, _DOUBLE,
                                                             static)[0], p)
    total = build_avg_valid(e, e("Pow", e("Div", y, scale), exponent), sizes, output_size, ndim, _DOUBLE, static,
                            mean)
    root = e("Pow", total, e("Div", e.const(np.asarray(1.0)), exponent))
    return e("Cast", e("Mul", scale, root), to=dtype)


def build_avgmax(e: _Emitter, x, output_size: Sequence[int], ndim: int, dtype: int,
                 static: Sequence[int | None], combine: bool, sizes=None):
    """timm's avgmax (``combine``: ``0.5·(avg + max)``, else the plain avg), the window maxima and their
    int64 argmax, from one cast of ``x``; half types are computed in float32 and rounded once.  With
    ``sizes`` (as :func:`build_avg_valid`'s) it pools a padded batch."""
    compute = _compute_dtype(dtype)
    y = x if compute == dtype else e("Cast", x, to=compute)
    if sizes is None:
        avg = build_avg(e, y, output_size, ndim, compute, static)
        values, indices = build_max(e, y, output_size, ndim, compute, static)
    else:
        avg = build_avg_valid(e, y, sizes, output_size, ndim, compute, static)
        values, indices = build_max_valid(e, y, sizes, output_size, ndim, compute, static)
    first = e("Mul", e("Add", avg, values), e.const(np.asarray(0.5, _NUMPY[compute]))) if combine else avg
    if compute != dtype:  # rounded once
        first, values = e("Cast", first, to=dtype), e("Cast", values, to=dtype)
    return first, values, indices


class _ProtoEmitter(_Emitter):
    """Builds a plain ``onnx`` graph (no torch needed): the harness column and graph-level tests."""

    def __init__(self, opset: int = DEFAULT_OPSET):
        self.opset = opset
        self.nodes = []

    def _name(self):
        return f"v{next(_NAMES)}"

    def __call__(self, op_type, *inputs, **attributes):
        from onnx import helper

        name = self._name()
        self.nodes.append(helper.make_node(op_type, list(inputs), [name], name=f"n{name}", **attributes))
        return name

    def const(self, value):
        from onnx import numpy_helper

        return self("Constant", value=numpy_helper.from_array(np.asarray(value)))

    def branch(self):
        return _ProtoEmitter(self.opset)

    def if_(self, cond, then, then_out, other, other_out, dtype, ndim):
        from onnx import helper

        graphs = [helper.make_graph(em.nodes, f"{tag}_{self._name()}", [],
                                    [helper.make_tensor_value_info(out, dtype, [None] * ndim)])
                  for em, out, tag in ((then, then_out, "then"), (other, other_out, "else"))]
        return self("If", cond, then_branch=graphs[0], else_branch=graphs[1])


def _output_size(output_size, function: str) -> list[int]:
    return list(_args.static_output_size(output_size, function))


def _dtype_proto(dtype: str) -> int:
    return {"float32": _FLOAT, "float64": _DOUBLE, "float16": _FLOAT16}[dtype]


def _sample_sizes(e: _Emitter, valid_sizes, output_size):
    """The ``(N, 2·rank)`` table the padded-batch builders take: each sample's input lengths, then its
    output lengths (the output size, or its own input length where ``output_size`` is ``None``)."""
    columns = []
    for d, o in enumerate(output_size):
        own = e("Slice", valid_sizes, _i64(e, [d]), _i64(e, [d + 1]), _i64(e, [1]))
        columns.append(own if o is None else e("Expand", _i64(e, [[o]]), e("Shape", own)))
    return e("Concat", valid_sizes, *columns, axis=1)


def standalone_model(op: str, output_size: Sequence[int | None], dtype: str = "float32",
                     input_size: Sequence[int | None] | None = None, opset: int = DEFAULT_OPSET,
                     valid_sizes: bool = False, p: float = 3.0, eps: float = 1e-6):
    """The graph the exporters produce, as a self-contained ``onnx.ModelProto`` (no torch needed).

    ``op``: ``"avg"``, ``"max"`` (values), ``"argmax"`` (values, indices), or one of the further
    reductions ``"lp"`` (``norm_type = p``), ``"gem"`` (``p``, ``eps``), ``"avgmax"`` and
    ``"catavgmax"`` (``2C`` output channels).  Input ``x`` of shape ``(N, C, *input_size)``;
    ``input_size`` entries ``None`` (default: all) are dynamic.  With ``valid_sizes`` the graph pools a
    padded batch and takes a second input ``valid_sizes`` (int64 ``(N, rank)``); ``output_size``
    entries may then be ``None`` (each sample's own length).
    """
    from onnx import helper

    if valid_sizes:
        output_size = [o if o is None else _output_size([o], "anypool.onnx.standalone_model")[0]
                       for o in output_size]
    else:
        output_size = _output_size(output_size, "anypool.onnx.standalone_model")
    rank = len(output_size)
    input_size = [None] * rank if input_size is None else list(input_size)
    proto = _dtype_proto(dtype)
    e = _ProtoEmitter(opset)
    inputs = [helper.make_tensor_value_info("x", proto, ["N", "C", *[s or f"S{i}" for i, s in enumerate(input_size)]])]
    sizes = None
    if valid_sizes:
        inputs.append(helper.make_tensor_value_info("valid_sizes", _INT64, ["N", rank]))
        sizes = _sample_sizes(e, "valid_sizes", output_size)
    if op in ("lp", "gem"):
        power = dict(p=float(p), mean=op == "gem", floor=float(eps) if op == "gem" else None)
        outs = [build_power_mean(e, "x", output_size, rank + 2, proto, input_size, **power) if sizes is None else
                build_power_mean_valid(e, "x", sizes, output_size, rank + 2, proto, input_size, **power)]
    elif op in ("avgmax", "catavgmax"):
        first, values, _ = build_avgmax(e, "x", output_size, rank + 2, proto, input_size, op == "avgmax", sizes)
        outs = [first if op == "avgmax" else e("Concat", first, values, axis=1)]
    elif sizes is not None:
        outs = build_avg_valid(e, "x", sizes, output_size, rank + 2, proto, input_size) if op == "avg" else \
            build_max_valid(e, "x", sizes, output_size, rank + 2, proto, input_size)
        outs = [outs] if op == "avg" else list(outs)
    elif op == "avg":
        outs = [build_avg(e, "x", output_size, rank + 2, proto, input_size)]
    else:
        outs = list(build_max(e, "x", output_size, rank + 2, proto, input_size, op == "argmax"))
    out_names = ["y", "indices"][:2 if op == "argmax" else 1]
    outs = outs[:len(out_names)]
    e.nodes += [helper.make_node("Identity", [v], [n]) for v, n in zip(outs, out_names)]
    out_dims = ["N", "C", *[o if o is not None else f"O{i}" for i, o in enumerate(output_size)]]
    graph = helper.make_graph(
        e.nodes, f"anypool_{op}_{rank}d", inputs,
        [helper.make_tensor_value_info(n, proto if n == "y" else _INT64, out_dims) for n in out_names])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


