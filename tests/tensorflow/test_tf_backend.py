"""The TensorFlow backend against the NumPy reference: values, indices, gradients; eager and tf.function."""

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

import anypool  # noqa: E402
from anypool import _args, _harness  # noqa: E402
from anypool.backends import numpy as reference  # noqa: E402
from anypool.backends import tensorflow as backend  # noqa: E402


def _failures(column, cases, ops=_harness.OPS):
    report = _harness.check(column, cases, ops)
    assert report.cases > 0
    return report.failures


def test_eager_matches_reference():
    cases = _harness.random_cases(160, seed=11)
    assert _failures(_harness.anypool_column(backend), cases) == []


def test_eager_fixed_cases():
    """Shapes the random draw may miss: long windows, >2x upsampling on one axis, size-1 axes, NaN, empty output."""
    cases = [
        _harness.Case((2, 3, 70, 9), (3, 31), "channels_first", "float32", "special", 1),
        _harness.Case((1, 5, 64, 4), (1, 6), "channels_last", "float16", "ties", 2),
        _harness.Case((2, 1, 1, 1), (5, 1), "channels_last", "bfloat16", "normal", 3),
        _harness.Case((3, 40), (0,), "channels_first", "float32", "normal", 4),
        _harness.Case((2, 2, 6, 7, 5), (2, 3, 11), "channels_first", "float64", "special", 5),
        _harness.Case((2, 3, 224, 224), (7, 7), "channels_first", "float32", "ties", 6),
    ]
    assert _failures(_harness.anypool_column(backend), cases) == []


def _dynamic_column():
    """Each case inside a tf.function whose input_signature hides the batch and spatial sizes."""

    def run(case, x, op):
        spec = case.spec
        hidden = set(spec.spatial_axes) | ({0} if spec.batched else set())
        signature = [tf.TensorSpec([None if i in hidden else s for i, s in enumerate(case.shape)], case.dtype)]

        def pool(t):
            assert all(t.shape[a] is None for a in spec.spatial_axes)  # the sizes really are unknown here
            if op == "avg":
                return anypool.adaptive_avg_pool(t, case.output_size, data_format=case.data_format)
            return anypool.adaptive_max_pool(t, case.output_size, data_format=case.data_format,
                                             return_indices=op == "argmax")

        out = tf.function(pool, input_signature=signature, autograph=False)(backend.from_numpy(x, case.dtype))
        if op == "argmax":
            return tuple(_harness._to_numpy(backend, o) for o in out)
        return _harness._to_numpy(backend, out)

    return _harness.Column("anypool[tensorflow, tf.function None dims]", run)


def test_tf_function_unknown_sizes_matches_reference():
    cases = _harness.random_cases(8, seed=12) + [
        _harness.Case((2, 3, 50, 9), (7, 40), "channels_first", "float32", "special", 7),
        _harness.Case((1, 13, 1, 2), (4, 3), "channels_last", "float32", "ties", 8),
    ]
    assert _failures(_dynamic_column(), cases) == []


def test_one_graph_serves_many_sizes():
    f = tf.function(lambda t: anypool.adaptive_avg_pool2d(t, (3, 5)),
                    input_signature=[tf.TensorSpec([None, 2, None, None], tf.float32)])
    for h, w in [(3, 5), (10, 11), (1, 2), (31, 4)]:
        x = np.random.default_rng(h * w).standard_normal((1, 2, h, w)).astype(np.float32)
        spec = _args.pool_spec(x.shape, (3, 5), 2)
        np.testing.assert_allclose(f(tf.constant(x)).numpy(), reference.avg_pool(x, spec), rtol=1e-6, atol=1e-6)


def _grad_cases():
    return _harness.random_cases(40, seed=13, dtypes=("float32", "float64")) + [
        _harness.Case((2, 3, 37, 53), (5, 9), "channels_last", "float32", "ties", 9),
        _harness.Case((2, 3, 5, 5), (7, 12), "channels_first", "float64", "ties", 10),
        _harness.Case((1, 2, 9, 4), (4, 3), "channels_first", "float32", "special", 11),
    ]


def _check_grads(case, compiled):
    x = case.input()
    spec = case.spec
    for op in ("avg", "max"):
        if op == "avg":
            y_ref = reference.avg_pool(x, spec)
        else:
            y_ref, index = reference.max_pool(x, spec, return_indices=True)
        g = np.random.default_rng(case.seed).standard_normal(y_ref.shape).astype(x.dtype)
        want = reference.avg_pool_grad(g, spec) if op == "avg" else reference.max_pool_grad(g, index, spec)
        fn = anypool.adaptive_avg_pool if op == "avg" else anypool.adaptive_max_pool

        g_t = tf.constant(g)

        def grad(t, fn=fn, g_t=g_t):
            with tf.GradientTape() as tape:
                tape.watch(t)
                y = fn(t, case.output_size, data_format=case.data_format)
            return tape.gradient(y, t, output_gradients=g_t)

        if compiled:
            shape = [None] * len(case.shape)
            grad = tf.function(grad, input_signature=[tf.TensorSpec(shape, x.dtype)], autograph=False)
        got = grad(tf.constant(x)).numpy()
        tol = 1e-5 if x.dtype == np.float32 else 1e-12
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol, err_msg=f"{op} {case.describe()}")


@pytest.mark.parametrize("case", _grad_cases(), ids=lambda c: c.describe())
def test_gradients_match_reference(case):
    """avg: Aᵀg; max: g routed to PyTorch's argmax (first on ties, last NaN)."""
    _check_grads(case, compiled=False)


@pytest.mark.parametrize("case", _grad_cases()[::6], ids=lambda c: c.describe())
def test_gradients_unknown_sizes(case):
    _check_grads(case, compiled=True)


def test_half_precision_accumulates_in_float32():
    # 4096 values of 1 + 2^-10 in float16: a float16 running sum would stall at 2048 (ulp 2).
    x = tf.fill((1, 1, 4096), tf.constant(1 + 2**-10, tf.float16))
    assert anypool.adaptive_avg_pool1d(x, 1).numpy().item() == np.float16(1 + 2**-10)


def test_errors_are_clear():
    with pytest.raises(TypeError, match=r"adaptive_avg_pool2d\(input\): got a tensor of dtype int32"):
        anypool.adaptive_avg_pool2d(tf.zeros((1, 1, 4, 4), tf.int32), 2)
    with pytest.raises(ValueError, match="every spatial axis of length >= 1"):
        anypool.adaptive_max_pool2d(tf.zeros((1, 1, 0, 4)), 2)
    with pytest.raises(ValueError, match=r"adaptive_avg_pool2d\(output_size\)"):
        anypool.adaptive_avg_pool2d(tf.zeros((1, 1, 4, 4)), (1, 2, 3))


def test_integer_max_and_variables():
    x = tf.Variable(np.arange(30, dtype=np.int32).reshape(1, 1, 5, 6))
    values, index = anypool.adaptive_max_pool2d(x, (2, 4), return_indices=True)
    spec = _args.pool_spec((1, 1, 5, 6), (2, 4), 2)
    want_v, want_i = reference.max_pool(x.numpy(), spec, return_indices=True)
    assert values.dtype == tf.int32 and index.dtype == tf.int64
    np.testing.assert_array_equal(values.numpy(), want_v)
    np.testing.assert_array_equal(index.numpy(), want_i)
