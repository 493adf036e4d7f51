"""anypool's Keras layers on the Keras backend this process runs (KERAS_BACKEND=tensorflow | jax | torch).

The Makefile runs this file once per backend, each in its own process.
"""

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from anypool import _args, _harness  # noqa: E402
from anypool.backends import numpy as reference  # noqa: E402
from anypool.layers import keras as layers  # noqa: E402

BACKEND = keras.backend.backend()


def test_layers_match_reference():
    (column,) = layers.harness_columns()
    assert column.name == f"keras[{BACKEND}] layers"
    # JAX compiles every eager op for every new shape: fewer random shapes keep its run short
    cases = _harness.random_cases(20 if BACKEND == "jax" else 50, seed=21, unbatched=False) + [
        # upsampling by more than 2x on one axis (Keras' own JAX path returns NaN on such cases)
        _harness.Case((2, 5, 3, 2), (17, 2), "channels_last", "float32", "normal", 1),
        _harness.Case((1, 2, 3, 4), (2, 13), "channels_first", "float32", "ties", 2),
        # non-divisible, long windows, NaN/inf
        _harness.Case((2, 37, 53, 3), (5, 9), "channels_last", "float32", "special", 3),
        _harness.Case((2, 3, 100), (33,), "channels_first", "float16", "special", 4),
        # size-1 axes, 3-D
        _harness.Case((1, 1, 7, 1, 2), (1, 3, 4), "channels_last", "bfloat16", "normal", 5),
        _harness.Case((2, 2, 9, 1, 5), (4, 1, None), "channels_first", "float64", "special", 6),
    ]
    report = _harness.check(column, cases, ops=("avg", "max"))
    assert report.cases >= 30
    assert report.failures == []


def _x(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _ref(op, x, output_size, data_format="channels_last"):
    spec = _args.pool_spec(x.shape, output_size, x.ndim - 2, data_format)
    return reference.avg_pool(x, spec) if op == "avg" else reference.max_pool(x, spec)


def test_unknown_spatial_sizes():
    inp = keras.Input(shape=(None, None, 3))
    model = keras.Model(inp, [layers.AdaptiveAveragePooling2D((3, 4))(inp), layers.AdaptiveMaxPooling2D(5)(inp)])
    assert tuple(model.outputs[0].shape) == (None, 3, 4, 3)
    assert tuple(model.outputs[1].shape) == (None, 5, 5, 3)
    for h, w in [(7, 9), (2, 30), (16, 16)]:
        x = _x((2, h, w, 3), seed=h)
        avg, mx = model.predict(x, verbose=0)
        np.testing.assert_allclose(avg, _ref("avg", x, (3, 4)), rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(mx, _ref("max", x, 5))


def test_save_load_round_trip(tmp_path):
    inp = keras.Input(shape=(3, None, 11))
    a = layers.AdaptiveAveragePooling2D((2, None), data_format="channels_first")(inp)
    m = layers.AdaptiveMaxPooling1D(4, data_format="channels_first")(keras.layers.Reshape((6, -1))(a))
    model = keras.Model(inp, m)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.layers[1], layers.AdaptiveAveragePooling2D)
    assert loaded.layers[1].get_config()["output_size"] == [2, None]
    x = _x((2, 3, 7, 11), seed=1)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    want = _ref("max", _ref("avg", x, (2, None), "channels_first").reshape(2, 6, -1), 4, "channels_first")
    np.testing.assert_allclose(model.predict(x, verbose=0), want, rtol=1e-6, atol=1e-6)


def test_config_and_output_shape():
    layer = layers.AdaptiveMaxPooling3D((1, None, 4), data_format="channels_first", name="p")
    config = layer.get_config()
    assert config["output_size"] == [1, None, 4] and config["data_format"] == "channels_first"
    clone = layers.AdaptiveMaxPooling3D.from_config(config)
    assert clone.output_size == (1, None, 4) and clone.name == "p"
    assert layer.compute_output_shape((None, 2, 5, None, 9)) == (None, 2, 1, None, 4)
    assert layers.AdaptiveAveragePooling1D(3).data_format == keras.config.image_data_format()
    assert keras.saving.get_registered_name(layers.AdaptiveAveragePooling2D) == "anypool>AdaptiveAveragePooling2D"


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"AdaptiveAveragePooling2D\(output_size\): got \(1, 2, 3\)"):
        layers.AdaptiveAveragePooling2D((1, 2, 3))
    with pytest.raises(ValueError, match=r"AdaptiveMaxPooling1D\(data_format\): got 'NCHW'"):
        layers.AdaptiveMaxPooling1D(2, data_format="NCHW")
    with pytest.raises(ValueError, match=r"AdaptiveMaxPooling2D\(output_size\)"):
        layers.AdaptiveMaxPooling2D(-1)


def test_fit_one_step():
    keras.utils.set_random_seed(0)
    inp = keras.Input(shape=(None, None, 2))
    h = keras.layers.Conv2D(4, 3, padding="same")(inp)
    h = keras.layers.Concatenate()([layers.AdaptiveAveragePooling2D((2, 3))(h), layers.AdaptiveMaxPooling2D((2, 3))(h)])
    model = keras.Model(inp, keras.layers.Dense(1)(keras.layers.Flatten()(h)))
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    x, y = _x((4, 11, 13, 2), seed=2), _x((4, 1), seed=3)
    before = [np.array(w) for w in model.get_weights()]
    history = model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    after = model.get_weights()
    assert all(not np.array_equal(b, a) for b, a in zip(before, after))  # every weight got a gradient
