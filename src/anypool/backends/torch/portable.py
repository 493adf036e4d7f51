"""The portable implementation: pure torch ops, for every device and for symbolic sizes.

All four functions work on the logical layout ``x: (N, C, *S)`` (any strides) and
return fresh tensors.  A tensor whose channels are innermost in memory
(channels_last) is processed as its ``(N, *S, C)`` view, so no layout copy is made
and the result keeps that layout.  Per spatial axis of input length ``L`` and
output length ``O`` (windows from :mod:`anypool._bins`):

* avg forward — gather the ``(O, K)`` window index, zero the repeats, sum; divide
  once by the product of the window lengths.  A divisible axis (``L % O == 0``) needs
  no gather: it is the free view ``(O, L/O)``, and all such axes are summed in one pass.
  (A matmul with the averaging matrix would turn one ``inf`` into NaN everywhere,
  ``0 · inf``; the masked gather does not.)
* avg backward — gather over the covering range ``[cover_first(i), cover_last(i)]``:
  ``dx[i] = Σ_j g[j] / len(j)``; a pure gather, so deterministic with no atomics and
  no cuBLAS (which needs ``CUBLAS_WORKSPACE_CONFIG`` under deterministic mode).
* max forward — gather ``(O, K)`` and pick PyTorch's position (first maximum; the last
  NaN when the window holds one), last spatial axis first, which picks exactly the
  row-major first maximum / last NaN of the product window; flat int64 indices.
* max backward — gather gradient and indices over the product of the covering
  ranges and keep those whose argmax is this input: deterministic, no scatter.  On a
  divisible axis each input has one covering output, so that axis is a broadcast view.
  On the CPU (static sizes) a ``scatter_add`` instead: serial per row there, so deterministic.

Padded batches: each function also takes ``sizes``, an int64 ``(N, 2k)`` tensor — per
sample the valid input lengths ``L_i`` then the valid output lengths ``O_i`` (``O_i`` is
the output size, or ``L_i`` on an axis that keeps its size).  Sample ``i`` is pooled with
the windows of ``(L_i, O_i)``, gathered per sample (the padding is never read); outputs
``j >= O_i`` are 0, and the padding's gradient is 0.
The further reductions (LP, GeM, avgmax; see the end of this file) follow.

float16/bfloat16 accumulate in float32.  Sizes may be SymInts (window tables are
built with torch ops from the ``_bins`` expressions), so the code also traces.
"""

from __future__ import annotations

import math

import torch

from ... import _args, _bins

__all__ = ["supports", "avg_forward", "avg_backward", "max_forward", "max_backward", "channels_last",
           "lp_forward", "lp_backward", "gem_forward", "gem_backward", "avgmax_forward", "avgmax_backward"]


# devices whose scatter_add is deterministic by construction (serial within a row); elsewhere
# (CUDA: atomics) max backward gathers over the covering ranges instead
SCATTER_DEVICES = ("cpu",)


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
    flat = index.reshape(-1)
    inner = y.shape[axis + 1:]
    # index_select copies whole trailing blocks (fast when they are long) but is 10x slower
    # than advanced indexing when they are short (measured on CPU, torch 2.13)
    if _static(*inner) and math.prod(inner) >= 256:
        picked = y.index_select(axis, flat)
    else:
        picked = y[(slice(None),) * axis + (flat,)]
    return picked.unflatten(axis, tuple(index.shape))


def _windows(y: torch.Tensor, axis: int, length, out):
    """``y`` with ``axis`` split into ``(O, K)`` windows, and the ``(O, K)`` validity mask (``None``: all valid).

    A divisible axis is a free view (``K = L / O``); otherwise a gather of the window index.
    """
    if _static(length, out) and length % out == 0:
        return y.unflatten(axis, (out, length // out)), None, None
    index, valid, _ = _window_table(length, out, y.device)
    return _gather(y, axis, index), valid, index


def _empty(x: torch.Tensor, output_size, dtype=None) -> torch.Tensor:
    """An empty result (some output axis is 0) in ``x``'s layout."""
    v, first, cl = _physical(x)
    shape = list(v.shape)
    shape[first:first + len(output_size)] = output_size
    return _logical(v.new_empty(shape, dtype=dtype), cl)


def avg_forward(x: torch.Tensor, output_size, sizes: torch.Tensor | None = None) -> torch.Tensor:
    if 0 in output_size:
        return _empty(x, output_size)
    if sizes is not None:
        return _avg_forward_valid(x, output_size, sizes)
    v, first, cl = _physical(x)
    acc = _acc_dtype(x.dtype)
    y, divisor, divisible = v, None, []
    for d, out in enumerate(output_size):
        axis, length = first + d, v.shape[first + d]
        if _static(length) and length % out == 0:
            if length != out:
                divisible.append(d)
            continue
        index, valid, lengths = _window_table(length, out, x.device)
        g = _gather(y, axis, index)
        y = torch.where(_along(valid, axis, g.dim()), g, 0).sum(axis + 1, dtype=acc)
        lengths = _along(lengths, axis, y.dim())
        divisor = lengths if divisor is None else divisor * lengths
    if divisible:  # every divisible axis is a free (O, K) view: one reduction over all their K axes
        for d in reversed(divisible):
            y = y.unflatten(first + d, (output_size[d], v.shape[first + d] // output_size[d]))
        y = y.sum(tuple(first + d + i + 1 for i, d in enumerate(divisible)), dtype=acc)
        k = math.prod(v.shape[first + d] // output_size[d] for d in divisible)
        divisor = k if divisor is None else divisor * k
    if divisor is None:  # every axis kept its size: a copy
        return x.clone(memory_format=torch.preserve_format)
    return _logical((y / divisor).to(x.dtype), cl)


def _divides(length, out) -> bool:
    return _static(length, out) and out > 0 and length % out == 0


def _spread(y: torch.Tensor, axis: int, out, length) -> torch.Tensor:
    """A divisible axis ``O -> L = O·k`` of ``y`` as the broadcast view ``(O, k)`` at ``axis``, ``axis + 1``."""
    shape = list(y.shape)
    shape.insert(axis + 1, length // out)
    return y.unsqueeze(axis + 1).expand(shape)


def avg_backward(grad_out: torch.Tensor, input_size, sizes: torch.Tensor | None = None) -> torch.Tensor:
    v, first, cl = _physical(grad_out)
    acc = _acc_dtype(grad_out.dtype)
    output_size = v.shape[first:first + len(input_size)]
    if 0 in output_size:
        return _logical(v.new_zeros(_shape_with(v, first, input_size)), cl)
    if sizes is not None:
        return _avg_backward_valid(grad_out, input_size, sizes)
    divisor, gathered, spread = None, [], []
    for d, (length, out) in enumerate(zip(input_size, output_size)):
        if _static(length, out) and length == out:
            continue
        _, _, lengths = _window_table(length, out, grad_out.device)
        lengths = _along(lengths, first + d, v.dim())
        divisor = lengths if divisor is None else divisor * lengths
        (spread if _divides(length, out) else gathered).append(d)
    if divisor is None:
        return grad_out.clone(memory_format=torch.preserve_format)
    y = v.to(acc) / divisor
    for d in gathered:
        axis = first + d
        index, valid = _cover_table(input_size[d], output_size[d], grad_out.device)
        g = _gather(y, axis, index)
        y = torch.where(_along(valid, axis, g.dim()), g, 0).sum(axis + 1)
    if spread:  # a divisible axis sends each output to exactly its k inputs: broadcast views, one copy
        for d in reversed(spread):
            y = _spread(y, first + d, output_size[d], input_size[d])
        y = y.reshape(_shape_with(v, first, input_size))
    return _logical(y.to(grad_out.dtype), cl)


def _shape_with(v: torch.Tensor, first: int, sizes) -> list:
    shape = list(v.shape)
    shape[first:first + len(sizes)] = sizes
    return shape


def _pick(g: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch's choice along ``dim`` (keepdim): ``(value, position)`` of the first maximum, or of the last NaN.

    ``Tensor.max(dim)`` returns the first maximal position (documented, every device) and
    propagates NaN, so only the position of a NaN needs fixing: the last one wins.
    """
    values, first = g.max(dim, keepdim=True)
    if not g.is_floating_point():
        return values, first
    # the last NaN is the first True of the reversed NaN mask (bool: one byte a element)
    any_nan, last_from_end = g.isnan().flip(dim).max(dim, keepdim=True)
    return values, torch.where(any_nan, g.shape[dim] - 1 - last_from_end, first)


def max_forward(x: torch.Tensor, output_size, sizes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    if 0 in output_size:
        return _empty(x, output_size), _empty(x, output_size, torch.int64)
    if sizes is not None:
        return _max_forward_valid(x, output_size, sizes)
    v, first, cl = _physical(x)
    input_size = v.shape[first:first + len(output_size)]
    y, flat, stride = v, None, 1
    for d in reversed(range(len(output_size))):
        axis, length, out = first + d, input_size[d], output_size[d]
        g, _, index = _windows(y, axis, length, out)  # repeats in a row never change the pick
        y, pick = _pick(g, axis + 1)
        y = y.squeeze(axis + 1)
        if index is None:  # divisible: window j starts at j * K
            k = length // out
            coord = pick.squeeze(axis + 1) + _along(torch.arange(out, device=x.device) * k, axis, y.dim())
            earlier = None if flat is None else flat.unflatten(axis, (out, k))
        else:
            coord = _along(index, axis, g.dim()).expand(g.shape).gather(axis + 1, pick).squeeze(axis + 1)
            earlier = None if flat is None else _gather(flat, axis, index)
        flat = coord if earlier is None else earlier.gather(axis + 1, pick).squeeze(axis + 1) + coord * stride
        stride = stride * length
    return _logical(y, cl), _logical(flat, cl)


def max_backward(grad_out: torch.Tensor, indices: torch.Tensor, input_size,
                 sizes: torch.Tensor | None = None) -> torch.Tensor:
    v, first, cl = _physical(grad_out)
    rank = len(input_size)
    output_size = v.shape[first:first + rank]
    acc = _acc_dtype(grad_out.dtype)
    if 0 in output_size:
        return _logical(v.new_zeros(_shape_with(v, first, input_size)), cl)
    if sizes is not None:
        return _max_backward_valid(grad_out, indices, input_size, sizes)
    ix = indices.movedim(1, -1) if cl else indices
    g = v.to(acc)
    if g.device.type in SCATTER_DEVICES and _static(*input_size):
        # CPU scatter_add adds each row serially in index order (parallel only across rows):
        # deterministic, and O(outputs) rather than a gather over the covering ranges
        flat_shape = [*v.shape[:first], math.prod(input_size), *v.shape[first + rank:]]
        out = g.new_zeros(flat_shape).scatter_add_(first, ix.flatten(first, first + rank - 1),
                                                   g.flatten(first, first + rank - 1))
        return _logical(out.unflatten(first, tuple(input_size)).to(grad_out.dtype), cl)
    # each spatial axis d becomes two: a divisible one (O, k) — input o·k + r, a broadcast view, its
    # only covering output — or (L, Kc) — input i and its covering outputs, gathered; Kc is summed
    pairs, summed = [], []
    for d in range(rank):
        axis, length, out = first + 2 * d, input_size[d], output_size[d]
        if _divides(length, out):
            g, ix = _spread(g, axis, out, length), _spread(ix, axis, out, length)
            pairs += [out, length // out]
            continue
        index, valid = _cover_table(length, out, grad_out.device)
        g = torch.where(_along(valid, axis, g.dim() + 1), _gather(g, axis, index), 0)
        ix = _gather(ix, axis, index)
        pairs += [length, 1]
        summed.append(axis + 1)
    plane = torch.arange(math.prod(input_size) if _static(*input_size) else _prod(input_size), device=g.device)
    target = plane.reshape(pairs)  # row-major: (O, k) enumerates o·k + r, (L, 1) enumerates i
    target = target.reshape((1,) * first + tuple(target.shape) + (1,) * (g.dim() - first - target.dim()))
    g = torch.where(ix == target, g, 0)
    if summed:
        g = g.sum(tuple(summed), keepdim=True)
    return _logical(g.reshape(_shape_with(v, first, input_size)).to(grad_out.dtype), cl)


def _prod(sizes):
    total = 1
    for s in sizes:
        total = total * s
    return total


# --- padded batches: per-sample windows ---------------------------------------------------------


def _at(t: torch.Tensor, axis: int, ndim: int) -> torch.Tensor:
    """A per-sample table ``(N, A)`` or ``(N, A, B)`` placed at axes 0 and ``axis`` (, ``axis + 1``)."""
    n, rest = t.shape[0], tuple(t.shape[1:])
    return t.reshape((n,) + (1,) * (axis - 1) + rest + (1,) * (ndim - axis - len(rest)))


def _gather_rows(y: torch.Tensor, axis: int, index: torch.Tensor) -> torch.Tensor:
    """``y`` with ``axis`` replaced by the two axes of ``index`` ``(N, A, B)``: sample ``n`` reads its own rows."""
    n, a, b = index.shape
    shape = list(y.shape)
    shape[axis] = a * b
    flat = _at(index.reshape(n, a * b), axis, y.dim()).expand(shape)
    return y.gather(axis, flat).unflatten(axis, (a, b))


def _sample_windows(length: torch.Tensor, out: torch.Tensor, out_size, padded, device):
    """Per sample (lengths ``(N,)``, outputs ``(N,)``) of one axis padded to ``out_size`` outputs:
    ``(index (N, O, K), valid (N, O, K), window lengths (N, O), output present (N, O))``.

    ``K = ceil(padded / O) + 1`` bounds every sample's windows (``L_i <= padded``; an axis
    that keeps its size has windows of 1).  Outputs ``j >= O_i`` read position 0 and are dropped.
    """
    j = torch.arange(out_size, device=device)
    ell, o = length[:, None], out[:, None]
    present = j < o
    start = torch.where(present, _bins.start_expr(j, ell, o), 0)
    end = torch.where(present, _bins.end_expr(j, ell, o), 1)
    k = torch.arange(_bins.max_window_expr(padded, out_size), device=device)
    lengths = end - start
    return torch.minimum(start[..., None] + k, end[..., None] - 1), k < lengths[..., None], lengths, present


def _sample_covers(length: torch.Tensor, out: torch.Tensor, padded, device):
    """Per sample of one axis: ``(index (N, L, Kc), valid (N, L, Kc))``, the outputs covering each
    input ``i < L_i`` (none for the padding)."""
    i = torch.arange(padded, device=device)
    ell, o = length[:, None], out[:, None]
    inside = i < ell
    first = torch.where(inside, _bins.cover_first_expr(i, ell, o), 0)
    last = torch.where(inside, _bins.cover_last_expr(i, ell, o), 0)
    # the widest cover over the batch (concrete sizes: this path runs on real tensors)
    k = torch.arange(int(_bins.max_cover_expr(length, out).max()), device=device)
    return torch.minimum(first[..., None] + k, last[..., None]), (k <= (last - first)[..., None]) & inside[..., None]


def _split(sizes: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    sizes = sizes.to(torch.int64)
    return sizes[:, :rank], sizes[:, rank:]


def _avg_forward_valid(x: torch.Tensor, output_size, sizes: torch.Tensor) -> torch.Tensor:
    v, first, cl = _physical(x)
    rank = len(output_size)
    lengths_in, lengths_out = _split(sizes.to(x.device), rank)
    y, divisor, present = v, None, None
    for d, out in enumerate(output_size):
        axis = first + d
        index, valid, lengths, here = _sample_windows(lengths_in[:, d], lengths_out[:, d], out, v.shape[axis],
                                                      x.device)
        g = _gather_rows(y, axis, index)
        y = torch.where(_at(valid, axis, g.dim()), g, 0).sum(axis + 1, dtype=_acc_dtype(x.dtype))
        lengths, here = _at(lengths, axis, y.dim()), _at(here, axis, y.dim())
        divisor = lengths if divisor is None else divisor * lengths
        present = here if present is None else present & here
    return _logical(torch.where(present, y / divisor, 0).to(x.dtype), cl)


def _avg_backward_valid(grad_out: torch.Tensor, input_size, sizes: torch.Tensor) -> torch.Tensor:
    v, first, cl = _physical(grad_out)
    rank = len(input_size)
    output_size = v.shape[first:first + rank]
    lengths_in, lengths_out = _split(sizes.to(grad_out.device), rank)
    divisor = None
    for d, out in enumerate(output_size):
        _, _, lengths, _ = _sample_windows(lengths_in[:, d], lengths_out[:, d], out, input_size[d], grad_out.device)
        lengths = _at(lengths, first + d, v.dim())
        divisor = lengths if divisor is None else divisor * lengths
    y = v.to(_acc_dtype(grad_out.dtype)) / divisor
    for d in range(rank):
        axis = first + d
        index, valid = _sample_covers(lengths_in[:, d], lengths_out[:, d], input_size[d], grad_out.device)
        g = _gather_rows(y, axis, index)
        y = torch.where(_at(valid, axis, g.dim()), g, 0).sum(axis + 1)
    return _logical(y.to(grad_out.dtype), cl)


def _max_forward_valid(x: torch.Tensor, output_size, sizes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    v, first, cl = _physical(x)
    rank = len(output_size)
    input_size = v.shape[first:first + rank]
    lengths_in, lengths_out = _split(sizes.to(x.device), rank)
    y, flat, stride, present = v, None, 1, None
    for d in reversed(range(rank)):
        axis, out = first + d, output_size[d]
        index, _, _, here = _sample_windows(lengths_in[:, d], lengths_out[:, d], out, input_size[d], x.device)
        g = _gather_rows(y, axis, index)  # repeats in a row never change the pick
        y, pick = _pick(g, axis + 1)
        y = y.squeeze(axis + 1)
        coord = _at(index, axis, g.dim()).expand(g.shape).gather(axis + 1, pick).squeeze(axis + 1)
        earlier = None if flat is None else _gather_rows(flat, axis, index).gather(axis + 1, pick).squeeze(axis + 1)
        flat = coord if earlier is None else earlier + coord * stride
        stride = stride * input_size[d]
        here = _at(here, axis, y.dim())
        present = here if present is None else present & here
    return _logical(torch.where(present, y, 0), cl), _logical(torch.where(present, flat, 0), cl)


def _max_backward_valid(grad_out: torch.Tensor, indices: torch.Tensor, input_size,
                        sizes: torch.Tensor) -> torch.Tensor:
    """A gather over each sample's covering ranges, keeping the outputs whose argmax is this input."""
    v, first, cl = _physical(grad_out)
    rank = len(input_size)
    lengths_in, lengths_out = _split(sizes.to(grad_out.device), rank)
    ix = indices.movedim(1, -1) if cl else indices
    g, summed = v.to(_acc_dtype(grad_out.dtype)), []
    for d in range(rank):
        axis = first + 2 * d
        index, valid = _sample_covers(lengths_in[:, d], lengths_out[:, d], input_size[d], grad_out.device)
        g = torch.where(_at(valid, axis, g.dim() + 1), _gather_rows(g, axis, index), 0)
        ix = _gather_rows(ix, axis, index)
        summed.append(axis + 1)
    plane = torch.arange(math.prod(input_size) if _static(*input_size) else _prod(input_size), device=g.device)
    pairs = [p for size in input_size for p in (size, 1)]
    target = plane.reshape(pairs).reshape((1,) * first + tuple(pairs) + (1,) * (g.dim() - first - len(pairs)))
    g = torch.where(ix == target, g, 0).sum(tuple(summed), keepdim=True)
    return _logical(g.reshape(_shape_with(v, first, input_size)).to(grad_out.dtype), cl)
# --- more reductions (composed from the above and plain torch ops) ------------------------------
# The power means gather each output's whole product window (every spatial axis as (O, K)) and
# reduce it, scaled by the window's largest |t| as csrc/reductions.cpp does (see its formulas):
# exact and overflow-free, at the cost of memory ~ 2^rank times the input.  Their backward is the
# same formula's gradient on the windows, taken back to the inputs by a gather over the covering
# ranges (the adjoint of the window gather): deterministic on every device.


def _product_windows(v: torch.Tensor, first: int, output_size):
    """``v`` with spatial axis ``d`` replaced by ``(O_d, K_d)``; ``(windows, mask or None, K axes)``."""
    valid = []
    for d, out in enumerate(output_size):
        axis = first + 2 * d
        v, ok, _ = _windows(v, axis, v.shape[axis], out)
        if ok is not None:
            valid.append((axis, ok))
    mask = None
    for axis, ok in valid:
        m = _along(ok, axis, v.dim())
        mask = m if mask is None else mask & m
    return v, mask, tuple(first + 2 * d + 1 for d in range(len(output_size)))


def _unwindow(gw: torch.Tensor, first: int, input_size, output_size) -> torch.Tensor:
    """The adjoint of :func:`_product_windows`: each input sums its entries in the windows covering it."""
    for d in reversed(range(len(input_size))):
        axis, length, out = first + 2 * d, input_size[d], output_size[d]
        if _divides(length, out):  # the windows tile the axis: (O, L/O) is L
            gw = gw.flatten(axis, axis + 1)
            continue
        k = gw.shape[axis + 1]
        index, valid = _cover_table(length, out, gw.device)  # (L, Kc) covering outputs j
        offset = torch.arange(length, device=gw.device)[:, None] - _bins.start_expr(index, length, out)
        flat = index * k + offset.clamp(0, k - 1)
        picked = _gather(gw.flatten(axis, axis + 1), axis, flat)
        gw = torch.where(_along(valid, axis, picked.dim()), picked, 0).sum(axis + 1)
    return gw


def _power_parts(x: torch.Tensor, output_size, p, floor: float | None):
    v, first, cl = _physical(x)
    w, mask, k = _product_windows(v.to(_acc_dtype(x.dtype)), first, output_size)
    t = w if floor is None else w.clamp(min=floor)
    a = t.abs()
    m = (a if mask is None else torch.where(mask, a, 0)).amax(k, keepdim=True)
    scale = torch.where(torch.isfinite(m) & (m > 0), m, 1)
    keep = ~torch.isinf(m) | torch.isinf(t)  # m = inf: only the infinite terms count, and the NaN ones
    if _args.fractional_power(p, floor):
        keep = keep | (t < 0)
    if mask is not None:
        keep = keep & mask
    u = t / scale
    terms = torch.where(keep, u.pow(p), 0)
    full = math.prod(w.shape[a] for a in k if mask is None or mask.shape[a] == 1)  # the unmasked (divisible) axes
    count = full if mask is None else mask.sum(k, keepdim=True) * full
    return dict(v=v, first=first, cl=cl, w=w, k=k, keep=keep, scale=scale, u=u, terms=terms,
                total=terms.sum(k, keepdim=True), count=count)


def _power_out(parts, p, mean: bool) -> torch.Tensor:
    s = parts["total"] / parts["count"] if mean else parts["total"]
    return parts["scale"] * s.pow(1 / p)


def _power_forward(x: torch.Tensor, output_size, p, mean: bool, floor: float | None) -> torch.Tensor:
    if 0 in output_size:
        return _empty(x, output_size)
    parts = _power_parts(x, output_size, p, floor)
    return _logical(_power_out(parts, p, mean).squeeze(parts["k"]).to(x.dtype), parts["cl"])


def _power_backward(grad_out, x, p, mean: bool, floor: float | None, p_grad: bool = False):
    """``(grad x, grad p or None)`` of the power mean (``grad p`` float64, 0-d)."""
    input_size = tuple(x.shape[2:])
    output_size = tuple(grad_out.shape[2:])
    if 0 in output_size:
        return torch.zeros_like(x), (x.new_zeros((), dtype=torch.float64) if p_grad else None)
    parts = _power_parts(x, output_size, p, floor)
    k, total = parts["k"], parts["total"]
    g = grad_out.to(parts["w"].dtype)
    g = g.movedim(1, -1) if parts["cl"] else g  # in x's axis order, whatever grad_out's memory format
    g = g.reshape(parts["scale"].shape)  # output axes with the window axes as size 1
    y = _power_out(parts, p, mean)
    coef = torch.where(total == 0, 0, g * y / (parts["scale"] * total))  # torch's lp_pool: 0 at a zero sum
    gw = torch.where(parts["keep"], coef * parts["u"].pow(p - 1), 0)
    if floor is not None:
        gw = torch.where(parts["w"] < floor, 0, gw)  # torch.clamp passes the gradient where x >= floor
    first = parts["first"]
    gin = _logical(_unwindow(gw, first, input_size, output_size).to(x.dtype), parts["cl"])
    if not p_grad:
        return gin, None
    logs = torch.where(parts["keep"], parts["terms"] * parts["u"].log(), 0).sum(k, keepdim=True)
    s = total / parts["count"] if mean else total
    gp = (g.double() * y.double() / p * (logs.double() / total.double() - s.double().log() / p)).sum()
    return gin, gp


def power_mean_valid(x: torch.Tensor, output_size, sizes: torch.Tensor, p, mean: bool,
                     floor: float | None) -> torch.Tensor:
    """The power mean of a padded batch ``(N, C, *S)`` (``sizes`` as ``avg_forward``'s), in plain
    differentiable torch ops: each sample's own product windows (``_sample_windows``), reduced as
    :func:`_power_parts` does; autograd takes the gradient (for a tensor ``p`` too)."""
    if 0 in output_size:
        return _empty(x, output_size)
    rank = len(output_size)
    lengths_in, lengths_out = _split(sizes.to(x.device), rank)
    w, picked = x.to(_acc_dtype(x.dtype)), []
    for d, out in enumerate(output_size):
        axis = 2 + 2 * d
        index, valid, _, here = _sample_windows(lengths_in[:, d], lengths_out[:, d], out, x.shape[2 + d], x.device)
        w = _gather_rows(w, axis, index)
        picked.append((axis, valid, here))
    mask = present = None
    for axis, valid, here in picked:
        m, h = _at(valid, axis, w.dim()), _at(here, axis, w.dim())
        mask = m if mask is None else mask & m
        present = h if present is None else present & h
    k = tuple(axis + 1 for axis, _, _ in picked)
    t = w if floor is None else w.clamp(min=floor)
    p = p.to(w.dtype) if isinstance(p, torch.Tensor) else p  # 1 / p in the accumulation type
    m = torch.where(mask, t.abs(), 0).amax(k, keepdim=True).detach()  # the mean is homogeneous in the scale
    scale = torch.where(torch.isfinite(m) & (m > 0), m, 1)
    keep = mask & (~torch.isinf(m) | torch.isinf(t))  # m = inf: only the infinite terms count, and the NaN ones
    if _args.fractional_power(p, floor):
        keep = keep | (mask & (t < 0))
    # the dropped terms' base is 1, not theirs: a zero base with p < 1 would give NaN gradients
    terms = torch.where(keep, torch.where(keep, t / scale, 1).pow(p), 0)
    total = terms.sum(k, keepdim=True)
    if mean:
        total = total / mask.sum(k, keepdim=True)
    zero = total == 0  # the root has no derivative at 0: torch's lp_pool gives gradient 0 there
    root = torch.where(zero, 0, torch.where(zero, 1, total).pow(1 / p))
    return torch.where(present, scale * root, 0).squeeze(k).to(x.dtype)


def lp_forward(x: torch.Tensor, output_size, norm_type: float) -> torch.Tensor:
    return _power_forward(x, output_size, float(norm_type), False, None)


def lp_backward(grad_out: torch.Tensor, x: torch.Tensor, norm_type: float) -> torch.Tensor:
    return _power_backward(grad_out, x, float(norm_type), False, None)[0]


def gem_forward(x: torch.Tensor, output_size, p: float, eps: float) -> torch.Tensor:
    return _power_forward(x, output_size, float(p), True, float(eps))


def gem_backward(grad_out: torch.Tensor, x: torch.Tensor, p: float, eps: float, p_grad: bool):
    return _power_backward(grad_out, x, float(p), True, float(eps), p_grad)


def avgmax_forward(x: torch.Tensor, output_size, combine: bool):
    """``(avg, max, argmax)``; with ``combine`` the first is ``0.5·(avg + max)``, rounded once."""
    values, indices = max_forward(x, output_size)
    if not combine:
        return avg_forward(x, output_size), values, indices
    acc = _acc_dtype(x.dtype)
    mean = avg_forward(x.to(acc), output_size)  # not yet rounded to a half type
    return (0.5 * (mean + values.to(acc))).to(x.dtype), values, indices


def avgmax_backward(grad_avg: torch.Tensor, grad_max: torch.Tensor, indices: torch.Tensor, input_size):
    acc = _acc_dtype(grad_avg.dtype)
    total = avg_backward(grad_avg.to(acc), input_size) + max_backward(grad_max.to(acc), indices, input_size)
    return total.to(grad_avg.dtype)
