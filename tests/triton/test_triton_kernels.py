"""The Triton kernels against the NumPy reference.

Runs the kernels on CPU tensors under ``TRITON_INTERPRET=1`` (how ``make test`` runs
this directory) or, without the interpreter, on CUDA when a GPU is present.  Every
kernel variant: avg/max, LP/GeM (with dL/dp), avgmax forward and backward, per-sample
sizes (padded batches), spatial rank 1/2/3, NCHW,
channels_last and arbitrary strides, float32/float16/bfloat16, NaN/inf, ties,
upsampling, size-1 axes, windows longer than a tile, int32 and int64 offsets.
"""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from anypool import _args, _bins, _harness  # noqa: E402
from anypool._harness import Case  # noqa: E402
from anypool.backends import numpy as reference  # noqa: E402
from anypool.backends.torch import triton as tk  # noqa: E402

if tk._INTERPRETED:
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    pytest.skip("Triton kernels need TRITON_INTERPRET=1 or a CUDA GPU", allow_module_level=True)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ---------------------------------------------------------------- helpers

def _logical(case: Case, x: np.ndarray) -> torch.Tensor:
    """The case's input as a logical (N, C, *S) tensor; channels_last cases keep their strides."""
    t = torch.from_numpy(x).to(DTYPES[case.dtype]).to(DEVICE)
    spec = case.spec
    if spec.channels_last:
        t = t.movedim(-1, 1 if spec.batched else 0)
    return t if spec.batched else t.unsqueeze(0)


def _restore(case: Case, t: torch.Tensor) -> np.ndarray:
    """Inverse of :func:`_logical` for a result, as NumPy (bfloat16 -> float32)."""
    spec = case.spec
    if not spec.batched:
        t = t.squeeze(0)
    if spec.channels_last:
        t = t.movedim(1 if spec.batched else 0, -1)
    t = t.cpu()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def _relayout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same logical values with other strides: ``nchw``, ``cl`` (channels innermost)
    or ``strided`` (every axis a step-2 view into a larger buffer, with a storage offset)."""
    if layout == "nchw":
        return t.contiguous()
    if layout == "cl":
        return t.movedim(1, -1).contiguous().movedim(-1, 1)
    fill = float("nan") if t.is_floating_point() else -7
    big = torch.full([2 * s + 1 for s in t.shape], fill, dtype=t.dtype, device=t.device)
    view = big[tuple(slice(1, None, 2) for _ in t.shape)]
    view.copy_(t)
    return view


def _random(shape, dtype: str, seed: int) -> torch.Tensor:
    """A gradient of ``dtype`` whose values are exact in that dtype."""
    g = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3
    return g.to(DTYPES[dtype]).to(DEVICE)


def _check_grad(got: torch.Tensor, want: _harness.Accumulated, dtype: str, what: str) -> None:
    """Accumulated in float32, rounded once to ``dtype`` (see ``_harness.Accumulated``)."""
    got = got.cpu().float().double().numpy()
    problem = want.problem(got, dtype)
    assert problem is None, f"{what}: {problem}"


def _run_case(case: Case, layout: str = "as-is", grad_layout: str = "as-is") -> None:
    """Forward (values, indices) and backward of avg and max on ``case``, against the reference."""
    x = case.input()
    t = _logical(case, x)
    if layout != "as-is":
        t = _relayout(t, layout)
    out = case.spec.output_size
    assert tk.supports(t, out)

    avg = tk.avg_forward(t, out)
    values, indices = tk.max_forward(t, out)
    assert values.stride() == indices.stride()
    for op, got in (("avg", _restore(case, avg)), ("argmax", (_restore(case, values), _restore(case, indices)))):
        err, problem = _harness.compare(case, op, got, _harness.expected(case, x, op))
        assert problem is None, f"{op} {case.describe()} {layout}: {problem}"

    # backward, against the reference gradient on the logical (N, C, *S) problem; the max gradient is
    # placed by the reference's indices, so a wrong index cannot pass
    logical = Case(tuple(t.shape), tuple(out), "channels_first", case.dtype, case.values, case.seed)
    _, want_indices = _harness.expected(logical, t.cpu().float().double().numpy(), "argmax")
    g = _random(avg.shape, case.dtype, case.seed)
    if grad_layout != "as-is":
        g = _relayout(g, grad_layout)
    g64 = g.cpu().double().numpy()
    input_size = tuple(t.shape[2:])
    _check_grad(tk.avg_backward(g, input_size), _harness.expected_gradient(logical, "avg", g64), case.dtype,
                f"avg grad {case.describe()}")
    idx = indices if grad_layout == "as-is" else _relayout(indices, grad_layout)
    _check_grad(tk.max_backward(g, idx, input_size), _harness.expected_gradient(logical, "max", g64, want_indices),
                case.dtype, f"max grad {case.describe()}")


# ---------------------------------------------------------------- explicit cases

SHAPES = [
    # rank 1: non-divisible, window longer than any tile, upsampling, size-1 input, global
    ((2, 3, 7), (3,)), ((1, 2, 300), (2,)), ((2, 2, 5), (12,)), ((1, 3, 1), (4,)), ((2, 3, 9), (1,)),
    # rank 2: non-divisible, upsampling, size-1 axes, long windows along W and H, divisible, global
    ((1, 3, 7, 9), (3, 4)), ((1, 2, 3, 4), (7, 9)), ((2, 3, 1, 7), (3, 1)), ((1, 2, 2, 300), (1, 2)),
    ((1, 2, 24, 2), (2, 2)), ((1, 3, 4, 4), (2, 2)), ((2, 5, 3, 7), (1, 1)),
    # rank 3: non-divisible, upsampling, size-1 axes, long depth windows
    ((1, 2, 3, 4, 5), (2, 3, 2)), ((1, 2, 2, 2, 3), (3, 3, 4)), ((1, 3, 1, 1, 9), (1, 1, 2)),
    ((1, 2, 12, 2, 2), (3, 1, 2)),
]
VALUES = ("normal", "ties", "special")


def _case(i: int, shape, out, dtype: str) -> Case:
    return Case(shape, out, "channels_first", dtype, VALUES[i % len(VALUES)], seed=100 + i)


@pytest.mark.parametrize("layout", ["nchw", "cl", "strided"])
@pytest.mark.parametrize("i", range(len(SHAPES)), ids=[f"{s}->{o}" for s, o in SHAPES])
def test_float32_every_layout(i, layout):
    shape, out = SHAPES[i]
    _run_case(_case(i, shape, out, "float32"), layout, grad_layout=layout)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("i", range(len(SHAPES)), ids=[f"{s}->{o}" for s, o in SHAPES])
def test_half_dtypes(i, dtype):
    shape, out = SHAPES[i]
    _run_case(_case(i + 1, shape, out, dtype), ("nchw", "cl")[i % 2])


@pytest.mark.parametrize("values", VALUES)
def test_channels_last_with_differently_strided_gradient(values):
    # autograd may hand the backward an NCHW (or any) gradient for a channels_last forward
    _run_case(Case((1, 4, 5, 7), (4, 3), "channels_first", "float32", values, 7), "cl", grad_layout="nchw")
    _run_case(Case((1, 4, 5, 7), (4, 3), "channels_first", "float32", values, 8), "nchw", grad_layout="strided")


@pytest.mark.parametrize("layout", ["nchw", "cl", "strided"])
def test_merged_global_axes(layout):
    # trailing axes pooled to 1 are merged into one when memory allows (not for the strided view)
    for i, (shape, out) in enumerate([((1, 2, 3, 2, 5), (1, 1, 1)), ((1, 2, 3, 1, 4), (1, 3, 1)),
                                      ((2, 3, 2, 3, 4), (2, 1, 1))]):
        _run_case(_case(i, shape, out, "float32"), layout, grad_layout=layout)


def test_harness_random_cases():
    """The shared differential harness: random shapes/layouts/dtypes/values, unbatched and channels_last."""
    cases = _harness.random_cases(16, seed=11, dtypes=("float16", "bfloat16", "float32"), max_length=8)

    def run(case: Case, x: np.ndarray, op: str):
        t = _logical(case, x)
        if op == "avg":
            return _restore(case, tk.avg_forward(t, case.spec.output_size))
        values, indices = tk.max_forward(t, case.spec.output_size)
        return (_restore(case, values), _restore(case, indices)) if op == "argmax" else _restore(case, values)

    report = _harness.check(_harness.Column("triton", run), cases)
    assert report.cases > 0 and not report.failures, "\n".join(report.failures)


def test_empty_outputs_and_batches():
    x = torch.randn(2, 3, 5, 4, device=DEVICE)
    assert tk.avg_forward(x, (0, 2)).shape == (2, 3, 0, 2)
    values, indices = tk.max_forward(x, (3, 0))
    assert values.shape == indices.shape == (2, 3, 3, 0) and indices.dtype == torch.int64
    g = torch.randn(2, 3, 0, 2, device=DEVICE)
    assert torch.equal(tk.avg_backward(g, (5, 4)), torch.zeros(2, 3, 5, 4, device=DEVICE))
    empty = torch.randn(0, 3, 5, 4, device=DEVICE)
    assert tk.avg_forward(empty, 2).shape == (0, 3, 2, 2)


def test_output_layout_follows_input():
    x = torch.randn(2, 6, 5, 4, device=DEVICE)
    assert tk.avg_forward(x, 3).is_contiguous()
    cl = x.to(memory_format=torch.channels_last)
    values, indices = tk.max_forward(cl, 3)
    assert values.is_contiguous(memory_format=torch.channels_last)
    assert indices.is_contiguous(memory_format=torch.channels_last)
    assert tk.avg_backward(values, (5, 4)).is_contiguous(memory_format=torch.channels_last)


def test_expanded_gradient():
    # autograd's gradient of .sum() is a stride-0 expansion: read as is, grad_in laid out channels first
    x = torch.randn(2, 3, 7, 5, device=DEVICE)
    spec = _args.pool_spec(tuple(x.shape), (3, 4), 2)
    g = torch.ones((), device=DEVICE).expand(2, 3, 3, 4)
    dx = tk.avg_backward(g, (7, 5))
    assert dx.is_contiguous()
    want = reference.avg_pool_grad(np.ones((2, 3, 3, 4)), spec)
    np.testing.assert_allclose(dx.cpu().numpy(), want, rtol=1e-6, atol=1e-6)
    _, indices = tk.max_forward(x, (3, 4))
    want = reference.max_pool_grad(np.ones((2, 3, 3, 4)), indices.cpu().numpy(), spec)
    np.testing.assert_allclose(tk.max_backward(g, indices, (7, 5)).cpu().numpy(), want, rtol=1e-6, atol=1e-6)


def test_max_ties_and_nan_selection():
    # one window of 6: ties pick the first, NaN the last NaN, -inf-only windows index their first
    rows = [[1, 3, 3, 0, 3, 2], [np.nan, 5, np.nan, 9, 1, 1], [-np.inf] * 6, [np.inf, 1, np.inf, np.nan, 0, 2]]
    x = torch.tensor(rows, dtype=torch.float32, device=DEVICE)[None]
    values, indices = tk.max_forward(x, (1,))
    assert indices.flatten().tolist() == [1, 2, 0, 3]
    v = values.flatten().cpu().numpy()
    assert v[0] == 3 and np.isnan(v[1]) and v[2] == -np.inf and np.isnan(v[3])


def test_int64_offsets(monkeypatch):
    """The int64-offset specialisation (used for tensors of >= 2**31 elements) on small tensors."""
    monkeypatch.setattr(tk, "_FORCE_INT64", True)
    for i, (shape, out) in enumerate([((1, 3, 5, 6), (4, 5)), ((1, 2, 2, 3, 4), (3, 5, 6)), ((2, 2, 300), (2,))]):
        _run_case(_case(i, shape, out, "float32"), ("nchw", "cl")[i % 2])


def test_batch_split_over_grid_axes(monkeypatch):
    """Batches beyond one grid axis (65535 on CUDA) go over axes 1 and 2; shrink the limit to test it."""
    monkeypatch.setattr(tk, "_GRID_Y", 2)
    _run_case(Case((5, 3, 6), (4,), "channels_first", "float32", "special", 3), "nchw")
    _run_case(Case((3, 3, 2, 5), (3, 2), "channels_first", "float32", "ties", 4), "cl")


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_backward_is_bitwise_deterministic(layout):
    # upsampling: many outputs per input, the case where atomics would reorder sums
    x = _relayout(torch.randn(1, 4, 3, 5, device=DEVICE), layout)
    g = _relayout(torch.randn(1, 4, 8, 16, device=DEVICE), layout)
    _, indices = tk.max_forward(x, (8, 16))
    for f in (lambda: tk.avg_backward(g, (3, 5)), lambda: tk.max_backward(g, indices, (3, 5))):
        first, second = f(), f()
        assert torch.equal(first.view(torch.int32), second.view(torch.int32))


def test_supports():
    x = torch.randn(2, 3, 4, 5, device=DEVICE)
    assert tk.supports(x, (2, 2)) and tk.supports(x, 3) and tk.supports(x, (None, 2))
    assert tk.supports(x.half(), 2) and tk.supports(x.bfloat16(), 2)
    assert tk.supports(x[:, :, 0], 2) and tk.supports(x[..., None], (1, 2, 3))
    assert not tk.supports(x.double(), 2)  # float64 stays on the portable path
    assert not tk.supports(x.int(), 2)
    assert not tk.supports(x[0, 0], 2)  # rank 0 spatial / unbatched forms are the caller's job
    assert not tk.supports(torch.randn(1, 1, 2, 2, 2, 2, device=DEVICE), 1)
    assert not tk.supports(x, (2, 2, 2))
    assert not tk.supports(x.numpy() if DEVICE == "cpu" else x.cpu().numpy(), 2)


# ---------------------------------------------------------------- device formulas

def test_device_formulas_match_bins():
    """The @triton.jit copies of _bins' start/end/cover formulas agree with _bins."""
    import triton
    import triton.language as tl

    @triton.jit
    def formulas(j_ptr, l_ptr, o_ptr, out_ptr, n, BLOCK: tl.constexpr):
        k = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = k < n
        j = tl.load(j_ptr + k, mask=m, other=0)
        length = tl.load(l_ptr + k, mask=m, other=1)
        out = tl.load(o_ptr + k, mask=m, other=1)
        tl.store(out_ptr + 4 * k, tk._start(j, length, out), mask=m)
        tl.store(out_ptr + 4 * k + 1, tk._end(j, length, out), mask=m)
        tl.store(out_ptr + 4 * k + 2, tk._cover_first(j, length, out), mask=m)
        tl.store(out_ptr + 4 * k + 3, tk._cover_last(j, length, out), mask=m)

    pairs = np.array(list(itertools.product(range(1, 41), range(1, 41))), dtype=np.int64)
    big = np.array([[2**31 - 1, 3], [100_003, 20_011], [65_537, 32_771], [7, 2**30]], dtype=np.int64)
    for dtype, table in ((np.int32, pairs), (np.int64, np.concatenate([pairs, big]))):
        # every output j < O (start/end) and every input i < L (cover) of small axes; spot values on big ones
        spots = lambda L, O: {0, 1, min(L, O) - 1, max(L, O) // 2, max(L, O) - 1}  # noqa: E731
        rows = [(i, L, O) for L, O in table.tolist() for i in (range(max(L, O)) if max(L, O) <= 40 else spots(L, O))]
        j, L, O = (np.array(c, dtype=dtype) for c in zip(*rows))
        got = torch.zeros((len(j), 4), dtype=torch.int64 if dtype == np.int64 else torch.int32, device=DEVICE)
        args = [torch.from_numpy(a).to(DEVICE) for a in (j, L, O)]
        formulas[(triton.cdiv(len(j), 1024),)](*args, got, len(j), BLOCK=1024)
        j64, L64, O64 = (a.astype(np.int64) for a in (j, L, O))
        ok_out, ok_in = j64 < O64, j64 < L64  # start/end are defined for outputs, cover for inputs
        got = got.cpu().numpy().astype(np.int64)
        assert np.array_equal(got[ok_out, 0], _bins.start_expr(j64, L64, O64)[ok_out])
        assert np.array_equal(got[ok_out, 1], _bins.end_expr(j64, L64, O64)[ok_out])
        assert np.array_equal(got[ok_in, 2], _bins.cover_first_expr(j64, L64, O64)[ok_in])
        assert np.array_equal(got[ok_in, 3], _bins.cover_last_expr(j64, L64, O64)[ok_in])


# ---------------------------------------------------------------- compiled (not interpreted) kernels

@pytest.mark.skipif(DEVICE != "cpu", reason="on a GPU the other tests compile and run the kernels")
def test_kernels_compile_for_sm90():
    """The interpreter accepts code the compiler rejects: compile every variant for sm_90 (no GPU needed)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    src = str(Path(__file__).resolve().parents[2] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    script = Path(__file__).with_name("compile_sm90.py")
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "compiled" in done.stdout, done.stdout


# ---------------------------------------------------------------- padded batches (sizes=)

def _padded_batch(seed: int, rank: int, dtype: str):
    """A random padded batch ``(x, sizes, padded output size, keep)`` for the ``sizes=`` kernels.

    Sample 0 is full size, sample 1 has size 1 on every axis; output sizes mix ``None`` (kept
    axes: each sample's output is its own length), 1, downsampling and upsampling.  The valid
    regions hold normal values, ties and NaN/±inf; the padding NaN, ±inf and huge values, so any
    read of it shows.
    """
    rng = np.random.default_rng(seed)
    n, c = 3, int(rng.integers(1, 4))
    padded = [int(s) for s in rng.integers(2, 7 if rank < 3 else 5, rank)]
    valid = np.stack([rng.integers(1, s + 1, n) for s in padded], axis=1)
    valid[0], valid[1] = padded, 1
    out = [None if k == 0 else 1 if k == 1 else int(rng.integers(1, 2 * s + 2))
           for k, s in zip(rng.integers(0, 4, rank), padded)]
    keep = tuple(o is None for o in out)
    out_padded = tuple(s if o is None else o for o, s in zip(out, padded))
    x = rng.choice([-2.0, 0.0, 1.0, 3.0], (n, c, *padded)) + (rng.standard_normal((n, c, *padded)) if seed % 2 else 0)
    special = rng.random(x.shape)
    x[special < 0.04] = np.nan
    x[(special > 0.96)] = np.inf
    x = torch.from_numpy(x).to(DTYPES[dtype]).double().numpy()  # exact in dtype
    pad = np.ones(x.shape, bool)
    for i, v in enumerate(valid):
        pad[(i, slice(None), *(slice(0, s) for s in v))] = False
    x[pad] = rng.choice([np.nan, np.inf, -np.inf, 6e4], int(pad.sum()))
    outs = np.array([[s if o is None else o for o, s in zip(out, v)] for v in valid])
    sizes = torch.from_numpy(np.concatenate([valid, outs], axis=1))
    return x, sizes, valid, out_padded, keep


@pytest.mark.parametrize("seed", range(6))
def test_sizes_match_each_cropped_sample(seed):
    """Values, indices (into the padded plane) and gradients (0 on the padding) against the
    NumPy reference of each sample cropped alone; every dtype, both layouts, ranks 1-3."""
    rank, dtype, layout = 1 + seed % 3, ("float32", "float16", "bfloat16")[seed % 3], ("nchw", "cl")[seed // 3]
    x, sizes, valid, out, keep = _padded_batch(seed, rank, dtype)
    spec = _args.pool_spec(x.shape, out, rank)
    t = _relayout(torch.from_numpy(x).to(DTYPES[dtype]).to(DEVICE), layout)
    sizes = sizes.to(DEVICE)
    # the most summands per output / per input gradient over the batch's own windows
    own = [list(zip(v, s)) for v, s in zip(valid.tolist(), sizes[:, rank:].tolist())]
    window = max(np.prod([_bins.max_window(L, O) for L, O in axes]) for axes in own)
    cover = max(np.prod([_bins.max_cover_expr(L, O) for L, O in axes]) for axes in own)

    with np.errstate(invalid="ignore"):
        want = reference.avg_pool(x, spec, valid, keep)
        magnitude = reference.avg_pool(np.abs(x), spec, valid, keep)
    got = tk.avg_forward(t, out, sizes=sizes)
    problem = _harness.Accumulated.of(want, magnitude, window, rank, dtype).problem(got.float().cpu().numpy(), dtype)
    assert problem is None, f"avg: {problem}"

    want_v, want_i = reference.max_pool(x, spec, True, valid, keep)
    values, indices = tk.max_forward(t, out, sizes=sizes)
    np.testing.assert_array_equal(values.float().cpu().numpy(), want_v)
    np.testing.assert_array_equal(indices.cpu().numpy(), want_i)

    g = _random(values.shape, dtype, seed)
    g64 = g.cpu().double().numpy()
    want = reference.avg_pool_grad_valid(g64, spec, valid, keep)
    magnitude = reference.avg_pool_grad_valid(np.abs(g64), spec, valid, keep)
    got = tk.avg_backward(g, x.shape[2:], sizes=sizes)
    problem = _harness.Accumulated.of(want, magnitude, cover, rank, dtype).problem(got.float().cpu().numpy(), dtype)
    assert problem is None, f"avg grad: {problem}"
    # max: the reference's indices place each present output's gradient (absent outputs have none)
    present = reference.avg_pool(np.ones(x.shape), spec, valid, keep) > 0
    g_present = np.where(present, g64, 0.0)
    want = reference.max_pool_grad(g_present, want_i, spec)
    magnitude = reference.max_pool_grad(np.abs(g_present), want_i, spec)
    got = tk.max_backward(g, indices, x.shape[2:], sizes=sizes)
    problem = _harness.Accumulated.of(want, magnitude, cover, rank, dtype).problem(got.float().cpu().numpy(), dtype)
    assert problem is None, f"max grad: {problem}"
    padding = np.isnan(x) & False
    for i, v in enumerate(valid):
        padding[i] = True
        padding[(i, slice(None), *(slice(0, s) for s in v))] = False
    for grad in (tk.avg_backward(g, x.shape[2:], sizes=sizes), got):  # exactly 0, not just close
        assert (grad.float().cpu().numpy()[padding] == 0).all(), "gradient on the padding"


# ---------------------------------------------------------------- LP, GeM, avgmax

EXPONENTS = (2.0, 2.5, 3.0, 1.0, 4.0, 7.3)
_MANTISSA = {"float32": 23, "float16": 10, "bfloat16": 7}


def _close(got: torch.Tensor, want: np.ndarray, scale, dtype: str, terms: int, what: str) -> None:
    """``got`` (one rounding to ``dtype`` of a float32 accumulation) against the float64 ``want``:
    NaN and inf where ``want`` has them; else within 2 ulps of ``dtype`` plus ``terms`` float32
    roundings of ``scale`` (the window's largest ``|x|``, what a sum's rounding is relative to)."""
    got = got.detach().cpu().double().numpy()
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape, what
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=f"NaN positions: {what}")
    inf = np.isinf(want)
    np.testing.assert_array_equal(got[inf], want[inf], err_msg=f"inf positions: {what}")
    ok = np.isfinite(want)
    g, w, s = got[ok], want[ok], np.broadcast_to(np.where(np.isfinite(scale), scale, 0), want.shape)[ok]
    bound = 2.0 ** (1 - _MANTISSA[dtype]) * np.abs(w) + 4 * terms * 2.0**-24 * s + 1e-30
    bad = np.abs(g - w) > bound
    assert not bad.any(), f"{what}: worst {np.abs(g - w)[bad].max():.3g} at {w[bad][:4]} (got {g[bad][:4]})"


def _reduction_cases(n: int, seed: int):
    cases = _harness.random_cases(n, seed=seed, dtypes=("float32", "float16", "bfloat16"), max_length=7,
                                  long_length=40, empty=False)
    return [c for c in cases if 0 not in c.spec.output_size]


def _power_case(case: Case, power: str):
    """``(x float64 exact in dtype, t logical tensor, p, eps)``; odd and non-integer LP powers get |x|
    (a mixed-sign odd power cancels: conditioning, not accuracy; a negative base is NaN)."""
    p = EXPONENTS[case.seed % len(EXPONENTS)]
    x = case.input().astype(np.float64)
    if power == "lp" and p not in (2.0, 4.0):
        x = np.abs(x)
    t = _relayout(_logical(case, x), ("nchw", "cl", "strided")[case.seed % 3])
    return t, p, 0.5


@pytest.mark.parametrize("power", ["lp", "gem"])
def test_power_means_match_reference(power):
    """LP and GeM values, x gradients (against float64 autograd of the portable composite) and GeM's
    p gradient (a central difference of the NumPy reference) on random cases of every dtype and layout."""
    from anypool.backends.torch import portable

    for case in _reduction_cases(6, seed=21 + (power == "gem")):
        t, p, eps = _power_case(case, power)
        out = case.spec.output_size
        x64 = t.cpu().double()
        spec = _args.pool_spec(tuple(t.shape), out, t.dim() - 2)
        window = math.prod(_bins.max_window(L, O) for L, O in zip(spec.input_size, spec.output_size))
        cover = math.prod(_bins.max_cover_expr(L, O) for L, O in zip(spec.input_size, spec.output_size))
        scale = reference.max_pool(np.abs(x64.numpy()), spec)
        what = f"{power} p={p} {case.describe()}"
        if power == "lp":
            got, want = tk.lp_forward(t, out, p), reference.lp_pool(x64.numpy(), spec, p)
        else:
            got, want = tk.gem_forward(t, out, p, eps), reference.gem_pool(x64.numpy(), spec, p, eps)
        assert got.dtype == t.dtype and got.shape == t.shape[:2] + tuple(out)
        _close(got, want, scale, case.dtype, window, what)

        if not torch.isfinite(x64).all():  # gradients of windows with NaN/inf: not compared (the composite's are NaN)
            continue
        # no zeros for the gradients: where a window's sum is 0 the kernels give 0 (torch's lp_pool rule),
        # the composite the derivative of t^p
        t = t.masked_fill(t == 0, 0.5)
        x64 = t.cpu().double()
        if power == "lp":
            got, want = tk.lp_forward(t, out, p), reference.lp_pool(x64.numpy(), spec, p)
        else:
            got, want = tk.gem_forward(t, out, p, eps), reference.gem_pool(x64.numpy(), spec, p, eps)
        g = _random(got.shape, case.dtype, case.seed)
        xg = x64.clone().requires_grad_()
        composite = portable.lp_forward(xg, out, p) if power == "lp" else portable.gem_forward(xg, out, p, eps)
        (composite * g.cpu().double()).sum().backward()
        if power == "lp":
            gx, gp = tk.lp_backward(g, t, p), None
        else:
            gx, gp = tk.gem_backward(g, t, p, eps, True)
        assert gx.dtype == t.dtype and gx.shape == t.shape
        _close(gx, xg.grad.numpy(), np.abs(xg.grad.numpy()).max(), case.dtype, 4 * cover * window, f"grad x {what}")
        if gp is not None:
            assert gp.dtype == torch.float64 and gp.dim() == 0
            h = 1e-6
            g64 = g.cpu().double().numpy()
            fd = sum(s * (reference.gem_pool(x64.numpy(), spec, p + s * h, eps) * g64).sum() for s in (1, -1)) / (2 * h)
            # float32 throughout (the inputs are exact): relative to the sum of the terms' sizes
            magnitude = (np.abs(g64) * np.abs(want)).sum() * (1 + np.abs(np.log(np.abs(want) + 1e-30)).max())
            assert abs(gp.item() - fd) <= 1e-5 * window * magnitude + 1e-6, (gp.item(), fd, what)


def test_lp_of_inf_and_a_negative_is_nan():
    """A window whose largest |x| is inf counts its infinite terms and its NaN ones: a negative x with a
    non-integer p (NaN in torch's pow and in the reference)."""
    x = torch.tensor([math.inf, -2.0, 1.0, 3.0, math.inf, 2.0, 1.0, 3.0, -math.inf, -2.0, 1.0, 3.0]).reshape(1, 1, 12)
    spec = _args.pool_spec(tuple(x.shape), (3,), 1)
    want = reference.lp_pool(x.double().numpy(), spec, 2.5)
    assert np.isnan(want).any() and not np.isnan(want).all()
    _close(tk.lp_forward(x.to(DEVICE), (3,), 2.5), want, 1.0, "float32", 4, "lp of inf and a negative")


@pytest.mark.parametrize("combine", [True, False])
def test_avgmax_matches_reference(combine):
    """avgmax (``0.5·(avg + max)``) / catavgmax's parts from one pass: values, indices and the
    combined gradient gather, on random cases with NaN/inf and ties, every dtype and layout."""
    for case in _reduction_cases(5, seed=31 + combine):
        x = case.input()
        t = _relayout(_logical(case, x), ("nchw", "cl", "strided")[case.seed % 3])
        out = case.spec.output_size
        logical = Case(tuple(t.shape), tuple(out), "channels_first", case.dtype, case.values, case.seed)
        x64 = t.cpu().double().numpy()
        spec = logical.spec
        first, values, indices = tk.avgmax_forward(t, out, combine)
        assert first.stride() == values.stride() == indices.stride()
        want_v, want_i = reference.max_pool(x64, spec, return_indices=True)
        np.testing.assert_array_equal(values.cpu().double().numpy(), want_v)
        np.testing.assert_array_equal(indices.cpu().numpy(), want_i)
        if combine:
            with np.errstate(invalid="ignore"):
                want = reference.avgmax_pool(x64, spec)
            _close(first, want, reference.max_pool(np.abs(x64), spec), case.dtype, logical.window, case.describe())
        else:
            problem = _harness.expected(logical, x64, "avg").problem(first.cpu().double().numpy(), case.dtype)
            assert problem is None, f"avg {case.describe()}: {problem}"
        ga = _random(first.shape, case.dtype, case.seed)
        gm = _relayout(_random(first.shape, case.dtype, case.seed + 1), ("nchw", "cl")[case.seed % 2])
        want = _harness.expected_gradient(logical, "avg", ga.cpu().double().numpy())
        want_max = _harness.expected_gradient(logical, "max", gm.cpu().double().numpy(), want_i)
        both = _harness.Accumulated(want.value + want_max.value, want.bound + want_max.bound)
        _check_grad(tk.avgmax_backward(ga, gm, indices, t.shape[2:]), both, case.dtype, f"grad {case.describe()}")


def test_power_means_special_windows():
    """inf and NaN windows, all-zero windows (gradient 0, torch's lp_pool rule), values below GeM's
    eps (clamped, gradient 0), and a large p that would overflow float32 / float16 unscaled."""
    x = torch.tensor([[[1.0, np.inf, 2.0, -np.inf], [np.nan, 1.0, np.inf, 2.0], [0.0, 0.0, 3.0, 4.0],
                       [0.1, 0.2, 3.0, -1.0]]], device=DEVICE)
    lp = tk.lp_forward(x, (2,), 2.0).cpu()
    assert lp[0, 0].tolist() == [np.inf, np.inf] and np.isnan(lp[0, 1, 0]) and lp[0, 1, 1] == np.inf
    assert lp[0, 2, 0] == 0 and lp[0, 2, 1] == 5.0
    g = torch.ones(1, 4, 2, device=DEVICE)
    gx = tk.lp_backward(g[:, 2:3], x[:, 2:3], 2.0).cpu()
    np.testing.assert_allclose(gx.numpy(), [[[0.0, 0.0, 0.6, 0.8]]], rtol=1e-6, atol=0)
    gem = tk.gem_forward(x[:, 3:], (2,), 3.0, 0.5).cpu()
    np.testing.assert_allclose(gem[0, 0].numpy(), [0.5, ((27 + 0.125) / 2) ** (1 / 3)], rtol=1e-6)
    gx, gp = tk.gem_backward(g[:, 3:], x[:, 3:], 3.0, 0.5, True)
    assert gx[0, 0, 0] == gx[0, 0, 1] == gx[0, 0, 3] == 0 and gx[0, 0, 2] > 0 and torch.isfinite(gp)
    for dtype, big in ((torch.float16, 200.0), (torch.bfloat16, 1e30), (torch.float32, 1e30)):
        t = (torch.rand(1, 2, 9, 7, generator=torch.Generator().manual_seed(3)) + 0.5).mul(big).to(dtype).to(DEVICE)
        spec = _args.pool_spec(tuple(t.shape), (2, 3), 2)
        x64 = t.cpu().double().numpy()
        lp = tk.lp_forward(t, (2, 3), 16.0)
        gem = tk.gem_forward(t, (2, 3), 12.0, 1e-6)
        _close(lp, reference.lp_pool(x64, spec, 16.0), 0, _harness_dtype(dtype), 25, "lp large p")
        _close(gem, reference.gem_pool(x64, spec, 12.0, 1e-6), 0, _harness_dtype(dtype), 25, "gem large p")
        gx, gp = tk.gem_backward(torch.ones_like(gem), t, 12.0, 1e-6, True)
        assert torch.isfinite(gx).all() and torch.isfinite(tk.lp_backward(torch.ones_like(lp), t, 16.0)).all()
        assert torch.isfinite(gp)


def _harness_dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_reduction_backwards_are_bitwise_deterministic(layout):
    x = _relayout(torch.rand(1, 4, 3, 5, device=DEVICE) + 0.1, layout)
    g = _relayout(torch.randn(1, 4, 8, 11, device=DEVICE), layout)
    _, _, indices = tk.avgmax_forward(x, (8, 11), True)
    for f in (lambda: tk.lp_backward(g, x, 2.5), lambda: tk.gem_backward(g, x, 3.0, 1e-6, True),
              lambda: tk.avgmax_backward(g, g, indices, (3, 5))):
        first, second = f(), f()
        first, second = (r if isinstance(r, tuple) else (r,) for r in (first, second))
        for a, b in zip(first, second):
            assert torch.equal(a.view(torch.int64 if a.dtype == torch.float64 else torch.int32),
                               b.view(torch.int64 if b.dtype == torch.float64 else torch.int32))
