"""Exact integer window geometry of adaptive pooling — the one place it is defined.

For one spatial axis of input length ``L`` and output length ``O``, output ``j``
(``0 <= j < O``) reduces the half-open input window::

    start(j) = (j * L) // O
    end(j)   = ((j + 1) * L + O - 1) // O          # ceil((j + 1) * L / O)

and input ``i`` is covered by exactly the outputs ``j`` with::

    (i * O) // L  <=  j  <=  ((i + 1) * O - 1) // L

Everything is integer arithmetic; nothing here ever touches a float index.  The
``*_expr`` functions are written with ``*``, ``+`` and ``//`` only, so they work
unchanged on Python ints, NumPy arrays and symbolic/tensor integers (torch
SymInts, TensorFlow or ONNX graph values) when a backend must compute windows
from a size only known at run time.  Everything else is cached per ``(L, O)``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "AxisBins",
    "axis_bins",
    "bins",
    "start_expr",
    "end_expr",
    "cover_first_expr",
    "cover_last_expr",
    "max_window",
    "max_window_expr",
    "max_cover",
    "max_cover_expr",
    "window_index",
    "averaging_matrix",
    "fixed_pool",
]


def start_expr(j: Any, length: Any, out: Any) -> Any:
    """First input index of window ``j``: ``floor(j·L/O)``."""
    return (j * length) // out


def end_expr(j: Any, length: Any, out: Any) -> Any:
    """One past the last input index of window ``j``: ``ceil((j+1)·L/O)``."""
    return ((j + 1) * length + out - 1) // out


def cover_first_expr(i: Any, length: Any, out: Any) -> Any:
    """First output whose window contains input ``i``."""
    return (i * out) // length


def cover_last_expr(i: Any, length: Any, out: Any) -> Any:
    """Last output whose window contains input ``i``."""
    return ((i + 1) * out - 1) // length


def max_window_expr(length: Any, out: Any) -> Any:
    """An upper bound on every window length: ``ceil(L/O) + 1``.

    Every window has length ``ceil(L/O)`` or ``ceil(L/O) + 1``; a backend that
    must pick a static gather width for a run-time ``L`` uses this bound.
    """
    return (length + out - 1) // out + 1


def max_cover_expr(length: Any, out: Any) -> Any:
    """An upper bound on how many outputs cover one input: ``(O + L - 2) // L + 1``.

    ``cover_last - cover_first <= (O + L - 2) / L``; a gather-based backward that must
    pick a static width for a run-time ``L`` uses this bound.
    """
    return (out + length - 2) // length + 1


@dataclass(frozen=True)
class AxisBins:
    """The windows of one axis.  ``starts``/``ends``/``lengths`` are int64 arrays of shape ``(O,)``."""

    input_size: int
    output_size: int
    starts: np.ndarray
    ends: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        return self.ends - self.starts

    @property
    def is_upsampling(self) -> bool:
        return self.output_size > self.input_size

    @property
    def is_global(self) -> bool:
        return self.output_size == 1

    @property
    def overlaps(self) -> np.ndarray:
        """Number of inputs shared by windows ``j`` and ``j+1``, shape ``(O-1,)``."""
        return np.maximum(self.ends[:-1] - self.starts[1:], 0)

    @property
    def fixed_pool(self) -> tuple[int, int] | None:
        return fixed_pool(self.input_size, self.output_size)

    def cover(self) -> tuple[np.ndarray, np.ndarray]:
        """For each input ``i``: the first and last output covering it, shape ``(L,)`` each."""
        i = np.arange(self.input_size, dtype=np.int64)
        return (
            cover_first_expr(i, self.input_size, self.output_size),
            cover_last_expr(i, self.input_size, self.output_size),
        )

    def __iter__(self):
        return iter(zip(self.starts.tolist(), self.ends.tolist()))


def _frozen(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


@functools.lru_cache(maxsize=1024)
def axis_bins(input_size: int, output_size: int) -> AxisBins:
    """The windows of one axis of length ``input_size`` pooled to ``output_size``."""
    j = np.arange(output_size, dtype=np.int64)
    return AxisBins(
        int(input_size),
        int(output_size),
        _frozen(start_expr(j, input_size, output_size)),
        _frozen(end_expr(j, input_size, output_size)),
    )


def bins(input_size, output_size) -> tuple[AxisBins, ...]:
    """The windows of every axis: ``bins((224, 224), (7, 7))`` → one :class:`AxisBins` per axis.

    Ints are accepted for a single axis (``bins(10, 7)``); the result is always a tuple.
    """
    from . import _args

    inputs = _args.input_size_tuple(input_size)
    outputs = _args.normalize_output_size(output_size, inputs)
    return tuple(axis_bins(L, O) for L, O in zip(inputs, outputs))


@functools.lru_cache(maxsize=1024)
def max_window(input_size: int, output_size: int) -> int:
    """The longest window of the axis (0 when the output is empty)."""
    b = axis_bins(input_size, output_size)
    return int(b.lengths.max()) if output_size else 0


@functools.lru_cache(maxsize=1024)
def max_cover(input_size: int, output_size: int) -> int:
    """The most outputs covering one input of the axis (0 when the output is empty)."""
    if not output_size:
        return 0
    first, last = axis_bins(input_size, output_size).cover()
    return int((last - first).max()) + 1


@functools.lru_cache(maxsize=1024)
def window_index(input_size: int, output_size: int) -> np.ndarray:
    """Gather indices of shape ``(O, K)``, ``K = max_window``: row ``j`` lists window ``j``.

    Rows shorter than ``K`` repeat their last index.  A repeat never changes a max
    or its first-max/last-NaN position, so gather + reduce over ``K`` is exact.
    """
    b = axis_bins(input_size, output_size)
    k = np.arange(max_window(input_size, output_size), dtype=np.int64)
    return _frozen(np.minimum(b.starts[:, None] + k, b.ends[:, None] - 1))


@functools.lru_cache(maxsize=256)
def averaging_matrix(input_size: int, output_size: int, dtype: str = "float64") -> np.ndarray:
    """``A`` of shape ``(O, L)`` with ``A[j, i] = 1/len(j)`` inside window ``j``, else 0.

    Average pooling along an axis is ``A @ x``; its gradient is ``Aᵀ @ g``.
    """
    b = axis_bins(input_size, output_size)
    i = np.arange(input_size, dtype=np.int64)
    inside = (i >= b.starts[:, None]) & (i < b.ends[:, None])
    return _frozen((inside / b.lengths[:, None]).astype(dtype))


def fixed_pool(input_size: int, output_size: int) -> tuple[int, int] | None:
    """``(kernel, stride)`` of the ordinary pool equal to this axis, or ``None``.

    Only when ``L`` is a multiple of ``O`` do all windows share one length and one
    stride (``O == 1`` is the global pool, ``kernel = L``).
    """
    if output_size == 0 or input_size % output_size:
        return None
    k = input_size // output_size
    return (k, k)
