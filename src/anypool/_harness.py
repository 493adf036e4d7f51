"""The differential conformance harness: random cases, the NumPy oracle, and columns.

A *case* is one random call (shape, layout, output size, dtype, special values).
A *column* is one implementation under test: a function ``run(case, x, op)`` that
takes the case's NumPy input and returns NumPy results — values for ``"avg"``,
``"max"`` and the further reductions (``"lp"``, ``"gem"``, ``"avgmax"``,
``"catavgmax"``), ``(values, indices)`` for ``"argmax"``.  Every column is compared with
the NumPy reference backend.  Used by ``anypool check`` and by the test-suite of
every backend, so a new backend joins by adding a column, nothing else.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

import numpy as np

from . import _args, _bins
from .backends import numpy as reference

OPS = ("avg", "max", "argmax")
REDUCTIONS = ("lp", "gem", "avgmax", "catavgmax")
# LP's and GeM's exponent, drawn by a case's seed, and GeM's floor (large enough to clamp some inputs)
EXPONENTS = (2.0, 2.5, 3.0, 1.0, 4.0, 7.3)
GEM_EPS = 0.5
DTYPES = ("float16", "bfloat16", "float32", "float64")
# Unit roundoff of each dtype, and the dtype each one accumulates in (half types in float32).
ROUNDOFF = {"float16": 2.0**-11, "bfloat16": 2.0**-8, "float32": 2.0**-24, "float64": 2.0**-53}
ACCUMULATOR = {"float16": "float32", "bfloat16": "float32", "float32": "float32", "float64": "float64"}
# The smallest positive normal number of each dtype: below it, rounding errors are absolute.
TINY = {"float16": 2.0**-14, "bfloat16": 2.0**-126, "float32": 2.0**-126, "float64": 2.0**-1022}


def round_to(values, dtype: str) -> np.ndarray:
    """``values`` (float64) rounded once, to nearest even, to ``dtype``; returned as float64."""
    v = np.asarray(values, dtype=np.float64)
    if dtype != "bfloat16":  # NumPy converts float64 to float16/float32 directly (no double rounding)
        return v.astype(dtype).astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        # the two bfloat16 neighbours of v: truncate float32(v) to bfloat16, and one bfloat16 ulp away from it
        # (float32(v) is within 2**-24 of v, so v's nearest bfloat16 is one of them)
        bits = v.astype(np.float32).view(np.uint32) & np.uint32(0xFFFF0000)
        low = bits.view(np.float32).astype(np.float64)
        high = (bits + np.uint32(0x10000)).view(np.float32).astype(np.float64)
        d_low, d_high = np.abs(v - low), np.abs(high - v)
        even_low = (bits & np.uint32(0x10000)) == 0
        pick_low = (d_low < d_high) | ((d_low == d_high) & even_low)
        out = np.where(pick_low, low, high)
    return np.where(np.isfinite(v), out, v)


def _special_mismatch(got: np.ndarray, want: np.ndarray) -> str | None:
    """What differs in shape, NaN positions or infinities between ``got`` and the reference ``want``."""
    if got.shape != want.shape:
        return f"shape {got.shape} != {want.shape}"
    nan = np.isnan(want)
    if not np.array_equal(np.isnan(got), nan):
        return "NaN positions differ"
    infinite = ~np.isfinite(want) & ~nan
    if not np.array_equal(got[infinite], want[infinite]):
        return "inf positions differ"
    return None


@dataclass(frozen=True)
class Accumulated:
    """The exact result of a sum-like reduction and how far a correct implementation may be from it.

    ``value`` is computed in float64.  An implementation that accumulates ``terms`` values per
    output in the case's accumulator (float32 for half types) and rounds once to the output
    dtype lands within ``bound`` of ``value`` *before* that last rounding, so it must return
    ``round_to(value ± bound)``: for half types that is exactly ``round_to(value)`` unless the
    accumulation error can cross a rounding boundary, in which case the neighbour is allowed too.
    """

    value: np.ndarray
    bound: np.ndarray

    @classmethod
    def of(cls, value, magnitude, terms: int, rank: int, dtype: str) -> Accumulated:
        """``magnitude`` is the same reduction of ``|x|`` (float64); ``terms`` the most summands per output."""
        # each of the ``terms`` additions and up to 2·rank scalings (separable passes, 1/n) rounds once in the
        # accumulator; the float64 reference itself is that close to exact in float64
        steps = terms + 2 * rank + 1
        accumulate = ROUNDOFF[ACCUMULATOR[dtype]]
        magnitude = np.asarray(magnitude, dtype=np.float64)
        bound = steps * (accumulate + ROUNDOFF["float64"]) * magnitude + TINY[ACCUMULATOR[dtype]] * accumulate
        return cls(np.asarray(value, dtype=np.float64), bound)

    def problem(self, got, dtype: str) -> str | None:
        """``None`` when ``got`` is a correctly rounded result for ``dtype``, else what is wrong."""
        got = np.asarray(got, dtype=np.float64)
        mismatch = _special_mismatch(got, self.value)
        if mismatch:
            return mismatch
        finite = np.isfinite(self.value)
        got, want, bound = got[finite], self.value[finite], self.bound[finite]
        if dtype in ("float16", "bfloat16"):  # rounded once: the rounding of some value in [want ± bound]
            low, high = round_to(want - bound, dtype), round_to(want + bound, dtype)
        else:  # rounded once at the end, plus the accumulation error
            slack = ROUNDOFF[dtype] * np.abs(want) + bound + TINY[dtype] * ROUNDOFF[dtype]
            low, high = want - slack, want + slack
        bad = ~((low <= got) & (got <= high))
        if not bad.any():
            return None
        i = int(np.argmax(bad))
        exact = round_to(want[i], dtype)
        return (f"{int(bad.sum())} of {bad.size} not correctly rounded to {dtype}, e.g. got {got[i]!r}, "
                f"exact {want[i]!r} (rounds to {exact!r}; allowed [{low[i]!r}, {high[i]!r}])")


def ulp(values, dtype: str) -> np.ndarray:
    """The spacing of ``dtype`` at ``values`` (the subnormal spacing below its normal range)."""
    a = np.maximum(np.abs(np.asarray(values, dtype=np.float64)), TINY[dtype])
    return 2.0 ** np.floor(np.log2(a)) * 2 * ROUNDOFF[dtype]


@dataclass(frozen=True)
class Reduced:
    """The float64 result of a further reduction (LP, GeM, avgmax, catavgmax) and its error bound.

    Powers and roots round more than once, so the contract is looser than :class:`Accumulated`'s:
    float32/float64 results within 16 units of roundoff of ``value`` plus the accumulator's summation
    error, ``4 · window · u_acc · scale`` (``scale``: the window's largest ``|x|``); half-type results
    within one ulp of ``round_to(value)``, or within one ulp plus that summation error of ``value``.
    """

    value: np.ndarray
    scale: np.ndarray
    window: int

    def problem(self, got, dtype: str) -> str | None:
        """``None`` when ``got`` is within the bound, else what is wrong."""
        got = np.asarray(got, dtype=np.float64)
        mismatch = _special_mismatch(got, self.value)
        if mismatch:
            return mismatch
        finite = np.isfinite(self.value)
        g, w = got[finite], self.value[finite]
        s = np.where(np.isfinite(self.scale), self.scale, 0)[finite]
        accumulate = ROUNDOFF[ACCUMULATOR[dtype]]
        summation = 4 * self.window * accumulate * s
        if dtype in ("float16", "bfloat16"):
            rounded = round_to(w, dtype)
            bad = (np.abs(g - rounded) > ulp(rounded, dtype)) & (np.abs(g - w) > summation + ulp(w, dtype))
        else:
            bad = np.abs(g - w) > 16 * accumulate * np.abs(w) + summation
        if not bad.any():
            return None
        i = int(np.argmax(bad))
        return f"{int(bad.sum())} of {bad.size} outside the bound, e.g. got {g[i]!r}, exact {w[i]!r}"

    def error(self, got) -> float:
        """``max |got - value| / (1 + |value|)`` over the finite outputs."""
        finite = np.isfinite(self.value)
        got, want = np.asarray(got, dtype=np.float64)[finite], self.value[finite]
        return float((np.abs(got - want) / (1 + np.abs(want))).max(initial=0.0))


@dataclass(frozen=True)
class Case:
    shape: tuple[int, ...]
    output_size: tuple  # one entry per spatial axis, may hold None
    data_format: str
    dtype: str
    values: str  # "normal", "ties" (small integers) or "special" (NaN and ±inf sprinkled in)
    seed: int
    storage: str = "contiguous"  # or "memory_format" (torch's channels_last memory) or "view" (see restride)
    valid: tuple[tuple[int, ...], ...] | None = None  # ``valid_sizes``: one row of spatial sizes per sample

    @property
    def valid_sizes(self) -> np.ndarray | None:
        """``valid`` as the int64 ``(N, rank)`` array the functions take, or ``None``."""
        return None if self.valid is None else np.array(self.valid, dtype=np.int64).reshape(-1, self.rank)

    @property
    def rank(self) -> int:
        return len(self.output_size)

    @property
    def exponent(self) -> float:
        """``norm_type`` of LP and ``p`` of GeM for this case."""
        return EXPONENTS[self.seed % len(EXPONENTS)]

    @property
    def window(self) -> int:
        """The most input positions one output reduces (in any sample's valid region)."""
        return max(math.prod(_bins.max_window(L, O) for L, O in zip(c.spec.input_size, c.spec.output_size))
                   for c in self.samples())

    @property
    def coverage(self) -> int:
        """The most outputs one input position contributes to (the terms of its gradient)."""
        return max(math.prod(_bins.max_cover_expr(L, O) for L, O in zip(c.spec.input_size, c.spec.output_size))
                   for c in self.samples())

    def samples(self) -> list[Case]:
        """With ``valid``: one batch-1 case per sample, cropped to its valid region; else ``[self]``."""
        if self.valid is None:
            return [self]
        channels = self.shape[-1 if self.data_format == "channels_last" else 1]
        return [replace(self, shape=(1, *sizes, channels) if self.data_format == "channels_last" else
                        (1, channels, *sizes), valid=None) for sizes in self.valid]

    @property
    def avg_tolerance(self) -> float:
        """Allowed ``max |a - b| / (1 + |b|)`` for avg between implementations that need not round once
        (the frameworks' own ops round intermediate results: half-type channels_last averages in torch
        were measured up to 3 ulps off), and between two implementations: 8 ulps plus 2·n·u of summation.
        Against the reference, a column that rounds once is held to :class:`Accumulated` instead."""
        return 8 * ROUNDOFF[self.dtype] + 2 * self.window * ROUNDOFF[ACCUMULATOR[self.dtype]]

    @property
    def spec(self) -> _args.PoolSpec:
        return _args.pool_spec(self.shape, self.output_size, self.rank, self.data_format)

    def input(self) -> np.ndarray:
        """The input as float32/float64 NumPy (bfloat16 cases hold bfloat16-exact float32)."""
        rng = np.random.default_rng(self.seed)
        if self.values == "ties":
            x = rng.integers(-3, 4, self.shape).astype(np.float64)
        else:
            x = rng.standard_normal(self.shape) * 4
        if self.values == "special" and x.size:
            flat = x.reshape(-1)
            for v in (np.nan, np.inf, -np.inf):
                flat[rng.choice(flat.size, max(1, flat.size // 20))] = v
        if self.dtype == "bfloat16":  # bfloat16-exact values, held as float32
            return round_to(x, "bfloat16").astype(np.float32)
        return x.astype(self.dtype)

    def describe(self) -> str:
        valid = "" if self.valid is None else f" valid_sizes={list(map(list, self.valid))}"
        return (f"shape={self.shape} output_size={self.output_size} {self.data_format} {self.dtype} "
                f"{self.values} seed={self.seed} storage={self.storage}{valid}")


STORAGES = ("contiguous", "memory_format", "view")


def random_cases(n: int, seed: int = 0, ranks: Iterable[int] = (1, 2, 3), dtypes: Iterable[str] = DTYPES,
                 data_formats: Iterable[str] = _args.DATA_FORMATS, max_length: int = 24, long_length: int = 300,
                 unbatched: bool = True, empty: bool = True, storages: Iterable[str] = STORAGES,
                 valid: float = 0.0) -> list[Case]:
    """``n`` random cases: non-divisible sizes, upsampling (O > L), size-1 axes, ``None`` and
    (with ``empty``) 0 entries, unbatched and channels_last inputs, every dtype, NaN/inf and ties.

    Most axes are at most ``max_length`` long; about one case in six has one axis of up to
    ``long_length`` (windows longer than any tile or vector width; 0 turns this off).  A share
    ``valid`` of the cases are padded batches with random ``valid_sizes`` (see :func:`_random_valid`).
    """
    rng = np.random.default_rng(seed)
    ranks, dtypes, formats, storages = list(ranks), list(dtypes), list(data_formats), list(storages)
    cases = []
    for _ in range(n):
        rank = int(rng.choice(ranks))
        spatial = [int(rng.choice([1, rng.integers(2, 9), rng.integers(2, max_length + 1)], p=[0.15, 0.45, 0.4]))
                   for _ in range(rank)]
        if long_length > max_length and rng.random() < 1 / 6:
            axis = int(rng.integers(rank))
            others = math.prod(spatial) // spatial[axis]  # keep the plane under ~20k positions
            longest = max(max_length + 1, min(long_length, 20_000 // others))
            spatial[axis] = int(rng.integers(max_length + 1, longest + 1))
        outputs = [_random_output(rng, length, empty) for length in spatial]
        channels = int(rng.integers(1, 4))
        padded = valid > 0 and rank <= 3 and rng.random() < valid  # no draw otherwise: same cases as before
        lead = [] if unbatched and not padded and rng.random() < 0.25 else [int(rng.integers(1, 5 if padded else 3))]
        data_format = str(rng.choice(formats))
        shape = lead + ([channels] + spatial if data_format == "channels_first" else spatial + [channels])
        cases.append(Case(tuple(shape), tuple(outputs), data_format, str(rng.choice(dtypes)),
                          str(rng.choice(["normal", "normal", "ties", "special"])), int(rng.integers(2**31)),
                          str(rng.choice(storages, p=_storage_weights(storages))),
                          _random_valid(rng, lead[0], spatial) if padded else None))
    return cases


def _random_valid(rng, n: int, spatial: list[int]) -> tuple[tuple[int, ...], ...]:
    """Sizes of ``n`` samples padded to ``spatial``: each axis 1, full or anything between; one sample full."""
    rows = [tuple(int(rng.choice([1, L, rng.integers(1, L + 1), rng.integers(1, L + 1)])) for L in spatial)
            for _ in range(n)]
    rows[int(rng.integers(n))] = tuple(spatial)
    return tuple(rows)


def _random_output(rng, length: int, empty: bool):
    """An output size for an axis of ``length``: mostly downsampling (O < L), sometimes the identity."""
    kind = rng.random()
    if kind < 0.07:
        return None
    if kind < 0.17:
        return 1
    if kind < 0.32:
        return int(rng.integers(length + 1, 3 * length + 3))  # upsampling
    if kind < 0.36:
        return 0 if empty else length
    if kind < 0.41 or length == 1:
        return length
    return int(rng.integers(1, length))


def _storage_weights(storages: list[str]) -> list[float]:
    weights = [3.0 if s == "contiguous" else 1.0 for s in storages]
    return [w / sum(weights) for w in weights]


def restride(arr, storage: str):
    """``arr`` with the same values in another memory layout (torch tensors and NumPy arrays; others as is).

    ``"memory_format"``: torch's channels_last / channels_last_3d for a 4-D / 5-D tensor (else as
    ``"view"``); ``"view"``: a non-contiguous view, every other element of a buffer twice as long on
    the last axis, with the first axis innermost in memory.
    """
    if storage == "contiguous":
        return arr
    if type(arr).__module__.startswith("torch"):
        import torch

        if storage == "memory_format" and arr.dim() in (4, 5):
            return arr.contiguous(memory_format=torch.channels_last if arr.dim() == 4 else torch.channels_last_3d)
        inner = arr.movedim(0, -1).contiguous().movedim(-1, 0) if arr.dim() > 1 else arr
        wide = torch.zeros((*inner.shape[:-1], 2 * inner.shape[-1]), dtype=arr.dtype, device=arr.device)
        wide = wide.movedim(0, -1).contiguous().movedim(-1, 0) if arr.dim() > 1 else wide
        wide[..., ::2] = inner
        return wide[..., ::2]
    if isinstance(arr, np.ndarray) and arr.ndim:
        wide = np.zeros((*arr.shape[:-1], 2 * arr.shape[-1]), dtype=arr.dtype)
        wide = np.moveaxis(np.ascontiguousarray(np.moveaxis(wide, 0, -1)), -1, 0)
        wide[..., ::2] = arr
        return wide[..., ::2]
    return arr


def operand(case: Case, x: np.ndarray, op: str) -> np.ndarray:
    """The input ``op`` runs on: ``x``, or ``|x|`` for LP with ``p`` 3 or 7.3 (an odd power of mixed
    signs cancels, and a non-integer one of a negative is NaN: conditioning, not accuracy)."""
    return np.abs(x) if op == "lp" and case.exponent in (3.0, 7.3) else x


def reduce(arr, case: Case, op: str, **kw):
    """anypool's public function for reduction ``op`` on ``arr`` (any backend's array), with the case's
    output size and exponent."""
    import anypool

    if op == "lp":
        return anypool.adaptive_lp_pool(arr, case.exponent, case.output_size, **kw)
    if op == "gem":
        return anypool.adaptive_gem_pool(arr, case.output_size, p=case.exponent, eps=GEM_EPS, **kw)
    return getattr(anypool, f"adaptive_{op}_pool")(arr, case.output_size, **kw)


def expected(case: Case, x: np.ndarray, op: str):
    """The reference result for ``op`` on ``x``: an :class:`Accumulated` mean for ``"avg"``,
    values (and indices) for ``"max"``/``"argmax"`` (float32 for bfloat16 cases), a
    :class:`Reduced` result for the further reductions.

    A padded batch (``case.valid``) gets each sample's own result on its crop, alone, placed in
    the padded output (0 beyond a sample's length on ``None`` axes); indices count positions of
    the padded plane.
    """
    if case.valid is not None:
        return per_sample(case, x, lambda sample, crop: expected(sample, crop, op))
    if op in REDUCTIONS:
        spec, x64 = case.spec, x.astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            value = np.asarray(reduce(x64, case, op, data_format=case.data_format), dtype=np.float64)
            top = reference.max_pool(np.abs(x64), spec)
        scale = np.concatenate([top, top], axis=spec.channel_axis) if op == "catavgmax" else top
        return Reduced(value, scale, case.window)
    if op == "avg":
        spec = case.spec
        x64 = x.astype(np.float64)
        with np.errstate(invalid="ignore"):
            value, magnitude = reference.avg_pool(x64, spec), reference.avg_pool(np.abs(x64), spec)
        return Accumulated.of(value, magnitude, case.window, case.rank, case.dtype)
    return reference.max_pool(x, case.spec, return_indices=op == "argmax")


def expected_gradient(case: Case, op: str, grad_output, indices=None) -> Accumulated:
    """The reference gradient of ``op`` ("avg" or "max") w.r.t. the input for ``grad_output``
    (channels_first or channels_last as ``case``); ``indices``: the max positions (take them from an
    independent source, e.g. :func:`expected`, so that a wrong index cannot pass)."""
    if case.valid is not None:
        return _per_sample_gradient(case, op, grad_output, indices)
    spec = case.spec
    g = np.asarray(grad_output, dtype=np.float64)
    if op == "avg":
        value, magnitude = reference.avg_pool_grad(g, spec), reference.avg_pool_grad(np.abs(g), spec)
    else:
        value, magnitude = reference.max_pool_grad(g, indices, spec), reference.max_pool_grad(np.abs(g), indices, spec)
    return Accumulated.of(value, magnitude, case.coverage, case.rank, case.dtype)


def _crop_index(spec: _args.PoolSpec, sizes) -> tuple:
    """The index of the leading ``sizes`` region of each spatial axis of a ``spec``-shaped array."""
    index = [slice(None)] * len(spec.shape)
    for axis, size in zip(spec.spatial_axes, sizes):
        index[axis] = slice(0, size)
    return tuple(index)


def _reindex(indices: np.ndarray, from_size, to_size) -> np.ndarray:
    """Flat offsets into a plane of ``from_size`` as flat offsets into the plane of ``to_size``."""
    return np.ravel_multi_index(np.unravel_index(indices, from_size), to_size).astype(indices.dtype)


def per_sample(case: Case, x: np.ndarray, pool: Callable[[Case, np.ndarray], object]):
    """``pool(sample_case, crop)`` of every sample of a padded batch, assembled like one padded result.

    ``pool`` returns values, ``(values, indices)`` (indices into the crop's plane) or an
    :class:`Accumulated`; each sample's output lands in the leading region of the padded output.
    """
    spec = case.spec
    parts = []
    for i, (sample, sizes) in enumerate(zip(case.samples(), case.valid)):
        out = pool(sample, x[i:i + 1][_crop_index(spec, sizes)])
        if isinstance(out, tuple):
            out = (out[0], _reindex(out[1], sizes, spec.input_size))
        parts.append((sample.spec.output_size, out))

    def assemble(pick):
        first = pick(parts[0][1])
        shape = list(spec.output_shape)
        shape[spec.channel_axis] = first.shape[spec.channel_axis]  # catavgmax doubles the channels
        full = np.zeros(shape, dtype=first.dtype)
        for i, (size, out) in enumerate(parts):
            full[i:i + 1][_crop_index(spec, size)] = pick(out)
        return full

    first = parts[0][1]
    if isinstance(first, Reduced):
        return Reduced(assemble(lambda r: r.value), assemble(lambda r: r.scale), max(r.window for _, r in parts))
    if isinstance(first, Accumulated):
        return Accumulated(assemble(lambda a: a.value), assemble(lambda a: a.bound))
    if isinstance(first, tuple):
        return assemble(lambda o: o[0]), assemble(lambda o: o[1])
    return assemble(lambda o: o)


def _per_sample_gradient(case: Case, op: str, grad_output, indices) -> Accumulated:
    """:func:`expected_gradient` of a padded batch: each sample's crop gradient, 0 on the padding."""
    spec = case.spec
    value, bound = np.zeros(spec.shape), np.zeros(spec.shape)
    for i, (sample, sizes) in enumerate(zip(case.samples(), case.valid)):
        region = _crop_index(spec, sample.spec.output_size)
        own = None if indices is None else _reindex(np.asarray(indices)[i:i + 1][region], spec.input_size, sizes)
        grad = expected_gradient(sample, op, np.asarray(grad_output)[i:i + 1][region], own)
        crop = (slice(i, i + 1), *_crop_index(spec, sizes)[1:])
        value[crop], bound[crop] = grad.value, grad.bound
    return Accumulated(value, bound)


def compare(case: Case, op: str, got, want) -> tuple[float, str | None]:
    """``(error, problem)``: the scaled avg error (0 for max) and a description of any mismatch.

    ``want`` is :func:`expected`'s reference (an avg then must be correctly rounded, see
    :class:`Accumulated`) or another implementation's result (an avg then agrees within
    ``case.avg_tolerance``, both having rounded).
    """
    if isinstance(want, Reduced):
        problem = want.problem(got, case.dtype)
        return (float("inf"), problem) if problem else (want.error(got), None)
    if op == "argmax":
        (got_v, got_i), (want_v, want_i) = got, want
        err, problem = compare(case, "max", got_v, want_v)
        if problem is None and (np.shape(got_i) != np.shape(want_i) or not np.array_equal(got_i, want_i)):
            problem = "indices differ"
        return err, problem
    checked = isinstance(want, Accumulated)
    if checked:
        problem = want.problem(got, case.dtype)
        if problem is not None:
            return float("inf"), problem
        want = want.value
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        return float("inf"), f"shape {got.shape} != {want.shape}"
    if not np.array_equal(np.isnan(got), np.isnan(want)):
        return float("inf"), "NaN positions differ"
    finite = np.isfinite(want)
    if not np.array_equal(got[~finite & ~np.isnan(want)], want[~finite & ~np.isnan(want)]) or \
            not np.isfinite(got[finite]).all():
        return float("inf"), "inf positions differ"
    err = float((np.abs(got[finite] - want[finite]) / (1 + np.abs(want[finite]))).max(initial=0.0))
    if op == "max":
        return 0.0, None if np.array_equal(got[finite], want[finite]) else f"max values differ by {err:.3g}"
    tolerance = case.avg_tolerance
    return err, None if checked or err <= tolerance else f"error {err:.3g} > {tolerance:.3g}"


@dataclass
class Column:
    """One implementation under test; ``supports(case, op)`` filters what it can run.

    ``rounds_once``: the column promises anypool's contract for averages (accumulate in float32 or
    float64, round once to the output dtype), held exactly; other columns (the frameworks' own ops)
    are held to ``Case.avg_tolerance``.  ``ops``: the ops it has at all (layers return no indices).
    """

    name: str
    run: Callable[[Case, np.ndarray, str], object]
    supports: Callable[[Case, str], bool] = lambda case, op: True
    rounds_once: bool = True
    ops: tuple[str, ...] = OPS

    def expected(self, case: Case, x: np.ndarray, op: str):
        """The reference this column is held to (:func:`expected`, as plain values unless ``rounds_once``)."""
        want = expected(case, x, op)
        return want.value if isinstance(want, Accumulated) and not self.rounds_once else want


@dataclass
class Report:
    column: str
    cases: int = 0
    max_error: float = 0.0
    failures: list[str] = field(default_factory=list)


def check(column: Column, cases: Iterable[Case], ops: Iterable[str] = OPS, progress=None,
          min_share: float = 0.5) -> Report:
    """Run ``column`` on every case and op it supports; it fails when it served less than
    ``min_share`` of the cases times its ``ops`` (a ``supports`` filter that silently drops most of them)."""
    report = Report(column.name)
    ops = tuple(op for op in ops if op in column.ops)
    offered = 0
    for case in cases:
        offered += len(ops)
        x = case.input()
        for op in ops:
            if not column.supports(case, op):
                continue
            xo = operand(case, x, op)
            try:
                err, problem = compare(case, op, column.run(case, xo, op), column.expected(case, xo, op))
            except Exception as e:  # a crash is a failure of the column, reported like a mismatch
                err, problem = float("inf"), f"{type(e).__name__}: {e}"
            report.cases += 1
            report.max_error = max(report.max_error, err)
            if problem:
                report.failures.append(f"{op} {case.describe()}: {problem}")
        if progress:
            progress()
    if report.cases < min_share * offered:
        report.failures.append(f"served {report.cases} of {offered} case-ops, less than {min_share:.0%}")
    return report


def anypool_column(backend) -> Column:
    """anypool's public functions on one backend's arrays."""
    import anypool

    def run(case: Case, x: np.ndarray, op: str):
        arr = restride(backend.from_numpy(x, case.dtype), case.storage)
        kw = dict(data_format=case.data_format, valid_sizes=case.valid_sizes)
        if op in REDUCTIONS:
            return _to_numpy(backend, reduce(arr, case, op, **kw))
        if op == "avg":
            return _to_numpy(backend, anypool.adaptive_avg_pool(arr, case.output_size, **kw))
        out = anypool.adaptive_max_pool(arr, case.output_size, return_indices=op == "argmax", **kw)
        return tuple(_to_numpy(backend, o) for o in out) if op == "argmax" else _to_numpy(backend, out)

    def supports(case: Case, op: str) -> bool:
        # a backend may lack a dtype in this process (JAX has no float64 unless jax_enable_x64 is on)
        available = getattr(backend, "supports_dtype", lambda dtype: True)(case.dtype)
        return available and (backend.name != "numpy" or case.dtype != "bfloat16")

    return Column(f"anypool[{backend.name}]", run, supports, ops=OPS + REDUCTIONS)


def _to_numpy(backend, x) -> np.ndarray:
    out = backend.to_numpy(x)
    return out.astype(np.float32) if out.dtype.name == "bfloat16" else out


def _fixed_kernel(spec: _args.PoolSpec) -> tuple[int, ...] | None:
    """The kernel of the fixed windows that equal the adaptive ones (each input length a multiple of
    its output length), or ``None``."""
    pools = [_bins.fixed_pool(L, o) for L, o in zip(spec.input_size, spec.output_size)]
    return None if None in pools else tuple(kernel for kernel, _ in pools)


def torch_native_column() -> Column:
    """PyTorch's own ``torch.nn.functional.adaptive_*_pool{1,2,3}d`` (CPU), for comparison, and the
    composites models write with them for the further reductions: timm's ``0.5 * (avg + max)`` and
    ``torch.cat`` of both, GeM's ``avg(x.clamp(eps).pow(p)).pow(1 / p)``, and ``F.lp_pool{1,2,3}d``
    where the windows are fixed.  The composites round each step, so they serve float32 and float64."""
    import torch
    import torch.nn.functional as F

    def native(t, op: str, spec: _args.PoolSpec, exponent: float):
        size = spec.output_size if len(spec.output_size) > 1 else spec.output_size[0]
        rank = len(spec.output_size)
        avg, max_ = getattr(F, f"adaptive_avg_pool{rank}d"), getattr(F, f"adaptive_max_pool{rank}d")
        channel = 1 if spec.batched else 0
        if op == "avg":
            return avg(t, size)
        if op in ("max", "argmax"):
            return max_(t, size, return_indices=op == "argmax")
        if op == "avgmax":
            return 0.5 * (avg(t, size) + max_(t, size))
        if op == "catavgmax":
            return torch.cat([avg(t, size), max_(t, size)], channel)
        if op == "gem":
            return avg(t.clamp(GEM_EPS).pow(exponent), size).pow(1.0 / exponent)
        kernel = _fixed_kernel(spec)
        return getattr(F, f"lp_pool{rank}d")(t, exponent, kernel if rank > 1 else kernel[0])

    def run(case: Case, x: np.ndarray, op: str):
        if case.valid is not None:  # the users' workaround: one native call per cropped sample
            return per_sample(case, x, lambda sample, crop: run(sample, crop, op))
        spec = case.spec
        t = restride(torch.from_numpy(x).to(getattr(torch, case.dtype)), case.storage)
        if spec.channels_last:  # native ops want channels first
            t = t.movedim(-1, 1 if spec.batched else 0)
        out = native(t, op, spec, case.exponent)
        outs = out if op == "argmax" else (out,)
        if spec.channels_last:
            outs = tuple(o.movedim(1 if spec.batched else 0, -1) for o in outs)
        outs = tuple(o.float().numpy() if o.dtype == torch.bfloat16 else o.numpy() for o in outs)
        return outs if op == "argmax" else outs[0]

    def supports(case: Case, op: str) -> bool:
        # size-0 outputs and 0-size windows are outside what the native op accepts
        if case.rank > 3 or 0 in case.spec.output_size:
            return False
        if op in REDUCTIONS and case.dtype not in ("float32", "float64"):
            return False
        return op != "lp" or all(_fixed_kernel(c.spec) for c in case.samples())  # lp_pool: fixed windows only

    return Column("torch native", run, supports, rounds_once=False, ops=OPS + REDUCTIONS)


# Modules that contribute columns beyond anypool's array backends (each defines
# ``harness_columns() -> list[Column]``); skipped when their framework is missing.
EXTRA_COLUMN_MODULES = ("anypool.onnx", "anypool.layers.keras")


def columns() -> list[Column]:
    """Every column this installation can run."""
    from . import _dispatch

    found = [anypool_column(b) for b in _dispatch.installed_backends() if b.name != "numpy"]
    try:
        found.append(torch_native_column())
    except ImportError:
        pass
    for module in EXTRA_COLUMN_MODULES:
        try:
            found.extend(importlib.import_module(module).harness_columns())
        except ImportError:
            continue
    return found
