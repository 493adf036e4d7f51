"""TensorFlow with ``valid_sizes``: against the NumPy reference (held to "each cropped sample pooled alone" by
tests/test_valid_sizes.py), eager and ``tf.function`` with unknown batch and spatial sizes, gradients."""

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

import anypool  # noqa: E402
from anypool import _args  # noqa: E402
from anypool.backends import numpy as reference  # noqa: E402

FUNCTIONS = {1: ("adaptive_avg_pool1d", "adaptive_max_pool1d"), 2: ("adaptive_avg_pool2d", "adaptive_max_pool2d"),
             3: ("adaptive_avg_pool3d", "adaptive_max_pool3d")}


def _case(seed, rank=None):
    """A padded batch (channels_first or last) with NaN/±inf/huge padding, per-sample valid sizes, an output size."""
    rng = np.random.default_rng(seed)
    rank = rank or int(rng.integers(1, 4))
    n, c = int(rng.integers(1, 5)), int(rng.integers(1, 4))
    padded = tuple(int(s) for s in rng.integers(1, 10 if rank < 3 else 6, rank))
    valid = np.stack([rng.integers(1, s + 1, n) for s in padded], axis=1)
    valid[0] = padded
    if n > 1:
        valid[1] = 1
    out = tuple(None if k == 0 else 1 if k == 1 else int(rng.integers(1, 2 * s + 3))
                for k, s in zip(rng.integers(0, 5, rank), padded))
    x = np.round(rng.standard_normal((n, c, *padded)) * 4) / 4
    for i in range(n):
        region = np.zeros(padded, bool)
        region[tuple(slice(0, int(s)) for s in valid[i])] = True
        x[i][:, ~region] = rng.choice([np.nan, np.inf, -np.inf, 6e4], (c, int((~region).sum())))
    cl = bool(rng.integers(0, 2))
    return (np.moveaxis(x, 1, -1) if cl else x), valid, out, cl


@pytest.mark.parametrize("seed", range(16))
def test_eager_matches_reference(seed):
    x, valid, out, cl = _case(seed)
    dtype = ("float32", "float64", "float16")[seed % 3]
    x = x.astype(dtype)
    fmt = "channels_last" if cl else "channels_first"
    avg, mx = FUNCTIONS[valid.shape[1]]
    vs = tf.constant(valid, tf.int32) if seed % 2 else valid.tolist()
    got = getattr(anypool, avg)(tf.constant(x), out, data_format=fmt, valid_sizes=vs)
    want = getattr(anypool, avg)(x, out, data_format=fmt, valid_sizes=valid)
    tol = {"float16": 2e-3, "float32": 2e-6, "float64": 1e-14}[dtype]  # a few ulps, relative to 1 + |want|
    np.testing.assert_allclose(got.numpy().astype(np.float64), want.astype(np.float64), rtol=tol, atol=tol)
    values, index = getattr(anypool, mx)(tf.constant(x), out, data_format=fmt, valid_sizes=vs, return_indices=True)
    want_values, want_index = getattr(anypool, mx)(x, out, data_format=fmt, valid_sizes=valid, return_indices=True)
    np.testing.assert_array_equal(values.numpy(), want_values)
    np.testing.assert_array_equal(index.numpy(), want_index)
    got = anypool.global_max_pool(tf.constant(x), data_format=fmt, valid_sizes=vs)
    np.testing.assert_array_equal(got.numpy(), anypool.global_max_pool(x, data_format=fmt, valid_sizes=valid))


def test_tf_function_unknown_sizes_one_trace():
    traces = []

    @tf.function(input_signature=[tf.TensorSpec([None, 2, None, None], tf.float32),
                                  tf.TensorSpec([None, 2], tf.int64)])
    def f(x, v):
        traces.append(1)
        return (anypool.adaptive_avg_pool2d(x, (3, 2), valid_sizes=v),
                *anypool.adaptive_max_pool2d(x, (2, None), valid_sizes=v, return_indices=True))

    rng = np.random.default_rng(0)
    for shape, valid in (((3, 2, 7, 6), [[7, 6], [1, 1], [4, 5]]), ((2, 2, 4, 9), [[2, 9], [4, 3]])):
        x, v = rng.standard_normal(shape).astype(np.float32), np.array(valid)
        avg, values, index = f(tf.constant(x), tf.constant(v))
        want = anypool.adaptive_avg_pool2d(x, (3, 2), valid_sizes=v)
        np.testing.assert_allclose(avg.numpy(), want, rtol=2e-6, atol=2e-6)
        want_values, want_index = anypool.adaptive_max_pool2d(x, (2, None), valid_sizes=v, return_indices=True)
        np.testing.assert_array_equal(values.numpy(), want_values)
        np.testing.assert_array_equal(index.numpy(), want_index)
    assert len(traces) == 1


@pytest.mark.parametrize("seed", range(6))
def test_gradients_match_reference_and_vanish_on_padding(seed):
    x, valid, out, cl = _case(50 + seed)
    rank = valid.shape[1]
    fmt = "channels_last" if cl else "channels_first"
    spec = _args.pool_spec(x.shape, out, rank, fmt)
    keep = _args.kept_axes(out, rank)
    xt = tf.constant(x)
    rng = np.random.default_rng(seed)
    present = anypool.adaptive_avg_pool(np.ones_like(x), out, data_format=fmt, valid_sizes=valid) == 1
    padding = ~np.isfinite(x) | (np.abs(x) > 1e4)
    for function in FUNCTIONS[rank]:
        with tf.GradientTape() as tape:
            tape.watch(xt)
            y = getattr(anypool, function)(xt, out, data_format=fmt, valid_sizes=valid)
            g = rng.standard_normal(y.shape)
            loss = tf.reduce_sum(y * tf.constant(g))
        grad = tape.gradient(loss, xt).numpy()
        if function.startswith("adaptive_avg"):
            want = reference.avg_pool_grad_valid(g, spec, valid, keep)
        else:
            _, idx = getattr(anypool, function)(x, out, data_format=fmt, valid_sizes=valid, return_indices=True)
            want = reference.max_pool_grad(np.where(present, g, 0), idx, spec)
        np.testing.assert_allclose(grad, want, rtol=1e-12, atol=1e-12)
        assert (grad[padding] == 0).all()


def test_harness_padded_batches():
    """The shared harness's random padded batches (every dtype, layout, NaN/inf; avg, max and the further
    reductions) against the crops pooled alone."""
    from anypool import _harness
    from anypool.backends import tensorflow as backend

    report = _harness.check(_harness.anypool_column(backend), _harness.random_cases(150, seed=35, valid=1.0),
                            ops=_harness.OPS + _harness.REDUCTIONS)
    assert not report.failures, "\n".join(report.failures[:10])


REDUCTIONS = {"lp": lambda x, out, **kw: anypool.adaptive_lp_pool(x, 2.5, out, **kw),
              "gem": lambda x, out, p=3.0, **kw: anypool.adaptive_gem_pool(x, out, p=p, eps=0.5, **kw),
              "avgmax": anypool.adaptive_avgmax_pool, "catavgmax": anypool.adaptive_catavgmax_pool}


@pytest.mark.parametrize("seed", range(6))
def test_reduction_gradients_are_those_of_the_crops(seed):
    """The gradient (of x, and of GeM's variable p) of a padded batch is the sum of each crop's, taken
    through the static-size graph; the padding (NaN, ±inf, huge) gets exactly 0."""
    x, valid, out, cl = _case(80 + seed)
    x = np.abs(x)  # LP with a non-integer p is defined on x ≥ 0
    fmt = "channels_last" if cl else "channels_first"
    padding = ~np.isfinite(x) | (x > 1e4)
    rng = np.random.default_rng(seed)
    for name, reduce in REDUCTIONS.items():
        p = tf.Variable(3.0, dtype=tf.float64)
        kw = {"p": p} if name == "gem" else {}
        xt = tf.constant(x)
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(xt)
            y = reduce(xt, out, data_format=fmt, valid_sizes=valid, **kw)
            g = tf.constant(rng.standard_normal(y.shape))
            loss = tf.reduce_sum(y * g)
        grad, grad_p = tape.gradient(loss, xt).numpy(), tape.gradient(loss, p)
        want, want_p = np.zeros_like(x), 0.0
        for i, size in enumerate(valid):
            crop = (slice(None),) * (0 if cl else 1) + tuple(slice(0, int(s)) for s in size)
            sample = tf.constant(x[i][crop][None])
            sample_out = tuple(int(s) if o is None else o for o, s in zip(out, size))
            with tf.GradientTape(persistent=True) as tape:
                tape.watch(sample)
                y_i = reduce(sample, sample_out, data_format=fmt, **kw)
                g_i = g[i][tuple(slice(0, o) for o in ((y_i.shape[1],) if not cl else ()) + sample_out)]
                loss = tf.reduce_sum(y_i[0] * g_i)
            want[i][crop] = tape.gradient(loss, sample).numpy()[0]
            if name == "gem":
                want_p += float(tape.gradient(loss, p))
        np.testing.assert_allclose(grad, want, rtol=1e-11, atol=1e-11, err_msg=name)
        assert (grad[padding] == 0).all(), name
        if name == "gem":
            np.testing.assert_allclose(float(grad_p), want_p, rtol=1e-11, atol=1e-11)


def test_reductions_in_tf_function_unknown_sizes_one_trace():
    traces = []

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 2], tf.float32),
                                  tf.TensorSpec([None, 2], tf.int64)])
    def f(x, v):
        traces.append(1)
        return {name: reduce(x, (3, None), data_format="channels_last", valid_sizes=v)
                for name, reduce in REDUCTIONS.items()}

    rng = np.random.default_rng(1)
    for shape, valid in (((3, 7, 6, 2), [[7, 6], [1, 1], [4, 5]]), ((2, 4, 9, 2), [[2, 9], [4, 3]])):
        x, v = np.abs(rng.standard_normal(shape)).astype(np.float32), np.array(valid)
        for name, got in f(tf.constant(x), tf.constant(v)).items():
            want = REDUCTIONS[name](x, (3, None), data_format="channels_last", valid_sizes=v)
            np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6, err_msg=name)
    assert len(traces) == 1
