"""The fast CPU path (``anypool.backends.torch.cpu``, the C++ kernels) called directly, against the NumPy reference.

Values, indices and gradients on random shapes: non-divisible, upsampling, size-1 axes, channels_last and
arbitrary strides, float32/float64/bfloat16/float16, NaN/±inf, and windows longer than any vector or unrolled
loop; the C++ window formulas against ``_bins``; the no-compiler fallback; determinism across thread counts.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from anypool import _args, _bins, _harness  # noqa: E402
from anypool.backends import numpy as ref  # noqa: E402
from anypool.backends.torch import cpu, ops, portable  # noqa: E402

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
HALF = (torch.bfloat16, torch.float16)
LAYOUTS = ["contiguous", "channels_last", "strided"]


def _case(rng, rank):
    n, c = int(rng.integers(1, 4)), int(rng.integers(1, 6))
    size = tuple(int(s) for s in rng.integers(1, 13, rank))
    out = tuple(int(rng.choice([1, max(1, s // 3), s, s + int(rng.integers(1, 5)), int(rng.integers(1, 9))]))
                for s in size)
    return (n, c, *size), out


def _make(rng, shape, dtype, layout, special=True):
    a = rng.standard_normal(shape)
    if special:  # a few NaN/±inf and repeated values (ties), so every selection rule is exercised
        flat = a.reshape(-1)
        k = flat.size
        flat[rng.integers(0, k, max(1, k // 20))] = np.round(flat[rng.integers(0, k, max(1, k // 20))])
        flat[rng.integers(0, k, max(1, k // 50))] = 1.0
        for v in (np.nan, np.inf, -np.inf):
            if rng.random() < 0.4:
                flat[rng.integers(0, k, max(1, k // 60))] = v
    x = torch.from_numpy(a).to(dtype)
    if layout == "channels_last":
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
    elif layout == "strided":  # neither layout: every other element of a wider buffer, axes 0/1 swapped in memory
        big = torch.zeros((shape[1], shape[0], *shape[2:-1], 2 * shape[-1]), dtype=dtype)
        big[..., ::2] = x.transpose(0, 1)
        x = big[..., ::2].transpose(0, 1)
    return x


def _np(t):
    return (t.float() if t.dtype in HALF else t).double().numpy()


def _spec(shape, out):
    return _args.pool_spec(shape, out, len(shape) - 2, batched=True)


def _rounded(got, want: _harness.Accumulated, dtype):
    """Accumulated in float32 (float64 for float64), rounded once to ``dtype``: see ``_harness.Accumulated``."""
    problem = want.problem(_np(got), str(dtype).removeprefix("torch."))
    assert problem is None, problem


def _layout_ok(t, like, spatial):
    """``t`` has the memory format the op promises for ``like`` (strides of size-1 axes do not matter)."""
    want = ops._layout_strides(like, spatial)
    return all(a == b for a, b, n in zip(t.stride(), want, t.shape) if n > 1)


def _check(x, out, dtype, rng):
    shape = tuple(x.shape)
    spec = _spec(shape, out)
    case = _harness.Case(shape, out, "channels_first", str(dtype).removeprefix("torch."), "normal", 0)
    xn = _np(x)  # bf16-exact values in float64: the reference sees exactly what the kernel sees
    assert cpu.supports(x, out)

    avg = cpu.avg_forward(x, out)
    assert avg.dtype == dtype and tuple(avg.shape) == spec.output_shape
    assert _layout_ok(avg, x, out)  # output memory format follows the input
    _rounded(avg, _harness.expected(case, xn, "avg"), dtype)

    values, indices = cpu.max_forward(x, out)
    want_values, want_indices = ref.max_pool(xn, spec, return_indices=True)
    assert indices.dtype == torch.int64 and _layout_ok(values, x, out) and _layout_ok(indices, x, out)
    np.testing.assert_array_equal(indices.numpy(), want_indices)
    np.testing.assert_array_equal(_np(values), want_values)  # max is exact, NaN where the reference has NaN

    g = torch.from_numpy(rng.standard_normal(spec.output_shape)).to(dtype)
    if portable.channels_last(x):
        g = g.movedim(1, -1).contiguous().movedim(-1, 1)
    gn = _np(g)
    for grad, want in [(cpu.avg_backward(g, shape[2:]), _harness.expected_gradient(case, "avg", gn)),
                       (cpu.max_backward(g, indices, shape[2:]),
                        _harness.expected_gradient(case, "max", gn, want_indices))]:
        assert grad.dtype == dtype and _layout_ok(grad, g, shape[2:])
        _rounded(grad, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_random_cases_match_reference(rank, layout, dtype):
    rng = np.random.default_rng([rank, LAYOUTS.index(layout), DTYPES.index(dtype)])
    for _ in range(12):
        shape, out = _case(rng, rank)
        _check(_make(rng, shape, dtype, layout), out, dtype, rng)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_long_windows_and_special_values(layout, dtype):
    # windows of 150-300 along W (longer than any vector/unroll), and rows of H spanning several windows
    rng = np.random.default_rng(7)
    for shape, out in [((2, 3, 300), (2,)), ((2, 3, 300), (1,)), ((1, 4, 37, 301), (3, 2)),
                       ((1, 2, 3, 5, 257), (2, 2, 1)), ((2, 17, 9, 9), (1, 1)), ((1, 3, 1, 1), (4, 5))]:
        _check(_make(rng, shape, dtype, layout), out, dtype, rng)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_each_kernel_path(layout, dtype):
    # shapes that reach each path of pool.cpp: small windows read straight from the input (planar rows of
    # more windows than kLockstep, in chunks of 64), the general planar max in lockstep (narrow along W,
    # tall), the separable passes, upsampling; backward scatters by whole samples (a batch that keeps every
    # thread busy) and by blocks of 16 channels with a tail; a global avg backward on both layouts
    rng = np.random.default_rng(11)
    busy = 4 * torch.get_num_threads() + 1
    for shape, out in [((2, 3, 12, 40), (6, 20)), ((1, 2, 4, 300), (2, 150)), ((1, 2, 40, 300), (2, 100)),
                       ((2, 3, 10, 10), (4, 3)), ((busy, 5, 6, 6), (3, 3)), ((1, 40, 6, 6), (3, 3)),
                       ((busy, 40, 5, 7), (7, 9)), ((1, 19, 3, 8, 9), (2, 3, 4)), ((3, 20, 5, 7), (1, 1))]:
        _check(_make(rng, shape, dtype, layout), out, dtype, rng)


def test_all_nan_and_inf_windows():
    x = torch.tensor([[[np.nan, 1.0, np.nan, 2.0, np.inf, -np.inf, 3.0, 3.0, -0.0, 0.0]]])
    # windows [0,2) [2,4) [4,6) [6,8) [8,10): a NaN wins; +inf is a plain maximum; ties keep the first,
    # including -0.0 == 0.0
    np.testing.assert_array_equal(cpu.max_forward(x, (5,))[1].numpy(), [[[0, 2, 4, 6, 8]]])
    # windows [0,4) [3,7) [6,10): the last of two NaNs wins
    values, indices = cpu.max_forward(x, (3,))
    np.testing.assert_array_equal(indices.numpy(), [[[2, 4, 6]]])
    assert torch.isnan(values[0, 0, 0]) and values[0, 0, 1] == np.inf
    avg = cpu.avg_forward(x, (3,))
    assert torch.isnan(avg[0, 0, 1]) and avg[0, 0, 2] == 1.5  # inf + -inf is NaN, as in PyTorch


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_long_planar_spans_pick_torchs_argmax(dtype):
    # planar windows of >= 16 positions take the vectorised lanes: each row one rule of PyTorch's pick
    nan, inf = np.nan, np.inf
    rows = np.full((9, 49), -5.0)
    rows[0] = np.random.default_rng(0).standard_normal(49)
    rows[1, 30] = nan                          # one NaN
    rows[2, [3, 40]] = nan                     # the last NaN wins
    rows[3] = -inf                             # all -inf: the first
    rows[4, [20, 35]] = inf                    # +inf is a plain maximum (no NaN), the first of two
    rows[5, [17, 33]] = 7.0                    # ties keep the first
    rows[6, 18], rows[6, 19] = -0.0, 0.0       # -0.0 == 0.0: the first, with its own sign
    rows[7, 48] = nan                          # a NaN past the last full lane group
    rows[8, 5], rows[8, 40] = inf, -inf        # inf - inf flags the lanes without a NaN
    x = torch.from_numpy(rows).to(dtype)
    cases = [(x.reshape(9, 1, 7, 7), (1, 1)), (x.reshape(9, 1, 49), (1,)), (x[:, :48].reshape(9, 1, 48), (2,))]
    for shaped, out in cases:
        values, indices = cpu.max_forward(shaped, out)
        want_values, want_indices = ref.max_pool(_np(shaped), _spec(tuple(shaped.shape), out), return_indices=True)
        np.testing.assert_array_equal(indices.numpy(), want_indices)
        np.testing.assert_array_equal(_np(values), want_values)
        assert np.array_equal(np.signbit(_np(values)), np.signbit(want_values))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_backward_is_bitwise_deterministic(layout):
    rng = np.random.default_rng(3)
    x = _make(rng, (4, 8, 23, 29), torch.float32, layout, special=False)
    out = (7, 5)  # overlapping windows: inputs covered by two outputs sum two terms
    _, indices = cpu.max_forward(x, out)
    g = torch.from_numpy(rng.standard_normal((4, 8, *out)).astype(np.float32))
    if layout == "channels_last":
        g = g.movedim(1, -1).contiguous().movedim(-1, 1)
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2, 2, 3):
            torch.set_num_threads(n)
            runs.append((cpu.avg_backward(g, (23, 29)), cpu.max_backward(g, indices, (23, 29))))
    finally:
        torch.set_num_threads(threads)
    for avg, mx in runs[1:]:
        assert torch.equal(avg.view(torch.int32), runs[0][0].view(torch.int32))
        assert torch.equal(mx.view(torch.int32), runs[0][1].view(torch.int32))


def test_supports():
    x = torch.randn(2, 3, 8, 8)
    assert cpu.supports(x, [4, 4]) and cpu.supports(x.half(), [4, 4]) and cpu.supports(x.bfloat16(), [4, 4])
    assert not cpu.supports(x.int(), [4, 4])
    assert not cpu.supports(x, [0, 4])  # empty output
    assert not cpu.supports(torch.randn(2, 3, 0, 8), [4, 4])
    assert not cpu.supports(torch.randn(1, 1, 2, 2, 2, 2), [1, 1, 1, 1])  # spatial rank 4


@pytest.mark.parametrize("layout", LAYOUTS + ["one channel", "unit spatial"])
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_results_have_the_promised_strides(rank, layout):
    # the eager path skips ops._conform for this module (EXACT_LAYOUT): every result must already
    # have the strides the custom ops' fake impls promise, in every layout (ambiguous ones included)
    assert cpu.EXACT_LAYOUT
    c = 1 if layout == "one channel" else 5
    size = (1,) * rank if layout == "unit spatial" else tuple(range(4, 4 + rank))
    x = torch.randn(2, c, *size)
    if layout in ("channels_last", "one channel", "unit spatial"):
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
    elif layout == "strided":
        x = torch.randn(2, c, *(2 * s for s in size))[(slice(None), slice(None)) + (slice(None, None, 2),) * rank]
    out = [2] * rank
    spatial = list(x.shape[2:])
    y = cpu.avg_forward(x, out)
    values, indices = cpu.max_forward(x, out)
    first, vmax, imax = cpu.avgmax_forward(x, out, True)
    promised = ops._layout_strides(x, out)
    for r in (y, values, indices, cpu.lp_forward(x, out, 2.0), cpu.gem_forward(x, out, 3.0, 1e-6), first, vmax, imax):
        assert r.stride() == promised
    g = y.clone() if not portable.channels_last(y) else y.movedim(1, -1).contiguous().movedim(-1, 1)
    assert cpu.avg_backward(g, spatial).stride() == ops._layout_strides(g, spatial)
    assert cpu.max_backward(g, indices, spatial).stride() == ops._layout_strides(g, spatial)


@pytest.mark.parametrize("L,O", [(1, 1), (7, 3), (3, 7), (10, 10), (224, 7), (7, 224), (600, 37), (1000, 333)])
def test_cpp_window_formulas_equal_bins(L, O):
    got = cpu._kernels.bins(L, O).numpy()
    axis = _bins.axis_bins(L, O)
    first, last = axis.cover()
    np.testing.assert_array_equal(got[0, :O], axis.starts)
    np.testing.assert_array_equal(got[1, :O], axis.ends)
    np.testing.assert_array_equal(got[2, :L], first)
    np.testing.assert_array_equal(got[3, :L], last)


def test_cpp_window_formulas_do_not_overflow():
    # j*L overflows int64 here; the header takes the products in 128 bits, _bins in Python ints
    for L, O in [(2**62 + 3, 2**40 + 7), (2**40 + 7, 2**62 + 3), (2**63 - 1, 3)]:
        for k in (0, 1, min(L, O) // 3, min(L, O) - 1):
            want = [_bins.start_expr(k, L, O), _bins.end_expr(k, L, O),
                    _bins.cover_first_expr(k, L, O), _bins.cover_last_expr(k, L, O)]
            assert list(cpu._kernels.bin_at(k, L, O)) == want, (k, L, O)


_FALLBACK = """
import warnings, torch
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import anypool
    x = torch.randn(2, 3, 9, 7)
    a = anypool.adaptive_avg_pool2d(x, (4, 3))
    m = anypool.adaptive_max_pool2d(x, (4, 3))
    anypool.adaptive_avg_pool2d(x, 2)
from anypool.backends.torch import ops
assert ops.implementation(x, (4, 3)) is ops.portable
torch.testing.assert_close(a, torch.nn.functional.adaptive_avg_pool2d(x, (4, 3)))
torch.testing.assert_close(m, torch.nn.functional.adaptive_max_pool2d(x, (4, 3)))
print("WARNINGS", len(caught))
for w in caught:
    print(w.category.__name__, w.message)
"""


def test_no_compiler_falls_back_to_portable_with_one_warning(tmp_path):
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "ANYPOOL_CACHE_DIR": str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, "-c", _FALLBACK], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "WARNINGS 1\n" in run.stdout, run.stdout
    assert "no-such-compiler" in run.stdout and "portable" in run.stdout, run.stdout


def test_a_stale_build_lock_is_removed_with_a_warning(tmp_path):
    lock = tmp_path / "lock"
    lock.write_text("")
    cpu._clear_stale_lock(lock)  # a fresh lock belongs to a running build: kept, silently
    assert lock.exists()
    old = time.time() - cpu._STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    with pytest.warns(UserWarning, match="stale C.. build lock .*lock"):
        cpu._clear_stale_lock(lock)
    assert not lock.exists()
    cpu._clear_stale_lock(lock)  # no lock: nothing to do
