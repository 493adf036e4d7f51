"""The torch backend against the NumPy reference and PyTorch's own ops: values, indices, gradients, layouts."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import anypool  # noqa: E402
from anypool import _harness  # noqa: E402
from anypool.backends import torch as backend  # noqa: E402
from anypool.backends.torch import ops, portable  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}



def _assert_clean(report):
    assert report.cases > 0
    assert not report.failures, f"{len(report.failures)} failures, e.g.\n" + "\n".join(report.failures[:10])


# --- the differential harness -------------------------------------------------------------------


def test_harness_against_numpy_reference():
    """Values and indices of 1200 random cases (all dtypes, layouts, ranks, NaN/inf, upsampling) on CPU."""
    _assert_clean(_harness.check(_harness.anypool_column(backend), _harness.random_cases(1200, seed=11)))


def test_harness_portable_path():
    """The pure-torch path the other devices use, even when a fast CPU implementation exists."""
    with ops.force_implementation("portable"):
        _assert_clean(_harness.check(_harness.anypool_column(backend), _harness.random_cases(400, seed=12)))


def test_harness_four_and_five_spatial_axes():
    cases = _harness.random_cases(60, seed=13, ranks=(4, 5), max_length=6)
    _assert_clean(_harness.check(_harness.anypool_column(backend), cases))


def test_torch_native_column_agrees_with_reference():
    """The harness' own torch-native column (the semantics we copy) passes the same cases."""
    cases = _harness.random_cases(200, seed=14)
    _assert_clean(_harness.check(_harness.torch_native_column(), cases))


def _native_cases(n, seed):
    """Random (x, output_size) pairs native torch accepts, half of them channels_last in memory."""
    rng = np.random.default_rng(seed)
    for case in _harness.random_cases(n, seed=seed, data_formats=("channels_first",), unbatched=True):
        if any(o == 0 for o in case.spec.output_size):
            continue
        x = torch.from_numpy(case.input()).to(DTYPES[case.dtype])
        if x.dim() in (4, 5) and rng.random() < 0.5:
            x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
        yield case, x


def _sizes(case):
    """``output_size`` for anypool (may hold None) and for torch (1-D ops take no None)."""
    if case.rank > 1:
        return case.output_size, case.output_size
    return case.output_size[0], case.spec.output_size[0]


@pytest.mark.parametrize("device", DEVICES)
def test_matches_torch_native(device):
    """Max values and indices bit for bit, avg to rounding, layouts kept — against torch.nn.functional."""
    for case, x in _native_cases(300, seed=21):
        x = x.to(device)
        size, native_size = _sizes(case)
        want = getattr(F, f"adaptive_avg_pool{case.rank}d")(x, native_size)
        got = getattr(anypool, f"adaptive_avg_pool{case.rank}d")(x, size)
        assert got.dtype == want.dtype and got.device == x.device and got.shape == want.shape, case.describe()
        tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[x.dtype]
        torch.testing.assert_close(got, want, rtol=tol, atol=tol, equal_nan=True, msg=case.describe)
        want_v, want_i = getattr(F, f"adaptive_max_pool{case.rank}d")(x, native_size, return_indices=True)
        got_v, got_i = getattr(anypool, f"adaptive_max_pool{case.rank}d")(x, size, return_indices=True)
        assert torch.equal(got_i, want_i), case.describe()
        assert torch.equal(got_v.isnan(), want_v.isnan()), case.describe()
        assert torch.equal(got_v.nan_to_num(), want_v.nan_to_num()), case.describe()
        if case.rank == 2 and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
                and not x.is_contiguous():
            assert got.is_contiguous(memory_format=torch.channels_last), case.describe()


def test_windows_longer_than_any_tile():
    """Long windows (hundreds of elements) and a large upsampling factor, against native."""
    x = torch.randn(2, 3, 700, 5)
    for size in [(2, 3), (1, 1), (3, 40)]:
        torch.testing.assert_close(anypool.adaptive_avg_pool2d(x, size), F.adaptive_avg_pool2d(x, size))
        got = anypool.adaptive_max_pool2d(x, size, return_indices=True)
        want = F.adaptive_max_pool2d(x, size, return_indices=True)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# --- gradients ----------------------------------------------------------------------------------


def _grad_cases(n, seed, dtypes):
    for case in _harness.random_cases(n, seed=seed, dtypes=dtypes):
        if case.values != "special":  # an inf input has no meaningful gradient
            yield case


@pytest.mark.parametrize("implementation", [None, "portable", "portable-gather"])
def test_gradients_against_reference(implementation, monkeypatch):
    """d/dx of avg and max, by autograd, against the NumPy reference gradients, rounded once to the dtype;
    the max gradient is placed by the reference's own indices, so a wrong index cannot pass."""
    rng = np.random.default_rng(0)
    if implementation == "portable-gather":  # the atomic-free max backward other devices use
        monkeypatch.setattr(portable, "SCATTER_DEVICES", ())
        implementation = "portable"
    with ops.force_implementation(implementation):
        for case in _grad_cases(300, seed=31, dtypes=_harness.DTYPES):
            xn = case.input()
            x = _harness.restride(backend.from_numpy(xn, case.dtype), case.storage).requires_grad_()
            _, want_indices = _harness.expected(case, xn, "argmax")
            for op in ("avg", "max"):
                if op == "avg":
                    y = anypool.adaptive_avg_pool(x, case.output_size, data_format=case.data_format)
                else:
                    y = anypool.adaptive_max_pool(x, case.output_size, data_format=case.data_format)
                g = backend.from_numpy(rng.standard_normal(tuple(y.shape)), case.dtype)
                (gx,) = torch.autograd.grad(y, x, g)
                assert gx.dtype == x.dtype and gx.shape == x.shape
                want = _harness.expected_gradient(case, op, _harness._to_numpy(backend, g), want_indices)
                problem = want.problem(_harness._to_numpy(backend, gx), case.dtype)
                assert problem is None, f"{op} {case.describe()}: {problem}"


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_match_torch_native(device):
    for case, x in _native_cases(120, seed=41):
        if case.values == "special" or x.dtype not in (torch.float32, torch.float64):
            continue
        size, native_size = _sizes(case)
        for kind in ("avg", "max"):
            x1, x2 = x.to(device).requires_grad_(), x.to(device).requires_grad_()
            mine, native = getattr(anypool, f"adaptive_{kind}_pool{case.rank}d"), \
                getattr(F, f"adaptive_{kind}_pool{case.rank}d")
            y1, y2 = mine(x1, size), native(x2, native_size)
            g = torch.randn_like(y2)
            torch.testing.assert_close(torch.autograd.grad(y1, x1, g)[0], torch.autograd.grad(y2, x2, g)[0],
                                       msg=case.describe)


# --- layouts: views only, memory format kept ----------------------------------------------------


class _Recorder(TorchDispatchMode):
    """Records every op (with its arguments) dispatched while active."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((func, args))
        return func(*args, **(kwargs or {}))


def _op_input(calls):
    return next(args[0] for func, args in calls if "anypool" in str(func))


def test_channels_last_memory_is_served_without_a_copy():
    x = torch.randn(2, 8, 9, 11).contiguous(memory_format=torch.channels_last)
    with _Recorder() as rec:
        y = anypool.adaptive_avg_pool2d(x, (4, 5))
    assert _op_input(rec.calls).data_ptr() == x.data_ptr()
    assert y.is_contiguous(memory_format=torch.channels_last)
    values, indices = anypool.adaptive_max_pool2d(x, (4, 5), return_indices=True)
    assert values.is_contiguous(memory_format=torch.channels_last)
    assert indices.is_contiguous(memory_format=torch.channels_last)
    # the portable path itself reads the strided view: no op copies the whole input
    for fn in (portable.avg_forward, portable.max_forward):
        with _Recorder() as rec:
            fn(x, [4, 5])
        copies = [f for f, args in rec.calls if "copy" in str(f) or "clone" in str(f) or "contiguous" in str(f)]
        assert not copies, copies


def test_channels_last_data_format_is_a_view():
    x = torch.randn(2, 9, 11, 8)  # (N, H, W, C)
    with _Recorder() as rec:
        y = anypool.adaptive_max_pool2d(x, (4, 5), data_format="channels_last")
    seen = _op_input(rec.calls)
    assert seen.data_ptr() == x.data_ptr() and seen.shape == (2, 8, 9, 11)
    assert y.shape == (2, 4, 5, 8) and y.is_contiguous()
    want = anypool.adaptive_max_pool2d(x.permute(0, 3, 1, 2).contiguous(), (4, 5)).permute(0, 2, 3, 1)
    assert torch.equal(y, want)


def test_unbatched_and_arbitrary_strides():
    base = torch.randn(3, 20, 17)
    x = base[:, ::2, 1::3]  # neither contiguous nor channels_last
    assert torch.equal(anypool.adaptive_max_pool2d(x, (3, 4)), F.adaptive_max_pool2d(x, (3, 4)))
    torch.testing.assert_close(anypool.adaptive_avg_pool2d(x, (3, 4)), F.adaptive_avg_pool2d(x, (3, 4)))
    y = anypool.adaptive_avg_pool1d(torch.randn(4, 10).t(), 3)  # (10, 4) transposed view, unbatched 1-D
    assert y.shape == (10, 3)


def test_empty_outputs_and_empty_batches():
    x = torch.randn(2, 3, 5, 6)
    assert anypool.adaptive_avg_pool2d(x, (0, 3)).shape == (2, 3, 0, 3)
    v, i = anypool.adaptive_max_pool2d(x, (2, 0), return_indices=True)
    assert v.shape == i.shape == (2, 3, 2, 0) and i.dtype == torch.int64
    e = torch.randn(0, 3, 5, 6, requires_grad=True)
    y = anypool.adaptive_avg_pool2d(e, 2)
    assert y.shape == (0, 3, 2, 2)
    y.sum().backward()
    assert e.grad.shape == e.shape
    assert anypool.global_avg_pool(x).shape == (2, 3)
    assert anypool.global_max_pool(x, keepdims=True).shape == (2, 3, 1, 1)


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match="empty window"):
        anypool.adaptive_avg_pool2d(torch.randn(1, 2, 0, 4), 1)
    with pytest.raises(TypeError, match="floating dtype"):
        anypool.adaptive_avg_pool2d(torch.ones(1, 2, 3, 4, dtype=torch.int32), 1)
    with pytest.raises(TypeError, match="torch backend"):
        anypool.adaptive_max_pool2d(torch.ones(1, 2, 3, 4, dtype=torch.bool), 1)
    with pytest.raises(ValueError, match="spatial axes"):
        anypool.adaptive_avg_pool2d(torch.randn(2, 3), 1)
    with pytest.raises(ValueError, match="output_size"):
        anypool.adaptive_avg_pool2d(torch.randn(1, 2, 3, 4), -1)


def test_integer_max_pool_matches_native_rule():
    x = torch.randint(-3, 4, (2, 3, 7, 9), dtype=torch.int64)
    v, i = anypool.adaptive_max_pool2d(x, (3, 4), return_indices=True)
    want_v, want_i = F.adaptive_max_pool2d(x.double(), (3, 4), return_indices=True)
    assert v.dtype == torch.int64 and torch.equal(v.double(), want_v) and torch.equal(i, want_i)
