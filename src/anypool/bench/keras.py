"""Keras / TensorFlow benchmark: anypool vs ``keras.layers.Adaptive*Pooling2D`` on Keras' TensorFlow backend.

Both contenders run inside one ``tf.function`` each (graph mode, as Keras trains),
forward and forward+backward (``GradientTape`` with a given output gradient), on
the 2-D cases of the shared suite.  The machine's read bandwidth is measured beside
every case (a ``reduce_sum`` over a buffer of the input's size).
"""

from __future__ import annotations

import functools

from . import Row, keras_on, median_ms

BASELINE = "keras-tf"




def run(cases, device: str = "cpu", repeats: int = 20, progress=None) -> list[Row]:
    say = progress or (lambda msg: None)
    if device != "cpu":
        say("keras: only the CPU is benchmarked (tensorflow-cpu); skipped")
        return []
    try:
        keras = keras_on("tensorflow")
    except ImportError:
        say("keras: not installed; skipped")
        return []
    if keras is None:
        say("keras: already imported with a non-TensorFlow backend; skipped (run `anypool bench --framework keras` "
            "in a fresh process)")
        return []
    import tensorflow as tf

    import anypool

    rows = []
    for case in [c for c in cases if c.rank == 2]:
        n, c, h, w = case.shape
        shape = (n, h, w, c) if case.channels_last else case.shape
        x = tf.cast(tf.random.normal(shape, seed=0), case.dtype)
        bandwidth_fn = tf.function(functools.partial(tf.reduce_sum, tf.random.normal(shape, seed=1)))
        for op in ("avg", "max"):
            contenders = _contenders(keras, anypool, case, op)
            out_shape = contenders["anypool"](x).shape
            grad = tf.cast(tf.random.normal(out_shape, seed=2), case.dtype)
            out_bytes = case.nbytes * out_shape.num_elements() // x.shape.num_elements()
            for mode in ("fwd", "fwd+bwd"):
                say(f"keras {op} {mode} {case.label()}")
                times = {}
                for label, fn in contenders.items():
                    step = functools.partial(_step(tf, fn, mode, grad), x)
                    try:
                        step()
                        times[label] = median_ms(step, repeats=repeats)
                    except Exception as e:  # the baseline may refuse a case; anypool must not
                        if label == "anypool":
                            raise
                        say(f"  {label} failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
                        times[label] = None
                bw_ms = median_ms(bandwidth_fn, repeats=repeats)
                moved = (case.nbytes + out_bytes) * (2 if mode == "fwd+bwd" else 1)
                rows.append(Row("keras", case.label(), op, mode, times["anypool"], {BASELINE: times.get(BASELINE)},
                                bytes_moved=moved, bandwidth_gbs=4 * x.shape.num_elements() / (bw_ms * 1e6)))
    return rows


def _contenders(keras, anypool, case, op: str) -> dict:
    layout = "channels_last" if case.channels_last else "channels_first"
    ours = anypool.adaptive_avg_pool2d if op == "avg" else anypool.adaptive_max_pool2d
    native = getattr(keras.layers, "AdaptiveAveragePooling2D" if op == "avg" else "AdaptiveMaxPooling2D", None)
    contenders = {"anypool": functools.partial(ours, output_size=case.output_size, data_format=layout)}
    if native is not None:  # Keras < 3.11 has no adaptive pooling
        contenders[BASELINE] = native(case.output_size, data_format=layout)
    return contenders


def _step(tf, fn, mode: str, grad):
    if mode == "fwd":
        return tf.function(fn)

    @tf.function
    def step(t):
        with tf.GradientTape() as tape:
            tape.watch(t)
            y = fn(t)
        return tape.gradient(y, t, output_gradients=grad)

    return step

