"""Padded batches: ``valid_sizes=`` on every pooling function, in NumPy and torch (C++ CPU kernels and portable path).

The oracle is the definition: output ``i`` is the same function applied to sample ``i`` cropped to its valid
region, alone — computed here by cropping and calling anypool's NumPy reference and torch's native adaptive
pools on each crop.  Random shapes (non-divisible, upsampling, size-1 valid sizes, full-size samples,
``None`` output entries), both layouts, every dtype, NaN/±inf in the padding (which must not leak), indices
that gather back to the values, gradients (the crop's on the valid region, exactly 0 on the padding),
double backward, ``torch.compile``/``torch.export`` with ``valid_sizes`` a tensor input, layers, and every error.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import anypool
from anypool import _args, _bins, _harness
from anypool._harness import ROUNDOFF
from anypool.backends import numpy as ref

torch = pytest.importorskip("torch")

from anypool.backends.torch import ops  # noqa: E402
from anypool.layers import torch as layers  # noqa: E402

IMPLS = ["numpy", "portable", "anypool.backends.torch.cpu"]
DTYPES = ["float32", "float64", "float16", "bfloat16"]
FUNCTIONS = {1: ("adaptive_avg_pool1d", "adaptive_max_pool1d"), 2: ("adaptive_avg_pool2d", "adaptive_max_pool2d"),
             3: ("adaptive_avg_pool3d", "adaptive_max_pool3d")}
NATIVE_AVG = {1: torch.nn.functional.adaptive_avg_pool1d, 2: torch.nn.functional.adaptive_avg_pool2d,
              3: torch.nn.functional.adaptive_avg_pool3d}
NATIVE_MAX = {1: torch.nn.functional.adaptive_max_pool1d, 2: torch.nn.functional.adaptive_max_pool2d,
              3: torch.nn.functional.adaptive_max_pool3d}


# --- cases ------------------------------------------------------------------------------------------


def _case(seed: int, rank: int | None = None, channels: int | None = None):
    """A random padded batch: ``(x float64 NumPy, valid (N, k), output_size, channels_last)``.

    The valid regions hold normal values with ties and, sometimes, NaN/±inf; the padding holds
    NaN, ±inf and huge values, so any read of it shows in the result.
    """
    rng = np.random.default_rng(seed)
    rank = rank or int(rng.integers(1, 4))
    n, c = int(rng.integers(1, 5)), int(rng.integers(1, 4))
    c = channels or c
    padded = tuple(int(s) for s in rng.integers(1, 11 if rank < 3 else 7, rank))
    valid = np.stack([rng.integers(1, s + 1, n) for s in padded], axis=1)
    valid[0] = padded  # a full-size sample
    if n > 1:
        valid[1] = 1  # a sample of size 1 on every axis
    output_size = []
    for s in padded:
        kind = rng.integers(0, 5)
        output_size.append(None if kind == 0 else 1 if kind == 1 else int(rng.integers(1, 2 * s + 3)))
    channels_last = bool(rng.integers(0, 2))
    x = np.round(rng.standard_normal((n, c, *padded)) * 4) / 4  # quarter steps: ties
    if rng.integers(0, 3) == 0:
        x.reshape(-1)[rng.integers(0, x.size, 2)] = [np.nan, np.inf]
    pad_values = np.array([np.nan, np.inf, -np.inf, 6e4, -6e4])
    for i in range(n):
        region = np.zeros(padded, bool)
        region[tuple(slice(0, int(s)) for s in valid[i])] = True
        x[i][:, ~region] = rng.choice(pad_values, (c, int((~region).sum())))
    if channels_last:
        x = np.moveaxis(x, 1, -1)
    return x, valid, tuple(output_size), channels_last


def _crop(a: np.ndarray, i: int, sizes, channels_last: bool) -> np.ndarray:
    spatial = tuple(slice(0, int(s)) for s in sizes)
    return a[(slice(i, i + 1), *spatial)] if channels_last else a[(slice(i, i + 1), slice(None), *spatial)]


def _oracle(function: str, x: np.ndarray, valid, output_size, channels_last: bool, **kw):
    """Each sample cropped and pooled alone by the NumPy reference, written into zeros of the padded result."""
    fmt = "channels_last" if channels_last else "channels_first"
    rank = valid.shape[1]
    padded = x.shape[1:1 + rank] if channels_last else x.shape[2:]
    results = []
    for i, sizes in enumerate(valid):
        got = getattr(anypool, function)(_crop(x, i, sizes, channels_last), *output_size, data_format=fmt, **kw)
        if kw.get("return_indices"):
            values, index = got
            index = np.ravel_multi_index(np.unravel_index(index, tuple(int(s) for s in sizes)), padded)
            got = (values, index)
        results.append(got)
    out_spatial = [o if o is not None else p for o, p in zip(_out_entries(output_size, rank), padded)]

    def assemble(k):
        first = results[0][k] if k is not None else results[0]
        full = list(first.shape)
        full[0] = len(results)
        if function.startswith("adaptive"):
            for d, size in enumerate(out_spatial):
                full[1 + d if channels_last else 2 + d] = size
        out = np.zeros(full, first.dtype)
        for i, r in enumerate(results):
            r = r[k] if k is not None else r
            out[(slice(i, i + 1), *(slice(0, s) for s in r.shape[1:]))] = r
        return out

    return (assemble(0), assemble(1)) if kw.get("return_indices") else assemble(None)


def _out_entries(output_size, rank):
    if not output_size:
        return (1,) * rank
    (size,) = output_size
    return tuple(size) if isinstance(size, (tuple, list)) else (size,) * rank


def _to(impl: str, x: np.ndarray, dtype: str):
    if impl == "numpy":
        return x.astype(dtype) if dtype != "bfloat16" else x.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(x)).to(getattr(torch, dtype))


def _numpy(y) -> np.ndarray:
    if isinstance(y, torch.Tensor):
        y = y.detach()
        return (y.float() if y.dtype == torch.bfloat16 else y).numpy()
    return np.asarray(y)


def _call(impl: str, function: str, x, *args, **kw):
    if impl == "numpy":
        return getattr(anypool, function)(x, *args, **kw)
    with ops.force_implementation(impl):
        return getattr(anypool, function)(x, *args, **kw)


def _exact_input(x: np.ndarray, dtype: str) -> np.ndarray:
    """``x`` rounded to ``dtype`` (as float32/64): the oracle pools the same numbers the backend sees."""
    if dtype == "bfloat16":
        return torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    return x.astype(dtype)


def _tolerance(dtype: str, padded, output_size) -> float:
    window = math.prod(_bins.max_window_expr(p, o if o else p) for p, o in zip(padded, output_size))
    return 8 * ROUNDOFF[dtype] + 2 * window * ROUNDOFF["float64" if dtype == "float64" else "float32"]


def _close(got, want, tol):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    same = (got == want) | (np.isnan(got) & np.isnan(want))
    with np.errstate(invalid="ignore"):
        err = np.where(same, 0.0, np.abs(got - want) / (1 + np.abs(want)))
    assert np.all(np.where(np.isfinite(want) | same, err, np.inf) <= tol), (err.max(), got, want)


# --- values and indices: the crop pooled alone --------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("seed", range(24))
def test_equals_each_cropped_sample_alone(impl, seed):
    x, valid, output_size, cl = _case(seed)
    rank = valid.shape[1]
    dtype = DTYPES[seed % 4] if impl != "numpy" else DTYPES[seed % 3]
    fmt = "channels_last" if cl else "channels_first"
    xe = _exact_input(x, dtype)
    padded = x.shape[1:1 + rank] if cl else x.shape[2:]
    avg, mx = FUNCTIONS[rank]
    vs = valid if seed % 2 else valid.tolist()
    if impl != "numpy" and seed % 3 == 0:
        vs = torch.from_numpy(valid).to(torch.int32)

    got = _call(impl, avg, _to(impl, x, dtype), output_size, data_format=fmt, valid_sizes=vs)
    want = _oracle(avg, xe, valid, (output_size,), cl)
    _close(_numpy(got), want, _tolerance(dtype, padded, output_size))

    values, index = _call(impl, mx, _to(impl, x, dtype), output_size, data_format=fmt, valid_sizes=vs,
                          return_indices=True)
    want_values, want_index = _oracle(mx, xe, valid, (output_size,), cl, return_indices=True)
    np.testing.assert_array_equal(_numpy(values), want_values)
    np.testing.assert_array_equal(_numpy(index), want_index)
    only = _call(impl, mx, _to(impl, x, dtype), output_size, data_format=fmt, valid_sizes=vs)
    np.testing.assert_array_equal(_numpy(only), want_values)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("seed", range(8))
def test_generic_and_global_functions(impl, seed):
    x, valid, output_size, cl = _case(100 + seed)
    rank = valid.shape[1]
    fmt = "channels_last" if cl else "channels_first"
    xt = _to(impl, x, "float64")
    got = _call(impl, "adaptive_avg_pool", xt, output_size, data_format=fmt, valid_sizes=valid)
    _close(_numpy(got), _oracle("adaptive_avg_pool", x, valid, (output_size,), cl), 1e-12)
    got, idx = _call(impl, "adaptive_max_pool", xt, output_size, data_format=fmt, valid_sizes=valid,
                     return_indices=True)
    want, want_idx = _oracle("adaptive_max_pool", x, valid, (output_size,), cl, return_indices=True)
    np.testing.assert_array_equal(_numpy(got), want)
    np.testing.assert_array_equal(_numpy(idx), want_idx)
    for keepdims in (False, True):
        for function, reduce in (("global_avg_pool", np.mean), ("global_max_pool", np.max)):
            got = _numpy(_call(impl, function, xt, data_format=fmt, keepdims=keepdims, valid_sizes=valid))
            axes = tuple(range(1, 1 + rank)) if cl else tuple(range(2, 2 + rank))
            want = np.concatenate([reduce(_crop(x, i, s, cl), axis=axes, keepdims=keepdims)
                                   for i, s in enumerate(valid)])
            if function == "global_avg_pool":
                _close(got, want, 1e-12)
            else:
                np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("impl", IMPLS[1:])
@pytest.mark.parametrize("seed", range(12))
def test_equals_torch_native_on_each_crop(impl, seed):
    x, valid, output_size, cl = _case(200 + seed)
    rank = valid.shape[1]
    fmt = "channels_last" if cl else "channels_first"
    xt = torch.from_numpy(np.ascontiguousarray(x)).float()
    avg, mx = FUNCTIONS[rank]
    got = _call(impl, avg, xt, output_size, data_format=fmt, valid_sizes=torch.from_numpy(valid))
    values, index = _call(impl, mx, xt, output_size, data_format=fmt, valid_sizes=torch.from_numpy(valid),
                          return_indices=True)
    logical = (lambda t: t.movedim(-1, 1)) if cl else (lambda t: t)
    got, values, index = logical(got), logical(values), logical(index)
    xl = logical(xt)
    for i, sizes in enumerate(valid.tolist()):
        crop = xl[(slice(i, i + 1), slice(None), *(slice(0, s) for s in sizes))]
        out = [s if o is None else o for o, s in zip(output_size, sizes)]
        region = (slice(i, i + 1), slice(None), *(slice(0, o) for o in out))
        torch.testing.assert_close(got[region], NATIVE_AVG[rank](crop, out), equal_nan=True, rtol=1e-5, atol=1e-6)
        want_v, want_i = NATIVE_MAX[rank](crop, out, return_indices=True)
        torch.testing.assert_close(values[region], want_v, equal_nan=True, rtol=0, atol=0)
        coords = np.unravel_index(want_i.numpy(), sizes)
        padded = xl.shape[2:]
        torch.testing.assert_close(index[region], torch.from_numpy(np.ravel_multi_index(coords, padded)))
        beyond = torch.ones_like(got[i:i + 1], dtype=torch.bool)
        beyond[(slice(None), slice(None), *region[2:])] = False
        assert (got[i:i + 1][beyond] == 0).all() and (values[i:i + 1][beyond] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_indices_gather_back_to_the_values(impl):
    for seed in range(6):
        x, valid, output_size, cl = _case(300 + seed)
        rank = valid.shape[1]
        x = np.nan_to_num(np.moveaxis(x, -1, 1) if cl else x, nan=7.0)  # gather compares values: no NaN
        values, index = _call(impl, FUNCTIONS[rank][1], _to(impl, x, "float64"), output_size, valid_sizes=valid,
                              return_indices=True)
        values, index = _numpy(values), _numpy(index)
        flat = x.reshape(x.shape[0], x.shape[1], -1)
        gathered = np.take_along_axis(flat, index.reshape(index.shape[0], index.shape[1], -1), axis=2)
        present = _oracle(FUNCTIONS[rank][1], np.ones_like(x), valid, (output_size,), False) == 1
        np.testing.assert_array_equal(gathered.reshape(values.shape)[present], values[present])


def test_none_entry_keeps_each_samples_own_length():
    # the text-line case: height pooled to 2, each line valid over its own width, 0 beyond
    x = torch.arange(2 * 1 * 4 * 6, dtype=torch.float64).reshape(2, 1, 4, 6)
    got = layers.AdaptiveAvgPool2d((2, None))(x, valid_sizes=torch.tensor([[4, 6], [2, 3]]))
    first = torch.nn.functional.adaptive_avg_pool2d(x[:1], (2, 6))
    second = torch.nn.functional.adaptive_avg_pool2d(x[1:, :, :2, :3], (2, 3))
    torch.testing.assert_close(got[:1], first)
    torch.testing.assert_close(got[1:, :, :, :3], second)
    assert (got[1:, :, :, 3:] == 0).all()


# --- gradients ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS[1:])
@pytest.mark.parametrize("seed", range(10))
def test_gradients_equal_the_crops_and_vanish_on_the_padding(impl, seed):
    x, valid, output_size, cl = _case(400 + seed)
    rank = valid.shape[1]
    x = np.where(np.isfinite(x), x, 0.0)  # finite values, so the native crop's gradient is finite too
    rng = np.random.default_rng(seed)
    for function, native in zip(FUNCTIONS[rank], (NATIVE_AVG[rank], NATIVE_MAX[rank])):
        xt = torch.from_numpy(np.ascontiguousarray(x)).requires_grad_()
        with ops.force_implementation(impl):
            y = getattr(anypool, function)(xt, output_size, data_format="channels_last" if cl else "channels_first",
                                           valid_sizes=torch.from_numpy(valid))
            g = torch.from_numpy(rng.standard_normal(y.shape))
            (grad,) = torch.autograd.grad(y, xt, g)
        logical = (lambda t: t.movedim(-1, 1)) if cl else (lambda t: t)
        grad, g, xl = logical(grad), logical(g), logical(xt.detach())
        region_mask = torch.zeros_like(grad, dtype=torch.bool)
        for i, sizes in enumerate(valid.tolist()):
            crop = xl[(slice(i, i + 1), slice(None), *(slice(0, s) for s in sizes))].clone().requires_grad_()
            out = [s if o is None else o for o, s in zip(output_size, sizes)]
            yc = native(crop, out)
            yc = yc[0] if isinstance(yc, tuple) else yc
            gc = g[(slice(i, i + 1), slice(None), *(slice(0, o) for o in out))]
            (want,) = torch.autograd.grad(yc, crop, gc)
            region = (slice(i, i + 1), slice(None), *(slice(0, s) for s in sizes))
            torch.testing.assert_close(grad[region], want, rtol=1e-12, atol=1e-12)
            region_mask[region] = True
        assert (grad[~region_mask] == 0).all()
        if function.startswith("adaptive_avg"):
            keep = _args.kept_axes(output_size, rank)
            spec = _args.pool_spec(xl.shape, output_size, rank)
            want = ref.avg_pool_grad_valid(g.numpy(), spec, valid, keep)
            np.testing.assert_allclose(grad.numpy(), want, rtol=1e-12, atol=1e-12)


def test_padding_gradient_is_zero_with_nan_in_the_padding():
    x, valid, output_size, cl = _case(7, rank=2)
    xt = torch.from_numpy(np.ascontiguousarray(x)).requires_grad_()
    fmt = "channels_last" if cl else "channels_first"
    for impl in IMPLS[1:]:
        with ops.force_implementation(impl):
            for function in FUNCTIONS[2]:
                y = getattr(anypool, function)(xt, output_size, data_format=fmt, valid_sizes=valid)
                (grad,) = torch.autograd.grad(y.sum(), xt)
                pad = ~torch.from_numpy(np.isfinite(x) | (np.abs(x) < 1e4))
                assert pad.any() or (valid == np.array(x.shape[1:3] if cl else x.shape[2:])).all()
                assert (grad[pad] == 0).all()


@pytest.mark.parametrize("impl", IMPLS[1:])
def test_avg_double_backward_and_gradcheck(impl):
    rng = np.random.default_rng(5)
    x = torch.from_numpy(rng.standard_normal((3, 2, 5, 7))).requires_grad_()
    valid = torch.tensor([[5, 7], [2, 3], [1, 6]])
    with ops.force_implementation(impl):
        for function in FUNCTIONS[2]:
            def f(t, function=function):
                return getattr(anypool, function)(t, (3, 4), valid_sizes=valid)
            assert torch.autograd.gradcheck(f, (x,))
        assert torch.autograd.gradgradcheck(lambda t: anypool.adaptive_avg_pool2d(t, (3, 4), valid_sizes=valid), (x,))
        assert torch.autograd.gradgradcheck(lambda t: anypool.adaptive_avg_pool2d(t, (2, None), valid_sizes=valid),
                                            (x,))


def test_custom_ops_opcheck():
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.standard_normal((3, 2, 5, 7))).requires_grad_()
    sizes = torch.tensor([[5, 7, 3, 4], [2, 3, 3, 4], [1, 6, 3, 4]])
    torch.library.opcheck(ops.adaptive_avg_pool_valid, (x, sizes, [3, 4]))
    torch.library.opcheck(ops.adaptive_max_pool_valid, (x, sizes, [3, 4]))
    g = torch.randn(3, 2, 3, 4, dtype=torch.float64)
    torch.library.opcheck(ops.adaptive_avg_pool_valid_backward, (g, sizes, [5, 7]))
    _, idx = ops.adaptive_max_pool_valid(x.detach(), sizes, [3, 4])
    torch.library.opcheck(ops.adaptive_max_pool_valid_backward, (g, idx, sizes, [5, 7]))


# --- tracing: compile and export --------------------------------------------------------------------


def test_compile_fullgraph_valid_sizes_a_tensor_input_no_recompile():
    import torch._dynamo

    torch._dynamo.reset()
    frames = []

    def backend(gm, example_inputs):
        frames.append(gm)
        return gm.forward

    @torch.compile(fullgraph=True, backend=backend, dynamic=False)
    def f(x, valid):
        return anypool.adaptive_avg_pool2d(x, 3, valid_sizes=valid) + anypool.adaptive_max_pool2d(
            x, (3, None), valid_sizes=valid).sum(-1, keepdim=True)

    x = torch.randn(4, 3, 9, 8)
    for valid in ([[9, 8], [1, 1], [4, 5], [9, 2]], [[3, 3], [9, 8], [2, 7], [5, 5]]):
        v = torch.tensor(valid)
        want = anypool.adaptive_avg_pool2d(x, 3, valid_sizes=v) + anypool.adaptive_max_pool2d(
            x, (3, None), valid_sizes=v).sum(-1, keepdim=True)
        torch.testing.assert_close(f(x, v), want)
    assert len(frames) == 1


def test_export_dynamic_batch_and_size():
    class Model(torch.nn.Module):
        def forward(self, x, valid):
            return anypool.adaptive_avg_pool2d(x, (3, 2), valid_sizes=valid)

    n, h, w = torch.export.Dim("n", min=2), torch.export.Dim("h", min=2), torch.export.Dim("w", min=2)
    x, v = torch.randn(3, 2, 7, 6), torch.tensor([[7, 6], [2, 3], [5, 1]])
    ep = torch.export.export(Model(), (x, v), dynamic_shapes=({0: n, 2: h, 3: w}, {0: n}))
    for shape, valid in (((3, 2, 7, 6), [[7, 6], [2, 3], [5, 1]]), ((5, 2, 4, 9), [[4, 9], [1, 1], [2, 8], [3, 3],
                                                                                     [4, 2]])):
        x, v = torch.randn(shape), torch.tensor(valid)
        torch.testing.assert_close(ep.module()(x, v), anypool.adaptive_avg_pool2d(x, (3, 2), valid_sizes=v))


# --- layers ------------------------------------------------------------------------------------------


def test_torch_layers_take_valid_sizes_in_forward():
    x, valid, _, cl = _case(11, rank=2)
    xt = torch.from_numpy(x).movedim(-1, 1) if cl else torch.from_numpy(x)
    v = torch.from_numpy(valid)
    torch.testing.assert_close(layers.AdaptiveAvgPool2d((3, 2))(xt, valid_sizes=v),
                               anypool.adaptive_avg_pool2d(xt, (3, 2), valid_sizes=v), equal_nan=True)
    values, index = layers.AdaptiveMaxPool2d(4, return_indices=True)(xt, valid_sizes=v)
    want = anypool.adaptive_max_pool2d(xt, 4, valid_sizes=v, return_indices=True)
    torch.testing.assert_close(values, want[0], equal_nan=True)
    torch.testing.assert_close(index, want[1])
    torch.testing.assert_close(layers.GlobalAvgPool()(xt, valid_sizes=v),
                               anypool.global_avg_pool(xt, valid_sizes=v), equal_nan=True)
    torch.testing.assert_close(layers.GlobalMaxPool(flatten=False)(xt, valid_sizes=v),
                               anypool.global_max_pool(xt, keepdims=True, valid_sizes=v), equal_nan=True)
    x1 = xt.flatten(2)
    v1 = v.prod(1).clamp(max=x1.shape[-1])
    torch.testing.assert_close(layers.AdaptiveAvgPool1d(3)(x1, valid_sizes=v1),
                               anypool.adaptive_avg_pool1d(x1, 3, valid_sizes=v1), equal_nan=True)
    torch.testing.assert_close(layers.AdaptiveMaxPool1d(3)(x1, valid_sizes=v1),
                               anypool.adaptive_max_pool1d(x1, 3, valid_sizes=v1), equal_nan=True)
    x3 = xt.unsqueeze(2)
    v3 = torch.cat([torch.ones_like(v[:, :1]), v], 1)
    torch.testing.assert_close(layers.AdaptiveAvgPool3d((1, 2, 2))(x3, valid_sizes=v3),
                               anypool.adaptive_avg_pool3d(x3, (1, 2, 2), valid_sizes=v3), equal_nan=True)
    torch.testing.assert_close(layers.AdaptiveMaxPool3d((1, 2, 2))(x3, valid_sizes=v3),
                               anypool.adaptive_max_pool3d(x3, (1, 2, 2), valid_sizes=v3), equal_nan=True)
    # without valid_sizes the layers pool the whole padded tensor, as before
    torch.testing.assert_close(layers.AdaptiveAvgPool2d(2)(xt), anypool.adaptive_avg_pool2d(xt, 2), equal_nan=True)


def test_torch_reduction_layers_take_valid_sizes_in_forward():
    """LP, GeM and timm's SelectAdaptivePool2d on a padded batch, against the NumPy reference on the same data."""
    x, valid = _cf_case(13, 2, False)
    x = np.abs(x) + 0.5  # LP with a non-integer p and GeM: positive inputs
    xt, v = torch.from_numpy(x), torch.from_numpy(valid)
    for layer, want in ((layers.AdaptiveLPPool2d(2.5, (3, 2)),
                         anypool.adaptive_lp_pool2d(x, 2.5, (3, 2), valid_sizes=valid)),
                        (layers.AdaptiveGeMPool2d(2, p=3.0), anypool.adaptive_gem_pool2d(x, 2, valid_sizes=valid)),
                        (layers.SelectAdaptivePool2d(1, "catavgmax", flatten=True),
                         anypool.select_adaptive_pool2d(x, "catavgmax", 1, True, valid_sizes=valid))):
        np.testing.assert_allclose(layer(xt, valid_sizes=v).detach().numpy(), want, rtol=1e-12, atol=1e-12)


# --- errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [np.zeros, torch.zeros])
@pytest.mark.parametrize(("valid", "kind", "words"), [
    ([[5, 4], [3]], TypeError, "valid_sizes): got [[5, 4], [3]]; expected an integer array"),
    ([[5, 4]], ValueError, "got an array of shape (1, 2); expected shape (2, 2): one row per sample"),
    ([5, 4], ValueError, "got an array of shape (2,); expected shape (2, 2)"),
    ([[5, 4, 1], [1, 1, 1]], ValueError, "got an array of shape (2, 3); expected shape (2, 2)"),
    ([[5.0, 4.0], [3.0, 2.0]], TypeError, "got an array of dtype float64; expected an integer dtype"),
    ([[True, True], [True, True]], TypeError, "got an array of dtype bool; expected an integer dtype"),
    ([[5, 4], [0, 2]], ValueError, "got 0 for sample 1, spatial axis 0; expected a size from 1 to the padded size 5"),
    ([[5, 5], [3, 2]], ValueError, "got 5 for sample 0, spatial axis 1; expected a size from 1 to the padded size 4"),
    ([[5, 4], [-1, 2]], ValueError, "got -1 for sample 1, spatial axis 0"),
])
def test_errors_name_argument_value_and_expectation(make, valid, kind, words):
    x = make((2, 3, 5, 4))
    for function in ("adaptive_avg_pool2d", "adaptive_max_pool2d"):
        with pytest.raises(kind) as e:
            getattr(anypool, function)(x, 2, valid_sizes=valid)
        assert f"{function}(valid_sizes)" in str(e.value) and words in str(e.value), str(e.value)
    with pytest.raises(kind, match=r"global_avg_pool\(valid_sizes\)"):
        anypool.global_avg_pool(x, valid_sizes=valid)


@pytest.mark.parametrize("make", [np.zeros, torch.zeros])
def test_errors_unbatched_input_and_tensor_dtypes(make):
    with pytest.raises(ValueError, match=r"adaptive_avg_pool2d\(valid_sizes\): got valid sizes for an input of shape "
                                         r"\(3, 5, 4\); expected a batched input \(N, C, \*S\)"):
        anypool.adaptive_avg_pool2d(make((3, 5, 4)), 2, valid_sizes=[[5, 4]])
    with pytest.raises(ValueError, match=r"expected a batched input \(N, \*S, C\)"):
        anypool.adaptive_max_pool1d(make((5, 3)), 2, data_format="channels_last", valid_sizes=[5])
    # 1-D accepts (N,) as well as (N, 1)
    x = make((2, 3, 5))
    np.testing.assert_array_equal(_numpy(anypool.adaptive_avg_pool1d(x, 2, valid_sizes=[5, 2])),
                                  _numpy(anypool.adaptive_avg_pool1d(x, 2, valid_sizes=[[5], [2]])))
    if make is torch.zeros:
        with pytest.raises(TypeError, match=r"got an array of dtype float32; expected an integer dtype"):
            anypool.adaptive_avg_pool1d(x, 2, valid_sizes=torch.tensor([5.0, 2.0]))
        with pytest.raises(ValueError, match=r"got 6 for sample 0, spatial axis 0; expected a size from 1 to the "
                                             r"padded size 5"):
            anypool.adaptive_max_pool1d(x, 2, valid_sizes=torch.tensor([6, 2]))


def test_compile_aot_autograd_with_backward():
    @torch.compile(fullgraph=True, backend="aot_eager", dynamic=True)
    def f(x, valid):
        return (anypool.adaptive_avg_pool2d(x, (2, 3), valid_sizes=valid).sum()
                + anypool.adaptive_max_pool2d(x, 2, valid_sizes=valid).square().sum())

    for shape, valid in (((3, 2, 7, 6), [[7, 6], [2, 3], [5, 1]]), ((2, 2, 5, 9), [[1, 9], [5, 4]])):
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        v = torch.tensor(valid)
        (got,) = torch.autograd.grad(f(x, v), x)
        want = (anypool.adaptive_avg_pool2d(x, (2, 3), valid_sizes=v).sum()
                + anypool.adaptive_max_pool2d(x, 2, valid_sizes=v).square().sum())
        torch.testing.assert_close(got, torch.autograd.grad(want, x)[0])


# --- JAX ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def jnp():
    jax = pytest.importorskip("jax")
    return jax.numpy


@pytest.mark.parametrize("seed", range(12))
def test_jax_equals_each_cropped_sample_alone(jnp, seed):
    x, valid, output_size, cl = _case(500 + seed)
    rank = valid.shape[1]
    dtype = ("float32", "float16", "bfloat16")[seed % 3]
    fmt = "channels_last" if cl else "channels_first"
    xe = _exact_input(x, dtype)
    padded = x.shape[1:1 + rank] if cl else x.shape[2:]
    avg, mx = FUNCTIONS[rank]
    xj = jnp.asarray(x, dtype=jnp.bfloat16 if dtype == "bfloat16" else dtype)
    vs = jnp.asarray(valid) if seed % 2 else valid.tolist()
    got = getattr(anypool, avg)(xj, output_size, data_format=fmt, valid_sizes=vs)
    _close(np.asarray(got.astype(jnp.float32)), _oracle(avg, xe, valid, (output_size,), cl),
           _tolerance(dtype, padded, output_size))
    values, index = getattr(anypool, mx)(xj, output_size, data_format=fmt, valid_sizes=vs, return_indices=True)
    want_values, want_index = _oracle(mx, xe, valid, (output_size,), cl, return_indices=True)
    np.testing.assert_array_equal(np.asarray(values.astype(jnp.float32)), want_values)
    np.testing.assert_array_equal(np.asarray(index), want_index)
    got = anypool.global_max_pool(xj, data_format=fmt, valid_sizes=vs)
    want = _oracle("adaptive_max_pool", xe, valid, ((1,) * rank,), cl).reshape(got.shape)
    np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), want)


def test_jax_jit_traces_valid_sizes_once_grad_and_vmap(jnp):
    import jax

    traces = []

    @jax.jit
    def f(x, valid):
        traces.append(1)
        return anypool.adaptive_avg_pool2d(x, (3, 2), valid_sizes=valid), anypool.adaptive_max_pool2d(
            x, (2, None), valid_sizes=valid, return_indices=True)

    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 2, 7, 6)).astype(np.float32)
    for valid in ([[7, 6], [1, 1], [4, 5]], [[2, 3], [7, 2], [5, 6]]):
        v = np.array(valid)
        avg, (values, index) = f(jnp.asarray(x), jnp.asarray(v))
        _close(np.asarray(avg), _oracle("adaptive_avg_pool2d", x, v, ((3, 2),), False), 1e-6)
        want_values, want_index = _oracle("adaptive_max_pool2d", x, v, ((2, None),), False, return_indices=True)
        np.testing.assert_array_equal(np.asarray(values), want_values)
        np.testing.assert_array_equal(np.asarray(index), want_index)
    assert len(traces) == 1

    v = np.array([[7, 6], [2, 3], [5, 1]])
    xp = np.where(np.ones_like(x, bool), x, 0)
    xp[1, :, 2:, :] = np.nan  # padding: NaN must not reach the gradient either
    xp[2, :, :, 1:] = np.inf
    for function, native in (("adaptive_avg_pool2d", NATIVE_AVG[2]), ("adaptive_max_pool2d", NATIVE_MAX[2])):
        g = jax.grad(lambda t, function=function: getattr(anypool, function)(t, (3, 2), valid_sizes=v).sum())(
            jnp.asarray(xp))
        g = np.asarray(g)
        for i, sizes in enumerate(v):
            crop = torch.from_numpy(xp[i:i + 1, :, :sizes[0], :sizes[1]]).requires_grad_()
            (want,) = torch.autograd.grad(native(crop, (3, 2)).sum(), crop)
            np.testing.assert_allclose(g[i:i + 1, :, :sizes[0], :sizes[1]], want.numpy(), rtol=1e-6, atol=1e-7)
            pad = np.ones(g.shape[1:], bool)
            pad[:, :sizes[0], :sizes[1]] = False
            assert (g[i][pad] == 0).all()

    batched = jax.vmap(lambda t, s: anypool.adaptive_avg_pool2d(t, (3, 2), valid_sizes=s))
    xs, vs = np.stack([x, x[::-1]]), np.stack([v, v[::-1]])
    got = np.asarray(batched(jnp.asarray(xs), jnp.asarray(vs)))
    for b in range(2):
        _close(got[b], _oracle("adaptive_avg_pool2d", xs[b], vs[b], ((3, 2),), False), 1e-6)


# --- ONNX export ----------------------------------------------------------------------------------------


def _cf_case(seed, rank, channels_last):
    """A case with 2 channels (fixed at export) in the layout asked for."""
    x, valid, _, cl = _case(seed, rank=rank, channels=2)
    x = np.moveaxis(x, -1, 1) if cl else x
    return np.ascontiguousarray(np.moveaxis(x, 1, -1) if channels_last else x), valid


class _Padded(torch.nn.Module):
    def __init__(self, rank, output_size, data_format):
        super().__init__()
        self.rank, self.output_size, self.data_format = rank, output_size, data_format

    def forward(self, x, valid):
        avg, mx = FUNCTIONS[self.rank]
        kw = {"data_format": self.data_format, "valid_sizes": valid}
        return (getattr(anypool, avg)(x, self.output_size, **kw),
                *getattr(anypool, mx)(x, self.output_size, return_indices=True, **kw),
                anypool.global_avg_pool(x, **kw))


@pytest.mark.parametrize(("rank", "output_size", "data_format"), [
    (1, 3, "channels_first"), (2, (3, None), "channels_first"), (2, (2, 5), "channels_last"),
    (3, (2, 1, 3), "channels_first"),
])
def test_onnx_export_valid_sizes_a_graph_input(rank, output_size, data_format):
    ort = pytest.importorskip("onnxruntime")
    import anypool.onnx

    cl = data_format == "channels_last"
    x, valid = _cf_case(600 + rank, rank, cl)
    x = torch.from_numpy(x).float()
    spatial = range(1, 1 + rank) if cl else range(2, 2 + rank)
    dims = {0: "N", **{a: f"S{a}" for a in spatial}}
    model = _Padded(rank, output_size, data_format)
    program = anypool.onnx.export(model, (x, torch.from_numpy(valid)), None, dynamic_shapes=(dims, {0: "N"}))
    session = ort.InferenceSession(program.model_proto.SerializeToString())
    names = [i.name for i in session.get_inputs()]
    for seed in range(3):  # other batch compositions, sizes and padding (NaN, inf)
        x, valid = _cf_case(700 + 10 * rank + seed, rank, cl)
        got = session.run(None, {names[0]: x.astype(np.float32), names[1]: valid})
        want = model(torch.from_numpy(x).float(), torch.from_numpy(valid))
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w.numpy(), rtol=1e-6, atol=1e-6)


def test_flax_modules_take_valid_sizes(jnp):
    pytest.importorskip("flax")
    import anypool.layers.flax as apf

    x, valid = _cf_case(800, 2, True)  # Flax: channels_last
    xj = jnp.asarray(x.astype(np.float32))
    kw_cl = dict(data_format="channels_last", valid_sizes=valid)
    for module, function, kw in ((apf.AdaptiveAvgPool((3, None)), "adaptive_avg_pool", {}),
                                 (apf.AdaptiveMaxPool((2, 4)), "adaptive_max_pool", {}),
                                 (apf.GlobalAvgPool(), "global_avg_pool", {}),
                                 (apf.GlobalMaxPool(keepdims=True), "global_max_pool", {"keepdims": True})):
        args = (module.output_size,) if function.startswith("adaptive") else ()
        want = getattr(anypool, function)(x.astype(np.float32), *args, data_format="channels_last",
                                          valid_sizes=valid, **kw)
        np.testing.assert_allclose(np.asarray(module(xj, valid_sizes=jnp.asarray(valid))), want, rtol=1e-6,
                                   atol=1e-6)
    xp = np.abs(x.astype(np.float32)) + 0.5
    for module, want in ((apf.AdaptiveGeMPool((2, 3)), anypool.adaptive_gem_pool2d(xp, (2, 3), **kw_cl)),
                         (apf.AdaptiveLPPool(3.0, (2, 2)), anypool.adaptive_lp_pool2d(xp, 3.0, 2, **kw_cl)),
                         (apf.SelectAdaptivePool2d(2, "avgmax"), anypool.adaptive_avgmax_pool2d(xp, 2, **kw_cl))):
        np.testing.assert_allclose(np.asarray(module(jnp.asarray(xp), valid_sizes=jnp.asarray(valid))), want,
                                   rtol=1e-5, atol=1e-6)


def test_plain_torch_onnx_export_after_import():
    ort = pytest.importorskip("onnxruntime")
    import anypool.onnx  # noqa: F401  (registers the translations with torch.onnx.export)

    model = _Padded(2, (2, None), "channels_first")
    x, valid = _cf_case(900, 2, False)
    dims = {0: torch.export.Dim("N", min=2), 2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC}
    program = torch.onnx.export(model, (torch.from_numpy(x).float(), torch.from_numpy(valid)), dynamo=True,
                                dynamic_shapes=(dims, {0: dims[0]}), verbose=False)
    session = ort.InferenceSession(program.model_proto.SerializeToString())
    names = [i.name for i in session.get_inputs()]
    x, valid = _cf_case(901, 2, False)
    got = session.run(None, {names[0]: x.astype(np.float32), names[1]: valid})
    for g, w in zip(got, model(torch.from_numpy(x).float(), torch.from_numpy(valid))):
        np.testing.assert_allclose(g, w.numpy(), rtol=1e-6, atol=1e-6)


class _PaddedReductions(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.gem = layers.AdaptiveGeMPool2d((3, 2), p=2.5)
        self.lp = layers.AdaptiveLPPool2d(2.0, (2, 3))
        self.head = layers.SelectAdaptivePool2d(2, "catavgmax")

    def forward(self, x, valid):
        return self.gem(x, valid_sizes=valid), self.lp(x, valid_sizes=valid), self.head(x, valid_sizes=valid)


def test_onnx_export_of_padded_reductions_any_batch_and_size():
    ort = pytest.importorskip("onnxruntime")
    import anypool.onnx  # noqa: F401  (registers the translations with torch.onnx.export)

    rng = np.random.default_rng(14)
    model = _PaddedReductions()
    dims = {0: torch.export.Dim("N", min=2), 2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC}
    example = (torch.rand(3, 2, 9, 7) + 0.1, torch.tensor([[9, 7], [4, 3], [1, 2]]))
    program = torch.onnx.export(model, example, dynamo=True, dynamic_shapes=(dims, {0: dims[0]}), verbose=False)
    session = ort.InferenceSession(program.model_proto.SerializeToString())
    names = [i.name for i in session.get_inputs()]
    for shape, valid in (((3, 2, 9, 7), [[9, 7], [4, 3], [1, 2]]), ((2, 2, 12, 5), [[12, 5], [3, 1]])):
        x, valid = rng.random(shape) + 0.1, np.array(valid)
        got = session.run(None, {names[0]: x.astype(np.float32), names[1]: valid})
        x = x.astype(np.float32).astype(np.float64)
        want = (anypool.adaptive_gem_pool2d(x, (3, 2), p=2.5, valid_sizes=valid),
                anypool.adaptive_lp_pool2d(x, 2.0, (2, 3), valid_sizes=valid),
                anypool.select_adaptive_pool2d(x, "catavgmax", 2, valid_sizes=valid))
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=2e-6, atol=1e-7)


def test_cli_explain_valid(capsys):
    from anypool import cli

    assert cli.main(["explain", "10x8", "3", "--valid", "5x8"]) == 0
    out = capsys.readouterr().out
    assert "valid over 5x8 of the padded 10x8" in out and "axis 0: 5 -> 3" in out and "axis 1: 8 -> 3" in out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [r[1:3] for r in rows[:3]] == [[str(s), str(e)] for s, e in _bins.axis_bins(5, 3)]
    assert cli.main(["explain", "10", "3", "--valid", "11"]) == 2
    assert "anypool explain(valid_sizes): got 11 for sample 0, spatial axis 0; expected a size from 1 to the " \
           "padded size 10" in capsys.readouterr().err


# --- the differential harness on padded batches -------------------------------------------------------


def _harness_clean(column, cases):
    report = _harness.check(column, cases)
    assert not report.failures, "\n".join(report.failures[:10])
    return report


@pytest.mark.parametrize("impl", IMPLS)
def test_harness_padded_batches(impl):
    """Random padded batches (every dtype, layout, storage, NaN/inf) against the crops pooled by the reference."""
    import importlib


    backend = importlib.import_module(f"anypool.backends.{'numpy' if impl == 'numpy' else 'torch'}")
    cases = _harness.random_cases(300, seed=31, valid=1.0)
    assert sum(c.valid is not None for c in cases) > 250
    # the C++ kernels by the default dispatch (which sends what they do not serve, e.g. empty outputs, to portable)
    with ops.force_implementation("portable" if impl == "portable" else None):
        _harness_clean(_harness.anypool_column(backend), cases)


def test_harness_padded_batches_torch_native_loop():
    """The users' workaround (native calls on each crop) agrees with the reference on the same cases."""

    _harness_clean(_harness.torch_native_column(), _harness.random_cases(200, seed=32, valid=1.0))


@pytest.mark.parametrize("column", ["jax", "onnxruntime"])
def test_harness_padded_batches_other_columns(column):
    cases = _harness.random_cases(40, seed=33, valid=1.0)
    if column == "jax":
        pytest.importorskip("jax")
        from anypool.backends import jax as backend

        found = _harness.anypool_column(backend)
    else:
        found = pytest.importorskip("anypool.onnx").harness_columns()[0]
    _harness_clean(found, cases)


def test_harness_rejects_plain_pooling_of_padded_batches():
    """The harness can fail: pooling the padded tensor as if every sample were full-size is caught."""
    from dataclasses import replace


    column = _harness.anypool_column(ref)
    plain = _harness.Column("ignores valid_sizes", lambda case, x, op: column.run(replace(case, valid=None), x, op))
    cases = [c for c in _harness.random_cases(60, seed=34, valid=1.0, dtypes=("float64",))
             if any(row != c.spec.input_size for row in c.valid)]
    report = _harness.check(plain, cases)
    assert len(report.failures) > len(cases), report.failures[:3]


def test_reductions_on_numpy_pool_each_crop_alone():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 2, 9, 7))
    x[1, :, 4:, :] = np.nan  # padding of sample 1: must not reach its output
    x[1, :, :, 3:] = np.inf
    sizes = np.array([[9, 7], [4, 3], [1, 2]])
    calls = [lambda t, **k: anypool.adaptive_lp_pool2d(t, 2.0, (3, None), **k),
             lambda t, **k: anypool.adaptive_gem_pool2d(np.abs(t), 2, 3.0, **k),
             lambda t, **k: anypool.adaptive_avgmax_pool2d(t, 2, **k),
             lambda t, **k: anypool.adaptive_catavgmax_pool2d(t, 2, **k)]
    for pool in calls:
        got = pool(x, valid_sizes=sizes)
        for i, (h, w) in enumerate(sizes):
            alone = pool(x[i:i + 1, :, :h, :w])
            oh, ow = alone.shape[2:]
            np.testing.assert_array_equal(got[i:i + 1, :, :oh, :ow], alone)
            assert not got[i, :, oh:, :].any() and not got[i, :, :, ow:].any()


def _padded_reduction_cases(n: int, seed: int, **kw):
    return [c for c in _harness.random_cases(n, seed=seed, valid=1.0, **kw) if c.valid is not None]


def test_reductions_on_torch_pool_each_crop_alone():
    """The differential harness on padded batches: LP, GeM, avgmax and catavgmax of torch input, each
    sample against the NumPy reference on its crop alone (every dtype, layout, NaN/inf, size-1 axes)."""
    from anypool.backends import torch as torch_backend

    cases = _padded_reduction_cases(120, seed=71)
    report = _harness.check(_harness.anypool_column(torch_backend), cases, ops=_harness.REDUCTIONS)
    assert not report.failures, report.failures[:3]
    assert report.cases == 4 * len(cases)


def test_reductions_on_jax_pool_each_crop_alone():
    jax_backend = pytest.importorskip("anypool.backends.jax")
    cases = _padded_reduction_cases(16, seed=72, dtypes=[d for d in DTYPES if jax_backend.supports_dtype(d)])
    report = _harness.check(_harness.anypool_column(jax_backend), cases, ops=_harness.REDUCTIONS)
    assert not report.failures, report.failures[:3]
    assert report.cases == 4 * len(cases)


def test_reductions_in_standalone_onnx_graphs_pool_each_crop_alone():
    """The padded LP, GeM, avgmax and catavgmax graphs in ONNX Runtime, against the crops pooled alone."""
    column = pytest.importorskip("anypool.onnx").harness_columns()[0]
    report = _harness.check(column, _harness.random_cases(60, seed=37, valid=1.0), ops=_harness.REDUCTIONS)
    assert not report.failures, report.failures[:3]
    assert report.cases > 120


_SIZES = np.array([[9, 7], [4, 3], [1, 2]])


def _padded_plane(seed: int) -> np.ndarray:
    """``(3, 2, 9, 7)`` float64, positive where ``_SIZES`` is valid, NaN/inf/-inf in the padding."""
    rng = np.random.default_rng(seed)
    x = np.abs(rng.standard_normal((3, 2, 9, 7))) + 0.2
    for i, (h, w) in enumerate(_SIZES):
        x[i, :, h:, :] = np.nan
        x[i, :, :h, w:] = rng.choice([np.inf, -np.inf], (2, h, 7 - w))
    return x


def _native_reduction(reduce: str, t, out, p):
    """torch's own composites (as timm and the GeM papers write them), on one crop."""
    F = torch.nn.functional
    if reduce == "gem":
        return F.adaptive_avg_pool2d(t.clamp(min=1e-6).pow(p), out).pow(1 / p)
    avg, top = F.adaptive_avg_pool2d(t, out), F.adaptive_max_pool2d(t, out)
    return 0.5 * (avg + top) if reduce == "avgmax" else torch.cat([avg, top], 1)


def _padded_reduction(reduce: str, t, out, p, **kw):
    if reduce == "gem":
        return anypool.adaptive_gem_pool2d(t, out, p=p, **kw)
    if reduce == "lp":
        return anypool.adaptive_lp_pool2d(t, 3.0, out, **kw)
    return getattr(anypool, f"adaptive_{reduce}_pool2d")(t, out, **kw)


@pytest.mark.parametrize("reduce", ["gem", "avgmax", "catavgmax"])
def test_reduction_gradients_with_valid_sizes_are_each_crops(reduce):
    """Gradients of x (and of a learnable p) on a padded batch: each sample's crop gradient through torch's
    native composite, exactly 0 on the padding, which holds NaN and ±inf."""
    x0, out = _padded_plane(9), (3, 2)
    channels = 4 if reduce == "catavgmax" else 2
    weights = torch.from_numpy(np.random.default_rng(10).standard_normal((3, channels, 3, 2)))
    x = torch.from_numpy(x0).requires_grad_()
    p = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    (_padded_reduction(reduce, x, out, p, valid_sizes=_SIZES) * weights).sum().backward()
    want_p = 0.0
    for i, (h, w) in enumerate(_SIZES):
        crop = torch.from_numpy(x0[i:i + 1, :, :h, :w].copy()).requires_grad_()
        q = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
        (_native_reduction(reduce, crop, out, q) * weights[i:i + 1]).sum().backward()
        torch.testing.assert_close(x.grad[i:i + 1, :, :h, :w], crop.grad)
        assert not x.grad[i, :, h:, :].any() and not x.grad[i, :, :, w:].any()
        want_p += q.grad.item() if reduce == "gem" else 0.0
    if reduce == "gem":
        assert p.grad.item() == pytest.approx(want_p, rel=1e-10)


@pytest.mark.parametrize("data_format", ["channels_first", "channels_last"])
def test_power_means_with_valid_sizes_gradcheck(data_format):
    rng = np.random.default_rng(11)
    x = torch.from_numpy(np.abs(rng.standard_normal((3, 2, 6, 5))) + 0.3)
    sizes = np.array([[6, 5], [3, 4], [1, 2]])
    if data_format == "channels_last":
        x = x.movedim(1, -1).contiguous()
    x = x.requires_grad_()
    p = torch.tensor(2.6, dtype=torch.float64, requires_grad=True)
    kw = dict(valid_sizes=sizes, data_format=data_format)
    assert torch.autograd.gradcheck(lambda a, q: anypool.adaptive_gem_pool(a, (4, 3), p=q, eps=1e-3, **kw), (x, p))
    assert torch.autograd.gradcheck(lambda a: anypool.adaptive_lp_pool(a, 3.0, (2, None), **kw), (x,))


def test_jax_reduction_gradients_with_valid_sizes_match_torch():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    x0, out = _padded_plane(12), (3, 2)
    weights = np.random.default_rng(13).standard_normal((3, 2, 3, 2))
    reductions = ("lp", "gem", "avgmax", "catavgmax")

    def loss(a, q):
        return sum(jnp.sum(_padded_reduction(r, a, out, q, valid_sizes=_SIZES)[:, :2] * weights) for r in reductions)

    gx, gp = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(x0, jnp.float32), jnp.float32(2.5))
    t = torch.from_numpy(x0).requires_grad_()
    q = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    w = torch.from_numpy(weights)
    sum((_padded_reduction(r, t, out, q, valid_sizes=_SIZES)[:, :2] * w).sum() for r in reductions).backward()
    np.testing.assert_allclose(np.asarray(gx), t.grad.numpy(), rtol=1e-4, atol=1e-5)  # 0, not NaN, on the padding
    np.testing.assert_allclose(float(gp), q.grad.item(), rtol=1e-4)
