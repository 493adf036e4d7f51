"""Keras layers (avg, max and the further reductions) with ``valid_sizes`` (a call argument) and, for the 1-D
layers, a Keras mask, on the current Keras backend (``KERAS_BACKEND``); against anypool's NumPy reference with the
same sizes."""

import numpy as np
import pytest

keras = pytest.importorskip("keras")

import anypool  # noqa: E402
from anypool.layers import keras as layers  # noqa: E402


def _batch(seed, rank, n=3, c=2):
    rng = np.random.default_rng(seed)
    padded = tuple(int(s) for s in rng.integers(2, 9, rank))
    valid = np.stack([rng.integers(1, s + 1, n) for s in padded], axis=1)
    valid[0] = padded
    x = rng.standard_normal((n, *padded, c)).astype(np.float32)  # channels_last
    for i in range(n):
        region = np.zeros(padded, bool)
        region[tuple(slice(0, int(s)) for s in valid[i])] = True
        x[i][~region] = np.nan  # the padding must not reach the result
    return x, valid


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_valid_sizes_call_argument(rank):
    x, valid = _batch(rank, rank)
    out = (3, None, 2)[:rank]
    for reduce in ("avg", "max"):
        layer = layers.LAYERS[reduce, rank](out, data_format="channels_last")
        got = keras.ops.convert_to_numpy(layer(keras.ops.convert_to_tensor(x), valid_sizes=valid))
        function = anypool.adaptive_avg_pool if reduce == "avg" else anypool.adaptive_max_pool
        want = function(x, out, data_format="channels_last", valid_sizes=valid)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_1d_layers_honour_a_prefix_mask():
    tokens = np.array([[4, 2, 7, 1, 3], [5, 9, 0, 0, 0], [6, 0, 0, 0, 0]])
    embed = keras.layers.Embedding(10, 4, mask_zero=True)
    for reduce in ("avg", "max", "avgmax", "lp"):
        pool = (layers.LAYERS[reduce, 1](2, data_format="channels_last") if reduce in ("avg", "max") else
                layers.AdaptiveLPPooling1D(2.0, 2, data_format="channels_last") if reduce == "lp" else
                layers.AdaptiveAvgMaxPooling1D(2, data_format="channels_last"))
        inputs = keras.Input((None,), dtype="int32")
        model = keras.Model(inputs, pool(embed(inputs)))
        got = keras.ops.convert_to_numpy(model(tokens))
        e = keras.ops.convert_to_numpy(embed(tokens))
        args = (e, 2.0, 2) if reduce == "lp" else (e, 2)
        want = getattr(anypool, f"adaptive_{reduce}_pool1d")(*args, data_format="channels_last", valid_sizes=[5, 2, 1])
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=reduce)


def test_a_mask_that_is_not_a_prefix_raises():
    x = np.ones((2, 4, 3), np.float32)
    mask = np.array([[True, True, False, True], [True, False, False, False]])
    layer = layers.AdaptiveAveragePooling1D(2, data_format="channels_last")
    with pytest.raises(ValueError, match=r"AdaptiveAveragePooling1D\(mask\): got row 0 = 1101; expected a mask "
                                         r"that is True on a non-empty prefix"):
        layer(keras.ops.convert_to_tensor(x), mask=keras.ops.convert_to_tensor(mask))


def test_harness_padded_batches():
    """The layers (avg, max and the further reductions) on the shared harness's random padded batches,
    against the crops pooled alone."""
    from anypool import _harness

    column, = layers.harness_columns()
    report = _harness.check(column, _harness.random_cases(40, seed=36, valid=1.0, unbatched=False), ops=column.ops)
    assert not report.failures, "\n".join(report.failures[:10])


@pytest.mark.parametrize("pool_type", ["avg", "max", "avgmax", "catavgmax"])
def test_select_adaptive_pooling2d_valid_sizes(pool_type):
    x, valid = _batch(7, 2)
    layer = layers.SelectAdaptivePooling2D(2, pool_type=pool_type, flatten=True, data_format="channels_last")
    got = keras.ops.convert_to_numpy(layer(keras.ops.convert_to_tensor(x), valid_sizes=valid))
    want = anypool.select_adaptive_pool2d(x, pool_type, 2, True, data_format="channels_last", valid_sizes=valid)
    assert np.isfinite(got).all()  # the NaN padding is never read
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
