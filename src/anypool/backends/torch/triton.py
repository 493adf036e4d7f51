"""Triton GPU kernels: adaptive avg/max, LP, GeM and avgmax pooling forward and a deterministic,
atomic-free backward (one generic kernel each way, specialised by constexpr flags).

Every function works on a *logical* batched channels-first tensor ``x`` of shape
``(N, C, *S)``, ``len(S)`` in 1..3, with arbitrary strides: NCHW-contiguous,
channels_last-strided (a ``movedim`` of an ``(N, *S, C)`` tensor) or any other view.
Nothing is copied to another layout; outputs are allocated in the input's layout
(channels innermost when ``C`` has the smallest stride, else contiguous NC*S).

Windows are PyTorch's, per spatial axis of input length ``L`` and output length ``O``::

    start(j) = (j * L) // O          end(j) = ((j + 1) * L + O - 1) // O

and the backward is a gather: input ``i`` adds up the outputs ``j`` covering it,
``(i * O) // L <= j <= ((i + 1) * O - 1) // L``, in a fixed order, so it is bitwise
reproducible (no atomics).  Sums accumulate in float32 for float16/bfloat16/float32.
Max: NaN propagates, ties keep the first row-major position, a window holding NaN
reports its last NaN; indices are int64 flat offsets into the spatial plane.
LP/GeM scale each window by its largest term (no float32 overflow for a large ``p``); GeM's
dL/dp is summed per output in float64 on the host.  With ``sizes`` (padded batches) each
sample's windows come from its own lengths, read in the kernel (no per-sample loop).

Spatial rank 1 and 2 run as rank 3 with leading length-1 axes.  Offsets are int32
unless a tensor spans 2**30 elements or an ``L * O`` product reaches 2**30 (masked
lanes may index up to twice past the end), then int64 (the ``INT64`` specialisation).
"""

from __future__ import annotations

import math

import torch

from ... import _args, _bins

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # the portable torch path is used instead
    triton = None

__all__ = ["supports", "avg_forward", "avg_backward", "max_forward", "max_backward", "lp_forward", "lp_backward",
           "gem_forward", "gem_backward", "avgmax_forward", "avgmax_backward"]

VALID_SIZES = True  # the kernels take per-sample sizes (see ops.py, "padded batches")

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Elements in one program's tile.  Memory-bound kernels: big enough to keep
# 4 warps' loads in flight, small enough that max pooling's per-lane state
# (value + index) stays in registers.
_TILE = 2048
_NUM_WARPS = 4
_GRID_Y = 65535  # CUDA's limit on grid dims 1 and 2; the batch is split over both
# int64 offsets from 2**30 elements on: masked lanes of a tile can index up to twice past the end
_INT32_LIMIT = 2**30
_FORCE_INT64 = False  # tests set this to run the int64-offset specialisation on small tensors


if triton is not None:

    # --- Device copies of anypool._bins' window formulas --------------------------------
    # _bins.start_expr & co. cannot be called from @triton.jit code (their annotations
    # are not constexpr and the interpreter needs `tl` in the function's globals), so
    # these are the exact same expressions; tests/triton checks they agree with _bins.
    # All operands are non-negative, where Triton's truncating `//` equals floor division.

    @triton.jit
    def _start(j, length, out):
        return (j * length) // out

    @triton.jit
    def _end(j, length, out):
        return ((j + 1) * length + out - 1) // out

    @triton.jit
    def _cover_first(i, length, out):
        return (i * out) // length

    @triton.jit
    def _cover_last(i, length, out):
        return ((i + 1) * out - 1) // length

    @triton.jit
    def _rounded(v, dtype: tl.constexpr):
        """float32 ``v`` rounded to nearest even in ``dtype``.  bfloat16 is rounded here, in the
        bits: the compiled cast already rounds so, but the interpreter's cast truncates."""
        if dtype == tl.bfloat16:
            bits = v.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            v = tl.where(v != v, v, bits.to(tl.float32, bitcast=True))  # a NaN stays NaN
        return v.to(dtype)

    @triton.jit
    def _power(u, e, sign, IP: tl.constexpr, LIBDEVICE: tl.constexpr):
        """``u ** e`` as C's ``pow``.  ``IP`` in 0..4: ``e`` is that integer (products, exact);
        -1: any ``e``.  The interpreter has no libdevice, so there ``|u| ** e`` is ``exp2(e·log2|u|)``
        times ``sign`` for a negative ``u`` (1 / -1 for an even / odd integer ``e``, else NaN)."""
        if IP == 0:
            r = u * 0.0 + 1.0
        elif IP == 1:
            r = u
        elif IP == 2:
            r = u * u
        elif IP == 3:
            r = u * u * u
        elif IP == 4:
            r = (u * u) * (u * u)
        elif LIBDEVICE:
            r = libdevice.pow(u, e)
        else:
            r = tl.exp2(e * tl.log2(tl.abs(u)))
            r = tl.where(u < 0, r * sign, r)
        return r

    @triton.jit
    def _sample_sizes(s_ptr, n, N, D, H, W, OD, OH, OW, HAS_SIZES: tl.constexpr):
        """Sample ``n``'s valid input lengths and output lengths (rank 3), or the padded ones."""
        if HAS_SIZES:  # rows of 6: (D, H, W) then (OD, OH, OW), padded with 1s on the host
            ok = n < N
            row = s_ptr + n * 6
            LD = tl.load(row + 0, mask=ok, other=1).to(n.dtype)
            LH = tl.load(row + 1, mask=ok, other=1).to(n.dtype)
            LW = tl.load(row + 2, mask=ok, other=1).to(n.dtype)
            VD = tl.load(row + 3, mask=ok, other=1).to(n.dtype)
            VH = tl.load(row + 4, mask=ok, other=1).to(n.dtype)
            VW = tl.load(row + 5, mask=ok, other=1).to(n.dtype)
        else:
            LD, LH, LW, VD, VH, VW = D + 0 * n, H + 0 * n, W + 0 * n, OD + 0 * n, OH + 0 * n, OW + 0 * n
        return LD, LH, LW, VD, VH, VW

    @triton.jit
    def _pool_fwd_kernel(
        x_ptr, y_ptr, y2_ptr, i_ptr, g_ptr, s_ptr,
        N, C, D, H, W, OD, OH, OW,
        sxn, sxc, sxd, sxh, sxw,
        syn, syc, syd, syh, syw,
        sgn, sgc, sgd, sgh, sgw,
        p, p_sign, root, root_sign, eps,
        SUM: tl.constexpr, MAX: tl.constexpr, POWER: tl.constexpr, WITH_INDEX: tl.constexpr,
        COMBINE: tl.constexpr, GRAD: tl.constexpr, P_GRAD: tl.constexpr, HAS_SIZES: tl.constexpr,
        IP: tl.constexpr, ROOT_IP: tl.constexpr, LIBDEVICE: tl.constexpr,
        BLOCK_O: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
        CL: tl.constexpr, WA: tl.constexpr, GRID_Y: tl.constexpr, INT64: tl.constexpr,
    ):
        """One program: one output row (od, oh) x BLOCK_O outputs along the width x BLOCK_C channels.

        The reduction (constexpr flags; ``y``, ``y2``, ``i`` share one layout):

        * ``SUM``: the mean -> ``y``;  ``MAX``: the max -> ``y``, its position -> ``i``;
        * both (avgmax): ``y`` = the mean, or ``0.5·(mean + max)`` with ``COMBINE``; max -> ``y2``;
        * ``POWER`` 1 (LP, ``Σ t^p``) or 2 (GeM, ``mean max(t, eps)^p``), then ``^(1/p)``: scaled
          by the window's ``m = max |t|`` (a first pass), ``m·(Σ (t/m)^p)^(1/p)``, so a large ``p``
          does not overflow float32; ``m = inf`` keeps only the infinite and NaN terms.  With ``GRAD``,
          for the backward gather instead: ``y`` = ``g·out/(m·T)`` (``T = Σ (t/m)^p``, 0 where
          ``T = 0``), ``y2`` = ``m``, and with ``P_GRAD`` ``i`` = this output's term of dL/dp,
          ``(g·out/p)·(Σ u^p ln u / T - ln(T/n) / p)`` (``n`` = window size; float32 buffers).

        With ``HAS_SIZES`` the windows are those of sample n's own lengths (``s_ptr``) and
        outputs past its own output lengths are 0.  The row's depth and height windows are
        scalars, walked exactly; the width windows in BLOCK_W-wide tiles (any length).
        Each lane keeps its own running state, combined once at the end.
        """
        pid = tl.program_id(0)
        n = tl.program_id(1) + tl.program_id(2) * GRID_Y  # the batch is split over grid axes 1 and 2
        if INT64:  # everything below derives from these, so it is all int64
            pid = pid.to(tl.int64)
            n = n.to(tl.int64)
        n_o = tl.cdiv(OW, BLOCK_O)
        n_c = tl.cdiv(C, BLOCK_C)
        if CL:  # neighbouring programs: neighbouring channel blocks, then outputs
            cb = pid % n_c
            ob = (pid // n_c) % n_o
            row = pid // (n_c * n_o)
        else:  # neighbouring programs: neighbouring outputs along the width, then rows
            ob = pid % n_o
            row = (pid // n_o) % (OD * OH)
            cb = pid // (n_o * OD * OH)
        od = row // OH
        oh = row % OH
        o = ob * BLOCK_O + tl.arange(0, BLOCK_O)
        c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        kw = tl.arange(0, BLOCK_W)
        # The tile's last axis is the memory-contiguous one (Triton spreads a warp's
        # threads along it): (outputs, window, channels) when channels are innermost
        # in memory (CL), else (channels, outputs, window).  WA: the window axis, 1 or 2.
        if CL:
            o = o[:, None, None]
            kw = kw[None, :, None]
            c = c[None, None, :]
            acc = tl.zeros((BLOCK_O, BLOCK_W, BLOCK_C), tl.float32)
        else:
            c = c[:, None, None]
            o = o[None, :, None]
            kw = kw[None, None, :]
            acc = tl.zeros((BLOCK_C, BLOCK_O, BLOCK_W), tl.float32)
        LD, LH, LW, VD, VH, VW = _sample_sizes(s_ptr, n, N, D, H, W, OD, OH, OW, HAS_SIZES)
        live = (od < VD) & (oh < VH)  # this row exists for the sample (else: empty windows, output 0)
        d0 = _start(od, LD, VD)
        d1 = tl.where(live, _end(od, LD, VD), d0)
        h0 = _start(oh, LH, VH)
        h1 = tl.where(live, _end(oh, LH, VH), h0)
        w0 = _start(o, LW, VW)
        w1 = _end(o, LW, VW)
        mask_oc = (o < tl.where(n < N, OW, 0)) & (c < C)  # spare batch-split programs do nothing
        mask_in = mask_oc & (o < tl.where(live, VW, 0))  # the outputs with a window
        k_len = tl.max(tl.where(mask_in, w1 - w0, 0))  # the longest width window in the tile
        x_base = x_ptr + n * sxn + c * sxc
        if MAX:
            none = D * H * W + 0 * n  # "no position yet": after every real one (int64 with n)
            best = acc + float("-inf")
            at = acc.to(none.dtype) + none
        if POWER:  # first pass: the window's scale m (NaN counted apart: it decides alone)
            top = acc
            bad = acc
            for d in range(d0, d1):
                for h in range(h0, h1):
                    row_ptr = x_base + d * sxd + h * sxh
                    for k0 in range(0, k_len, BLOCK_W):
                        w = w0 + k0 + kw
                        m = mask_in & (w < w1)
                        v = tl.load(row_ptr + w * sxw, mask=m, other=0.0).to(tl.float32)
                        t = tl.abs(v)
                        if POWER == 2:
                            t = tl.where(v < eps, eps, v)  # NaN stays NaN
                        top = tl.maximum(top, tl.where(m & (t == t), t, 0.0))
                        bad = tl.maximum(bad, tl.where(m & (t != t), 1.0, 0.0))
            scale = tl.max(top, axis=WA, keep_dims=True)
            has_nan = tl.max(bad, axis=WA, keep_dims=True) > 0
            infinite = (scale == float("inf")) & ~has_nan
            scale = tl.where((scale > 0) & (scale < float("inf")), scale, 1.0)
            logs = acc
        for d in range(d0, d1):
            for h in range(h0, h1):
                row_ptr = x_base + d * sxd + h * sxh
                for k0 in range(0, k_len, BLOCK_W):
                    w = w0 + k0 + kw
                    m = mask_in & (w < w1)
                    v = tl.load(row_ptr + w * sxw, mask=m, other=0.0).to(tl.float32)
                    if MAX:
                        # PyTorch's rule, lane by lane in row-major order: a larger value
                        # or any NaN replaces; an equal value keeps the earlier position.
                        take = m & ((v > best) | (v != v) | (at == none))
                        best = tl.where(take, v, best)
                        at = tl.where(take, (d * H + h) * W + w, at)
                    if SUM:
                        acc += v
                    if POWER:
                        t = v
                        if POWER == 2:
                            t = tl.where(v < eps, eps, v)
                        u = t / scale
                        term = _power(u, p, p_sign, IP, LIBDEVICE)
                        keep = m & ~(infinite & (tl.abs(t) != float("inf")) & (term == term))
                        acc += tl.where(keep, term, 0.0)
                        if P_GRAD:
                            logs += tl.where(keep, term * tl.log(tl.where(keep, u, 1.0)), 0.0)
        y_off = n * syn + c * syc + od * syd + oh * syh + o * syw
        count = tl.where(mask_in, (d1 - d0) * (h1 - h0) * (w1 - w0), 1).to(tl.float32)
        if MAX:
            # Combine the lanes: each holds its first maximum or its last NaN, so the
            # window's answer is the smallest position among the lanes at the maximum,
            # or the largest position among the NaN lanes.
            is_nan = best != best
            nan_window = tl.max(is_nan.to(tl.int32), axis=WA, keep_dims=True) > 0
            last_nan = tl.max(tl.where(is_nan, at, -1), axis=WA, keep_dims=True)
            peak = tl.max(tl.where(is_nan | (at == none), float("-inf"), best), axis=WA, keep_dims=True)
            first = tl.min(tl.where(~is_nan & (at != none) & (best == peak), at, none), axis=WA, keep_dims=True)
            value = tl.where(nan_window, float("nan"), peak)
            index = tl.where(mask_in, tl.where(nan_window, last_nan, first), 0).to(tl.int64)
        if SUM:
            mean = tl.sum(acc, axis=WA, keep_dims=True) / count
        if POWER:
            total = tl.sum(acc, axis=WA, keep_dims=True)
            s = total
            if POWER == 2:
                s = total / count
            result = scale * _power(s, root, root_sign, ROOT_IP, LIBDEVICE)
            if GRAD:
                g = tl.load(g_ptr + n * sgn + c * sgc + od * sgd + oh * sgh + o * sgw, mask=mask_in,
                            other=0.0).to(tl.float32)
                coef = tl.where(total == 0, 0.0, g * result / (scale * total))
                tl.store(y_ptr + y_off, tl.where(mask_in, coef, 0.0), mask=mask_oc)
                tl.store(y2_ptr + y_off, scale, mask=mask_oc)
                if P_GRAD:
                    logs = tl.sum(logs, axis=WA, keep_dims=True)
                    dp = g * result / p * (logs / total - tl.log(s) / p)
                    tl.store(i_ptr + y_off, tl.where(mask_in & (g != 0), dp, 0.0), mask=mask_oc)
            else:
                tl.store(y_ptr + y_off, _rounded(tl.where(mask_in, result, 0.0), y_ptr.dtype.element_ty),
                         mask=mask_oc)
        elif SUM and MAX:
            avg = mean
            if COMBINE:
                avg = 0.5 * (mean + value)
            tl.store(y_ptr + y_off, _rounded(tl.where(mask_in, avg, 0.0), y_ptr.dtype.element_ty), mask=mask_oc)
            tl.store(y2_ptr + y_off, _rounded(tl.where(mask_in, value, 0.0), y2_ptr.dtype.element_ty), mask=mask_oc)
            tl.store(i_ptr + y_off, index, mask=mask_oc)
        elif MAX:
            tl.store(y_ptr + y_off, _rounded(tl.where(mask_in, value, 0.0), y_ptr.dtype.element_ty), mask=mask_oc)
            if WITH_INDEX:
                tl.store(i_ptr + y_off, index, mask=mask_oc)
        else:
            tl.store(y_ptr + y_off, _rounded(tl.where(mask_in, mean, 0.0), y_ptr.dtype.element_ty), mask=mask_oc)

    @triton.jit
    def _pool_bwd_kernel(
        g_ptr, h_ptr, i_ptr, x_ptr, dx_ptr, s_ptr,
        N, C, D, H, W, OD, OH, OW,
        sgn, sgc, sgd, sgh, sgw,
        shn, shc, shd, shh, shw,
        sin, sic, sid, sih, siw,
        sxn, sxc, sxd, sxh, sxw,
        sdn, sdc, sdd, sdh, sdw,
        p1, p1_sign, eps,
        SUM: tl.constexpr, MAX: tl.constexpr, POWER: tl.constexpr, HAS_SIZES: tl.constexpr,
        IP1: tl.constexpr, LIBDEVICE: tl.constexpr,
        BLOCK_I: tl.constexpr, BLOCK_C: tl.constexpr,
        CL: tl.constexpr, GRID_Y: tl.constexpr, INT64: tl.constexpr,
    ):
        """One program: one input row (id, ih) x BLOCK_I inputs along the width x BLOCK_C channels.

        Gather: each input visits the outputs covering it in row-major order (the row's
        depth and height ranges are scalars, the width ones vectors) and adds, per output:
        ``SUM``: ``g / window size``; ``MAX``: ``h`` where the output's argmax ``i`` is this
        input; ``POWER``: ``g · (t/h)^(p-1)`` with ``g``, ``h`` the coefficient and scale
        from :func:`_pool_fwd_kernel` (``GRAD``) and ``t`` this input (``max(x, eps)`` for GeM,
        whose gradient is 0 where ``x < eps``).  With ``HAS_SIZES`` sample n's own windows,
        0 on its padding.  No atomics, a fixed order: bitwise reproducible.
        """
        pid = tl.program_id(0)
        n = tl.program_id(1) + tl.program_id(2) * GRID_Y
        if INT64:
            pid = pid.to(tl.int64)
            n = n.to(tl.int64)
        n_i = tl.cdiv(W, BLOCK_I)
        n_c = tl.cdiv(C, BLOCK_C)
        if CL:
            cb = pid % n_c
            ib = (pid // n_c) % n_i
            row = pid // (n_c * n_i)
        else:
            ib = pid % n_i
            row = (pid // n_i) % (D * H)
            cb = pid // (n_i * D * H)
        di = row // H
        hi = row % H
        i = ib * BLOCK_I + tl.arange(0, BLOCK_I)
        c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        if CL:  # tile (inputs, channels) or (channels, inputs): the contiguous axis last
            i = i[:, None]
            c = c[None, :]
            acc = tl.zeros((BLOCK_I, BLOCK_C), tl.float32)
        else:
            c = c[:, None]
            i = i[None, :]
            acc = tl.zeros((BLOCK_C, BLOCK_I), tl.float32)
        LD, LH, LW, VD, VH, VW = _sample_sizes(s_ptr, n, N, D, H, W, OD, OH, OW, HAS_SIZES)
        live = (di < LD) & (hi < LH)  # this row is in the sample's valid region (else: gradient 0)
        mask_ic = (i < tl.where(n < N, W, 0)) & (c < C)
        mask_in = mask_ic & (i < tl.where(live, LW, 0))
        fw = _cover_first(i, LW, VW)
        lw = _cover_last(i, LW, VW)
        c_len = tl.max(tl.where(mask_in, lw - fw + 1, 0))  # the most outputs covering an input of the tile
        fd = _cover_first(di, LD, VD)
        ld = tl.where(live, _cover_last(di, LD, VD) + 1, fd)
        fh = _cover_first(hi, LH, VH)
        lh = tl.where(live, _cover_last(hi, LH, VH) + 1, fh)
        g_base = g_ptr + n * sgn + c * sgc
        h_base = h_ptr + n * shn + c * shc
        i_base = i_ptr + n * sin + c * sic
        here = (di * H + hi) * W + i  # flat spatial position, what max's indices hold
        if POWER:
            t = tl.load(x_ptr + n * sxn + c * sxc + di * sxd + hi * sxh + i * sxw, mask=mask_in,
                        other=0.0).to(tl.float32)
            x_value = t
            if POWER == 2:
                t = tl.where(t < eps, eps, t)
        for od in range(fd, ld):
            size_d = _end(od, LD, VD) - _start(od, LD, VD)
            for oh in range(fh, lh):
                size_dh = size_d * (_end(oh, LH, VH) - _start(oh, LH, VH))
                g_row = g_base + od * sgd + oh * sgh
                h_row = h_base + od * shd + oh * shh
                i_row = i_base + od * sid + oh * sih
                for k in range(0, c_len):
                    ow = fw + k
                    m = mask_in & (ow <= lw)
                    if SUM:
                        g = tl.load(g_row + ow * sgw, mask=m, other=0.0).to(tl.float32)
                        acc += g / (size_dh * (_end(ow, LW, VW) - _start(ow, LW, VW))).to(tl.float32)
                    if MAX:
                        arg = tl.load(i_row + ow * siw, mask=m, other=-1)
                        gm = tl.load(h_row + ow * shw, mask=m, other=0.0).to(tl.float32)
                        acc += tl.where(arg == here, gm, 0.0)
                    if POWER:
                        coef = tl.load(g_row + ow * sgw, mask=m, other=0.0)
                        scale = tl.load(h_row + ow * shw, mask=m, other=1.0)
                        acc += tl.where(m, coef * _power(t / scale, p1, p1_sign, IP1, LIBDEVICE), 0.0)
        if POWER == 2:  # the clamp passes the gradient where x >= eps (torch.clamp's rule); NaN passes
            acc = tl.where(x_value < eps, 0.0, acc)
        dx_off = n * sdn + c * sdc + di * sdd + hi * sdh + i * sdw
        tl.store(dx_ptr + dx_off, _rounded(acc, dx_ptr.dtype.element_ty), mask=mask_ic)

    _INTERPRETED = not isinstance(_pool_fwd_kernel, triton.runtime.jit.JITFunction)
else:
    _INTERPRETED = False


# --- host side -----------------------------------------------------------------------

def supports(x, output_size) -> bool:
    """Whether these kernels can pool ``x`` (logical ``(N, C, *S)``, ``len(S)`` in 1..3).

    CUDA tensors of float32/float16/bfloat16 when Triton imports; CPU tensors too when
    Triton runs in its interpreter (``TRITON_INTERPRET=1``, for tests).
    """
    if triton is None or not isinstance(x, torch.Tensor) or x.dtype not in _DTYPES or not 3 <= x.dim() <= 5:
        return False
    if any(s < 1 for s in x.shape[2:]):
        return False
    try:
        _args.normalize_output_size(output_size, tuple(x.shape[2:]))
    except (TypeError, ValueError):
        return False
    return x.is_cuda or (_INTERPRETED and x.device.type == "cpu")


def avg_forward(x: torch.Tensor, output_size, sizes: torch.Tensor | None = None) -> torch.Tensor:
    """Adaptive average pool of ``x`` ``(N, C, *S)`` to ``(N, C, *output_size)``, in ``x``'s layout.

    ``sizes`` (int64 ``(N, 2k)``: per sample the valid input, then output lengths) pools each
    sample of a padded batch with its own windows, in the kernel; outputs past a sample's own are 0.
    """
    return _forward(x, output_size, sum_=True, sizes=sizes)[0]


def max_forward(x: torch.Tensor, output_size, sizes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive max pool of ``x``: ``(values, indices)``, indices int64 flat offsets into ``S`` (the padded plane)."""
    y, _, idx = _forward(x, output_size, max_=True, with_index=True, sizes=sizes)
    return y, idx


def avg_backward(grad_out: torch.Tensor, input_size, sizes: torch.Tensor | None = None) -> torch.Tensor:
    """Gradient of :func:`avg_forward` for an input of spatial size ``input_size``: ``(N, C, *input_size)``."""
    return _backward(grad_out, input_size, g=grad_out, sum_=True, sizes=sizes)


def max_backward(grad_out: torch.Tensor, indices: torch.Tensor, input_size,
                 sizes: torch.Tensor | None = None) -> torch.Tensor:
    """Gradient of :func:`max_forward`: each ``grad_out`` element lands on its argmax."""
    return _backward(grad_out, input_size, h=grad_out, indices=indices, max_=True, sizes=sizes)


def lp_forward(x: torch.Tensor, output_size, norm_type: float) -> torch.Tensor:
    """``(Σ_window x^p)^(1/p)``, ``p = norm_type``, scaled by each window's largest ``|x|``."""
    return _forward(x, output_size, power=1, p=_exponent(norm_type))[0]


def lp_backward(grad_out: torch.Tensor, x: torch.Tensor, norm_type: float) -> torch.Tensor:
    """Gradient of :func:`lp_forward` with respect to ``x`` (a gather, deterministic)."""
    return _power_backward(grad_out, x, 1, _exponent(norm_type), 0.0, False)[0]


def gem_forward(x: torch.Tensor, output_size, p: float, eps: float) -> torch.Tensor:
    """``(mean_window max(x, eps)^p)^(1/p)``, scaled by each window's maximum."""
    return _forward(x, output_size, power=2, p=_exponent(p), eps=float(eps))[0]


def gem_backward(grad_out: torch.Tensor, x: torch.Tensor, p: float, eps: float, p_grad: bool):
    """``(grad x, grad p)``: grad p a float64 0-d tensor (``None`` unless ``p_grad``), summed in a fixed order."""
    return _power_backward(grad_out, x, 2, _exponent(p), float(eps), bool(p_grad))


def avgmax_forward(x: torch.Tensor, output_size, combine: bool):
    """``(avg, max, argmax)`` of each window from one pass; with ``combine`` the first is ``0.5·(avg + max)``."""
    return _forward(x, output_size, sum_=True, max_=True, with_index=True, combine=bool(combine))


def avgmax_backward(grad_avg: torch.Tensor, grad_max: torch.Tensor, indices: torch.Tensor, input_size):
    """Avg backward of ``grad_avg`` plus max backward of ``grad_max`` at ``indices``, in one gather."""
    return _backward(grad_avg, input_size, g=grad_avg, h=grad_max, indices=indices, sum_=True, max_=True)


def _power_backward(grad_out, x, power: int, p: float, eps: float, p_grad: bool):
    """LP/GeM backward: per-output coefficients (one pass over the windows), then the gather."""
    if grad_out.shape[:2] != x.shape[:2] or grad_out.dim() != x.dim() or grad_out.dtype != x.dtype:
        raise ValueError(f"anypool triton: grad_out {tuple(grad_out.shape)} {grad_out.dtype} must match x "
                         f"{tuple(x.shape)} {x.dtype} in batch, channels, rank and dtype")
    coef, scale, dp = _forward(x, grad_out.shape[2:], power=power, p=p, eps=eps, grad=grad_out, p_grad=p_grad)
    gin = _backward(x, x.shape[2:], g=coef, h=scale, x=x, power=power, p=p, eps=eps)
    return gin, (dp.double().sum() if p_grad else None)  # a fixed order: torch's sum is deterministic


def _exponent(p) -> float:
    p = float(p)
    if not (p > 0 and math.isfinite(p)):
        raise ValueError(f"anypool triton: the exponent must be positive and finite, got {p}")
    return p


def _small(e: float) -> int:
    """``e`` as the IP of ``_power``: itself when an integer 0..4 (products), else -1 (``pow``)."""
    return int(e) if e in (0.0, 1.0, 2.0, 3.0, 4.0) else -1


def _sign(e: float) -> float:
    """What ``pow(-a, e)`` is times ``a ** e``: ±1 for an even/odd integer ``e``, NaN otherwise (C's pow)."""
    if e != int(e):
        return float("nan")
    return -1.0 if int(e) % 2 else 1.0


def _sizes6(sizes: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(N, 2k)`` sizes as ``(N, 6)`` int64 on ``like``'s device, rank 3 (leading axes of length 1)."""
    s = sizes.to(device=like.device, dtype=torch.int64)
    k = like.dim() - 2
    if s.dim() != 2 or s.shape[0] != like.shape[0] or s.shape[1] != 2 * k:
        raise ValueError(f"anypool triton: sizes must be (N, 2k) = ({like.shape[0]}, {2 * k}), got {tuple(s.shape)}")
    ones = s.new_ones((s.shape[0], 3 - k))
    return torch.cat([ones, s[:, :k], ones, s[:, k:]], dim=1).contiguous()


def _channels_inner(t: torch.Tensor) -> bool:
    """Whether ``C`` varies faster in memory than every spatial axis longer than 1.

    Ties (stride-0 expanded gradients, all-1 spatial sizes) count as channels first.
    """
    spatial = [t.stride(a) for a in range(2, t.dim()) if t.shape[a] > 1]
    return t.shape[1] > 1 and bool(spatial) and t.stride(1) < min(spatial)


def _empty(shape, like: torch.Tensor, channels_inner: bool, dtype=None) -> torch.Tensor:
    """A new ``(N, C, *S)`` tensor, stored ``(N, *S, C)`` when ``channels_inner``."""
    dtype = dtype or like.dtype
    if not channels_inner:
        return torch.empty(shape, dtype=dtype, device=like.device)
    stored = torch.empty((shape[0], *shape[2:], shape[1]), dtype=dtype, device=like.device)
    return stored.movedim(-1, 1)


def _geometry(inputs: list[torch.Tensor], outputs: list[torch.Tensor], merge: bool = True):
    """Spatial sizes and strides as rank 3: ``(sizes_in, sizes_out, strides per tensor)``.

    Rank 1 and 2 get leading length-1 axes.  Trailing axes pooled to 1 whose input
    memory is contiguous (``stride_h == W * stride_w``) are merged into one width
    axis: a global window over them is the same window, its row-major positions the
    same flat offsets, and the kernels then walk it in long contiguous tiles.  Not with
    per-sample sizes (``merge`` False): a sample's valid region is not a prefix of the plane.
    """
    pad = 5 - inputs[0].dim()
    size_in = [1] * pad + list(inputs[0].shape[2:])
    size_out = [1] * pad + list(outputs[0].shape[2:])
    strides = [[0] * pad + list(t.stride()[2:]) for t in inputs + outputs]
    for a in (1, 0) if merge else ():
        if size_out[a] == size_out[2] == 1 and size_in[a + 1:2] == [1] * (1 - a) and \
                all(st[a] == size_in[2] * st[2] for st in strides[:len(inputs)]):
            size_in[2] *= size_in[a]
            size_in[a] = 1
    return size_in, size_out, strides


def _span(t: torch.Tensor) -> int:
    """Elements between the first and one past the last addressed element."""
    return 1 + sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()))


def _needs_int64(tensors, size_in, size_out) -> bool:
    return _FORCE_INT64 or any(_span(t) >= _INT32_LIMIT for t in tensors) or \
        any((L + 1) * (O + 1) >= _INT32_LIMIT for L, O in zip(size_in, size_out))


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _blocks(sizes, order) -> tuple[int, ...]:
    """Split the tile among the axes ``sizes``, giving it to the axes in ``order`` first.

    The contiguous axis comes first so loads are coalesced and long; the others take
    what is left.
    """
    blocks, left = [1] * len(sizes), _TILE
    for a in order:
        blocks[a] = min(_pow2(sizes[a]), left)
        left //= blocks[a]
    return tuple(blocks)


def _num_warps(tile: int) -> int:
    return max(1, min(_NUM_WARPS, tile // 256))


def _launch(kernel, grid, *args, **meta):
    """Every launch goes through here (tests compile the same launches for a GPU target)."""
    if args[0].is_cuda:  # Triton launches on the current device
        with torch.cuda.device(args[0].device):
            kernel[grid](*args, **meta)
    else:
        kernel[grid](*args, **meta)


def _grid(programs: int, n: int) -> tuple[int, int, int]:
    return (programs, min(n, _GRID_Y), triton.cdiv(n, _GRID_Y))


def _forward(x: torch.Tensor, output_size, *, sum_=False, max_=False, power=0, with_index=False, combine=False,
             sizes=None, p=1.0, eps=0.0, grad=None, p_grad=False):
    """Launch :func:`_pool_fwd_kernel`: ``(y, y2, i)`` as described there (``None`` where unused)."""
    n, c = x.shape[:2]
    out = tuple(_args.normalize_output_size(output_size, tuple(x.shape[2:])))
    cl = _channels_inner(x)
    coefficients = grad is not None
    y = _empty((n, c, *out), x, cl, torch.float32 if coefficients else None)
    y2 = _empty((n, c, *out), x, cl, torch.float32 if coefficients else None) if (sum_ and max_) or coefficients \
        else None
    idx = _empty((n, c, *out), x, cl, torch.int64) if with_index else \
        _empty((n, c, *out), x, cl, torch.float32) if p_grad else None
    if y.numel() == 0:
        return y, y2, idx
    g = grad if coefficients else y
    (D, H, W), (OD, OH, OW), (sx, sy, sg) = _geometry([x], [y, g], merge=sizes is None)
    # the tile's window width: the padded plane's windows (a sample's own take as many tiles as they need)
    KW = _bins.max_window(W, OW)
    # tile axes (outputs along the width, window, channels); contiguous axis first
    bo, bw, bc = _blocks((OW, KW, c), (2, 1, 0) if cl else (1, 0, 2))
    programs = triton.cdiv(OW, bo) * OD * OH * triton.cdiv(c, bc)
    root = 1.0 / p
    _launch(_pool_fwd_kernel, _grid(programs, n),
            x, y, y if y2 is None else y2, y if idx is None else idx, g,
            y if sizes is None else _sizes6(sizes, x),
            n, c, D, H, W, OD, OH, OW,
            x.stride(0), x.stride(1), *sx,
            y.stride(0), y.stride(1), *sy,
            g.stride(0), g.stride(1), *sg,
            p, _sign(p), root, _sign(root), eps,
            SUM=sum_, MAX=max_, POWER=power, WITH_INDEX=with_index, COMBINE=combine, GRAD=coefficients,
            P_GRAD=p_grad, HAS_SIZES=sizes is not None, IP=_small(p), ROOT_IP=_small(root),
            LIBDEVICE=not _INTERPRETED, BLOCK_O=bo, BLOCK_W=bw, BLOCK_C=bc,
            CL=cl, WA=1 if cl else 2, GRID_Y=_GRID_Y, INT64=_needs_int64((x, y, g), (D, H, W), (OD, OH, OW)),
            num_warps=_num_warps(bo * bw * bc))
    return y, y2, idx


def _backward(like: torch.Tensor, input_size, *, g=None, h=None, indices=None, x=None, sum_=False, max_=False,
              power=0, sizes=None, p=1.0, eps=0.0) -> torch.Tensor:
    """Launch :func:`_pool_bwd_kernel`: the gradient ``(N, C, *input_size)`` in ``like``'s layout."""
    n, c = like.shape[:2]
    size = _args.input_size_tuple(input_size)
    cl = _channels_inner(like)
    dx = _empty((n, c, *size), like, cl, x.dtype if x is not None else None)
    g = h if g is None else g
    h = g if h is None else h
    ind = g if indices is None else indices
    if g.numel() == 0:
        return dx.zero_()
    xs = dx if x is None else x
    (D, H, W), (OD, OH, OW), (sd, sx, sg, sh, si) = _geometry([dx, xs], [g, h, ind], merge=sizes is None)
    bi, bc = _blocks((W, c), (1, 0) if cl else (0, 1))
    programs = triton.cdiv(W, bi) * D * H * triton.cdiv(c, bc)
    _launch(_pool_bwd_kernel, _grid(programs, n),
            g, h, ind, xs, dx, dx if sizes is None else _sizes6(sizes, dx),
            n, c, D, H, W, OD, OH, OW,
            g.stride(0), g.stride(1), *sg,
            h.stride(0), h.stride(1), *sh,
            ind.stride(0), ind.stride(1), *si,
            xs.stride(0), xs.stride(1), *sx,
            dx.stride(0), dx.stride(1), *sd,
            p - 1.0, _sign(p - 1.0), eps,
            SUM=sum_, MAX=max_, POWER=power, HAS_SIZES=sizes is not None, IP1=_small(p - 1.0),
            LIBDEVICE=not _INTERPRETED, BLOCK_I=bi, BLOCK_C=bc,
            CL=cl, GRID_Y=_GRID_Y, INT64=_needs_int64((g, h, ind, xs, dx), (D, H, W), (OD, OH, OW)),
            num_warps=_num_warps(bi * bc))
    return dx
