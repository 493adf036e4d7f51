"""The LP, GeM, avgmax and catavgmax Keras layers and SelectAdaptivePooling2D on the Keras backend this
process runs (KERAS_BACKEND=tensorflow | jax | torch), against the NumPy reference."""

import math

import numpy as np
import pytest

keras = pytest.importorskip("keras")

import anypool  # noqa: E402
from anypool import _bins, _harness  # noqa: E402
from anypool.backends import numpy as reference  # noqa: E402
from anypool.layers import keras as layers  # noqa: E402

BACKEND = keras.backend.backend()
REDUCTIONS = ("lp", "gem", "avgmax", "catavgmax")


def _make(reduce, rank, output_size, data_format, **params):
    cls = layers.REDUCTION_LAYERS[reduce, rank]
    if reduce == "lp":
        return cls(params.get("norm_type", 2.0), output_size, data_format=data_format)
    if reduce == "gem":
        return cls(output_size, p=params.get("p", 3.0), eps=params.get("eps", 1e-6), data_format=data_format)
    return cls(output_size, data_format=data_format)


def _reference(reduce, x, spec, norm_type=2.0, p=3.0, eps=1e-6):
    x = x.astype(np.float64)
    if reduce == "lp":
        return reference.lp_pool(x, spec, norm_type)
    if reduce == "gem":
        return reference.gem_pool(x, spec, p, eps)
    return getattr(reference, f"{reduce}_pool")(x, spec)


def _assert_close(got, want, scale, window, what):
    """The harness's bound for the reductions (:class:`_harness.Reduced`), float32."""
    problem = _harness.Reduced(np.asarray(want, np.float64), scale, window).problem(got, "float32")
    assert problem is None, f"{what}: {problem}"


@pytest.mark.parametrize("reduce", REDUCTIONS)
def test_reductions_match_reference(reduce):
    cases = _harness.random_cases(10 if BACKEND == "jax" else 20, seed=70 + REDUCTIONS.index(reduce),
                                  dtypes=("float32",), unbatched=False, empty=False, storages=("contiguous",))
    for case in cases:
        spec, x = case.spec, case.input()
        layer = _make(reduce, case.rank, case.output_size, case.data_format)
        got = keras.ops.convert_to_numpy(layer(keras.ops.convert_to_tensor(x)))
        m = reference.max_pool(np.abs(x.astype(np.float64)), spec)
        scale = np.concatenate([m, m], axis=spec.channel_axis) if reduce == "catavgmax" else m
        window = math.prod(_bins.max_window(L, O) for L, O in zip(spec.input_size, spec.output_size))
        _assert_close(got, _reference(reduce, x, spec), scale, window, f"{reduce} {case.describe()}")
        assert tuple(got.shape) == tuple(layer.compute_output_shape(x.shape))


def test_lp_and_gem_parameters_reach_the_function():
    x = np.abs(np.random.default_rng(0).standard_normal((2, 3, 11, 4))).astype(np.float32)
    spec = anypool._args.pool_spec(x.shape, (4, 3), 2, "channels_first")
    lp = layers.AdaptiveLPPooling2D(3.5, (4, 3), data_format="channels_first")
    gem = layers.AdaptiveGeMPooling2D((4, 3), p=1.7, eps=0.3, data_format="channels_first")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(lp(x)), reference.lp_pool(x.astype(np.float64), spec, 3.5),
                               rtol=1e-5)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(gem(x)),
                               reference.gem_pool(x.astype(np.float64), spec, 1.7, 0.3), rtol=1e-5)
    fixed = layers.AdaptiveGeMPooling2D((4, 3), p=1.7, eps=0.3, p_trainable=False, data_format="channels_first")
    assert fixed.trainable_weights == [] and fixed.weights == []
    np.testing.assert_allclose(keras.ops.convert_to_numpy(fixed(x)), keras.ops.convert_to_numpy(gem(x)), rtol=1e-6)
    assert [w.path.rsplit("/", 1)[-1] for w in gem.trainable_weights] == ["p"]


def test_select_adaptive_pooling2d():
    x = np.random.default_rng(1).standard_normal((2, 7, 5, 3)).astype(np.float32)  # channels_last
    spec = anypool._args.pool_spec(x.shape, (1, 1), 2, "channels_last")
    want = {"avg": reference.avg_pool(x, spec), "max": reference.max_pool(x, spec),
            "avgmax": reference.avgmax_pool(x, spec), "catavgmax": reference.catavgmax_pool(x, spec)}
    for pool_type in ("avg", "max", "avgmax", "catavgmax", "fast", "fastavgmax", "fastcatavgmax", ""):
        for flatten in (False, True):
            layer = layers.SelectAdaptivePooling2D(1, pool_type, flatten, data_format="channels_last")
            got = keras.ops.convert_to_numpy(layer(x))
            expect = x if not pool_type else want[pool_type.removeprefix("fast") or "avg"]
            expect = expect.reshape(2, -1) if flatten else expect
            np.testing.assert_allclose(got, expect, rtol=1e-6, atol=1e-6, err_msg=f"{pool_type} {flatten}")
            assert tuple(layer.compute_output_shape(x.shape)) == got.shape
            assert layer.feat_mult() == (2 if pool_type.endswith("catavgmax") else 1)
            assert layer.is_identity() == (pool_type == "")
    layer = layers.SelectAdaptivePooling2D((2, 3), "avgmax", data_format="channels_first")
    assert layer.compute_output_shape((None, 6, None, 9)) == (None, 6, 2, 3)
    assert layers.SelectAdaptivePooling2D(pool_type="catavgmax", flatten=True, data_format="channels_first") \
        .compute_output_shape((4, 6, 7, 9)) == (4, 12)


def test_avgmax_with_unknown_spatial_sizes():
    inp = keras.Input(shape=(None, None, 3))
    model = keras.Model(inp, [layers.AdaptiveAvgMaxPooling2D((3, 4))(inp), layers.AdaptiveCatAvgMaxPooling2D(2)(inp)])
    assert tuple(model.outputs[0].shape) == (None, 3, 4, 3) and tuple(model.outputs[1].shape) == (None, 2, 2, 6)
    for h, w in [(7, 9), (2, 30)]:
        x = np.random.default_rng(h).standard_normal((2, h, w, 3)).astype(np.float32)
        avgmax, cat = model.predict(x, verbose=0)
        np.testing.assert_allclose(avgmax, reference.avgmax_pool(x, anypool._args.pool_spec(
            x.shape, (3, 4), 2, "channels_last")), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(cat, reference.catavgmax_pool(x, anypool._args.pool_spec(
            x.shape, 2, 2, "channels_last")), rtol=1e-6, atol=1e-6)


def test_save_load_round_trip(tmp_path):
    inp = keras.Input(shape=(9, 8, 3))
    gem = layers.AdaptiveGeMPooling2D((3, 2), p=2.0, eps=1e-3)
    outs = [layers.AdaptiveLPPooling2D(2.5, (2, None))(inp), gem(inp), layers.AdaptiveAvgMaxPooling2D(4)(inp),
            layers.AdaptiveCatAvgMaxPooling2D((1, 3))(inp),
            layers.SelectAdaptivePooling2D(1, "catavgmax", flatten=True)(inp),
            layers.AdaptiveGeMPooling1D(2, p=4.0, p_trainable=False)(keras.layers.Reshape((72, 3))(inp)),
            layers.AdaptiveCatAvgMaxPooling3D((2, 1, 1))(keras.layers.Reshape((9, 8, 3, 1))(inp))]
    model = keras.Model(inp, outs)
    gem.p.assign(3.25)  # "trained": the saved model must carry this value, not the initial one
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    x = np.abs(np.random.default_rng(3).standard_normal((2, 9, 8, 3))).astype(np.float32)
    for got, want in zip(loaded.predict(x, verbose=0), model.predict(x, verbose=0)):
        np.testing.assert_array_equal(got, want)
    restored = [layer for layer in loaded.layers if isinstance(layer, layers.AdaptiveGeMPooling2D)][0]
    assert float(keras.ops.convert_to_numpy(restored.p)) == 3.25 and restored.eps == 1e-3
    spec = anypool._args.pool_spec(x.shape, (3, 2), 2, "channels_last")
    np.testing.assert_allclose(loaded.predict(x, verbose=0)[1], reference.gem_pool(x.astype(np.float64), spec, 3.25,
                                                                                   1e-3), rtol=1e-5)


def test_config_and_registration():
    lp = layers.AdaptiveLPPooling3D(3.0, (1, None, 4), data_format="channels_first", name="lp")
    clone = layers.AdaptiveLPPooling3D.from_config(lp.get_config())
    assert clone.norm_type == 3.0 and clone.output_size == (1, None, 4) and clone.name == "lp"
    gem = layers.AdaptiveGeMPooling1D(5, p=2.5, eps=1e-4, p_trainable=False)
    config = gem.get_config()
    assert config["p"] == 2.5 and config["eps"] == 1e-4 and config["p_trainable"] is False
    assert layers.AdaptiveGeMPooling1D.from_config(config).p == 2.5
    select = layers.SelectAdaptivePooling2D((1, 1), "fastavgmax", True, data_format="channels_first")
    clone = layers.SelectAdaptivePooling2D.from_config(select.get_config())
    assert (clone.pool_type, clone.flatten, clone.output_size) == ("fastavgmax", True, (1, 1))
    assert layers.AdaptiveCatAvgMaxPooling2D(2, data_format="channels_first") \
        .compute_output_shape((None, 5, 7, None)) == (None, 10, 2, 2)
    for name in ("AdaptiveLPPooling2D", "AdaptiveGeMPooling2D", "AdaptiveAvgMaxPooling1D",
                 "AdaptiveCatAvgMaxPooling3D", "SelectAdaptivePooling2D"):
        assert keras.saving.get_registered_name(getattr(layers, name)) == f"anypool>{name}"


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"AdaptiveGeMPooling2D\(p\): got 0"):
        layers.AdaptiveGeMPooling2D(1, p=0)
    with pytest.raises(ValueError, match=r"AdaptiveGeMPooling2D\(eps\): got -1"):
        layers.AdaptiveGeMPooling2D(1, eps=-1)
    with pytest.raises(ValueError, match=r"AdaptiveLPPooling1D\(norm_type\): got -2"):
        layers.AdaptiveLPPooling1D(-2, 1)
    with pytest.raises(ValueError, match=r"AdaptiveAvgMaxPooling2D\(output_size\): got \(1, 2, 3\)"):
        layers.AdaptiveAvgMaxPooling2D((1, 2, 3))
    with pytest.raises(ValueError, match=r"AdaptiveCatAvgMaxPooling1D\(data_format\): got 'NCL'"):
        layers.AdaptiveCatAvgMaxPooling1D(2, data_format="NCL")
    with pytest.raises(ValueError, match=r"SelectAdaptivePooling2D\(pool_type\): got 'mean'"):
        layers.SelectAdaptivePooling2D(1, "mean")
    with pytest.raises(ValueError, match=r"SelectAdaptivePooling2D\(output_size\): got 2"):
        layers.SelectAdaptivePooling2D(2, "fast")


def test_gem_learns_p():
    """Trained towards max pooling (GeM's p -> inf limit): p gets a gradient, grows, and the loss falls."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(4)
    x = (rng.random((8, 10, 9, 4)) + 0.01).astype(np.float32)
    y = reference.max_pool(x, anypool._args.pool_spec(x.shape, (3, 2), 2, "channels_last"))
    inp = keras.Input(shape=(10, 9, 4))
    gem = layers.AdaptiveGeMPooling2D((3, 2), p=2.0, data_format="channels_last")
    model = keras.Model(inp, gem(inp))
    model.compile(optimizer=keras.optimizers.SGD(20.0), loss="mse")
    before = model.evaluate(x, y, verbose=0)
    model.fit(x, y, batch_size=8, epochs=15, verbose=0)
    p = float(keras.ops.convert_to_numpy(gem.p))
    assert p > 4.0, p
    assert model.evaluate(x, y, verbose=0) < 0.5 * before
