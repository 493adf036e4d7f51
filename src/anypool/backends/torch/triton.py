"""Triton GPU kernels: adaptive avg/max pooling forward and a deterministic, atomic-free backward.

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

Spatial rank 1 and 2 run as rank 3 with leading length-1 axes.  Offsets are int32
unless a tensor spans 2**30 elements or an ``L * O`` product reaches 2**30 (masked
lanes may index up to twice past the end), then int64 (the ``INT64`` specialisation).
"""

from __future__ import annotations

import torch

from ... import _args, _bins

try:
    import triton
    import triton.language as tl
except ImportError:  # the portable torch path is used instead
    triton = None

__all__ = ["supports", "avg_forward", "avg_backward", "max_forward", "max_backward"]

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
    def _pool_fwd_kernel(
        x_ptr, y_ptr, i_ptr,
        N, C, D, H, W, OD, OH, OW,
        sxn, sxc, sxd, sxh, sxw,
        syn, syc, syd, syh, syw,
        KW,
        IS_MAX: tl.constexpr, WITH_INDEX: tl.constexpr,
        BLOCK_O: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
        CL: tl.constexpr, WA: tl.constexpr, GRID_Y: tl.constexpr, INT64: tl.constexpr,
    ):
        """One program: one output row (od, oh) x BLOCK_O outputs along the width x BLOCK_C channels.

        The row's depth and height windows are scalars, walked exactly; the width
        windows are walked in BLOCK_W-wide tiles (so windows of any length work).
        Each lane keeps its own running sum or (max, position), combined once at the end.
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
        d0 = _start(od, D, OD)
        d1 = _end(od, D, OD)
        h0 = _start(oh, H, OH)
        h1 = _end(oh, H, OH)
        w0 = _start(o, W, OW)
        w1 = _end(o, W, OW)
        mask_oc = (o < tl.where(n < N, OW, 0)) & (c < C)  # spare batch-split programs do nothing
        x_base = x_ptr + n * sxn + c * sxc
        if IS_MAX:
            none = D * H * W + 0 * n  # "no position yet": after every real one (int64 with n)
            best = acc + float("-inf")
            at = acc.to(none.dtype) + none
        for d in range(d0, d1):
            for h in range(h0, h1):
                row_ptr = x_base + d * sxd + h * sxh
                for k0 in range(0, KW, BLOCK_W):
                    w = w0 + k0 + kw
                    m = mask_oc & (w < w1)
                    v = tl.load(row_ptr + w * sxw, mask=m, other=0.0).to(tl.float32)
                    if IS_MAX:
                        # PyTorch's rule, lane by lane in row-major order: a larger value
                        # or any NaN replaces; an equal value keeps the earlier position.
                        take = m & ((v > best) | (v != v) | (at == none))
                        best = tl.where(take, v, best)
                        at = tl.where(take, (d * H + h) * W + w, at)
                    else:
                        acc += v
        y_off = n * syn + c * syc + od * syd + oh * syh + o * syw
        if IS_MAX:
            # Combine the lanes: each holds its first maximum or its last NaN, so the
            # window's answer is the smallest position among the lanes at the maximum,
            # or the largest position among the NaN lanes.
            is_nan = best != best
            has_nan = tl.max(is_nan.to(tl.int32), axis=WA, keep_dims=True) > 0
            last_nan = tl.max(tl.where(is_nan, at, -1), axis=WA, keep_dims=True)
            top = tl.max(tl.where(is_nan | (at == none), float("-inf"), best), axis=WA, keep_dims=True)
            first = tl.min(tl.where(~is_nan & (at != none) & (best == top), at, none), axis=WA, keep_dims=True)
            value = tl.where(has_nan, float("nan"), top)
            tl.store(y_ptr + y_off, _rounded(value, y_ptr.dtype.element_ty), mask=mask_oc)
            if WITH_INDEX:
                tl.store(i_ptr + y_off, tl.where(has_nan, last_nan, first).to(tl.int64), mask=mask_oc)
        else:
            count = ((d1 - d0) * (h1 - h0) * (w1 - w0)).to(tl.float32)
            mean = tl.sum(acc, axis=WA, keep_dims=True) / count
            tl.store(y_ptr + y_off, _rounded(mean, y_ptr.dtype.element_ty), mask=mask_oc)

    @triton.jit
    def _pool_bwd_kernel(
        g_ptr, i_ptr, dx_ptr,
        N, C, D, H, W, OD, OH, OW,
        sgn, sgc, sgd, sgh, sgw,
        sin, sic, sid, sih, siw,
        sdn, sdc, sdd, sdh, sdw,
        CW,
        IS_MAX: tl.constexpr,
        BLOCK_I: tl.constexpr, BLOCK_C: tl.constexpr,
        CL: tl.constexpr, GRID_Y: tl.constexpr, INT64: tl.constexpr,
    ):
        """One program: one input row (id, ih) x BLOCK_I inputs along the width x BLOCK_C channels.

        Gather: each input visits the outputs covering it in row-major order (the
        row's depth and height ranges are scalars, at most CW outputs along the width)
        and adds ``g / window size`` (avg) or ``g`` where the output's argmax is this
        input (max).  No atomics, a fixed order: bitwise reproducible.
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
        fw = _cover_first(i, W, OW)
        lw = _cover_last(i, W, OW)
        mask_ic = (i < tl.where(n < N, W, 0)) & (c < C)
        g_base = g_ptr + n * sgn + c * sgc
        i_base = i_ptr + n * sin + c * sic
        here = (di * H + hi) * W + i  # flat spatial position, what max's indices hold
        for od in range(_cover_first(di, D, OD), _cover_last(di, D, OD) + 1):
            size_d = _end(od, D, OD) - _start(od, D, OD)
            for oh in range(_cover_first(hi, H, OH), _cover_last(hi, H, OH) + 1):
                size_dh = size_d * (_end(oh, H, OH) - _start(oh, H, OH))
                g_row = g_base + od * sgd + oh * sgh
                i_row = i_base + od * sid + oh * sih
                for t in range(0, CW):
                    ow = fw + t
                    m = mask_ic & (ow <= lw)
                    g = tl.load(g_row + ow * sgw, mask=m, other=0.0).to(tl.float32)
                    if IS_MAX:
                        arg = tl.load(i_row + ow * siw, mask=m, other=-1)
                        acc += tl.where(arg == here, g, 0.0)
                    else:
                        acc += g / (size_dh * (_end(ow, W, OW) - _start(ow, W, OW))).to(tl.float32)
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


def avg_forward(x: torch.Tensor, output_size) -> torch.Tensor:
    """Adaptive average pool of ``x`` ``(N, C, *S)`` to ``(N, C, *output_size)``, in ``x``'s layout."""
    return _forward(x, output_size, is_max=False, with_index=False)[0]


def max_forward(x: torch.Tensor, output_size) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive max pool of ``x``: ``(values, indices)``, indices int64 flat offsets into ``S``."""
    return _forward(x, output_size, is_max=True, with_index=True)


def avg_backward(grad_out: torch.Tensor, input_size) -> torch.Tensor:
    """Gradient of :func:`avg_forward` for an input of spatial size ``input_size``: ``(N, C, *input_size)``."""
    return _backward(grad_out, None, input_size)


def max_backward(grad_out: torch.Tensor, indices: torch.Tensor, input_size) -> torch.Tensor:
    """Gradient of :func:`max_forward`: each ``grad_out`` element lands on its argmax."""
    return _backward(grad_out, indices, input_size)


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


def _geometry(inputs: list[torch.Tensor], outputs: list[torch.Tensor]):
    """Spatial sizes and strides as rank 3: ``(sizes_in, sizes_out, strides per tensor)``.

    Rank 1 and 2 get leading length-1 axes.  Trailing axes pooled to 1 whose input
    memory is contiguous (``stride_h == W * stride_w``) are merged into one width
    axis: a global window over them is the same window, its row-major positions the
    same flat offsets, and the kernels then walk it in long contiguous tiles.
    """
    pad = 5 - inputs[0].dim()
    size_in = [1] * pad + list(inputs[0].shape[2:])
    size_out = [1] * pad + list(outputs[0].shape[2:])
    strides = [[0] * pad + list(t.stride()[2:]) for t in inputs + outputs]
    for a in (1, 0):
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


def _forward(x: torch.Tensor, output_size, is_max: bool, with_index: bool):
    n, c = x.shape[:2]
    out = tuple(_args.normalize_output_size(output_size, tuple(x.shape[2:])))
    cl = _channels_inner(x)
    y = _empty((n, c, *out), x, cl)
    idx = _empty((n, c, *out), x, cl, torch.int64) if with_index else None
    if y.numel() == 0:
        return y, idx
    (D, H, W), (OD, OH, OW), (sx, sy) = _geometry([x], [y])
    KW = _bins.max_window(W, OW)
    # tile axes (outputs along the width, window, channels); contiguous axis first
    bo, bw, bc = _blocks((OW, KW, c), (2, 1, 0) if cl else (1, 0, 2))
    programs = triton.cdiv(OW, bo) * OD * OH * triton.cdiv(c, bc)
    _launch(_pool_fwd_kernel, _grid(programs, n),
            x, y, idx if with_index else y,
            n, c, D, H, W, OD, OH, OW,
            x.stride(0), x.stride(1), *sx,
            y.stride(0), y.stride(1), *sy,
            KW,
            IS_MAX=is_max, WITH_INDEX=with_index, BLOCK_O=bo, BLOCK_W=bw, BLOCK_C=bc,
            CL=cl, WA=1 if cl else 2, GRID_Y=_GRID_Y, INT64=_needs_int64((x, y), (D, H, W), (OD, OH, OW)),
            num_warps=_num_warps(bo * bw * bc))
    return y, idx


def _backward(grad_out: torch.Tensor, indices, input_size) -> torch.Tensor:
    n, c = grad_out.shape[:2]
    size = _args.input_size_tuple(input_size)
    cl = _channels_inner(grad_out)
    dx = _empty((n, c, *size), grad_out, cl)
    if grad_out.numel() == 0:
        return dx.zero_()
    ind = grad_out if indices is None else indices
    (D, H, W), (OD, OH, OW), (sd, sg, si) = _geometry([dx], [grad_out, ind])
    bi, bc = _blocks((W, c), (1, 0) if cl else (0, 1))
    programs = triton.cdiv(W, bi) * D * H * triton.cdiv(c, bc)
    _launch(_pool_bwd_kernel, _grid(programs, n),
            grad_out, ind, dx,
            n, c, D, H, W, OD, OH, OW,
            grad_out.stride(0), grad_out.stride(1), *sg,
            ind.stride(0), ind.stride(1), *si,
            dx.stride(0), dx.stride(1), *sd,
            _bins.max_cover(W, OW),
            IS_MAX=indices is not None, BLOCK_I=bi, BLOCK_C=bc,
            CL=cl, GRID_Y=_GRID_Y, INT64=_needs_int64((grad_out, ind, dx), (D, H, W), (OD, OH, OW)),
            num_warps=_num_warps(bi * bc))
    return dx
