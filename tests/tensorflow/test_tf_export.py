"""Export: a Keras model with anypool layers -> SavedModel (dynamic H, W) and TFLite (fixed size), exact."""

import os

import numpy as np
import pytest

if os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow":
    pytest.skip("export tests need KERAS_BACKEND=tensorflow", allow_module_level=True)
tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from anypool import _args  # noqa: E402
from anypool.backends import numpy as reference  # noqa: E402
from anypool.layers import keras as layers  # noqa: E402


def _model(shape):
    x = keras.Input(shape=shape)
    avg = layers.AdaptiveAveragePooling2D((3, 5), data_format="channels_last")(x)
    mx = layers.AdaptiveMaxPooling2D((7, 2), data_format="channels_last")(x)
    return keras.Model(x, [avg, mx])


def _expected(x):
    return (reference.avg_pool(x, _args.pool_spec(x.shape, (3, 5), 2, "channels_last")),
            reference.max_pool(x, _args.pool_spec(x.shape, (7, 2), 2, "channels_last")))


def _input(h, w, seed=0, nan=True):
    x = np.random.default_rng(seed).standard_normal((2, h, w, 3)).astype(np.float32)
    if nan:  # NaN must propagate through the SavedModel too
        x[0, h // 2, w // 3, 1] = np.nan
    return x


def test_saved_model_dynamic_sizes_exact(tmp_path):
    path = str(tmp_path / "saved")
    _model((None, None, 3)).export(path, format="tf_saved_model", verbose=False)
    serve = tf.saved_model.load(path).serve
    for h, w in [(9, 10), (3, 2), (64, 17), (1, 1), (40, 41)]:
        x = _input(h, w, seed=h * w)
        got = serve(tf.constant(x))
        for g, want in zip(got, _expected(x)):
            np.testing.assert_allclose(g.numpy(), want, rtol=1e-6, atol=1e-6, err_msg=f"size {(h, w)}")


def test_tflite_fixed_size_exact(tmp_path):
    model = _model((19, 23, 3))
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS, tf.lite.OpsSet.SELECT_TF_OPS]
    interpreter = tf.lite.Interpreter(model_content=converter.convert())
    # Finite input: TFLite's own kernels (XNNPACK's AVERAGE_POOL_2D, MAX_POOL_2D, REDUCE_MAX)
    # drop NaN, so NaN propagation is not promised there.
    x = _input(19, 23, seed=3, nan=False)
    x[1, :, :, 2] = np.round(x[1, :, :, 2])  # ties
    index = interpreter.get_input_details()[0]["index"]
    interpreter.resize_tensor_input(index, x.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(index, x)
    interpreter.invoke()
    outputs = sorted(interpreter.get_output_details(), key=lambda d: tuple(d["shape"]))  # (2,3,5,3) < (2,7,2,3)
    for detail, want in zip(outputs, _expected(x)):
        np.testing.assert_allclose(interpreter.get_tensor(detail["index"]), want, rtol=1e-6, atol=1e-6)
