"""LP, GeM, avgmax, catavgmax and select_adaptive_pool2d: the NumPy reference, the torch backend
(C++ CPU kernels and the portable path), timm's and torch's own composites, gradients."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import anypool
from anypool import _harness
from anypool.backends import numpy as reference

torch = pytest.importorskip("torch")
F = torch.nn.functional

from anypool.backends.torch import ops  # noqa: E402

IMPLS = ["anypool.backends.torch.cpu", "portable"]
REDUCTIONS = ["lp", "gem", "avgmax", "catavgmax"]


# --- an independent reference: one explicit loop per output, the plain (unscaled) formulas -----


def _loop_reference(x: np.ndarray, output_size, reduce: str, p: float = 2.0, eps: float = 1e-6) -> np.ndarray:
    """``x``: ``(N, C, *S)`` float64; every window sliced out by hand from the design's formulas."""
    n, c, *spatial = x.shape
    windows = [[((j * L) // O, -(-((j + 1) * L) // O)) for j in range(O)] for L, O in zip(spatial, output_size)]
    out = np.empty((n, c * (2 if reduce == "catavgmax" else 1), *output_size))
    for pos in np.ndindex(*output_size):
        w = x[(slice(None), slice(None)) + tuple(slice(*windows[d][j]) for d, j in enumerate(pos))]
        w = w.reshape(n, c, -1)
        if reduce == "lp":
            val = np.sum(w**p, axis=-1) ** (1 / p)
        elif reduce == "gem":
            val = np.mean(np.maximum(w, eps) ** p, axis=-1) ** (1 / p)
        elif reduce == "avgmax":
            val = 0.5 * (w.mean(-1) + w.max(-1))
        else:
            val = np.concatenate([w.mean(-1), w.max(-1)], axis=1)
        out[(slice(None), slice(None)) + pos] = val
    return out


@pytest.mark.parametrize("reduce", REDUCTIONS)
@pytest.mark.parametrize("shape,out", [((2, 3, 10), (3,)), ((1, 2, 7, 5), (3, 4)), ((2, 1, 4, 6), (9, 1)),
                                       ((1, 2, 3, 5, 4), (2, 3, 3)), ((1, 1, 1, 6), (1, 4))])
def test_numpy_reference_equals_the_loops(reduce, shape, out):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape) * 3
    if reduce == "lp":
        x = np.abs(x)
    got = _run_numpy(x, out, reduce, p=2.5, eps=0.1)
    want = _loop_reference(x, out, reduce, p=2.5, eps=0.1)
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-13)


def _run_numpy(x, out, reduce, p=2.5, eps=1e-6, data_format="channels_first"):
    if reduce == "lp":
        return anypool.adaptive_lp_pool(x, p, out, data_format=data_format)
    if reduce == "gem":
        return anypool.adaptive_gem_pool(x, out, p=p, eps=eps, data_format=data_format)
    return getattr(anypool, f"adaptive_{reduce}_pool")(x, out, data_format=data_format)


def test_numpy_lp_signs_follow_torch_lp_pool():
    """Odd integer p keeps the sign of x^p; a negative x with a non-integer p, or a negative sum's root, is NaN."""
    x = np.array([[[-1.0, -2.0, 0.5, -3.0]]])
    t = torch.from_numpy(x)
    for p in (1.0, 2.0, 3.0, 2.5):
        got = anypool.adaptive_lp_pool1d(x, p, 1)
        want = F.lp_pool1d(t, p, 4).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-14, equal_nan=True)


def test_numpy_power_means_do_not_overflow():
    rng = np.random.default_rng(1)
    x = np.abs(rng.standard_normal((2, 3, 9, 7))) + 0.1
    for scale in (1e200, 1e-200):
        big = anypool.adaptive_lp_pool2d(x * scale, 40.0, (2, 3))
        np.testing.assert_allclose(big, anypool.adaptive_lp_pool2d(x, 40.0, (2, 3)) * scale, rtol=1e-13)
        gem = anypool.adaptive_gem_pool2d(x * scale, (4, 2), p=30.0, eps=1e-300)
        np.testing.assert_allclose(gem, anypool.adaptive_gem_pool2d(x, (4, 2), p=30.0, eps=1e-300) * scale, rtol=1e-13)


def test_numpy_catavgmax_channel_axis():
    x = np.random.default_rng(2).standard_normal((2, 5, 6, 3))  # channels_last
    got = anypool.adaptive_catavgmax_pool2d(x, (2, 2), data_format="channels_last")
    assert got.shape == (2, 2, 2, 6)
    np.testing.assert_array_equal(got[..., 3:], anypool.adaptive_max_pool2d(x, (2, 2), data_format="channels_last"))
    unbatched = anypool.adaptive_catavgmax_pool1d(x[0, :, 0, :].T, 2)  # (C, L) -> (2C, O)
    assert unbatched.shape == (6, 2)


# --- the torch backend against the NumPy reference, every dtype and layout --------------------


def _to_torch(x: np.ndarray, dtype: str):
    return torch.from_numpy(np.ascontiguousarray(x)).to(getattr(torch, dtype))


def _assert_within(got, want: np.ndarray, dtype: str, window: int, what: str):
    """The harness's bound for the reductions (:class:`_harness.Reduced`), with no summation scale."""
    problem = _harness.Reduced(want, np.zeros(want.shape), window).problem(got, dtype)
    assert problem is None, f"{what}: {problem}"


def _report_clean(report: _harness.Report):
    assert not report.failures, f"{report.column}: {len(report.failures)} failures, e.g. " + "; ".join(
        report.failures[:3])


@pytest.mark.parametrize("impl", IMPLS)
def test_torch_matches_reference(impl):
    """The differential harness: every reduction on random cases (every dtype, layout, storage, NaN and inf,
    padded batches left to the NumPy reference)."""
    from anypool.backends import torch as torch_backend

    cases = [c for c in _harness.random_cases(240, seed=12)  # the C++ module serves no size-0 output
             if 0 not in c.spec.output_size or impl == "portable"]
    column = _harness.anypool_column(torch_backend)

    def run(case, x, op):
        got = _harness.reduce(_harness.restride(torch_backend.from_numpy(x, case.dtype), case.storage), case, op,
                              data_format=case.data_format)
        assert got.dtype == getattr(torch, case.dtype)
        return got.double().numpy()

    with ops.force_implementation(impl):
        report = _harness.check(_harness.Column(impl, run, column.supports, ops=_harness.REDUCTIONS), cases,
                                ops=_harness.REDUCTIONS)
    _report_clean(report)
    assert report.cases == 4 * len(cases)


def test_native_composites_match_reference():
    """The harness's torch-native column on the reductions: the composites models write with torch's own
    ops (timm's avgmax and catavgmax, GeM's clamp-pow-avg-pow, ``F.lp_pool`` on fixed windows) agree with
    the reference on random cases, padded batches (one call per crop) included."""
    report = _harness.check(_harness.torch_native_column(), _harness.random_cases(300, seed=41, valid=0.2),
                            ops=_harness.REDUCTIONS, min_share=0.0)
    _report_clean(report)
    assert report.cases > 300  # float32/float64 cases of every reduction, LP on fixed windows only


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
def test_planar_global_power_means_in_blocks_of_planes(dtype):
    """Planar global pools of small planes go through the C++ kernels' blocks of 64 transposed planes:
    140 planes (two full blocks and a part), against the reference, NaN and inf included."""
    rng = np.random.default_rng(21)
    x = np.abs(rng.standard_normal((2, 70, 7, 7))) * 4
    x.reshape(-1)[rng.choice(x.size, 40)] = np.inf
    x.reshape(-1)[rng.choice(x.size, 40)] = np.nan
    x = _to_torch(x, dtype).double().numpy()  # exactly representable
    spec = anypool._args.pool_spec(x.shape, 1, 2)
    with ops.force_implementation("anypool.backends.torch.cpu"):
        lp = anypool.adaptive_lp_pool2d(_to_torch(x, dtype), 3.0, 1)
        gem = anypool.adaptive_gem_pool2d(_to_torch(x, dtype), 1, p=2.7, eps=0.5)
    _assert_within(lp.double().numpy(), reference.lp_pool(x, spec, 3.0), dtype, 49, "lp")
    _assert_within(gem.double().numpy(), reference.gem_pool(x, spec, 2.7, 0.5), dtype, 49, "gem")


@pytest.mark.parametrize("shape, size", [((3, 50, 6, 6), (1, 1)), ((3, 50, 9, 8), (4, 3)),
                                         ((3, 50, 4, 5, 8), (3, 2, 3))])
def test_planar_avgmax_in_blocks_of_planes(shape, size):
    """avgmax and catavgmax through the blocks of 64 transposed planes (150 planes: two full blocks and a
    part; global and windowed, 2-D and 3-D): values, and the gradient (so the argmax: ties everywhere, a
    NaN in some planes) against timm's composite of torch's own ops."""
    x = torch.randint(-3, 4, shape).float()
    x.view(-1)[torch.randperm(x.numel())[:30]] = math.nan
    avg, top = ((F.adaptive_avg_pool2d, F.adaptive_max_pool2d) if len(size) == 2 else
                (F.adaptive_avg_pool3d, F.adaptive_max_pool3d))
    composites = {"avgmax": lambda t: 0.5 * (avg(t, size) + top(t, size)),
                  "catavgmax": lambda t: torch.cat([avg(t, size), top(t, size)], 1)}
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the windowed pools take the blocks when every thread gets one
    try:
        with ops.force_implementation("anypool.backends.torch.cpu"):
            for name, composite in composites.items():
                ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
                got, want = getattr(anypool, f"adaptive_{name}_pool")(ours, size), composite(theirs)
                torch.testing.assert_close(got, want, equal_nan=True)
                g = torch.randn_like(want)
                got.backward(g)
                want.backward(g)
                torch.testing.assert_close(ours.grad, theirs.grad, equal_nan=True)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("size", [(4, 3), (1, 1)])
def test_avgmax_backward_rejects_an_index_outside_the_plane(size):
    """The C++ avgmax backward adds each max gradient at its index (windowed planar: a scatter into the avg
    backward's result; otherwise a gather): an index past the plane raises instead of writing elsewhere."""
    from anypool.backends.torch import cpu

    x = torch.randn(2, 3, 9, 8)
    _, grad_max, indices = cpu.avgmax_forward(x, size, True)
    indices.view(-1)[1] = 9 * 8
    with pytest.raises(RuntimeError, match="outside the plane"):
        cpu.avgmax_backward(torch.ones_like(grad_max), grad_max, indices, (9, 8))


@pytest.mark.parametrize("impl", IMPLS)
def test_lp_of_inf_and_a_negative_is_nan_as_torch(impl):
    """A window whose largest |x| is inf counts only its infinite terms, and its NaN ones: a negative x with
    a non-integer p is NaN in torch's pow, so torch's lp_pool is NaN there, and so is ours.  Planar windows,
    a global pool (the C++ blocks of planes), channels_last, and the NumPy reference."""
    row = torch.tensor([math.inf, -2.0, 1.0, 3.0, math.inf, 2.0, 1.0, 3.0, -math.inf, -2.0, 1.0, 3.0])
    planes = torch.stack([row, row.roll(4), row.abs()]).reshape(1, 3, 2, 6)
    for x, out, fixed in ((row.reshape(1, 1, 12), (3,), lambda t: F.lp_pool1d(t, 2.5, 4)),
                          (row[:8].reshape(1, 2, 4), (1,), lambda t: F.lp_pool1d(t, 2.5, 4)),
                          (planes.to(memory_format=torch.channels_last), (1, 3), lambda t: F.lp_pool2d(t, 2.5, 2))):
        want = fixed(x)
        assert torch.isnan(want).any() and not torch.isnan(want).all()
        with ops.force_implementation(impl):
            got = anypool.adaptive_lp_pool(x, 2.5, out)
        torch.testing.assert_close(got, want, equal_nan=True)
        spec = anypool._args.pool_spec(x.shape, out, x.dim() - 2)
        np.testing.assert_allclose(reference.lp_pool(x.double().numpy(), spec, 2.5), want.double().numpy(),
                                   rtol=1e-6)


def test_harness_fails_wrong_reductions():
    """Each column below is wrong in one way the bound must catch."""
    from anypool.backends import torch as torch_backend

    right = _harness.anypool_column(torch_backend)

    def two_ulps_off(case, x, op):  # a half-type result rounded, then moved by two ulps
        got = np.asarray(right.run(case, x, op), np.float64)
        return np.where(np.isfinite(got), got + 2 * _harness.ulp(got, case.dtype), got)

    def max_first(case, x, op):  # catavgmax with the halves swapped
        got = right.run(case, x, op)
        return np.concatenate(np.split(got, 2, axis=case.spec.channel_axis)[::-1], axis=case.spec.channel_axis)

    def wrong_floor(case, x, op):  # GeM clamped at 1e-6 instead of the case's eps
        return anypool.adaptive_gem_pool(torch.from_numpy(x), case.output_size, p=case.exponent, eps=1e-6,
                                         data_format=case.data_format).numpy()

    cases = _harness.random_cases(60, seed=19, valid=0.0)
    for run, ops_, dtypes in ((two_ulps_off, ("lp", "gem", "avgmax"), ("bfloat16", "float16")),
                              (max_first, ("catavgmax",), _harness.DTYPES),
                              (wrong_floor, ("gem",), ("float32", "float64"))):
        column = _harness.Column(run.__name__, run, lambda case, op, d=dtypes: case.dtype in d and
                                 0 not in case.spec.output_size, ops=ops_)
        report = _harness.check(column, cases, ops=ops_, min_share=0.0)
        assert report.cases > 5 and len(report.failures) > report.cases // 2, (run.__name__, report)


def _run_torch(t, out, reduce, p=2.5, eps=1e-6, data_format="channels_first"):
    return _run_numpy(t, out, reduce, p, eps, data_format)  # the same public functions, torch tensors


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_large_p_does_not_overflow(impl, dtype):
    rng = np.random.default_rng(3)
    big = {"float16": 200.0, "bfloat16": 1e30, "float32": 1e30}[dtype]
    x = (np.abs(rng.standard_normal((2, 3, 9, 7))) + 0.5) * big
    x = _to_torch(x, dtype).double().numpy()  # exactly representable
    spec = anypool._args.pool_spec(x.shape, (2, 3), 2)
    with ops.force_implementation(impl):
        t = _to_torch(x, dtype).requires_grad_()
        lp = anypool.adaptive_lp_pool2d(t, 16.0, (2, 3))
        gem = anypool.adaptive_gem_pool2d(t, (2, 3), p=torch.tensor(12.0, requires_grad=True), eps=1e-6)
        assert torch.isfinite(lp).all() and torch.isfinite(gem).all()
        (lp.float().sum() + gem.float().sum()).backward()
        assert torch.isfinite(t.grad).all()
    _assert_within(lp.double().detach().numpy(), reference.lp_pool(x, spec, 16.0), dtype, 25, "lp")
    _assert_within(gem.double().detach().numpy(), reference.gem_pool(x, spec, 12.0, 1e-6), dtype, 25, "gem")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_power_means_at_the_ends_of_the_float32_range(impl, channels_last):
    """Windows whose largest |x| is near float32's maximum or subnormal (the kernels scale each window
    by a power of two there: its reciprocal must stay finite and the result must not overflow),
    whole planes (one contiguous span) and row blocks, against the float64 reference."""
    rng = np.random.default_rng(8)
    for top in (3e38, 1e-40, 1.0):
        x = (rng.uniform(0.25, 1.0, (2, 3, 6, 5)) * top).astype(np.float32).astype(np.float64)
        t = torch.from_numpy(x).float()
        if channels_last:
            t = t.contiguous(memory_format=torch.channels_last)
        for out in (1, (2, 1), (3, 2)):
            spec = anypool._args.pool_spec(x.shape, out, 2)
            with ops.force_implementation(impl):
                got = {"lp": anypool.adaptive_lp_pool2d(t, 2.0, out),
                       "gem": anypool.adaptive_gem_pool2d(t, out, 3.0, 1e-45)}
            want = {"lp": reference.lp_pool(x, spec, 2.0), "gem": reference.gem_pool(x, spec, 3.0, 1e-45)}
            assert torch.isfinite(got["gem"]).all(), (top, out)  # a mean: never above the window's maximum
            for name in got:  # LP overflows where its float64 value exceeds float32's range, and only there
                # within float32's rounding, and a few of its subnormal spacings absolutely
                np.testing.assert_allclose(got[name].double().numpy(), want[name].astype(np.float32), rtol=1e-6,
                                           atol=8 * 2.0**-149, err_msg=f"{name} top={top} out={out}")


@pytest.mark.parametrize("impl", IMPLS)
def test_special_windows(impl):
    x = torch.tensor([[[1.0, math.inf, 2.0, 3.0], [1.0, math.nan, 2.0, 3.0], [-math.inf, 1.0, 2.0, 3.0],
                       [0.0, 0.0, 0.0, 0.0]]], dtype=torch.float32)
    with ops.force_implementation(impl):
        lp = anypool.adaptive_lp_pool1d(x, 2.0, 2)[0]
        gem = anypool.adaptive_gem_pool1d(x, 2)[0]
        am = anypool.adaptive_avgmax_pool1d(x, 2)[0]
    inf, nan = math.inf, math.nan
    want_lp = [[inf, math.hypot(2, 3)], [nan, math.hypot(2, 3)], [inf, math.hypot(2, 3)], [0, 0]]
    torch.testing.assert_close(lp, torch.tensor(want_lp), equal_nan=True)
    assert math.isinf(gem[0, 0]) and math.isnan(gem[1, 0])
    assert gem[2, 0] == pytest.approx(((1e-6**3 + 1) / 2) ** (1 / 3))  # -inf clamps to eps
    assert gem[3, 0] == pytest.approx(1e-6)
    assert am[0, 0] == inf and math.isnan(am[1, 0]) and am[2, 0] == -inf  # 0.5 * (avg + max) of [-inf, 1]


# --- against torch's and timm's own composites ----------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_composites_and_their_gradients(impl, layout):
    rng = np.random.default_rng(4)
    for shape, out in [((2, 3, 12, 10), (4, 5)), ((1, 4, 9, 6), (3, 2)), ((2, 2, 7, 5), (1, 1))]:
        base = torch.from_numpy(rng.standard_normal(shape))
        if layout == "channels_last":
            base = base.contiguous(memory_format=torch.channels_last)
        o, kernel = out, (shape[2] // out[0], shape[3] // out[1])
        cases = [
            ("avgmax", functools.partial(anypool.adaptive_avgmax_pool2d, output_size=o),
             lambda t, o=o: 0.5 * (F.adaptive_avg_pool2d(t, o) + F.adaptive_max_pool2d(t, o)), base),
            ("catavgmax", functools.partial(anypool.adaptive_catavgmax_pool2d, output_size=o),
             lambda t, o=o: torch.cat([F.adaptive_avg_pool2d(t, o), F.adaptive_max_pool2d(t, o)], 1), base),
            ("lp2", functools.partial(anypool.adaptive_lp_pool2d, norm_type=2, output_size=o),
             functools.partial(F.lp_pool2d, norm_type=2, kernel_size=kernel), base),
            ("lp3.5", functools.partial(anypool.adaptive_lp_pool2d, norm_type=3.5, output_size=o),
             functools.partial(F.lp_pool2d, norm_type=3.5, kernel_size=kernel), base.abs() + 0.1),
        ]
        with ops.force_implementation(impl):
            for name, ours, theirs, x in cases:
                a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
                ya, yb = ours(a), theirs(b)
                torch.testing.assert_close(ya, yb, rtol=1e-12, atol=1e-12, msg=name)
                g = torch.from_numpy(rng.standard_normal(ya.shape))
                ya.backward(g)
                yb.backward(g)
                torch.testing.assert_close(a.grad, b.grad, rtol=1e-11, atol=1e-12, msg=name)
            # GeM with a learnable p: x and p gradients against the three-pass composite
            x = base.abs() + 0.05
            x[..., 0, 0] = 1e-9  # below eps: clamped, no gradient
            for p0 in (3.0, 1.7):
                pa = torch.tensor(p0, dtype=torch.float64, requires_grad=True)
                pb = torch.tensor(p0, dtype=torch.float64, requires_grad=True)
                a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
                ya = anypool.adaptive_gem_pool2d(a, out, p=pa, eps=1e-6)
                yb = F.adaptive_avg_pool2d(b.clamp(min=1e-6).pow(pb), out).pow(1.0 / pb)
                torch.testing.assert_close(ya, yb, rtol=1e-12, atol=1e-12)
                g = torch.from_numpy(rng.standard_normal(ya.shape))
                ya.backward(g)
                yb.backward(g)
                torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)
                torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-10, atol=1e-12)


def test_lp_gradient_is_zero_where_the_sum_is_zero():
    x = torch.zeros(1, 2, 4, 4, dtype=torch.float64)
    x[0, 1] = torch.arange(16.0).reshape(4, 4)
    for impl in IMPLS:
        with ops.force_implementation(impl):
            a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
            anypool.adaptive_lp_pool2d(a, 2, 2).sum().backward()
            F.lp_pool2d(b, 2, 2).sum().backward()
            torch.testing.assert_close(a.grad, b.grad)
            assert (a.grad[0, 0] == 0).all()


# --- gradients --------------------------------------------------------------------------------

_GRAD_SHAPES = [((2, 3, 7), (3,)), ((1, 2, 5, 7), (3, 4)), ((2, 1, 3, 4), (5, 6)), ((1, 2, 3, 4, 5), (2, 2, 3)),
                ((3, 6, 4), (2, 1))]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduce", REDUCTIONS)
def test_gradcheck(impl, reduce):
    rng = np.random.default_rng(5)
    for k, (shape, out) in enumerate(_GRAD_SHAPES):
        x = torch.from_numpy(rng.standard_normal(shape))
        x = torch.where(x.abs() < 0.1, x + 0.3, x)  # away from GeM's clamp kink and from 0
        data_format = "channels_last" if k == len(_GRAD_SHAPES) - 1 else "channels_first"
        p0 = [2.0, 2.6, 3.0, 1.5, 4.0][k]
        if (reduce == "lp" and p0 not in (2.0, 4.0)) or (reduce == "gem" and k % 2):  # LP: NaN unless even
            x = x.abs()
        x = x.requires_grad_()
        p = torch.tensor(p0, dtype=torch.float64, requires_grad=True)
        with ops.force_implementation(impl):
            if reduce == "gem":
                fn, inputs = functools.partial(_gem_of, out=out, data_format=data_format), (x, p)
            elif reduce == "lp":
                fn, inputs = functools.partial(anypool.adaptive_lp_pool, norm_type=p0, output_size=out,
                                               data_format=data_format), (x,)
            else:
                fn, inputs = functools.partial(_run_numpy, out=out, reduce=reduce, data_format=data_format), (x,)
            assert torch.autograd.gradcheck(fn, inputs)


def _gem_of(a, q, out, data_format):
    return anypool.adaptive_gem_pool(a, out, p=q, eps=1e-3, data_format=data_format)


@pytest.mark.parametrize("reduce", REDUCTIONS)
def test_cpp_backward_is_bitwise_deterministic_and_layout_preserving(reduce):
    rng = np.random.default_rng(6)
    x = torch.from_numpy(rng.standard_normal((2, 70, 13, 11)).astype(np.float32)).abs() + 0.1
    x = x.contiguous(memory_format=torch.channels_last)
    grads = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            a = x.clone().requires_grad_()
            y = _run_torch(a, (5, 4), reduce, p=3.0)
            y.backward(torch.ones_like(y))
            grads.append(a.grad)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(grads[0], grads[1])
    assert grads[0].is_contiguous(memory_format=torch.channels_last)
    assert y.is_contiguous(memory_format=torch.channels_last)


def test_compile_fullgraph_forward_and_backward():
    def f(x, p):
        return (anypool.adaptive_lp_pool2d(x, 2.0, (3, 2)).sum()
                + anypool.adaptive_gem_pool2d(x.abs(), (2, 3), p=p).sum()
                + anypool.adaptive_avgmax_pool2d(x, (4, 3)).sum() + anypool.adaptive_catavgmax_pool2d(x, 1).sum())

    x = torch.randn(2, 3, 9, 7, dtype=torch.float64)
    results = []
    for fn in (f, torch.compile(f, fullgraph=True, backend="aot_eager")):
        a = x.clone().requires_grad_()
        p = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
        y = fn(a, p)
        y.backward()
        results.append((y.detach(), a.grad, p.grad))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# --- argument checks ------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -1.0, math.inf, math.nan, True, "2", None])
def test_bad_norm_type(bad):
    x = np.ones((1, 2, 4, 4))
    with pytest.raises((TypeError, ValueError), match=r"adaptive_lp_pool2d\(norm_type\): got .*; expected a positive"):
        anypool.adaptive_lp_pool2d(x, bad, 2)


def test_bad_gem_arguments():
    x = np.ones((1, 2, 4, 4))
    with pytest.raises(ValueError, match=r"adaptive_gem_pool2d\(p\): got -3"):
        anypool.adaptive_gem_pool2d(x, 2, p=-3)
    with pytest.raises(ValueError, match=r"adaptive_gem_pool2d\(eps\): got 0"):
        anypool.adaptive_gem_pool2d(x, 2, eps=0)
    with pytest.raises(ValueError, match=r"adaptive_gem_pool2d\(p\): got an array of shape \(2,\)"):
        anypool.adaptive_gem_pool2d(torch.ones(1, 2, 4, 4), 2, p=torch.ones(2))
    with pytest.raises(TypeError, match=r"adaptive_lp_pool2d\(norm_type\).*not an array"):
        anypool.adaptive_lp_pool2d(x, np.float64(2.0) * np.ones(1), 2)
    with pytest.raises(TypeError, match=r"adaptive_avgmax_pool2d\(input\): got a tensor of dtype int64"):
        anypool.adaptive_avgmax_pool2d(torch.ones(1, 2, 4, 4, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match=r"adaptive_catavgmax_pool3d\(input\)"):
        anypool.adaptive_catavgmax_pool3d(torch.ones(2, 4, 4), 2)


def test_bad_pool_type():
    x = np.ones((1, 2, 4, 4))
    with pytest.raises(ValueError, match=r"select_adaptive_pool2d\(pool_type\): got 'mean'; expected one of"):
        anypool.select_adaptive_pool2d(x, "mean")
    with pytest.raises(ValueError, match=r"select_adaptive_pool2d\(output_size\): got 2; expected 1 with"):
        anypool.select_adaptive_pool2d(x, "fastavg", 2)
    with pytest.raises(ValueError, match=r"select_adaptive_pool2d\(input\)"):
        anypool.select_adaptive_pool2d(np.ones((2, 4, 4)), "avg")  # timm's pools take a batch


# --- timm ------------------------------------------------------------------------------------


def timm_pooling():
    """timm's ``timm.layers.adaptive_avgmax_pool``: imported, or (where timm's package import needs a
    torchvision this machine lacks) loaded from its file with its one sibling, ``format.py``."""
    try:
        return importlib.import_module("timm.layers.adaptive_avgmax_pool")
    except ImportError:
        pass
    spec = importlib.util.find_spec("timm")
    if spec is None or spec.origin is None:
        pytest.skip("timm is not installed")
    name = "_anypool_test_timm_layers"
    if name not in sys.modules:
        package = types.ModuleType(name)
        package.__path__ = [str(Path(spec.origin).parent / "layers")]
        sys.modules[name] = package
    return importlib.import_module(f"{name}.adaptive_avgmax_pool")


@pytest.mark.parametrize("pool_type", ["avg", "max", "avgmax", "catavgmax", "fast", "fastavg", "fastmax",
                                       "fastavgmax", "fastcatavgmax", ""])
@pytest.mark.parametrize("flatten", [False, True])
def test_select_adaptive_pool2d_matches_timm(pool_type, flatten):
    timm = timm_pooling()
    rng = np.random.default_rng(7)
    x = torch.from_numpy(rng.standard_normal((2, 5, 7, 6)))
    sizes = [1] if pool_type.startswith("fast") or not pool_type else [1, 3, (2, 4)]
    for size in sizes:
        want = timm.SelectAdaptivePool2d(size, pool_type, flatten)(x)
        got = anypool.select_adaptive_pool2d(x, pool_type, size, flatten)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        got_np = anypool.select_adaptive_pool2d(x.numpy(), pool_type, size, flatten)
        np.testing.assert_allclose(got_np, want.numpy(), rtol=1e-12, atol=1e-12)
    for fmt in ("NHWC",):  # timm's NHWC path: fast (global) pools only
        if pool_type:
            xl = x.permute(0, 2, 3, 1)
            want = timm.SelectAdaptivePool2d(1, pool_type if pool_type.startswith("fast") else "fast" + pool_type,
                                             flatten, input_fmt=fmt)(xl)
            got = anypool.select_adaptive_pool2d(xl, pool_type, 1, flatten, data_format="channels_last")
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_timm_functions_float32():
    timm = timm_pooling()
    x = torch.randn(3, 8, 13, 11)
    for size in (1, 3, (5, 2)):
        torch.testing.assert_close(anypool.adaptive_avgmax_pool2d(x, size), timm.adaptive_avgmax_pool2d(x, size))
        torch.testing.assert_close(anypool.adaptive_catavgmax_pool2d(x, size), timm.adaptive_catavgmax_pool2d(x, size))


# --- torch layers -----------------------------------------------------------------------------

layers = pytest.importorskip("anypool.layers.torch")


def test_lp_and_gem_layers():
    x = torch.randn(2, 3, 9, 7).abs()
    for rank, shape in ((1, (2, 3, 9)), (2, (2, 3, 9, 7)), (3, (1, 2, 5, 4, 6))):
        x = torch.randn(shape).abs()
        lp = getattr(layers, f"AdaptiveLPPool{rank}d")(2.5, 3)
        torch.testing.assert_close(lp(x), getattr(anypool, f"adaptive_lp_pool{rank}d")(x, 2.5, 3))
        gem = getattr(layers, f"AdaptiveGeMPool{rank}d")(2, p=4.0)
        assert isinstance(gem.p, torch.nn.Parameter) and list(dict(gem.named_parameters())) == ["p"]
        torch.testing.assert_close(gem(x), getattr(anypool, f"adaptive_gem_pool{rank}d")(x, 2, p=4.0))
        fixed = getattr(layers, f"AdaptiveGeMPool{rank}d")(2, p=4.0, p_trainable=False)
        assert not list(fixed.parameters()) and fixed.p == 4.0
        torch.testing.assert_close(fixed(x), gem(x))
    assert "p=4 (trainable)" in repr(gem) and "norm_type=2.5" in repr(lp)
    with pytest.raises(ValueError, match=r"AdaptiveGeMPool2d\(p\): got 0"):
        layers.AdaptiveGeMPool2d(1, p=0)
    with pytest.raises(ValueError, match=r"AdaptiveLPPool2d\(norm_type\): got -2"):
        layers.AdaptiveLPPool2d(-2, 1)


def test_gem_layer_learns_p():
    """Trained towards max pooling (GeM's p -> inf limit), p grows and the loss falls."""
    torch.manual_seed(0)
    x = torch.rand(8, 4, 10, 9) + 0.01
    target = F.adaptive_max_pool2d(x, (3, 2))
    pool = layers.AdaptiveGeMPool2d((3, 2), p=2.0)
    opt = torch.optim.SGD(pool.parameters(), lr=20.0)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = F.mse_loss(pool(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert pool.p.item() > 4.0 and losses[-1] < 0.5 * losses[0]


def test_select_adaptive_pool2d_layer_matches_timm():
    timm = timm_pooling()
    x = torch.randn(2, 6, 7, 5)
    for pool_type in ("avg", "max", "avgmax", "catavgmax", "fast", "fastavgmax", "fastcatavgmax", ""):
        for flatten in (False, True):
            theirs = timm.SelectAdaptivePool2d(1, pool_type, flatten)
            ours = layers.SelectAdaptivePool2d(1, pool_type, flatten)
            assert ours.feat_mult() == theirs.feat_mult() and ours.is_identity() == theirs.is_identity()
            torch.testing.assert_close(ours(x), theirs(x))
            if pool_type:
                nhwc = timm.SelectAdaptivePool2d(1, pool_type if pool_type.startswith("fast") else "fast" + pool_type,
                                                 flatten, input_fmt="NHWC")
                ours = layers.SelectAdaptivePool2d(1, pool_type, flatten, input_fmt="NHWC")
                torch.testing.assert_close(ours(x.permute(0, 2, 3, 1)), nhwc(x.permute(0, 2, 3, 1)))
    assert layers.SelectAdaptivePool2d((2, 3), "avgmax")(x).shape == (2, 6, 2, 3)
    with pytest.raises(ValueError, match=r"SelectAdaptivePool2d\(input_fmt\): got 'NCL'"):
        layers.SelectAdaptivePool2d(1, "avg", input_fmt="NCL")
    with pytest.raises(ValueError, match=r"SelectAdaptivePool2d\(output_size\): got 2"):
        layers.SelectAdaptivePool2d(2, "fast")


def _swap_heads(model: torch.nn.Module, make) -> int:
    """Replace every timm SelectAdaptivePool2d in ``model`` by ``make(timm_module)``; returns how many."""
    swapped = 0
    for sub in list(model.modules()):
        for child_name, child in list(sub.named_children()):
            if type(child).__name__ == "SelectAdaptivePool2d" and not isinstance(child, layers.SelectAdaptivePool2d):
                setattr(sub, child_name, make(child))
                swapped += 1
    return swapped


def _ours_like(timm_pool) -> torch.nn.Module:
    flatten = isinstance(timm_pool.flatten, torch.nn.Flatten)
    return layers.SelectAdaptivePool2d(1, timm_pool.pool_type, flatten)


@pytest.mark.parametrize("pool_type", ["avg", "avgmax", "catavgmax", "max"])
def test_swap_into_a_convnet_with_timms_head(pool_type):
    """A small network whose head is timm's own SelectAdaptivePool2d, swapped for ours: same outputs and grads."""
    timm = timm_pooling()
    torch.manual_seed(1)
    pool = timm.SelectAdaptivePool2d(1, pool_type, flatten=True)
    body = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 3))
    model = torch.nn.Sequential(body, pool, torch.nn.Linear(16 * pool.feat_mult(), 5))
    x = torch.randn(2, 3, 29, 23)
    want = model(x)
    want.sum().backward()
    want_grad = body[0].weight.grad.clone()
    body.zero_grad()
    assert _swap_heads(model, _ours_like) == 1
    got = model(x)
    got.sum().backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(body[0].weight.grad, want_grad)


@pytest.mark.parametrize("pool_type", ["avg", "catavgmax"])
def test_swap_into_timm_resnet18(pool_type):
    try:
        import timm
    except ImportError as e:  # timm's package import needs torchvision
        pytest.skip(f"timm cannot be imported here: {e}")
    torch.manual_seed(2)
    model = timm.create_model("resnet18", pretrained=False, num_classes=7, global_pool=pool_type).eval()
    x = torch.randn(2, 3, 75, 61)
    with torch.no_grad():
        want = model(x)
        assert _swap_heads(model, _ours_like) == 1
        got = model(x)
    assert isinstance(model.global_pool, layers.SelectAdaptivePool2d)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# --- JAX (composed from its pools and gathers) ------------------------------------------------


def test_jax_matches_reference():
    jax = pytest.importorskip("jax")
    from anypool.backends import jax as jax_backend

    dtypes = [d for d in _harness.DTYPES if jax_backend.supports_dtype(d)]
    eager = _harness.anypool_column(jax_backend)

    def jitted(case, x, op):  # the same public function, traced under jit
        fn = jax.jit(lambda a: _harness.reduce(a, case, op, data_format=case.data_format))
        got = fn(jax_backend.from_numpy(x, case.dtype))
        assert got.dtype.name == case.dtype
        return np.asarray(got).astype(np.float64)

    cases = _harness.random_cases(24, seed=40, dtypes=dtypes)
    _report_clean(_harness.check(_harness.Column("jax jit", jitted, eager.supports, ops=_harness.REDUCTIONS),
                                 cases, ops=_harness.REDUCTIONS))


def test_jax_gradients_match_torch():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    rng = np.random.default_rng(8)
    x = np.abs(rng.standard_normal((2, 3, 9, 7))).astype(np.float32) + 0.05
    out = (4, 3)

    def jax_loss(a, q):
        return (jnp.sum(anypool.adaptive_gem_pool2d(a, out, p=q) * 1.5)
                + jnp.sum(anypool.adaptive_lp_pool2d(a, 3.0, out)) + jnp.sum(anypool.adaptive_avgmax_pool2d(a, out))
                + jnp.sum(anypool.adaptive_catavgmax_pool2d(a, out)))

    gx, gp = jax.grad(jax_loss, argnums=(0, 1))(jnp.asarray(x), jnp.float32(2.5))
    t = torch.from_numpy(x).double().requires_grad_()
    q = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    (anypool.adaptive_gem_pool2d(t, out, p=q).sum() * 1.5 + anypool.adaptive_lp_pool2d(t, 3.0, out).sum()
     + anypool.adaptive_avgmax_pool2d(t, out).sum() + anypool.adaptive_catavgmax_pool2d(t, out).sum()).backward()
    np.testing.assert_allclose(np.asarray(gx), t.grad.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(float(gp), q.grad.item(), rtol=1e-4)


# --- ONNX export (dynamic batch, height and width) ---------------------------------------------


class _Heads(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.gem = layers.AdaptiveGeMPool2d((3, 2), p=2.5)
        with torch.no_grad():
            self.gem.p.fill_(3.25)  # "trained": the export must carry this value
        self.lp = layers.AdaptiveLPPool2d(2.0, (2, 3))
        self.avgmax = layers.SelectAdaptivePool2d((4, 3), "avgmax")
        self.cat = layers.SelectAdaptivePool2d(1, "catavgmax", flatten=True)

    def forward(self, x):
        return self.gem(x), self.lp(x), self.avgmax(x), self.cat(x)


def test_onnx_export_is_exact_for_every_size(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    aox = pytest.importorskip("anypool.onnx")
    path = tmp_path / "heads.onnx"
    x = torch.randn(2, 3, 11, 9)
    aox.export(_Heads(), (x,), path, dynamic_shapes=({0: "N", 2: "H", 3: "W"},))

    def want(a):
        a = a.astype(np.float64)
        return (anypool.adaptive_gem_pool2d(a, (3, 2), p=3.25), anypool.adaptive_lp_pool2d(a, 2.0, (2, 3)),
                anypool.adaptive_avgmax_pool2d(a, (4, 3)), anypool.select_adaptive_pool2d(a, "catavgmax", 1, True))

    shapes = [(2, 3, 11, 9), (1, 3, 7, 5), (3, 3, 12, 12), (1, 3, 2, 17), (2, 3, 4, 3)]
    assert aox.verify(path, want, shapes, atol=1e-5) == len(shapes)
