"""The JAX backend against the NumPy reference and torch native: values, indices, gradients, jit, vmap."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import anypool  # noqa: E402
from anypool import _harness  # noqa: E402
from anypool.backends import jax as backend  # noqa: E402
from anypool.backends import numpy as reference  # noqa: E402

LOW = ("float16", "bfloat16", "float32")


@functools.cache
def _compiled(shape, output_size, data_format, dtype, x64):
    """One jit per case for all three ops (one compile instead of three)."""

    def all_ops(x):
        avg = anypool.adaptive_avg_pool(x, output_size, data_format=data_format)
        values, indices = anypool.adaptive_max_pool(x, output_size, data_format=data_format, return_indices=True)
        plain = anypool.adaptive_max_pool(x, output_size, data_format=data_format)
        return avg, plain, values, indices

    return jax.jit(all_ops)


def jit_column() -> _harness.Column:
    """The public functions under ``jax.jit`` (the harness' own column runs them eagerly)."""

    def run(case, x, op):
        arr = backend.from_numpy(x, case.dtype)
        avg, plain, values, indices = _compiled(case.shape, case.output_size, case.data_format, case.dtype,
                                                bool(jax.config.jax_enable_x64))(arr)
        np_ = functools.partial(_harness._to_numpy, backend)
        if op == "avg":
            return np_(avg)
        if op == "max":
            # the plain path (no indices) is computed differently: it must agree with the indexed one
            assert np.array_equal(np_(plain), np_(values), equal_nan=True)
            return np_(plain)
        return np_(values), np_(indices)

    return _harness.Column("anypool[jax] jit", run)


def _cases(geometries: int, seed: int, dtypes, inputs: int = 4) -> list[_harness.Case]:
    """``geometries`` random cases, each with ``inputs`` random inputs (normal, ties, NaN/inf):
    one compile serves several inputs, so thousands of checks stay within the test budget."""
    rng = np.random.default_rng(seed)
    kinds = ("normal", "ties", "special", "special")
    return [dataclasses.replace(case, values=kinds[k % len(kinds)], seed=int(rng.integers(2**31)))
            for case in _harness.random_cases(geometries, seed=seed, dtypes=dtypes) for k in range(inputs)]


def _assert_clean(report):
    assert report.cases > 0
    assert not report.failures, "\n".join(report.failures[:10])


def test_jit_low_precision_and_float32_vs_reference():
    cases = _cases(220, seed=11, dtypes=LOW)  # 880 inputs x 3 ops
    _assert_clean(_harness.check(jit_column(), cases))


def test_jit_float64_vs_reference():
    with jax.enable_x64(True):
        cases = _cases(60, seed=12, dtypes=("float64",))
        _assert_clean(_harness.check(jit_column(), cases))


def test_eager_column_vs_reference():
    """The harness' own column (eager calls), as ``anypool check`` runs it."""
    cases = _harness.random_cases(8, seed=13, dtypes=LOW)
    _assert_clean(_harness.check(_harness.anypool_column(backend), cases))


def test_large_windows_and_wide_axes():
    """Windows longer than any doubling step, and long axes (1-D and 2-D)."""
    cases = [
        _harness.Case((2, 3, 1000), (7,), "channels_first", "float32", "ties", 1),
        _harness.Case((2, 3, 1000), (333,), "channels_first", "float32", "special", 2),
        _harness.Case((1, 97, 131, 2), (3, 1), "channels_last", "float32", "normal", 3),
        _harness.Case((2, 2, 64, 64), (6, 6), "channels_first", "bfloat16", "ties", 4),
        _harness.Case((2, 2, 5, 5), (17, 3), "channels_first", "float16", "special", 5),
    ]
    _assert_clean(_harness.check(jit_column(), cases))


def test_vs_torch_native():
    torch = pytest.importorskip("torch")  # noqa: F841
    native = _harness.torch_native_column()
    ours = jit_column()
    cases = [c for c in _cases(50, seed=14, dtypes=LOW, inputs=2) if all(o != 0 for o in c.spec.output_size)]
    for case in cases:
        x = case.input()
        for op in _harness.OPS:
            if not native.supports(case, op):
                continue
            got, want = ours.run(case, x, op), native.run(case, x, op)
            _, problem = _harness.compare(case, op, got, want)
            assert problem is None, f"{op} {case.describe()}: {problem}"


@pytest.mark.parametrize("x64", [False, True])
def test_index_dtype(x64):
    with jax.enable_x64(x64):
        x = jnp.arange(2 * 3 * 10, dtype=jnp.float32).reshape(2, 3, 10)
        _, idx = anypool.adaptive_max_pool1d(x, 4, return_indices=True)
        assert idx.dtype == (jnp.int64 if x64 else jnp.int32)
        np.testing.assert_array_equal(np.asarray(idx[0, 0]), [2, 4, 7, 9])  # windows [0,3) [2,5) [5,8) [7,10)


def _grad_cases(n, seed):
    return [c for c in _cases(n, seed=seed, dtypes=("float32",), inputs=2) if c.values != "special"]


@functools.cache
def _vjps(shape, output_size, data_format):
    avg = functools.partial(anypool.adaptive_avg_pool, output_size=output_size, data_format=data_format)
    mx = functools.partial(anypool.adaptive_max_pool, output_size=output_size, data_format=data_format)
    mxi = functools.partial(anypool.adaptive_max_pool, output_size=output_size, data_format=data_format,
                            return_indices=True)

    @jax.jit
    def grads(x, g):
        ga = jax.vjp(avg, x)[1](g)[0]
        gm = jax.vjp(mx, x)[1](g)[0]
        (_, idx), pull = jax.vjp(mxi, x)
        gi = pull((g, np.zeros(idx.shape, jax.dtypes.float0)))[0]
        return ga, gm, gi

    return grads


def test_gradients_vs_reference():
    for case in _grad_cases(50, 21):
        spec = case.spec
        x = case.input()
        g = np.random.default_rng(case.seed).standard_normal(spec.output_shape).astype(np.float32)
        ga, gm, gi = _vjps(case.shape, case.output_size, case.data_format)(jnp.asarray(x), jnp.asarray(g))
        _, ref_idx = reference.max_pool(x, spec, return_indices=True)
        want_avg = reference.avg_pool_grad(g, spec)
        want_max = reference.max_pool_grad(g, ref_idx, spec)
        np.testing.assert_allclose(np.asarray(ga), want_avg, rtol=1e-5, atol=1e-6, err_msg=case.describe())
        np.testing.assert_allclose(np.asarray(gm), want_max, rtol=1e-6, atol=1e-6, err_msg=case.describe())
        np.testing.assert_array_equal(np.asarray(gi), np.asarray(gm), err_msg=case.describe())


def test_gather_max_gradient_vs_reference():
    """The covering-range gather (the backward off the CPU, where the CPU scatters) routes exactly as
    PyTorch on non-divisible, upsampling, channels_last and 3-D cases, with the reference's indices."""
    cases = [c for c in _grad_cases(30, 23) if not all(c.spec.input_size[d] % max(c.spec.output_size[d], 1) == 0
                                                       for d in range(c.spec.rank))]
    assert cases
    for case in cases:
        spec = case.spec
        if 0 in spec.output_size:
            continue
        x = case.input()
        g = np.random.default_rng(case.seed).standard_normal(spec.output_shape).astype(np.float32)
        _, ref_idx = reference.max_pool(x, spec, return_indices=True)
        got = jax.jit(lambda g, i, spec=spec: backend._max_grad_gather(g, i, spec))(
            jnp.asarray(g), jnp.asarray(ref_idx.astype(np.int32)))
        want = reference.max_pool_grad(g, ref_idx, spec)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6, err_msg=case.describe())


def test_max_gradient_goes_to_the_first_tie_only():
    x = jnp.zeros((1, 1, 4, 4))  # every window is all ties: PyTorch routes to the first element
    g = jax.grad(lambda t: anypool.adaptive_max_pool2d(t, 3).sum())(x)
    want = np.zeros((4, 4))
    for r in (0, 1, 2):
        for c in (0, 1, 2):
            want[r, c] += 1  # window starts of 4 -> 3: 0, 1, 2
    np.testing.assert_array_equal(np.asarray(g[0, 0]), want)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_gradients_rounded_once(dtype):
    """avg and max gradients of half inputs keep the dtype and are the float64 gradient rounded once
    (max gradients placed by the reference's indices)."""
    case = _harness.Case((2, 3, 9, 7), (4, 5), "channels_first", dtype, "ties", 0)
    x = case.input()
    _, indices = _harness.expected(case, x, "argmax")
    g = np.random.default_rng(1).standard_normal((2, 3, 4, 5)).astype(np.float32)
    gj = backend.from_numpy(g, dtype)
    for op, fn in (("avg", anypool.adaptive_avg_pool2d), ("max", anypool.adaptive_max_pool2d)):
        _, vjp = jax.vjp(lambda t, fn=fn: fn(t, (4, 5)), backend.from_numpy(x, dtype))
        (gx,) = vjp(gj)
        assert gx.dtype == jnp.dtype(dtype)
        want = _harness.expected_gradient(case, op, _harness._to_numpy(backend, gj), indices)
        problem = want.problem(_harness._to_numpy(backend, gx), dtype)
        assert problem is None, f"{op}: {problem}"


def test_vmap_matches_batched_call():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((5, 3, 11, 13)), jnp.float32)
    for fn in (functools.partial(anypool.adaptive_avg_pool2d, output_size=(4, 6)),
               functools.partial(anypool.adaptive_max_pool2d, output_size=(4, 6))):
        np.testing.assert_array_equal(np.asarray(jax.vmap(fn)(x)), np.asarray(fn(x)))
    v, i = jax.vmap(lambda t: anypool.adaptive_max_pool2d(t, (4, 6), return_indices=True))(x)
    w, j = anypool.adaptive_max_pool2d(x, (4, 6), return_indices=True)
    np.testing.assert_array_equal(np.asarray(i), np.asarray(j))
    # per-example gradients under vmap equal the batched gradient
    gv = jax.vmap(jax.grad(lambda t: anypool.adaptive_max_pool2d(t, (4, 6)).sum()))(x)
    gb = jax.grad(lambda t: anypool.adaptive_max_pool2d(t, (4, 6)).sum())(x)
    np.testing.assert_array_equal(np.asarray(gv), np.asarray(gb))


def test_jit_output_size_static_and_global_pools():
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 5, 6, 3)), jnp.float32)
    f = jax.jit(anypool.adaptive_avg_pool2d, static_argnames=("output_size", "data_format"))
    y = f(x, output_size=(2, 4), data_format="channels_last")
    want = reference.avg_pool(np.asarray(x, np.float64), anypool._args.pool_spec(x.shape, (2, 4), 2, "channels_last"))
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(jax.jit(anypool.global_avg_pool)(jnp.moveaxis(x, -1, 1))),
                               np.asarray(x).mean(axis=(1, 2)), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(anypool.global_max_pool(x, data_format="channels_last")),
                                  np.asarray(x).max(axis=(1, 2)))


def test_errors_and_integers():
    with pytest.raises(TypeError, match="adaptive_avg_pool2d.*int32.*floating"):
        anypool.adaptive_avg_pool2d(jnp.ones((1, 2, 3, 3), jnp.int32), 2)
    with pytest.raises(ValueError, match="output_size"):
        anypool.adaptive_max_pool2d(jnp.ones((1, 2, 3, 3)), (2, -1))
    x = jnp.asarray(np.random.default_rng(3).integers(-5, 5, (2, 3, 7, 9)), jnp.int32)
    got = anypool.adaptive_max_pool2d(x, (3, 4))
    want = reference.max_pool(np.asarray(x), anypool._args.pool_spec(x.shape, (3, 4), 2))
    np.testing.assert_array_equal(np.asarray(got), want)


def test_empty_output_axis():
    x = jnp.ones((2, 3, 5))
    assert anypool.adaptive_avg_pool1d(x, 0).shape == (2, 3, 0)
    v, i = anypool.adaptive_max_pool1d(x, 0, return_indices=True)
    assert v.shape == i.shape == (2, 3, 0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_jit_max_keeps_nan_after_a_fused_elementwise_op(dtype):
    """Under jit, XLA:CPU fuses an elementwise op with a following max reduction into a kernel that
    drops NaN: the plain max path must still propagate it (an upsampled axis, then a divisible one)."""
    case = _harness.Case((2, 3, 16, 152), (46, 8), "channels_first", dtype, "special", 7)
    x = case.input()
    got = jax.jit(lambda t: anypool.adaptive_max_pool2d(t, case.output_size))(backend.from_numpy(x, dtype))
    _, problem = _harness.compare(case, "max", _harness._to_numpy(backend, got), _harness.expected(case, x, "max"))
    assert problem is None, problem
