"""Argument normalisation and validation — the one place that words an error.

Every public entry point turns its arguments into a :class:`PoolSpec` here, so
all backends receive the same, already-checked description of the job:
which axes are spatial, their input sizes and the output sizes.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

OutputSize = Union[int, None, Sequence[int | None]]
DATA_FORMATS = ("channels_first", "channels_last")


def _fail(kind: type[Exception], argument: str, value, expected: str) -> Exception:
    """``<argument>: got <value>; expected <what>`` — the one shape of every error message.

    ``value`` is shown with ``repr`` unless it is already a description (a ``_Described``).
    """
    shown = value if isinstance(value, _Described) else repr(value)
    return kind(f"{argument}: got {shown}; expected {expected}")


class _Described(str):
    """A description of a value (``tensor of shape (2, 0)``) rather than the value itself."""


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def input_size_tuple(input_size, argument: str = "input_size") -> tuple[int, ...]:
    """A spatial input size (int or sequence of ints) as a tuple of positive ints."""
    sizes = (input_size,) if _is_int(input_size) else input_size
    try:
        sizes = tuple(sizes)
    except TypeError:
        raise _fail(TypeError, argument, input_size, "an int or a sequence of ints") from None
    if not sizes or not all(_is_int(s) and s >= 1 for s in sizes):
        raise _fail(ValueError, argument, input_size, "positive ints (an empty spatial axis cannot be pooled)")
    return tuple(int(s) for s in sizes)


def output_rank(output_size: OutputSize, function: str) -> int:
    """The spatial rank of the generic functions: the length of ``output_size``."""
    if _is_int(output_size) or output_size is None or isinstance(output_size, (str, bytes)):
        raise _fail(TypeError, f"{function}(output_size)", output_size,
                    "a sequence with one entry per spatial axis (its length sets the spatial rank)")
    try:
        return len(output_size)
    except TypeError:
        raise _fail(TypeError, f"{function}(output_size)", output_size,
                    "a sequence with one entry per spatial axis") from None


def normalize_output_size(output_size: OutputSize, input_size: Sequence[int | None],
                          argument: str = "output_size") -> tuple[int | None, ...]:
    """``output_size`` as one non-negative int per spatial axis.

    An int applies to every axis; ``None`` (the whole argument or one entry) keeps
    that axis' input size (``None`` again when the input size is unknown).
    """
    rank = len(input_size)
    expected = f"an int >= 0 or a sequence of {rank} ints >= 0 or None"
    if output_size is None or _is_int(output_size):
        entries = (output_size,) * rank
    elif isinstance(output_size, (str, bytes)):
        raise _fail(TypeError, argument, output_size, expected)
    else:
        try:
            entries = tuple(output_size)
        except TypeError:
            raise _fail(TypeError, argument, output_size, expected) from None
        if len(entries) != rank:
            raise _fail(ValueError, argument, output_size,
                        f"{rank} entries, one per spatial axis (got {len(entries)})")
    result = []
    for entry, size in zip(entries, input_size):
        if entry is None:
            result.append(None if size is None else int(size))
        elif not _is_int(entry):
            raise _fail(TypeError, argument, output_size, expected)
        elif entry < 0:
            raise _fail(ValueError, argument, output_size, expected)
        else:
            result.append(int(entry))
    return tuple(result)


def check_data_format(data_format: str, function: str = "anypool") -> bool:
    """Validate ``data_format``; returns ``True`` for channels_last."""
    if data_format not in DATA_FORMATS:
        raise _fail(ValueError, f"{function}(data_format)", data_format, "'channels_first' or 'channels_last'")
    return data_format == "channels_last"


@dataclass(frozen=True)
class PoolSpec:
    """A checked pooling job on an array of shape ``shape``.

    ``spatial_axes`` are the (non-negative) axes pooled, in order; ``input_size``
    their lengths (``None`` where only known at run time) and ``output_size``
    their pooled lengths.
    """

    shape: tuple[int | None, ...]
    spatial_axes: tuple[int, ...]
    input_size: tuple[int | None, ...]
    output_size: tuple[int | None, ...]
    channels_last: bool
    batched: bool

    @property
    def rank(self) -> int:
        return len(self.spatial_axes)

    @property
    def output_shape(self) -> tuple[int | None, ...]:
        shape = list(self.shape)
        for axis, size in zip(self.spatial_axes, self.output_size):
            shape[axis] = size
        return tuple(shape)

    @property
    def data_format(self) -> str:
        return DATA_FORMATS[self.channels_last]

    @property
    def channel_axis(self) -> int:
        """The (non-negative) channel axis: catavgmax concatenates along it."""
        return len(self.shape) - 1 if self.channels_last else int(self.batched)


def pool_spec(shape: Sequence[int | None], output_size: OutputSize, rank: int,
              data_format: str = "channels_first", *, function: str = "adaptive pool",
              batched: bool | None = None, cache: bool = True) -> PoolSpec:
    """Check a call and describe it (see :func:`_pool_spec`); a repeated call is a cache hit.

    ``cache=False`` while a tracer (``torch.compile``) runs: it traces the checks themselves.
    """
    if cache:
        # only plain ints (and None) are cached: 2.0 and True hash like 2 but must still be rejected
        # (the backends' shapes hold ints and None only)
        kind = type(output_size)
        if kind is int or output_size is None:
            return _cached_pool_spec(tuple(shape), output_size, rank, data_format, function, batched)
        if (kind is tuple or kind is list) and all(type(v) is int or v is None for v in output_size):
            return _cached_pool_spec(tuple(shape), tuple(output_size), rank, data_format, function, batched)
    return _pool_spec(tuple(shape), output_size, rank, data_format, function, batched)


def _pool_spec(shape, output_size, rank, data_format, function, batched) -> PoolSpec:
    """Check a call and describe it.

    ``shape`` is the input's shape (entries may be ``None`` when unknown until run
    time). Accepted: ``(N, C, *S)`` / ``(C, *S)`` for channels_first and
    ``(N, *S, C)`` / ``(*S, C)`` for channels_last, with ``len(S) == rank``.
    ``batched`` forces one of the two forms (the global pools always take a batch).
    """
    channels_last = check_data_format(data_format, function)
    shape = tuple(None if s is None else int(s) for s in shape)
    allowed = (rank + 2,) if batched else (rank + 1,) if batched is False else (rank + 1, rank + 2)
    if len(shape) not in allowed:
        layouts = ("(C, *S)", "(N, C, *S)") if not channels_last else ("(*S, C)", "(N, *S, C)")
        forms = " or ".join(f"{n}-D {layouts[n == rank + 2]}" for n in allowed)
        raise _fail(ValueError, f"{function}(input)", _Described(f"a tensor of shape {shape}"),
                    f"{forms} with {rank} spatial axes S ({data_format})")
    is_batched = len(shape) == rank + 2
    first = 1 + is_batched if not channels_last else int(is_batched)
    spatial_axes = tuple(range(first, first + rank))
    input_size = tuple(shape[a] for a in spatial_axes)
    if any(s is not None and s < 1 for s in input_size):
        raise _fail(ValueError, f"{function}(input)", _Described(f"a tensor of shape {shape}"),
                    f"every spatial axis of length >= 1 ({data_format}; spatial size {input_size}): "
                    "an empty window has no average or maximum")
    out = normalize_output_size(output_size, input_size, argument=f"{function}(output_size)")
    return PoolSpec(shape, spatial_axes, input_size, out, channels_last, is_batched)


_cached_pool_spec = functools.lru_cache(maxsize=512)(_pool_spec)


def require_floating(dtype, is_floating: bool, function: str) -> None:
    """Average pooling is defined for floating inputs only."""
    if not is_floating:
        raise _fail(TypeError, f"{function}(input)", _Described(f"a tensor of dtype {dtype}"),
                    "a floating dtype (float16, bfloat16, float32 or float64); cast integers first")


def require_supported(dtype, supported: bool, function: str, backend: str) -> None:
    """A dtype the backend cannot pool (complex, bool, ...)."""
    if not supported:
        raise _fail(TypeError, f"{function}(input)", _Described(f"a tensor of dtype {dtype}"),
                    f"a dtype the {backend} backend can pool")


def unsupported_type(x, function: str) -> TypeError:
    kind = f"{type(x).__module__}.{type(x).__qualname__}"
    return _fail(TypeError, f"{function}(input)", _Described(f"an object of type {kind}"),
                 "a NumPy, PyTorch, JAX or TensorFlow array")


def static_output_size(output_size, function: str) -> tuple[int, ...]:
    """An export-time ``output_size``: one plain int >= 0 per spatial axis.

    A size computed from a dynamic input dimension is only known when the graph runs,
    but the exported graph's window layout needs it when it is built.
    """
    try:
        entries = tuple(output_size)
    except TypeError:
        entries = (output_size,)
    if not entries or not all(_is_int(s) and s >= 0 for s in entries):
        raise _fail(ValueError, f"{function}(output_size)", _Described(repr(list(entries))),
                    "ints >= 0 fixed at export time (an output size computed from a dynamic input dimension, "
                    "or a None entry on a dynamic axis, cannot be exported: pass a constant output_size)")
    return tuple(int(s) for s in entries)


def onnx_not_registered(function: str) -> RuntimeError:
    """A plain ``torch.onnx.export(dynamo=True)`` that began before anypool's translations were registered."""
    return _fail(RuntimeError, f"torch.onnx.export({function})", _Described("an export started before "
                 "anypool's ONNX translations were registered"),
                 "anypool.onnx.export(model, args, f, dynamic_shapes=...), or `import anypool.onnx` before "
                 "torch.onnx.export, for a graph that is exact for every input size")


# --- padded batches (valid_sizes) ------------------------------------------------------------


def kept_axes(output_size: OutputSize, rank: int) -> tuple[bool, ...]:
    """Which spatial axes keep their (per-sample) size: the ``None`` entries of ``output_size``."""
    if output_size is None:
        return (True,) * rank
    if isinstance(output_size, (tuple, list)):
        return tuple(entry is None for entry in output_size)
    return (False,) * rank


def check_valid_sizes(shape: Sequence[int | None], dtype, is_integer: bool, values, spec: PoolSpec,
                      function: str) -> None:
    """Check ``valid_sizes`` for a call described by ``spec``.

    Accepted: integers of shape ``(N, k)`` (``k`` = the spatial rank, ``N`` the batch) or,
    for one spatial axis, ``(N,)``; with ``values`` (a NumPy array; ``None`` while a tracer
    runs and they are unknown) every entry in ``1 .. padded size`` of its axis.
    """
    argument = f"{function}(valid_sizes)"
    if not spec.batched:
        raise _fail(ValueError, argument, _Described(f"valid sizes for an input of shape {spec.shape}"),
                    f"a batched input (N, {'*S, C' if spec.channels_last else 'C, *S'}): valid_sizes has one "
                    "row per sample")
    rank, batch = spec.rank, spec.shape[0]
    shape = tuple(shape)
    forms = f"({batch}, {rank})" + (f" or ({batch},)" if rank == 1 else "")
    ok = (len(shape) == 2 and shape[1] == rank) or (rank == 1 and len(shape) == 1)
    if not ok or (batch is not None and shape[0] is not None and shape[0] != batch):
        raise _fail(ValueError, argument, _Described(f"an array of shape {shape}"),
                    f"shape {forms}: one row per sample of the batch, one entry per spatial axis")
    if not is_integer:
        raise _fail(TypeError, argument, _Described(f"an array of dtype {dtype}"),
                    "an integer dtype (int32 or int64)")
    if values is None:
        return
    import numpy as np

    table = np.asarray(values).reshape(-1, rank)
    for d, size in enumerate(spec.input_size):
        column = table[:, d]
        bad = np.flatnonzero((column < 1) | ((column > size) if size is not None else False))
        if bad.size:
            i = int(bad[0])
            raise _fail(ValueError, argument, _Described(f"{int(column[i])} for sample {i}, spatial axis {d}"),
                        f"a size from 1 to the padded size {size} of that axis")


def is_integer_dtype(dtype) -> bool:
    """Whether a dtype name (``int32``, ``torch.int64``, ``uint8`` ...) is an integer type (bool is not)."""
    name = str(dtype).rsplit(".", 1)[-1]
    return name.startswith(("int", "uint"))


def valid_sizes_not_array(valid_sizes, function: str) -> TypeError:
    return _fail(TypeError, f"{function}(valid_sizes)", valid_sizes,
                 "an integer array (of the input's framework or NumPy) or a nested list of ints")


def valid_sizes_unsupported(backend: str, function: str) -> TypeError:
    return _fail(TypeError, f"{function}(valid_sizes)", _Described(f"valid sizes for a {backend} input"),
                 "an input of a backend that pools padded batches (NumPy, PyTorch, JAX or TensorFlow)")


def check_prefix_mask(mask, argument: str) -> None:
    """A mask ``(N, L)`` whose ``True`` entries are a prefix of every row (padding at the end)."""
    import numpy as np

    mask = np.asarray(mask, bool)
    if mask.ndim != 2:
        raise _fail(ValueError, argument, _Described(f"a mask of shape {mask.shape}"), "a mask (N, L) of the 1-D axis")
    lengths = mask.sum(1)
    bad = np.flatnonzero((mask != (np.arange(mask.shape[1]) < lengths[:, None])).any(1) | (lengths < 1))
    if bad.size:
        row = "".join("1" if v else "0" for v in mask[bad[0]])
        raise _fail(ValueError, argument, _Described(f"row {int(bad[0])} = {row}"),
                    "a mask that is True on a non-empty prefix of each sample and False after it (padding at "
                    "the end), as Embedding(mask_zero=True) or Masking give")
# --- the reductions beyond avg and max ---------------------------------------------------------

POOL_TYPES = ("", "avg", "max", "avgmax", "catavgmax", "fast", "fastavg", "fastmax", "fastavgmax", "fastcatavgmax")


def fractional_power(p, floor) -> bool:
    """Whether a power mean's negative terms are NaN: LP (no ``floor``) with a non-integer ``p``, as in
    ``torch.pow``.  Such a term makes its window NaN even where the window's largest ``|t|`` is inf, which
    otherwise leaves only the infinite terms to count (torch's ``lp_pool`` gives NaN there too)."""
    return floor is None and not float(p).is_integer()


def positive_exponent(value, argument: str) -> float | None:
    """An LP ``norm_type`` or GeM ``p`` given as a number: a positive finite float (returned as float).

    A tensor or array (a learnable ``p``) must hold one value; it is returned as ``None`` (its value is
    only read where the backend computes, so that a traced or device-resident ``p`` is not forced to the host).
    """
    if isinstance(value, bool) or value is None or isinstance(value, (str, bytes)):
        raise _fail(TypeError, argument, value, "a positive finite float")
    if isinstance(value, numbers.Real):
        if not (0 < float(value) < float("inf")):
            raise _fail(ValueError, argument, value, "a positive finite float")
        return float(value)
    try:
        shape = tuple(int(d) for d in value.shape)
    except (AttributeError, TypeError):
        raise _fail(TypeError, argument, value, "a positive finite float or an array holding one value") from None
    count = 1
    for d in shape:
        count *= d
    if count != 1 or len(shape) > 1:
        raise _fail(ValueError, argument, _Described(f"an array of shape {shape}"),
                    "a positive finite float or an array holding one value")
    return None


def positive_eps(value, argument: str) -> float:
    """GeM's clamp floor ``eps``: a positive finite float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (0 < float(value) < float("inf")):
        raise _fail(TypeError if not isinstance(value, numbers.Real) or isinstance(value, bool) else ValueError,
                    argument, value, "a positive finite float")
    return float(value)


def pool_type(value, function: str) -> str:
    """timm's ``pool_type`` (lower-cased): one of :data:`POOL_TYPES`; ``None`` means ``''`` (no pooling)."""
    if value is None:
        return ""
    if not isinstance(value, str) or value.lower() not in POOL_TYPES:
        raise _fail(ValueError, f"{function}(pool_type)", value, "one of " + ", ".join(map(repr, POOL_TYPES)))
    return value.lower()


def feat_mult(pool_type_: str) -> int:
    """Output channels per input channel of a checked ``pool_type`` (catavgmax concatenates two pools)."""
    return 2 if pool_type_.endswith("catavgmax") else 1


def fast_output_size(output_size, pool_type_: str, function: str) -> None:
    """timm's 'fast' pools (and its NHWC input) reduce to one value per channel only."""
    if output_size not in (1, (1, 1), [1, 1]):
        raise _fail(ValueError, f"{function}(output_size)", output_size,
                    f"1 with pool_type={pool_type_!r} (a 'fast' pool is a global pool)")


def number_expected(value, argument: str) -> TypeError:
    return _fail(TypeError, argument, value, "a positive finite float (a plain number, not an array)")


def unsupported_reduction(function: str, backend: str) -> NotImplementedError:
    return _fail(NotImplementedError, function, _Described(f"an array of the {backend} backend"),
                 "a backend that implements this reduction (NumPy, PyTorch)")


def input_fmt(value, function: str) -> str:
    """timm's ``input_fmt`` ('NCHW' or 'NHWC') as a ``data_format``."""
    formats = {"NCHW": "channels_first", "NHWC": "channels_last"}
    if value not in formats:
        raise _fail(ValueError, f"{function}(input_fmt)", value, "'NCHW' or 'NHWC'")
    return formats[value]


def static_spatial_size(spec: PoolSpec, function: str) -> ValueError:
    """A reduction built from static window tables, asked for spatial sizes only known at run time."""
    return _fail(ValueError, f"{function}(input)", _Described(f"a tensor of shape {spec.shape}"),
                 "spatial sizes known when the graph is built (give the tf.function input_signature static H, W)")
