"""The differential conformance harness: random cases, the NumPy oracle, and columns.

A *case* is one random call (shape, layout, output size, dtype, special values).
A *column* is one implementation under test: a function ``run(case, x, op)`` that
takes the case's NumPy input and returns NumPy results — values for ``"avg"`` and
``"max"``, ``(values, indices)`` for ``"argmax"``.  Every column is compared with
the NumPy reference backend.  Used by ``anypool check`` and by the test-suite of
every backend, so a new backend joins by adding a column, nothing else.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from . import _args, _bins
from .backends import numpy as reference

OPS = ("avg", "max", "argmax")
DTYPES = ("float16", "bfloat16", "float32", "float64")
# Unit roundoff of each dtype.  Max values and indices must be exact; an average may
# differ from the correctly rounded mean by the final rounding to its dtype plus the
# summation error of its accumulator (float32, or float64 for float64 inputs).
ROUNDOFF = {"float16": 2.0**-11, "bfloat16": 2.0**-8, "float32": 2.0**-24, "float64": 2.0**-53}


@dataclass(frozen=True)
class Case:
    shape: tuple[int, ...]
    output_size: tuple  # one entry per spatial axis, may hold None
    data_format: str
    dtype: str
    values: str  # "normal", "ties" (small integers) or "special" (NaN and ±inf sprinkled in)
    seed: int

    @property
    def rank(self) -> int:
        return len(self.output_size)

    @property
    def avg_tolerance(self) -> float:
        """Allowed ``max |got - ref| / (1 + |ref|)`` for avg: 8 ulps of rounding plus 2·n·u of summation."""
        spec = self.spec
        window = math.prod(_bins.max_window(L, O) for L, O in zip(spec.input_size, spec.output_size))
        accumulate = ROUNDOFF["float64" if self.dtype == "float64" else "float32"]
        return 8 * ROUNDOFF[self.dtype] + 2 * window * accumulate

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
        if self.dtype == "bfloat16":  # round to the nearest bfloat16 (ties to even)
            bits = x.astype(np.float32).view(np.uint32)
            rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            return np.where(np.isnan(x), np.float32(np.nan), rounded.view(np.float32)).astype(np.float32)
        return x.astype(self.dtype)

    def describe(self) -> str:
        return (f"shape={self.shape} output_size={self.output_size} {self.data_format} {self.dtype} "
                f"{self.values} seed={self.seed}")


def random_cases(n: int, seed: int = 0, ranks: Iterable[int] = (1, 2, 3), dtypes: Iterable[str] = DTYPES,
                 data_formats: Iterable[str] = _args.DATA_FORMATS, max_length: int = 24,
                 unbatched: bool = True) -> list[Case]:
    """``n`` random cases: non-divisible sizes, upsampling (O > L), size-1 axes, ``None``
    entries, unbatched and channels_last inputs, every dtype, NaN/inf and ties."""
    rng = np.random.default_rng(seed)
    ranks, dtypes, formats = list(ranks), list(dtypes), list(data_formats)
    cases = []
    for _ in range(n):
        rank = int(rng.choice(ranks))
        spatial = [int(rng.choice([1, rng.integers(1, 8), rng.integers(1, max_length + 1)])) for _ in range(rank)]
        outputs = []
        for length in spatial:
            kind = rng.integers(0, 6)
            outputs.append(
                None if kind == 0 else 1 if kind == 1 else int(rng.integers(length + 1, 3 * length + 3))
                if kind == 2 else int(rng.integers(1, length + 1))
            )
        channels = int(rng.integers(1, 4))
        lead = [] if unbatched and rng.random() < 0.25 else [int(rng.integers(1, 3))]
        data_format = str(rng.choice(formats))
        shape = lead + ([channels] + spatial if data_format == "channels_first" else spatial + [channels])
        cases.append(Case(tuple(shape), tuple(outputs), data_format, str(rng.choice(dtypes)),
                          str(rng.choice(["normal", "normal", "ties", "special"])), int(rng.integers(2**31))))
    return cases


def expected(case: Case, x: np.ndarray, op: str):
    """The reference result for ``op`` on ``x`` (ref dtype: float32 for bfloat16 cases)."""
    if op == "avg":
        return reference.avg_pool(x, case.spec)
    return reference.max_pool(x, case.spec, return_indices=op == "argmax")


def compare(case: Case, op: str, got, want) -> tuple[float, str | None]:
    """``(error, problem)``: the scaled avg error (0 for max) and a description of any mismatch."""
    if op == "argmax":
        (got_v, got_i), (want_v, want_i) = got, want
        err, problem = compare(case, "max", got_v, want_v)
        if problem is None and (np.shape(got_i) != np.shape(want_i) or not np.array_equal(got_i, want_i)):
            problem = "indices differ"
        return err, problem
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
    return err, None if err <= tolerance else f"error {err:.3g} > {tolerance:.3g}"


@dataclass
class Column:
    """One implementation under test; ``supports(case, op)`` filters what it can run."""

    name: str
    run: Callable[[Case, np.ndarray, str], object]
    supports: Callable[[Case, str], bool] = lambda case, op: True


@dataclass
class Report:
    column: str
    cases: int = 0
    max_error: float = 0.0
    failures: list[str] = field(default_factory=list)


def check(column: Column, cases: Iterable[Case], ops: Iterable[str] = OPS, progress=None) -> Report:
    report = Report(column.name)
    for case in cases:
        x = case.input()
        for op in ops:
            if not column.supports(case, op):
                continue
            try:
                err, problem = compare(case, op, column.run(case, x, op), expected(case, x, op))
            except Exception as e:  # a crash is a failure of the column, reported like a mismatch
                err, problem = float("inf"), f"{type(e).__name__}: {e}"
            report.cases += 1
            report.max_error = max(report.max_error, err)
            if problem:
                report.failures.append(f"{op} {case.describe()}: {problem}")
        if progress:
            progress()
    return report


def anypool_column(backend) -> Column:
    """anypool's public functions on one backend's arrays."""
    import anypool

    def run(case: Case, x: np.ndarray, op: str):
        arr = backend.from_numpy(x, case.dtype)
        if op == "avg":
            return _to_numpy(backend, anypool.adaptive_avg_pool(arr, case.output_size, data_format=case.data_format))
        out = anypool.adaptive_max_pool(arr, case.output_size, data_format=case.data_format,
                                        return_indices=op == "argmax")
        return tuple(_to_numpy(backend, o) for o in out) if op == "argmax" else _to_numpy(backend, out)

    def supports(case: Case, op: str) -> bool:
        # a backend may lack a dtype in this process (JAX has no float64 unless jax_enable_x64 is on)
        available = getattr(backend, "supports_dtype", lambda dtype: True)(case.dtype)
        return available and (backend.name != "numpy" or case.dtype != "bfloat16")

    return Column(f"anypool[{backend.name}]", run, supports)


def _to_numpy(backend, x) -> np.ndarray:
    out = backend.to_numpy(x)
    return out.astype(np.float32) if out.dtype.name == "bfloat16" else out


def torch_native_column() -> Column:
    """PyTorch's own ``torch.nn.functional.adaptive_*_pool{1,2,3}d`` (CPU), for comparison."""
    import torch
    import torch.nn.functional as F

    def run(case: Case, x: np.ndarray, op: str):
        spec = case.spec
        t = torch.from_numpy(x).to(getattr(torch, case.dtype))
        if spec.channels_last:  # native ops want channels first
            t = t.movedim(-1, 1 if spec.batched else 0)
        fn = getattr(F, f"adaptive_{'avg' if op == 'avg' else 'max'}_pool{case.rank}d")
        size = spec.output_size if case.rank > 1 else spec.output_size[0]
        out = fn(t, size) if op == "avg" else fn(t, size, return_indices=op == "argmax")
        outs = out if op == "argmax" else (out,)
        if spec.channels_last:
            outs = tuple(o.movedim(1 if spec.batched else 0, -1) for o in outs)
        outs = tuple(o.float().numpy() if o.dtype == torch.bfloat16 else o.numpy() for o in outs)
        return outs if op == "argmax" else outs[0]

    def supports(case: Case, op: str) -> bool:
        # size-0 outputs and 0-size windows are outside what the native op accepts
        return case.rank <= 3 and all(o != 0 for o in case.spec.output_size)

    return Column("torch native", run, supports)


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
