"""The fast CPU path: numba kernels, one pass over memory, split across ``torch.get_num_threads()`` threads.

Every function takes *logical* channels-first tensors ``(N, C, *S)`` (spatial rank
1–3) of any strides and returns tensors of the same memory format:

* a tensor that is channels_last-strided (``C`` the innermost axis) is served as the
  array ``(N, D, H, W, C)`` without a copy; the kernels vectorise over ``C``;
* anything else is made NCHW-contiguous (a no-op when it already is) and served as
  planes ``(N·C, D, H, W)``; the kernels vectorise along ``W``.

Lower spatial ranks are the 3-D kernels with ``D = 1`` (and ``H = 1``); a global pool
is one long row.  Windows come from :mod:`anypool._bins` only: output ``j`` of an axis
reduces ``[starts[j], ends[j])`` and input ``i`` is covered by outputs
``cover_first[i] .. cover_last[i]``.  Backward passes are gathers: each input row (planar)
or position (channels_last) is written by one thread from the outputs covering it, summed
in output order — no atomics, bitwise identical run to run and for any thread count.

Two cases go to torch's own kernels, chosen by measurement (BENCHMARKS.md): the global
average of planar input (``mean``) and channels_last max with windows of at most
``_NATIVE_CL_MAX_WINDOW`` positions (forward only; same rule, same indices).

Semantics are PyTorch's: float32/float64 accumulate in their own type (as PyTorch's
CPU kernel), bfloat16 is computed in float32 and rounded once; max keeps the first
maximum in row-major order, a window holding NaN reports its last NaN, indices are
int64 flat offsets into the spatial plane; a window summing ``inf`` and ``-inf`` is NaN.
"""

from __future__ import annotations

import functools
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ... import _bins
from . import portable

try:
    import numba
    from numba import njit
except ImportError:  # pragma: no cover - the torch extra installs numba
    numba = None

_DTYPES = (torch.float32, torch.float64, torch.bfloat16)

__all__ = ["supports", "avg_forward", "avg_backward", "max_forward", "max_backward"]


def supports(x: torch.Tensor, output_size) -> bool:
    """Whether this path serves ``x`` pooled to ``output_size`` (else use the portable path)."""
    output_size = tuple(output_size)
    return (numba is not None and x.device.type == "cpu" and x.dtype in _DTYPES and 3 <= x.dim() <= 5
            and len(output_size) == x.dim() - 2 and x.numel() > 0 and all(int(o) > 0 for o in output_size)
            and math.prod(x.shape[2:]) < 2**31)  # channels_last max keeps positions as int32


# ----------------------------------------------------------------------------------------------------------------
# Geometry, from _bins only: per axis (starts, ends) and (cover_first, cover_last), padded to 3 axes.


@functools.lru_cache(maxsize=256)
def _geometry(input_size: tuple, output_size: tuple):
    """Windows ``[start, end)`` and covering output ranges ``[first, last + 1)`` of the 3 canonical axes ``(D, H, W)``.

    Missing leading axes have size 1; everything is uint64 (see the kernels).
    """
    pad = 3 - len(input_size)
    axes = [_bins.axis_bins(1, 1)] * pad + [_bins.axis_bins(int(L), int(O)) for L, O in zip(input_size, output_size)]
    windows = [a.astype(np.uint64) for b in axes for a in (b.starts, b.ends)]
    covers = [a.astype(np.uint64) + k for b in axes for a, k in zip(b.cover(), (0, 1))]  # first, one past last
    return tuple(windows), tuple(covers)


def _plan(size, output_size):
    """The spatial sizes the kernels see: a global pool is one long row (flat index = row-major position)."""
    size, output_size = tuple(int(s) for s in size), tuple(int(o) for o in output_size)
    if len(size) > 1 and all(o == 1 for o in output_size):
        return (math.prod(size),), (1,)
    return size, output_size


def _canonical(t: torch.Tensor, channels_last: bool, spatial):
    """``t`` (N, C, *S) viewed as ``(N, D, H, W, C)`` or ``(N·C, D, H, W)``; ``spatial`` from :func:`_plan`."""
    n, c = t.shape[:2]
    s = [1] * (3 - len(spatial)) + list(spatial)
    if channels_last:
        return t.movedim(1, -1).reshape(n, *s, c)
    return t.reshape(n * c, *s)


_is_channels_last = portable.channels_last  # the layout rule the op's fake impls promise


def _empty(n, c, size, channels_last: bool, dtype) -> torch.Tensor:
    if channels_last:
        return torch.empty(n, *size, c, dtype=dtype).movedim(-1, 1)
    return torch.empty(n, c, *size, dtype=dtype)


def _prepare(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    t = t.detach()
    return t if channels_last else t.contiguous()


_CHUNK_BYTES = 1 << 22  # bfloat16 goes through float32 scratch this big, so the scratch stays in cache


def _call(kernel, channels_last: bool, inputs, outputs, geometry) -> None:
    """Run ``kernel`` on canonical views: reads ``inputs``, writes ``outputs`` (the last one sets the items).

    numba has no bfloat16: bfloat16 tensors are taken, in each thread, in chunks of the outer axis through
    float32 scratch converted by numba — one read of the input, one rounding of each result, no torch op
    between (a torch op inside the threads would wake its OpenMP pool to fight ours for the cores).
    """
    arrays = [a.view(torch.int16).numpy() if a.dtype == torch.bfloat16 else a.numpy() for a in (*inputs, *outputs)]
    last = arrays[-1]
    if all(a.dtype != torch.bfloat16 for a in (*inputs, *outputs)):
        items = math.prod(last.shape[:3]) if channels_last else last.shape[0]
        _launch(kernel, items, max(a.size for a in arrays), *arrays, *geometry)
        return
    n_in = len(inputs)
    step = max(1, _CHUNK_BYTES // (4 * max(a[:1].size for a in arrays)))

    def chunks(lo, hi, *arrays):
        for start in range(lo, hi, step):
            part = [a[start:min(hi, start + step)] for a in arrays[:len(arrays) - len(geometry)]]
            scratch = [_bf16_to_f32(a) if k < n_in and a.dtype == np.int16 else
                       np.empty(a.shape, np.float32) if a.dtype == np.int16 else a for k, a in enumerate(part)]
            last = scratch[-1]
            kernel(0, math.prod(last.shape[:3]) if channels_last else last.shape[0], *scratch, *geometry)
            for k in range(n_in, len(part)):
                if part[k].dtype == np.int16:
                    _f32_to_bf16(scratch[k], part[k])

    _launch(chunks, arrays[0].shape[0], max(a.size for a in arrays), *arrays, *geometry)


_NATIVE_CL_MAX_WINDOW = 16  # channels_last max windows of at most this many positions go to torch's kernel
_POOL: ThreadPoolExecutor | None = None
_INLINE_ITEMS = 1 << 16  # below this many input elements the thread hand-off costs more than it saves


def _forget_pool() -> None:  # a forked child has none of the parent's threads
    global _POOL
    _POOL = None


os.register_at_fork(after_in_child=_forget_pool)


def _launch(kernel, items: int, work: int, *arrays) -> None:
    """Run ``kernel(lo, hi, *arrays)`` over ``[0, items)`` split across ``torch.get_num_threads()`` threads.

    The kernels are serial and release the GIL; parts touch disjoint outputs.  Our own
    threads (not a second OpenMP runtime beside torch's) keep the two cores from
    fighting over spinning workers.
    """
    global _POOL
    parts = max(1, min(torch.get_num_threads(), items, work // _INLINE_ITEMS))
    bounds = [items * k // parts for k in range(parts + 1)]
    if parts == 1:
        kernel(0, items, *arrays)
        return
    if _POOL is None or _POOL._max_workers < parts - 1:
        _POOL = ThreadPoolExecutor(max_workers=parts - 1, thread_name_prefix="anypool")
    futures = [_POOL.submit(kernel, bounds[k], bounds[k + 1], *arrays) for k in range(1, parts)]
    kernel(bounds[0], bounds[1], *arrays)
    for f in futures:
        f.result()


def _spatial(input_size, dim):
    size = tuple(int(s) for s in input_size)
    return size[2:] if len(size) == dim else size


# ----------------------------------------------------------------------------------------------------------------
# Public entry points.


def avg_forward(x: torch.Tensor, output_size) -> torch.Tensor:
    """Mean over each window: ``(N, C, *S)`` → ``(N, C, *output_size)``, same memory format as ``x``."""
    cl = _is_channels_last(x)
    n, c, *size = x.shape
    output_size = tuple(int(o) for o in output_size)
    if not cl and all(o == 1 for o in output_size):
        # Global mean of planes: torch's own reduction streams many short planes better than a loop per plane.
        return x.contiguous().mean(tuple(range(2, x.dim())), keepdim=True)
    xx = _prepare(x, cl)
    out = _empty(n, c, output_size, cl, x.dtype)
    size, osize = _plan(size, output_size)
    windows, _ = _geometry(size, osize)
    _call(_avg_fwd_cl if cl else _avg_fwd_planar, cl, [_canonical(xx, cl, size)], [_canonical(out, cl, osize)],
          windows)
    return out


def avg_backward(grad_out: torch.Tensor, input_size) -> torch.Tensor:
    """Gradient of :func:`avg_forward`: ``gin[i] = Σ_{j covers i} g[j] / |window j|`` (a gather, deterministic)."""
    cl = _is_channels_last(grad_out)
    n, c, *out_size = grad_out.shape
    size = _spatial(input_size, grad_out.dim())
    g = _prepare(grad_out, cl)
    gin = _empty(n, c, size, cl, g.dtype)
    size, osize = _plan(size, out_size)
    windows, covers = _geometry(size, osize)
    _call(_avg_bwd_cl if cl else _avg_bwd_planar, cl, [_canonical(g, cl, osize)], [_canonical(gin, cl, size)],
          windows + covers)
    return gin


def max_forward(x: torch.Tensor, output_size):
    """Max over each window and its int64 flat index in the spatial plane (PyTorch's first-max / last-NaN rule)."""
    cl = _is_channels_last(x)
    n, c, *size = x.shape
    output_size = tuple(int(o) for o in output_size)
    if cl and math.prod(_bins.max_window(s, o) for s, o in zip(size, output_size)) <= _NATIVE_CL_MAX_WINDOW:
        # Small windows on channels_last: torch's kernel (vectorised over C, same rule) measured faster.
        native = getattr(torch.nn.functional, f"adaptive_max_pool{len(size)}d")
        values, indices = native(x.detach(), output_size, return_indices=True)
        return tuple(t.movedim(1, -1).contiguous().movedim(-1, 1) for t in (values, indices))  # its 3-D is NCDHW
    xx = _prepare(x, cl)
    values = _empty(n, c, output_size, cl, x.dtype)
    indices = _empty(n, c, output_size, cl, torch.int64)
    size, osize = _plan(size, output_size)
    windows, _ = _geometry(size, osize)
    _call(_max_fwd_cl if cl else _max_fwd_planar, cl, [_canonical(xx, cl, size)],
          [_canonical(values, cl, osize), _canonical(indices, cl, osize)], windows)
    return values, indices


def max_backward(grad_out: torch.Tensor, indices: torch.Tensor, input_size) -> torch.Tensor:
    """Gradient of :func:`max_forward`: each input sums the ``g`` of the covering outputs whose argmax it is."""
    cl = _is_channels_last(grad_out)
    n, c, *out_size = grad_out.shape
    size = _spatial(input_size, grad_out.dim())
    g = _prepare(grad_out, cl)
    # the kernel reads g and indices in the same order (a copy only if the forward's layout differed)
    idx = indices.movedim(1, -1).contiguous().movedim(-1, 1) if cl else indices.contiguous()
    gin = _empty(n, c, size, cl, g.dtype)
    size, osize = _plan(size, out_size)
    windows, covers = _geometry(size, osize)
    _call(_max_bwd_cl if cl else _max_bwd_planar, cl, [_canonical(g, cl, osize), _canonical(idx, cl, osize)],
          [_canonical(gin, cl, size)], windows + covers)
    return gin


# ----------------------------------------------------------------------------------------------------------------
# Kernels, each over the outer items ``[lo, hi)``: planar x (P, D, H, W), channels-last x (N, D, H, W, C).
# Every index is unsigned (``_u``): numba then skips negative-index wrap-around, which is what lets LLVM
# vectorise the inner loops.  Sums may be reassociated ("reassoc": LLVM vectorises window sums; results stay
# within rounding of the sequential sum); nothing assumes the absence of NaN/inf except where checked.

if numba is not None:
    _jit = njit(cache=True, nogil=True)

    @_jit
    def _bf16_to_f32(a):
        """bfloat16 bits (int16) → float32: the bits are the float32's upper half."""
        out = np.empty(a.shape, np.float32)
        bits, src = out.reshape(-1).view(np.uint32), a.reshape(-1).view(np.uint16)
        for k in range(src.size):
            bits[k] = np.uint32(src[k]) << np.uint32(16)
        return out

    @_jit
    def _f32_to_bf16(a, out):
        """float32 → bfloat16 bits, rounded to nearest even as torch does (NaN stays a quiet NaN)."""
        bits, dst = a.reshape(-1).view(np.uint32), out.reshape(-1).view(np.uint16)
        for k in range(bits.size):
            b = bits[k]
            if (b & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
                dst[k] = np.uint16((b >> np.uint32(16)) | np.uint32(0x40))
            else:
                dst[k] = np.uint16((b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))

    _jit_sum = njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
    _u = np.uint64

    @_jit_sum
    def _avg_fwd_planar(lo, hi, x, out, sd, ed, sh, eh, sw, ew):
        # Per output row: sum the window's input rows into ``row``, then each window of ``row``.
        od, oh, ow, width = _u(out.shape[1]), _u(out.shape[2]), _u(out.shape[3]), _u(x.shape[3])
        row = np.empty(x.shape[3], out.dtype)
        for p in range(_u(lo), _u(hi)):
            for a in range(od):
                for b in range(oh):
                    for w in range(width):
                        row[w] = 0
                    for d in range(sd[a], ed[a]):
                        for h in range(sh[b], eh[b]):
                            for w in range(width):
                                row[w] += x[p, d, h, w]
                    n = (ed[a] - sd[a]) * (eh[b] - sh[b])
                    for c in range(ow):
                        total = row[sw[c]]
                        for w in range(sw[c] + _u(1), ew[c]):
                            total += row[w]
                        out[p, a, b, c] = total / (n * (ew[c] - sw[c]))

    @_jit_sum
    def _avg_fwd_cl(lo, hi, x, out, sd, ed, sh, eh, sw, ew):
        # Per output position: the window's channel vectors summed into ``acc``.
        od, oh, ow, channels = _u(out.shape[1]), _u(out.shape[2]), _u(out.shape[3]), _u(out.shape[4])
        acc = np.empty(out.shape[4], out.dtype)
        scale = np.empty(1, out.dtype)
        for t in range(_u(lo), _u(hi)):
            i, b = t // oh, t % oh
            i, a = i // od, i % od
            for c in range(ow):
                for k in range(channels):
                    acc[k] = 0
                for d in range(sd[a], ed[a]):
                    for h in range(sh[b], eh[b]):
                        for w in range(sw[c], ew[c]):
                            for k in range(channels):
                                acc[k] += x[i, d, h, w, k]
                # one division per window, in the output's type (a uint64 divisor would make every lane float64)
                scale[0] = 1.0 / ((ed[a] - sd[a]) * (eh[b] - sh[b]) * (ew[c] - sw[c]))
                for k in range(channels):
                    out[i, a, b, c, k] = acc[k] * scale[0]

    @_jit
    def _max_fwd_planar(lo, hi, x, out, idx, sd, ed, sh, eh, sw, ew):
        # Down the window's rows, per column: first max row / last NaN row (branch-free, vectorised).  Then across
        # the columns of each window, comparing (value, flat index) by PyTorch's rule, which is order-free.
        od, oh, ow = _u(out.shape[1]), _u(out.shape[2]), _u(out.shape[3])
        height, width = _u(x.shape[2]), _u(x.shape[3])
        best = np.empty(x.shape[3], out.dtype)
        rows = np.empty(x.shape[3], np.uint64)  # flat offset of the row holding best[w]
        first_row = np.zeros(x.shape[3], np.uint64)
        for p in range(_u(lo), _u(hi)):
            for a in range(od):
                for b in range(oh):
                    r0 = (sd[a] * height + sh[b]) * width
                    if (ed[a] - sd[a]) * (eh[b] - sh[b]) == 1:  # one row: reduce it in place
                        values, offsets = x[p, sd[a], sh[b]], first_row
                    else:
                        values, offsets = best, rows
                        for w in range(width):
                            best[w] = x[p, sd[a], sh[b], w]
                            rows[w] = r0
                        for d in range(sd[a], ed[a]):
                            for h in range(sh[b], eh[b]):
                                if d == sd[a] and h == sh[b]:
                                    continue
                                r = (d * height + h) * width
                                for w in range(width):
                                    v = x[p, d, h, w]
                                    take = (v > best[w]) | (v != v)
                                    best[w] = v if take else best[w]
                                    rows[w] = r if take else rows[w]
                        r0 = _u(0)
                    for c in range(ow):
                        f = _window_argmax(values, offsets, sw[c], ew[c])
                        out[p, a, b, c] = values[f % width]
                        idx[p, a, b, c] = r0 + f

    @_jit
    def _window_argmax(values, offsets, start, end):
        """The flat index ``offsets[k] + k`` chosen by PyTorch's rule among ``values[k]``, ``start <= k < end``.

        A short window is one scalar scan; a long one is split into reductions LLVM vectorises: any NaN → the
        largest NaN index; else the max value, then the smallest index holding it (``-0.0 == 0.0``, so a tie
        of zeros keeps the first, as PyTorch does).
        """
        if end - start <= _u(16):
            bv, bf = values[start], offsets[start] + start
            for k in range(start + _u(1), end):
                v, f = values[k], offsets[k] + k
                if v != v:
                    if bv == bv or f > bf:
                        bv, bf = v, f
                elif bv == bv and (v > bv or (v == bv and f < bf)):
                    bv, bf = v, f
            return bf
        nan = False
        for k in range(start, end):
            nan |= values[k] != values[k]
        if nan:
            f = _u(0)
            for k in range(start, end):
                f = max(f, offsets[k] + k if values[k] != values[k] else _u(0))
            return f
        m = _max_no_nan(values, start, end)
        f = ~_u(0)
        for k in range(start, end):
            f = min(f, offsets[k] + k if values[k] == m else ~_u(0))
        return f

    @_jit
    def _max_no_nan(values, start, end):
        # Eight running maxima: LLVM does not vectorise a float max reduction, but runs these side by side.
        m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = values[start]
        k = start
        while k + _u(8) <= end:
            m0, m1 = max(m0, values[k]), max(m1, values[k + _u(1)])
            m2, m3 = max(m2, values[k + _u(2)]), max(m3, values[k + _u(3)])
            m4, m5 = max(m4, values[k + _u(4)]), max(m5, values[k + _u(5)])
            m6, m7 = max(m6, values[k + _u(6)]), max(m7, values[k + _u(7)])
            k += _u(8)
        while k < end:
            m0 = max(m0, values[k])
            k += _u(1)
        return max(max(max(m0, m1), max(m2, m3)), max(max(m4, m5), max(m6, m7)))

    @_jit
    def _max_fwd_cl(lo, hi, x, out, idx, sd, ed, sh, eh, sw, ew):
        # Per output position, the window scanned in row-major order, per channel: (v > best) or isnan(v).
        od, oh, ow, channels = _u(out.shape[1]), _u(out.shape[2]), _u(out.shape[3]), _u(out.shape[4])
        height, width = _u(x.shape[2]), _u(x.shape[3])
        best = np.empty(out.shape[4], out.dtype)
        pos = np.empty(out.shape[4], np.int32)  # same lane width as float32: the selects vectorise
        for t in range(_u(lo), _u(hi)):
            i, b = t // oh, t % oh
            i, a = i // od, i % od
            for c in range(ow):
                first = np.int32((sd[a] * height + sh[b]) * width + sw[c])
                for k in range(channels):
                    best[k] = x[i, sd[a], sh[b], sw[c], k]
                    pos[k] = first
                for d in range(sd[a], ed[a]):
                    for h in range(sh[b], eh[b]):
                        for w in range(sw[c], ew[c]):
                            f = np.int32((d * height + h) * width + w)
                            for k in range(channels):
                                v = x[i, d, h, w, k]
                                take = (v > best[k]) | (v != v)
                                best[k] = v if take else best[k]
                                pos[k] = f if take else pos[k]
                for k in range(channels):
                    out[i, a, b, c, k] = best[k]
                    idx[i, a, b, c, k] = pos[k]

    @_jit_sum
    def _avg_bwd_planar(lo, hi, g, gin, sd, ed, sh, eh, sw, ew, cfd, ced, cfh, ceh, cfw, cew):
        # Per input row: the covering output rows, each scaled by its window size, spread over each window's span.
        # Rows (and D-slices) covered by the same outputs are equal: copied, not recomputed.
        depth, height, width, ow = _u(gin.shape[1]), _u(gin.shape[2]), _u(gin.shape[3]), _u(g.shape[3])
        acc = np.empty(g.shape[3], gin.dtype)
        scale = np.empty(1, gin.dtype)
        inv_w = np.empty(g.shape[3], gin.dtype)
        for c in range(ow):
            inv_w[c] = 1.0 / (ew[c] - sw[c])
        for p in range(_u(lo), _u(hi)):
            for d in range(depth):
                if d > 0 and cfd[d] == cfd[d - 1] and ced[d] == ced[d - 1]:
                    for h in range(height):
                        for w in range(width):
                            gin[p, d, h, w] = gin[p, d - 1, h, w]
                    continue
                for h in range(height):
                    if h > 0 and cfh[h] == cfh[h - 1] and ceh[h] == ceh[h - 1]:
                        for w in range(width):
                            gin[p, d, h, w] = gin[p, d, h - 1, w]
                        continue
                    for c in range(ow):
                        acc[c] = 0
                    for a in range(cfd[d], ced[d]):
                        for b in range(cfh[h], ceh[h]):
                            scale[0] = 1.0 / ((ed[a] - sd[a]) * (eh[b] - sh[b]))
                            for c in range(ow):
                                acc[c] += g[p, a, b, c] * scale[0] * inv_w[c]
                    for w in range(width):
                        gin[p, d, h, w] = 0
                    for c in range(ow):  # in output order, so an overlap sums in a fixed order
                        for w in range(sw[c], ew[c]):
                            gin[p, d, h, w] += acc[c]

    @_jit_sum
    def _avg_bwd_cl(lo, hi, g, gin, sd, ed, sh, eh, sw, ew, cfd, ced, cfh, ceh, cfw, cew):
        # Per input position: the covering outputs' channel vectors, each scaled by its window size.
        depth, height, width, channels = _u(gin.shape[1]), _u(gin.shape[2]), _u(gin.shape[3]), _u(gin.shape[4])
        scale = np.empty(1, gin.dtype)
        for t in range(_u(lo), _u(hi)):
            i, h = t // height, t % height
            i, d = i // depth, i % depth
            for w in range(width):
                for k in range(channels):
                    gin[i, d, h, w, k] = 0
                for a in range(cfd[d], ced[d]):
                    for b in range(cfh[h], ceh[h]):
                        for c in range(cfw[w], cew[w]):
                            scale[0] = 1.0 / ((ed[a] - sd[a]) * (eh[b] - sh[b]) * (ew[c] - sw[c]))
                            for k in range(channels):
                                gin[i, d, h, w, k] += g[i, a, b, c, k] * scale[0]

    @_jit
    def _max_bwd_planar(lo, hi, g, idx, gin, sd, ed, sh, eh, sw, ew, cfd, ced, cfh, ceh, cfw, cew):
        # Per input row: only the covering output rows can route a gradient into it; scanned in output order.
        depth, height, width, ow = _u(gin.shape[1]), _u(gin.shape[2]), _u(gin.shape[3]), _u(g.shape[3])
        for p in range(_u(lo), _u(hi)):
            for d in range(depth):
                for h in range(height):
                    for w in range(width):
                        gin[p, d, h, w] = 0
                    first = (d * height + h) * width
                    for a in range(cfd[d], ced[d]):
                        for b in range(cfh[h], ceh[h]):
                            for c in range(ow):
                                f = _u(idx[p, a, b, c]) - first  # wraps to a huge value below the row
                                if f < width:
                                    gin[p, d, h, f] += g[p, a, b, c]

    @_jit
    def _max_bwd_cl(lo, hi, g, idx, gin, sd, ed, sh, eh, sw, ew, cfd, ced, cfh, ceh, cfw, cew):
        # Per input position: the covering outputs whose argmax it is, per channel, in output order.
        depth, height, width, channels = _u(gin.shape[1]), _u(gin.shape[2]), _u(gin.shape[3]), _u(gin.shape[4])
        for t in range(_u(lo), _u(hi)):
            i, h = t // height, t % height
            i, d = i // depth, i % depth
            for w in range(width):
                f = np.int64((d * height + h) * width + w)
                for k in range(channels):
                    gin[i, d, h, w, k] = 0
                for a in range(cfd[d], ced[d]):
                    for b in range(cfh[h], ceh[h]):
                        for c in range(cfw[w], cew[w]):
                            for k in range(channels):
                                gin[i, d, h, w, k] += g[i, a, b, c, k] if idx[i, a, b, c, k] == f else 0
