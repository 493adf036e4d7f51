"""The fast CPU path: C++ kernels (``csrc/pool.cpp``; LP, GeM, avgmax in ``csrc/reductions.cpp``) on torch's own
intra-op thread pool, called as a Python module (``csrc/bindings.cpp``).

The kernels run through ``at::parallel_for``, so they honour ``torch.set_num_threads`` and
share torch's OpenMP workers instead of starting a second pool beside them.  Every function
takes the *logical* channels-first tensor ``(N, C, *S)`` (spatial rank 1–3) of any strides
and returns results in its memory format (see the comment at the top of ``pool.cpp``).
Windows come from ``csrc/bins.h``, which ``tests/test_torch_cpu.py`` holds against
:mod:`anypool._bins`.

The extension is compiled on first use with ``torch.utils.cpp_extension`` and cached on disk
(``$ANYPOOL_CACHE_DIR``, else ``~/.cache/anypool``), keyed by the torch and Python versions and
the CPU capability torch itself dispatches to (``ATEN_CPU_CAPABILITY`` is honoured), so a cached
build never carries instructions the machine lacks.  Where it cannot be built (no C++
compiler, no ninja), importing this module raises ``ImportError`` and :mod:`.ops` warns once
and uses the portable path.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from types import ModuleType

import torch

__all__ = ["supports", "avg_forward", "avg_backward", "max_forward", "max_backward", "lp_forward", "lp_backward",
           "gem_forward", "gem_backward", "avgmax_forward", "avgmax_backward"]

VALID_SIZES = True  # the kernels take per-sample sizes (see ops.py, "padded batches")
# results already have the strides ops.py's fake impls promise (layout_empty in csrc/common.h follows
# ops._layout_empty; tests/test_torch_cpu.py holds them), so the eager path skips ops._conform
EXACT_LAYOUT = True
_CSRC = Path(__file__).with_name("csrc")
_SOURCES = ("pool.cpp", "reductions.cpp", "bindings.cpp")
_DTYPES = frozenset((torch.float32, torch.float64, torch.bfloat16, torch.float16))

# The instruction sets of each capability torch reports, as GCC/Clang flags.
_CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
}


def _cache_dir() -> Path:
    root = os.environ.get("ANYPOOL_CACHE_DIR") or Path.home() / ".cache" / "anypool"
    return Path(root)


_STALE_LOCK_S = 30 * 60  # far longer than a build takes (a few minutes): its builder died


def _clear_stale_lock(lock: Path) -> None:
    """Remove torch's build lock left behind by a build that was killed.

    ``cpp_extension.load`` waits, without a limit, for the lock file a running build holds; one
    left by a killed build would hang every later import.  A lock older than any build is removed,
    with a warning naming it.
    """
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > _STALE_LOCK_S:
        warnings.warn(f"anypool: removing the stale C++ build lock {lock} ({age / 60:.0f} min old; its build "
                      "was interrupted)", stacklevel=3)
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()


def build() -> ModuleType:
    """Compile (or load the cached build of) the extension; returns it as a module.

    Raises ``ImportError`` naming what is missing when it cannot be built.
    """
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise ImportError(f"no C++ compiler: {compiler!r} (from $CXX, default 'c++') is not on PATH")
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        raise ImportError("the 'ninja' build tool is missing (pip install ninja)")
    capability = torch.backends.cpu.get_cpu_capability()
    name = f"anypool_cpu_{capability.lower()}"
    directory = _cache_dir() / f"torch-{torch.__version__}-{sys.implementation.cache_tag}" / name
    directory.mkdir(parents=True, exist_ok=True)
    _clear_stale_lock(directory / "lock")
    try:
        return cpp_extension.load(
            name=name,
            sources=[str(_CSRC / s) for s in _SOURCES],
            extra_include_paths=[str(_CSRC)],
            extra_cflags=["-O3", "-fopenmp", "-fno-trapping-math", *_CAPABILITY_FLAGS.get(capability, [])],
            build_directory=str(directory),
        )
    except Exception as e:  # a compiler that fails (missing headers, a broken toolchain) is missing too
        raise ImportError(f"building the C++ kernels failed: {type(e).__name__}: {str(e).strip()[:500]}") from e


_kernels = build()


def supports(x: torch.Tensor, output_size) -> bool:
    """Whether this path serves ``x`` pooled to ``output_size`` (else the portable path does)."""
    d = x.dim()
    return (x.is_cpu and x.dtype in _DTYPES and 3 <= d <= 5 and len(output_size) == d - 2 and x.numel() > 0
            and min(output_size) > 0)


def avg_forward(x: torch.Tensor, output_size, sizes: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over each window: ``(N, C, *S)`` → ``(N, C, *output_size)``.

    ``sizes`` (int64 ``(N, 2k)``: per sample the valid input, then output lengths) pools each
    sample of a padded batch with its own windows; outputs past a sample's own are 0.
    """
    return _kernels.avg_forward(x, list(output_size), _cpu(sizes))


def avg_backward(grad_out: torch.Tensor, input_size, sizes: torch.Tensor | None = None) -> torch.Tensor:
    """Gradient of :func:`avg_forward`: ``gin[i] = Σ_{j covers i} g[j] / |window j|`` (a gather, deterministic)."""
    return _kernels.avg_backward(grad_out, [int(s) for s in input_size], _cpu(sizes))


def max_forward(x: torch.Tensor, output_size, sizes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Max over each window and its int64 flat index in the spatial plane (first max; last NaN)."""
    return _kernels.max_forward(x, list(output_size), _cpu(sizes))


def max_backward(grad_out: torch.Tensor, indices: torch.Tensor, input_size,
                 sizes: torch.Tensor | None = None) -> torch.Tensor:
    """Gradient of :func:`max_forward`: each input sums the ``g`` of the covering outputs whose argmax it is."""
    return _kernels.max_backward(grad_out, indices, [int(s) for s in input_size], _cpu(sizes))


def _cpu(sizes: torch.Tensor | None) -> torch.Tensor | None:
    return None if sizes is None else sizes.to(device="cpu", dtype=torch.int64)


def lp_forward(x: torch.Tensor, output_size, norm_type: float) -> torch.Tensor:
    """``(Σ_window x^p)^(1/p)``, scaled by each window's largest ``|x|`` (see ``csrc/reductions.cpp``)."""
    return _kernels.lp_forward(x, list(output_size), float(norm_type))


def lp_backward(grad_out: torch.Tensor, x: torch.Tensor, norm_type: float) -> torch.Tensor:
    """Gradient of :func:`lp_forward` with respect to ``x`` (a gather, deterministic)."""
    return _kernels.lp_backward(grad_out, x, float(norm_type))


def gem_forward(x: torch.Tensor, output_size, p: float, eps: float) -> torch.Tensor:
    """``(mean_window max(x, eps)^p)^(1/p)``, scaled by each window's maximum."""
    return _kernels.gem_forward(x, list(output_size), float(p), float(eps))


def gem_backward(grad_out: torch.Tensor, x: torch.Tensor, p: float, eps: float, p_grad: bool):
    """``(grad x, grad p)``: grad p a float64 0-d tensor (``None`` unless ``p_grad``), summed in a fixed order."""
    gin, per_output = _kernels.gem_backward(grad_out, x, float(p), float(eps), bool(p_grad))
    return gin, (per_output.sum() if p_grad else None)


def avgmax_forward(x: torch.Tensor, output_size, combine: bool):
    """``(avg, max, argmax)`` of each window from one pass; with ``combine`` the first is ``0.5·(avg + max)``."""
    return _kernels.avgmax_forward(x, list(output_size), bool(combine))


def avgmax_backward(grad_avg: torch.Tensor, grad_max: torch.Tensor, indices: torch.Tensor, input_size):
    """Avg backward of ``grad_avg`` plus max backward of ``grad_max`` at ``indices``, in one gather."""
    return _kernels.avgmax_backward(grad_avg, grad_max, indices, [int(s) for s in input_size])
