"""Keras 3 layers: exact adaptive pooling (PyTorch's windows) on every Keras backend.

``AdaptiveAveragePooling{1,2,3}D`` and ``AdaptiveMaxPooling{1,2,3}D`` mirror
``keras.layers.Adaptive*Pooling*D``: ``output_size`` (an int, or one entry per
spatial axis, ``None`` keeping that axis) and ``data_format`` (default
``keras.config.image_data_format()``).  Input ``(N, *S, C)`` (channels_last) or
``(N, C, *S)`` (channels_first); output the same with ``S`` replaced by
``output_size``.  Along an axis of length ``L`` pooled to ``O``, output ``j``
reduces input ``[floor(j·L/O), ceil((j+1)·L/O))``.

``call`` hands the backend tensor to anypool's public functions, which dispatch to
anypool's TensorFlow, JAX or torch backend — so spatial sizes may be unknown
(``keras.Input(shape=(None, None, C))``), and a model exports to a SavedModel with
dynamic height and width.  ``call(inputs, valid_sizes=None)`` pools padded batches (``valid_sizes`` ``(N, k)``: each
sample's unpadded spatial size); the 1-D layers also take a Keras mask (``Embedding(mask_zero=True)``,
``Masking``) that is a prefix per sample as the same lengths.  The layers are registered as serialisable
(``package="anypool"``): ``model.save("m.keras")`` / ``keras.models.load_model`` round-trip.
"""

from __future__ import annotations

import keras

import anypool

from .. import _args

if keras.backend.backend() == "tensorflow":  # load it now: it tells AutoGraph to leave anypool alone
    from ..backends import tensorflow as _tensorflow_backend  # noqa: F401

__all__ = [
    "AdaptiveAveragePooling1D", "AdaptiveAveragePooling2D", "AdaptiveAveragePooling3D",
    "AdaptiveMaxPooling1D", "AdaptiveMaxPooling2D", "AdaptiveMaxPooling3D", "harness_columns",
]


class _AdaptivePooling(keras.layers.Layer):
    """Shared by the six layers; subclasses set ``rank`` and ``reduce``."""

    rank: int
    reduce: str

    def __init__(self, output_size, data_format=None, **kwargs):
        super().__init__(**kwargs)
        name = type(self).__name__
        self.data_format = data_format or keras.config.image_data_format()
        _args.check_data_format(self.data_format, name)
        self.output_size = _args.normalize_output_size(output_size, (None,) * self.rank,
                                                       argument=f"{name}(output_size)")
        self.input_spec = keras.InputSpec(ndim=self.rank + 2)
        self.supports_masking = self.rank == 1  # a 1-D layer reads a mask as per-sample lengths (valid_sizes)

    def call(self, inputs, valid_sizes=None, mask=None):
        if mask is not None and self.rank == 1 and valid_sizes is None:
            valid_sizes = _mask_lengths(mask, type(self).__name__)
        if self.reduce == "avg":
            return anypool.adaptive_avg_pool(inputs, self.output_size, data_format=self.data_format,
                                             valid_sizes=valid_sizes)
        return anypool.adaptive_max_pool(inputs, self.output_size, data_format=self.data_format,
                                         valid_sizes=valid_sizes)

    def compute_mask(self, inputs, mask=None):
        return None  # the pooled axis has new positions: the input's mask does not apply to them

    def compute_output_shape(self, input_shape):
        spec = _args.pool_spec(tuple(input_shape), self.output_size, self.rank, self.data_format,
                               function=type(self).__name__, batched=True)
        return spec.output_shape

    def get_config(self):
        return {**super().get_config(), "output_size": list(self.output_size), "data_format": self.data_format}


def _mask_lengths(mask, layer: str):
    """A Keras mask ``(N, L)`` that is a prefix per sample (``Embedding(mask_zero=True)``, ``Masking``) as
    ``valid_sizes`` ``(N,)``; any other mask raises (checked when its values are known, i.e. not while traced)."""
    lengths = keras.ops.sum(keras.ops.cast(mask, "int32"), axis=1)
    try:
        values = keras.ops.convert_to_numpy(mask)
    except Exception:  # a symbolic tensor (tf.function, jit): its values are only known when the graph runs
        return lengths
    _args.check_prefix_mask(values, f"{layer}(mask)")
    return lengths


def _layer(rank: int, reduce: str):
    name = f"Adaptive{'Average' if reduce == 'avg' else 'Max'}Pooling{rank}D"
    spatial = ("L",) if rank == 1 else ("D", "H", "W")[3 - rank:]
    doc = (f"Adaptive {'average' if reduce == 'avg' else 'max'} pooling over {rank} spatial axes: "
           f"``(N, {', '.join(spatial)}, C)`` → ``(N, *output_size, C)`` (channels_last) or "
           f"``(N, C, {', '.join(spatial)})`` → ``(N, C, *output_size)`` (channels_first)."
           + (" NaN propagates." if reduce == "max" else " float16/bfloat16 accumulate in float32."))
    cls = type(name, (_AdaptivePooling,), {"rank": rank, "reduce": reduce, "__doc__": doc, "__module__": __name__})
    return keras.saving.register_keras_serializable(package="anypool", name=name)(cls)


AdaptiveAveragePooling1D = _layer(1, "avg")
AdaptiveAveragePooling2D = _layer(2, "avg")
AdaptiveAveragePooling3D = _layer(3, "avg")
AdaptiveMaxPooling1D = _layer(1, "max")
AdaptiveMaxPooling2D = _layer(2, "max")
AdaptiveMaxPooling3D = _layer(3, "max")

LAYERS = {("avg", 1): AdaptiveAveragePooling1D, ("avg", 2): AdaptiveAveragePooling2D,
          ("avg", 3): AdaptiveAveragePooling3D, ("max", 1): AdaptiveMaxPooling1D,
          ("max", 2): AdaptiveMaxPooling2D, ("max", 3): AdaptiveMaxPooling3D}


def _has_float64() -> bool:
    """JAX computes float64 only with ``jax_enable_x64`` (otherwise it silently uses float32)."""
    if keras.backend.backend() != "jax":
        return True
    import jax

    return bool(jax.config.jax_enable_x64)


def harness_columns():
    """The layers on the current Keras backend, as a column of the differential harness."""
    from .._harness import Column

    def run(case, x, op):
        layer = LAYERS[op, case.rank](case.output_size, data_format=case.data_format, dtype=case.dtype)
        y = layer(keras.ops.cast(keras.ops.convert_to_tensor(x), case.dtype), valid_sizes=case.valid_sizes)
        return keras.ops.convert_to_numpy(keras.ops.cast(y, "float32" if case.dtype == "bfloat16" else case.dtype))

    def supports(case, op):  # layers take a batch
        return case.spec.batched and 1 <= case.rank <= 3 and \
            (case.dtype != "float64" or _has_float64())

    return [Column(f"keras[{keras.backend.backend()}] layers", run, supports, ops=("avg", "max"))]

