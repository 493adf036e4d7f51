"""LP, GeM, avgmax, catavgmax and select_adaptive_pool2d on TensorFlow against the NumPy reference."""


import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

import anypool  # noqa: E402
from anypool import _harness  # noqa: E402
from anypool.backends import numpy as reference  # noqa: E402
from anypool.backends import tensorflow as backend  # noqa: E402

REDUCTIONS = ["lp", "gem", "avgmax", "catavgmax"]


def _run(x, out, reduce, p=2.5, eps=1e-6, data_format="channels_first"):
    if reduce == "lp":
        return anypool.adaptive_lp_pool(x, p, out, data_format=data_format)
    if reduce == "gem":
        return anypool.adaptive_gem_pool(x, out, p=p, eps=eps, data_format=data_format)
    return getattr(anypool, f"adaptive_{reduce}_pool")(x, out, data_format=data_format)


@pytest.mark.parametrize("graph", [False, True])
def test_matches_reference(graph):
    """The differential harness on every reduction, eagerly and inside ``tf.function``."""
    eager = _harness.anypool_column(backend)

    def traced(case, x, op):
        fn = tf.function(lambda a: _harness.reduce(a, case, op, data_format=case.data_format))
        got = fn(backend.from_numpy(x, case.dtype))
        assert got.dtype.name == case.dtype
        return backend.to_numpy(got).astype(np.float64)

    column = _harness.Column("tf.function", traced, eager.supports, ops=_harness.REDUCTIONS) if graph else eager
    report = _harness.check(column, _harness.random_cases(60 if graph else 120, seed=70), ops=_harness.REDUCTIONS)
    assert not report.failures, report.failures[:3]


def _numerical_grad(f, x, h=1e-6):
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[i] = h
        g[i] = (f(x + e) - f(x - e)) / (2 * h)
    return g


@pytest.mark.parametrize("reduce", REDUCTIONS)
def test_gradients_match_finite_differences(reduce):
    rng = np.random.default_rng(9)
    x = np.abs(rng.standard_normal((1, 2, 5, 4))) + 0.1
    out = (3, 3)
    weights = rng.standard_normal((1, 4 if reduce == "catavgmax" else 2, 3, 3))
    xt = tf.Variable(x)
    p = tf.Variable(2.7, dtype=tf.float64)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(_run(xt, out, reduce, p=p if reduce == "gem" else 2.7) * weights)
    gx, gp = tape.gradient(loss, [xt, p])
    numeric = _numerical_grad(lambda a: float(np.sum(_run(a, out, reduce, p=2.7) * weights)), x)
    np.testing.assert_allclose(gx.numpy(), numeric, rtol=1e-6, atol=1e-8)
    if reduce == "gem":
        h = 1e-6
        up, down = (np.sum(_run(x, out, "gem", p=2.7 + s) * weights) for s in (h, -h))
        dp = (up - down) / (2 * h)
        np.testing.assert_allclose(gp.numpy(), dp, rtol=1e-6)


def test_unknown_spatial_sizes():
    x = np.random.default_rng(10).standard_normal((2, 3, 9, 7)).astype(np.float32)
    spec = tf.TensorSpec([None, 3, None, None], tf.float32)
    am = tf.function(lambda t: anypool.adaptive_avgmax_pool2d(t, (2, 3)), input_signature=[spec])
    cat = tf.function(lambda t: anypool.select_adaptive_pool2d(t, "catavgmax", 1, True), input_signature=[spec])
    s = anypool._args.pool_spec(x.shape, (2, 3), 2)
    np.testing.assert_allclose(am(tf.constant(x)).numpy(), reference.avgmax_pool(x, s), rtol=1e-6)
    assert cat(tf.constant(x)).shape == (2, 6)
    lp = tf.function(lambda t: anypool.adaptive_lp_pool2d(t, 2.0, 1), input_signature=[spec])
    with pytest.raises(ValueError, match=r"adaptive_lp_pool\(input\): got a tensor of shape .*; expected spatial"):
        lp(tf.constant(x))
