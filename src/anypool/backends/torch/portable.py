"""The portable implementation: pure torch ops, for every device and for symbolic sizes.

All four functions work on the logical layout ``x: (N, C, *S)`` (any strides) and
return fresh tensors.  A tensor whose channels are innermost in memory
(channels_last) is processed as its ``(N, *S, C)`` view, so no layout copy is made
and the result keeps that layout.  Per spatial axis of input length ``L`` and
output length ``O`` (windows from :mod:`anypool._bins`):

* avg forward — gather the ``(O, K)`` window index, zero the repeats, sum; divide
  once by the product of the window lengths.  (A matmul with the averaging matrix
  would turn one ``inf`` into NaN everywhere, ``0 · inf``; the masked gather does not.)
* avg backward — gather over the covering range ``[cover_first(i), cover_last(i)]``:
  ``dx[i] = Σ_j g[j] / len(j)``; a pure gather, so deterministic with no atomics and
  no cuBLAS (which needs ``CUBLAS_WORKSPACE_CONFIG`` under deterministic mode).
* max forward — gather ``(O, K)`` and pick PyTorch's position (first maximum; the last
  NaN when the window holds one), last spatial axis first, which picks exactly the
  row-major first maximum / last NaN of the product window; flat int64 indices.
* max backward — gather gradient and indices over the product of the covering
  ranges and keep those whose argmax is this input: deterministic, no scatter.

float16/bfloat16 accumulate in float32.  Sizes may be SymInts (window tables are
built with torch ops from the ``_bins`` expressions), so the code also traces.
"""

from __future__ import annotations

import math

import torch

from ... import _bins

__all__ = ["supports", "avg_forward", "avg_backward", "max_forward", "max_backward", "channels_last"]


def supports(x: torch.Tensor, output_size) -> bool:
    return True


def channels_last(x: torch.Tensor) -> bool:
    """Whether ``x`` (logical ``(N, C, *S)``) has its channels innermost in memory."""
    return x.dim() >= 3 and not x.is_contiguous() and x.movedim(1, -1).is_contiguous()


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _physical(x: torch.Tensor) -> tuple[torch.Tensor, int, bool]:
    """``x`` as the view whose axis order follows memory: ``(view, first spatial axis, channels_last)``."""
    if channels_last(x):
        return x.movedim(1, -1), 1, True
    return x, 2, False


def _logical(y: torch.Tensor, cl: bool) -> torch.Tensor:
    return y.movedim(-1, 1) if cl else y


def _static(*sizes) -> bool:
    return all(isinstance(s, int) for s in sizes)


def _window_table(length, out, device):
    """``(index (O, K), valid (O, K) bool, lengths (O,))`` of the windows of one axis."""
    j = torch.arange(out, device=device)
    start, end = _bins.start_expr(j, length, out), _bins.end_expr(j, length, out)
    k = torch.arange(_bins.max_window(length, out) if _static(length, out) else _bins.max_window_expr(length, out),
                     device=device)
    lengths = end - start
    return torch.minimum(start[:, None] + k, end[:, None] - 1), k < lengths[:, None], lengths


def _cover_table(length, out, device):
    """``(index (L, Kc), valid (L, Kc) bool)``: the outputs covering each input of one axis."""
    i = torch.arange(length, device=device)
    first, last = _bins.cover_first_expr(i, length, out), _bins.cover_last_expr(i, length, out)
    k = torch.arange(_bins.max_cover(length, out) if _static(length, out) else _bins.max_cover_expr(length, out),
                     device=device)
    return torch.minimum(first[:, None] + k, last[:, None]), k <= (last - first)[:, None]


def _along(t: torch.Tensor, axis: int, ndim: int) -> torch.Tensor:
    """``t`` of shape ``(A,)`` or ``(A, B)`` placed at ``axis`` (and ``axis + 1``) of an ``ndim`` tensor."""
    return t.reshape((1,) * axis + tuple(t.shape) + (1,) * (ndim - axis - t.dim()))


def _gather(y: torch.Tensor, axis: int, index: torch.Tensor) -> torch.Tensor:
    """``y`` with ``axis`` replaced by the two axes of ``index`` (rows of positions along ``axis``)."""
    return y.index_select(axis, index.reshape(-1)).unflatten(axis, tuple(index.shape))


def _empty(x: torch.Tensor, output_size, dtype=None) -> torch.Tensor:
    """An empty result (some output axis is 0) in ``x``'s layout."""
    v, first, cl = _physical(x)
    shape = list(v.shape)
    shape[first:first + len(output_size)] = output_size
    return _logical(v.new_empty(shape, dtype=dtype), cl)


def avg_forward(x: torch.Tensor, output_size) -> torch.Tensor:
    if 0 in output_size:
        return _empty(x, output_size)
    v, first, cl = _physical(x)
    acc = _acc_dtype(x.dtype)
    y, divisor = v, None
    for d, out in enumerate(output_size):
        axis, length = first + d, y.shape[first + d]
        if _static(length) and length == out:
            continue
        index, valid, lengths = _window_table(length, out, x.device)
        g = _gather(y, axis, index)
        y = torch.where(_along(valid, axis, g.dim()), g, 0).sum(axis + 1, dtype=acc)
        lengths = _along(lengths, axis, y.dim())
        divisor = lengths if divisor is None else divisor * lengths
    if divisor is None:  # every axis kept its size: a copy
        return x.clone(memory_format=torch.preserve_format)
    return _logical((y / divisor).to(x.dtype), cl)


def avg_backward(grad_out: torch.Tensor, input_size) -> torch.Tensor:
    v, first, cl = _physical(grad_out)
    acc = _acc_dtype(grad_out.dtype)
    output_size = v.shape[first:first + len(input_size)]
    if 0 in output_size:
        return _logical(v.new_zeros(_shape_with(v, first, input_size)), cl)
    divisor, moved = None, []
    for d, (length, out) in enumerate(zip(input_size, output_size)):
        if _static(length, out) and length == out:
            continue
        _, _, lengths = _window_table(length, out, grad_out.device)
        lengths = _along(lengths, first + d, v.dim())
        divisor = lengths if divisor is None else divisor * lengths
        moved.append(d)
    if divisor is None:
        return grad_out.clone(memory_format=torch.preserve_format)
    y = v.to(acc) / divisor
    for d in moved:
        axis = first + d
        index, valid = _cover_table(input_size[d], output_size[d], grad_out.device)
        g = _gather(y, axis, index)
        y = torch.where(_along(valid, axis, g.dim()), g, 0).sum(axis + 1)
    return _logical(y.to(grad_out.dtype), cl)


def _shape_with(v: torch.Tensor, first: int, sizes) -> list:
    shape = list(v.shape)
    shape[first:first + len(sizes)] = sizes
    return shape


def _pick(g: torch.Tensor, dim: int) -> torch.Tensor:
    """PyTorch's choice along ``dim`` (keepdim): the first maximum, or the last NaN if any."""
    k = g.shape[dim]
    pos = _along(torch.arange(k, device=g.device), dim, g.dim())
    first_max = torch.where(g == g.amax(dim, keepdim=True), pos, k).amin(dim, keepdim=True)
    if not g.is_floating_point():
        return first_max
    last_nan = torch.where(g.isnan(), pos, -1).amax(dim, keepdim=True)
    return torch.where(last_nan >= 0, last_nan, first_max)


def max_forward(x: torch.Tensor, output_size) -> tuple[torch.Tensor, torch.Tensor]:
    if 0 in output_size:
        return _empty(x, output_size), _empty(x, output_size, torch.int64)
    v, first, cl = _physical(x)
    input_size = v.shape[first:first + len(output_size)]
    y, flat, stride = v, None, 1
    for d in reversed(range(len(output_size))):
        axis, length, out = first + d, input_size[d], output_size[d]
        index, _, _ = _window_table(length, out, x.device)
        g = _gather(y, axis, index)
        pick = _pick(g, axis + 1)
        y = g.gather(axis + 1, pick).squeeze(axis + 1)
        coord = _along(index, axis, g.dim()).expand(g.shape).gather(axis + 1, pick).squeeze(axis + 1)
        if flat is None:
            flat = coord
        else:
            flat = _gather(flat, axis, index).gather(axis + 1, pick).squeeze(axis + 1) + coord * stride
        stride = stride * length
    return _logical(y, cl), _logical(flat, cl)


def max_backward(grad_out: torch.Tensor, indices: torch.Tensor, input_size) -> torch.Tensor:
    v, first, cl = _physical(grad_out)
    rank = len(input_size)
    output_size = v.shape[first:first + rank]
    acc = _acc_dtype(grad_out.dtype)
    if 0 in output_size:
        return _logical(v.new_zeros(_shape_with(v, first, input_size)), cl)
    ix = indices.movedim(1, -1) if cl else indices
    g = v.to(acc)
    # after each axis ``first + 2d`` holds input position i_d and ``first + 2d + 1`` its covering outputs
    for d in range(rank):
        axis = first + 2 * d
        index, valid = _cover_table(input_size[d], output_size[d], grad_out.device)
        g = _gather(g, axis, index)
        ix = _gather(ix, axis, index)
        g = torch.where(_along(valid, axis, g.dim()), g, 0)
    plane = torch.arange(math.prod(input_size) if _static(*input_size) else _prod(input_size), device=g.device)
    target = plane.reshape([s for length in input_size for s in (length, 1)])
    target = target.reshape((1,) * first + tuple(target.shape) + (1,) * (g.dim() - first - target.dim()))
    g = torch.where(ix == target, g, 0)
    g = g.sum(tuple(first + 2 * d + 1 for d in range(rank)))
    return _logical(g.to(grad_out.dtype), cl)


def _prod(sizes):
    total = 1
    for s in sizes:
        total = total * s
    return total
