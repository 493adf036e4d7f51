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

More reductions over the same windows, same ``output_size``/``data_format``:
``AdaptiveLPPooling{1,2,3}D(norm_type, output_size)`` (``(Σ_window x^p)^(1/p)``),
``AdaptiveGeMPooling{1,2,3}D(output_size, p=3.0, eps=1e-6, p_trainable=True)``
(``(mean_window max(x, eps)^p)^(1/p)``, ``p`` a trainable scalar weight), ``AdaptiveAvgMaxPooling{1,2,3}D``
(``0.5·(avg + max)``), ``AdaptiveCatAvgMaxPooling{1,2,3}D`` (averages then maxima along the channel
axis: ``C`` → ``2C``) and timm's ``SelectAdaptivePooling2D``, with the same ``valid_sizes`` (and 1-D mask).
On the TensorFlow backend an LP or GeM of a whole batch (no ``valid_sizes``) needs spatial sizes known
when the graph is built.
"""

from __future__ import annotations

import keras
import numpy as np

import anypool

from .. import _args

if keras.backend.backend() == "tensorflow":  # load it now: it tells AutoGraph to leave anypool alone
    from ..backends import tensorflow as _tensorflow_backend  # noqa: F401

__all__ = [
    "AdaptiveAveragePooling1D", "AdaptiveAveragePooling2D", "AdaptiveAveragePooling3D",
    "AdaptiveMaxPooling1D", "AdaptiveMaxPooling2D", "AdaptiveMaxPooling3D",
    "AdaptiveLPPooling1D", "AdaptiveLPPooling2D", "AdaptiveLPPooling3D",
    "AdaptiveGeMPooling1D", "AdaptiveGeMPooling2D", "AdaptiveGeMPooling3D",
    "AdaptiveAvgMaxPooling1D", "AdaptiveAvgMaxPooling2D", "AdaptiveAvgMaxPooling3D",
    "AdaptiveCatAvgMaxPooling1D", "AdaptiveCatAvgMaxPooling2D", "AdaptiveCatAvgMaxPooling3D",
    "SelectAdaptivePooling2D", "harness_columns",
]


class _AdaptivePooling(keras.layers.Layer):
    """Shared by every pooling layer; subclasses set ``rank`` and ``reduce`` (``adaptive_<reduce>_pool``)."""

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
        return self._pool(inputs, data_format=self.data_format, valid_sizes=valid_sizes)

    def _pool(self, inputs, **kw):
        return getattr(anypool, f"adaptive_{self.reduce}_pool")(inputs, self.output_size, **kw)

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


def _shapes(rank: int, channels: str = "C") -> str:
    """The docstring's shapes of a layer over ``rank`` spatial axes with ``channels`` output channels."""
    spatial = ", ".join(("L",) if rank == 1 else ("D", "H", "W")[3 - rank:])
    return (f"``(N, {spatial}, C)`` → ``(N, *output_size, {channels})`` (channels_last) or "
            f"``(N, C, {spatial})`` → ``(N, {channels}, *output_size)`` (channels_first).")


def _register(name: str, base: type, rank: int, reduce: str, doc: str):
    cls = type(name, (base,), {"rank": rank, "reduce": reduce, "__doc__": doc, "__module__": __name__})
    return keras.saving.register_keras_serializable(package="anypool", name=name)(cls)


def _layer(rank: int, reduce: str):
    doc = (f"Adaptive {'average' if reduce == 'avg' else 'max'} pooling over {rank} spatial axes: {_shapes(rank)}"
           + (" NaN propagates." if reduce == "max" else " float16/bfloat16 accumulate in float32."))
    return _register(f"Adaptive{'Average' if reduce == 'avg' else 'Max'}Pooling{rank}D", _AdaptivePooling, rank,
                     reduce, doc)


AdaptiveAveragePooling1D = _layer(1, "avg")
AdaptiveAveragePooling2D = _layer(2, "avg")
AdaptiveAveragePooling3D = _layer(3, "avg")
AdaptiveMaxPooling1D = _layer(1, "max")
AdaptiveMaxPooling2D = _layer(2, "max")
AdaptiveMaxPooling3D = _layer(3, "max")


# --- more reductions over the same windows -----------------------------------------------------------


class _AdaptiveLPPooling(_AdaptivePooling):
    reduce = "lp"

    def __init__(self, norm_type, output_size, data_format=None, **kwargs):
        argument = f"{type(self).__name__}(norm_type)"
        if _args.positive_exponent(norm_type, argument) is None:
            raise _args.number_expected(norm_type, argument)
        super().__init__(output_size, data_format, **kwargs)
        self.norm_type = float(norm_type)

    def _pool(self, inputs, **kw):
        return anypool.adaptive_lp_pool(inputs, self.norm_type, self.output_size, **kw)

    def get_config(self):
        return {**super().get_config(), "norm_type": self.norm_type}


class _AdaptiveGeMPooling(_AdaptivePooling):
    reduce = "gem"

    def __init__(self, output_size, p=3.0, eps=1e-6, p_trainable=True, data_format=None, **kwargs):
        name = type(self).__name__
        if _args.positive_exponent(p, f"{name}(p)") is None:
            raise _args.number_expected(p, f"{name}(p)")
        eps = _args.positive_eps(eps, f"{name}(eps)")
        super().__init__(output_size, data_format, **kwargs)
        self.eps = eps
        self.p_init = float(p)
        self.p_trainable = bool(p_trainable)
        # a weight from the start (not in build): its value is saved, restored and trained like any other
        self.p = self.add_weight(shape=(), initializer=keras.initializers.Constant(self.p_init), name="p",
                                 trainable=True) if self.p_trainable else self.p_init

    def _pool(self, inputs, **kw):
        p = keras.ops.convert_to_tensor(self.p) if self.p_trainable else self.p
        return anypool.adaptive_gem_pool(inputs, self.output_size, p=p, eps=self.eps, **kw)

    def get_config(self):
        return {**super().get_config(), "p": self.p_init, "eps": self.eps, "p_trainable": self.p_trainable}


class _AdaptiveCatAvgMaxPooling(_AdaptivePooling):
    reduce = "catavgmax"

    def compute_output_shape(self, input_shape):
        shape = list(super().compute_output_shape(input_shape))
        axis = -1 if self.data_format == "channels_last" else 1
        shape[axis] = None if shape[axis] is None else 2 * shape[axis]
        return tuple(shape)


_REDUCTION_BASES = {"lp": _AdaptiveLPPooling, "gem": _AdaptiveGeMPooling, "avgmax": _AdaptivePooling,
                    "catavgmax": _AdaptiveCatAvgMaxPooling}
_REDUCTION_NAMES = {"lp": "LP", "gem": "GeM", "avgmax": "AvgMax", "catavgmax": "CatAvgMax"}
_REDUCTION_DOCS = {
    "lp": "LP (power-average) pooling ``(Σ_window x^p)^(1/p)``, ``p = norm_type`` a positive float "
          "(:func:`anypool.adaptive_lp_pool`; torch's ``lp_pool`` signs).",
    "gem": "Generalised-mean pooling ``(mean_window max(x, eps)^p)^(1/p)`` (:func:`anypool.adaptive_gem_pool`). "
           "``p`` is a trainable scalar weight (initial value ``p``) unless ``p_trainable=False`` fixes it.",
    "avgmax": "timm's avgmax: ``0.5·(avg + max)`` of each window (:func:`anypool.adaptive_avgmax_pool`).",
    "catavgmax": "timm's catavgmax: the window averages, then the maxima, along the channel axis, so ``C`` "
                 "channels become ``2C`` (:func:`anypool.adaptive_catavgmax_pool`).",
}


def _reduction_layer(rank: int, reduce: str):
    doc = f"{_REDUCTION_DOCS[reduce]} Over {rank} spatial axes: {_shapes(rank, '2C' if reduce == 'catavgmax' else 'C')}"
    return _register(f"Adaptive{_REDUCTION_NAMES[reduce]}Pooling{rank}D", _REDUCTION_BASES[reduce], rank, reduce, doc)


AdaptiveLPPooling1D = _reduction_layer(1, "lp")
AdaptiveLPPooling2D = _reduction_layer(2, "lp")
AdaptiveLPPooling3D = _reduction_layer(3, "lp")
AdaptiveGeMPooling1D = _reduction_layer(1, "gem")
AdaptiveGeMPooling2D = _reduction_layer(2, "gem")
AdaptiveGeMPooling3D = _reduction_layer(3, "gem")
AdaptiveAvgMaxPooling1D = _reduction_layer(1, "avgmax")
AdaptiveAvgMaxPooling2D = _reduction_layer(2, "avgmax")
AdaptiveAvgMaxPooling3D = _reduction_layer(3, "avgmax")
AdaptiveCatAvgMaxPooling1D = _reduction_layer(1, "catavgmax")
AdaptiveCatAvgMaxPooling2D = _reduction_layer(2, "catavgmax")
AdaptiveCatAvgMaxPooling3D = _reduction_layer(3, "catavgmax")


@keras.saving.register_keras_serializable(package="anypool", name="SelectAdaptivePooling2D")
class SelectAdaptivePooling2D(keras.layers.Layer):
    """timm's ``SelectAdaptivePool2d`` as a Keras layer (:func:`anypool.select_adaptive_pool2d`).

    ``pool_type``: ``'avg'``, ``'max'``, ``'avgmax'``, ``'catavgmax'`` (``2C`` output channels), ``'fast…'``
    (a global pool: ``output_size`` must be 1; ``'fast'`` is avg) or ``''`` (no pooling).  ``data_format``
    replaces timm's ``input_fmt``.  ``flatten`` flattens every axis after the batch axis:
    ``(N, H, W, C)`` → ``(N, *output_size, C)``, or ``(N, prod(output_size)·C)`` with ``flatten``.
    ``feat_mult()`` is the channel factor (2 for catavgmax), ``is_identity()`` whether it pools at all.
    """

    def __init__(self, output_size=1, pool_type="fast", flatten=False, data_format=None, **kwargs):
        super().__init__(**kwargs)
        name = type(self).__name__
        kind = _args.pool_type(pool_type, name)
        if kind.startswith("fast"):
            _args.fast_output_size(output_size, kind, name)
        self.data_format = data_format or keras.config.image_data_format()
        _args.check_data_format(self.data_format, name)
        self.output_size = _args.normalize_output_size(output_size, (None, None), argument=f"{name}(output_size)")
        self.pool_type = pool_type or ""
        self.flatten = bool(flatten)
        self.input_spec = keras.InputSpec(ndim=4)

    def call(self, inputs, valid_sizes=None):
        size = 1 if self.output_size == (1, 1) else self.output_size  # what a 'fast' pool accepts
        return anypool.select_adaptive_pool2d(inputs, self.pool_type, size, self.flatten,
                                              data_format=self.data_format, valid_sizes=valid_sizes)

    def is_identity(self) -> bool:
        return not self.pool_type

    def feat_mult(self) -> int:
        return _args.feat_mult(self.pool_type.lower())

    def compute_output_shape(self, input_shape):
        shape = tuple(input_shape)
        if self.pool_type:
            shape = list(_args.pool_spec(shape, self.output_size, 2, self.data_format, function=type(self).__name__,
                                         batched=True).output_shape)
            axis = -1 if self.data_format == "channels_last" else 1
            shape[axis] = None if shape[axis] is None else self.feat_mult() * shape[axis]
        if not self.flatten:
            return tuple(shape)
        rest = shape[1:]
        return (shape[0], None if None in rest else int(np.prod(rest)))

    def get_config(self):
        return {**super().get_config(), "output_size": list(self.output_size), "pool_type": self.pool_type,
                "flatten": self.flatten, "data_format": self.data_format}


LAYERS = {("avg", 1): AdaptiveAveragePooling1D, ("avg", 2): AdaptiveAveragePooling2D,
          ("avg", 3): AdaptiveAveragePooling3D, ("max", 1): AdaptiveMaxPooling1D,
          ("max", 2): AdaptiveMaxPooling2D, ("max", 3): AdaptiveMaxPooling3D}
REDUCTION_LAYERS = {(reduce, rank): globals()[f"Adaptive{_REDUCTION_NAMES[reduce]}Pooling{rank}D"]
                    for reduce in _REDUCTION_NAMES for rank in (1, 2, 3)}


def _has_float64() -> bool:
    """JAX computes float64 only with ``jax_enable_x64`` (otherwise it silently uses float32)."""
    if keras.backend.backend() != "jax":
        return True
    import jax

    return bool(jax.config.jax_enable_x64)


def harness_columns():
    """The layers on the current Keras backend, as a column of the differential harness."""
    from .._harness import GEM_EPS, REDUCTIONS, Column

    def make(case, op):
        kw = dict(data_format=case.data_format, dtype=case.dtype)
        if op == "lp":
            return REDUCTION_LAYERS[op, case.rank](case.exponent, case.output_size, **kw)
        if op == "gem":  # p fixed: a trainable weight would be created in the layer's float dtype, not float64
            return REDUCTION_LAYERS[op, case.rank](case.output_size, p=case.exponent, eps=GEM_EPS,
                                                   p_trainable=False, **kw)
        return (LAYERS if op in ("avg", "max") else REDUCTION_LAYERS)[op, case.rank](case.output_size, **kw)

    def run(case, x, op):
        y = make(case, op)(keras.ops.cast(keras.ops.convert_to_tensor(x), case.dtype), valid_sizes=case.valid_sizes)
        return keras.ops.convert_to_numpy(keras.ops.cast(y, "float32" if case.dtype == "bfloat16" else case.dtype))

    def supports(case, op):  # layers take a batch
        return case.spec.batched and 1 <= case.rank <= 3 and \
            (case.dtype != "float64" or _has_float64())

    return [Column(f"keras[{keras.backend.backend()}] layers", run, supports, ops=("avg", "max") + REDUCTIONS)]

