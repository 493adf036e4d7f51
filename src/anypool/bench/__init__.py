"""The benchmark suite behind ``anypool bench``: shared cases, timing and reporting.

Adaptive pooling is memory-bound, so every number is reported against the
machine's own read bandwidth measured in the same run (a sum over a buffer of the
input's size) and as a ratio to the framework's native op timed side by side —
never as a lone absolute time.  Each framework has a module here (``torch``,
``jax``, ``keras``, ``onnx``) with ``run(cases, device, repeats, progress) -> list[Row]``.
"""

from __future__ import annotations

import importlib
import itertools
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class BenchCase:
    name: str
    shape: tuple[int, ...]  # logical (N, C, *S)
    output_size: tuple[int, ...]
    dtype: str = "float32"
    channels_last: bool = False

    @property
    def rank(self) -> int:
        return len(self.output_size)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * (2 if self.dtype in ("bfloat16", "float16") else 4 if self.dtype == "float32"
                                        else 8)

    def label(self) -> str:
        layout = " cl" if self.channels_last else ""
        out = "x".join(map(str, self.output_size))
        return f"{self.shape}->{out} {self.dtype}{layout}"


def _suite() -> list[BenchCase]:
    two_d = [
        ((32, 512, 14, 14), (7, 7)), ((8, 64, 224, 224), (7, 7)), ((64, 2048, 7, 7), (1, 1)),
        ((8, 256, 64, 64), (6, 6)), ((8, 64, 100, 100), (33, 33)), ((32, 64, 5, 5), (7, 7)),
        ((16, 256, 37, 53), (5, 9)),
    ]
    cases = [BenchCase("2d", s, o) for s, o in two_d]
    cases += [BenchCase("2d-cl", s, o, channels_last=True) for s, o in two_d]
    cases.append(BenchCase("2d-bf16", (8, 64, 224, 224), (7, 7), dtype="bfloat16"))
    cases += [BenchCase("1d", (64, 256, 1000), (10,)), BenchCase("1d", (64, 256, 1000), (333,))]
    cases += [BenchCase("3d", (4, 64, 16, 56, 56), (4, 7, 7)), BenchCase("3d", (2, 32, 9, 33, 33), (4, 5, 6))]
    # batch-1 inference: per-call overhead and splitting one sample across threads
    batch_one = [((1, 2048, 7, 7), (1, 1)), ((1, 512, 14, 14), (7, 7)), ((1, 64, 224, 224), (7, 7))]
    cases += [BenchCase("2d-b1", s, o) for s, o in batch_one]
    cases += [BenchCase("2d-b1-cl", s, o, channels_last=True) for s, o in batch_one]
    return cases


SUITE: list[BenchCase] = _suite()
"""The public suite (issue #3); each case is run for avg and max."""


@dataclass
class Row:
    """One timed case: medians in milliseconds; ``None`` where a contender could not run."""

    framework: str
    case: str
    op: str  # "avg" | "max"
    mode: str  # "fwd" | "fwd+bwd"
    anypool_ms: float
    baselines_ms: dict[str, float | None] = field(default_factory=dict)  # e.g. {"native": .., "compile": ..}
    bytes_moved: int = 0
    bandwidth_gbs: float | None = None  # the machine's read bandwidth, measured beside this case
    timing: str = "alone"  # "alone" (back to back) or "in-model" (right after a native op)

    @property
    def fraction_of_bandwidth(self) -> float | None:
        if not self.bandwidth_gbs or not self.bytes_moved:
            return None
        return self.bytes_moved / (self.anypool_ms * 1e6) / self.bandwidth_gbs

    def speedup(self, baseline: str) -> float | None:
        t = self.baselines_ms.get(baseline)
        return t / self.anypool_ms if t else None


def median_ms(fn: Callable[[], object], repeats: int = 20, warmup: int = 3, sync: Callable[[], None] = lambda: None,
              min_seconds: float = 0.0) -> float:
    """Median wall time of ``fn()`` in milliseconds over ``repeats`` runs after ``warmup``."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    start = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def geomean(values) -> float | None:
    values = [v for v in values if v]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def machine() -> dict:
    """CPU model and thread count (plus what each framework adds, e.g. the GPU name)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "python": platform.python_version()}


FRAMEWORKS = ("torch", "jax", "keras", "onnx")


def keras_on(backend: str):
    """Keras on ``backend`` for a baseline, or ``None`` (missing, or already loaded with another backend)."""
    import sys

    if "keras" in sys.modules:
        import keras

        return keras if keras.backend.backend() == backend else None
    previous = os.environ.get("KERAS_BACKEND")
    os.environ["KERAS_BACKEND"] = backend  # Keras reads it once, at import
    try:
        import keras
    except ImportError:
        return None
    finally:
        if previous is None:
            del os.environ["KERAS_BACKEND"]
        else:
            os.environ["KERAS_BACKEND"] = previous
    return keras


def run(frameworks=FRAMEWORKS, device: str = "cpu", repeats: int = 20, cases=None, progress=None) -> list[Row]:
    rows = []
    for name in frameworks:
        try:
            module = importlib.import_module(f"anypool.bench.{name}")
        except ImportError:
            continue
        rows.extend(module.run(cases or SUITE, device=device, repeats=repeats, progress=progress))
    return rows


def run_isolated(frameworks=FRAMEWORKS, device: str = "cpu", repeats: int = 20, only=None) -> list[Row]:
    """:func:`run`, one fresh process per framework.

    Keras reads its backend once per process (the JAX suite loads it on JAX, the Keras
    suite needs TensorFlow), and TensorFlow must not load its LLVM before Triton's.
    """
    import subprocess
    import sys
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in frameworks:
            path = os.path.join(tmp, f"{name}.json")
            subprocess.run([sys.executable, "-m", "anypool.cli", "bench", "--framework", name, "--device", device,
                            "--repeats", str(repeats), "--json", path, *(f"--only={s}" for s in only or ())],
                           stdout=subprocess.DEVNULL, check=True)
            rows.extend(read_json(path))
    return rows


def read_json(path: str) -> list[Row]:
    with open(path) as f:
        payload = json.load(f)
    return [Row(**{k: v for k, v in row.items() if k != "fraction_of_bandwidth"}) for row in payload["rows"]]


def table(rows: list[Row]) -> str:
    baselines = sorted({b for r in rows for b in r.baselines_ms})
    head = f"{'framework':<9} {'case':<38} {'op':<4} {'mode':<8} {'timing':<8} {'anypool ms':>10} " + " ".join(
        f"{'x ' + b:>12}" for b in baselines) + f" {'%bw':>5}"
    lines = [head, "-" * len(head)]
    for r in rows:
        speed = " ".join(f"{(r.speedup(b) or float('nan')):>12.2f}" for b in baselines)
        frac = r.fraction_of_bandwidth
        lines.append(f"{r.framework:<9} {r.case:<38} {r.op:<4} {r.mode:<8} {r.timing:<8} {r.anypool_ms:>10.3f} {speed} "
                     f"{'' if frac is None else f'{100 * frac:5.0f}'}")
    for framework in sorted({r.framework for r in rows}):
        for mode, timing in itertools.product(("fwd", "fwd+bwd"), ("alone", "in-model")):
            sel = [r for r in rows if r.framework == framework and r.mode == mode and r.timing == timing]
            if not sel:
                continue
            parts = []
            for b in baselines:
                speedups = [r.speedup(b) for r in sel if r.speedup(b)]
                if speedups:
                    parts.append(f"{b}: geomean x{geomean(speedups):.2f}, min x{min(speedups):.2f}")
            lines.append(f"{framework} {mode} {timing}: " + "; ".join(parts))
    return "\n".join(lines)


def write_json(rows: list[Row], path: str, extra: dict | None = None) -> None:
    payload = {"machine": {**machine(), **(extra or {})},
               "rows": [{**asdict(r), "fraction_of_bandwidth": r.fraction_of_bandwidth} for r in rows]}
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)


def write_png(rows: list[Row], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    baselines = sorted({b for r in rows for b in r.baselines_ms})
    labels = [f"{r.framework} {r.op} {r.mode} {r.case}" for r in rows]
    fig, ax = plt.subplots(figsize=(10, max(3, 0.22 * len(rows))))
    height = 0.8 / max(1, len(baselines))
    for k, b in enumerate(baselines):
        ax.barh([i + k * height for i in range(len(rows))], [r.speedup(b) or 0 for r in rows], height, label=f"vs {b}")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(rows))], labels, fontsize=6)
    ax.set_xscale("log")
    ax.set_xlabel("speed-up of anypool (higher is better)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
