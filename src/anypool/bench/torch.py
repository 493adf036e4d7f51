"""PyTorch contenders: anypool's public functions, eager native ``F.adaptive_*_pool{1,2,3}d`` and
``torch.compile`` of the native op — forward, and forward+backward — beside the machine's read bandwidth.

Each contender is timed twice per round: *alone* (back to back) and *in-model*, right after a native op on a
tensor of the input's size (``torch.relu``, untimed), as a pool runs in a network: torch's OpenMP workers are
then still spinning from that op, which an isolated loop never shows.  Targets are judged on the in-model rows.
On the CPU the thread count is set to 2 unless ``torch.set_num_threads``/``OMP_NUM_THREADS`` chose one.
"""

from __future__ import annotations

import math
import os
import statistics

from . import BenchCase, Row, median_ms

TIMINGS = ("alone", "in-model")


def _input(torch, case: BenchCase, device: str):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(case.shape, generator=g).to(device=device, dtype=getattr(torch, case.dtype))
    if case.channels_last:  # a channels_last-strided logical NCHW tensor
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
    return x


def _contenders(torch, case: BenchCase, op: str):
    """``{name: f(x) -> tensor}`` for anypool, native and compiled native."""
    import torch.nn.functional as F

    import anypool

    size = tuple(case.output_size)
    native = getattr(F, f"adaptive_{op}_pool{case.rank}d")
    ours = anypool.adaptive_avg_pool if op == "avg" else anypool.adaptive_max_pool
    compiled = torch.compile(native)
    return {
        "anypool": lambda x: ours(x, size),
        "native": lambda x: native(x, size),
        "compile": lambda x: compiled(x, size),
    }


def _step(fn, x, mode: str, torch):
    """``fn(x)`` (``fwd``, no autograd) or ``fn(x)`` plus the gradient w.r.t. ``x`` (``fwd+bwd``), as a thunk."""
    if mode == "fwd":
        def step():
            with torch.no_grad():
                fn(x)
        return step
    xg = x.detach().requires_grad_()
    grad = torch.ones_like(fn(x.detach()))
    return lambda: torch.autograd.grad(fn(xg), xg, grad)


def _interleaved(steps: dict, repeats: int, sync, native_op) -> dict:
    """``{(name, timing): median ms}``: every thunk alone and right after ``native_op()`` (untimed), all in
    turn within every round so that a busy machine slows all alike."""
    times = {(name, timing): [] for name in steps for timing in TIMINGS}
    for _ in range(repeats):
        for name, step in steps.items():
            times[name, "alone"].append(median_ms(step, repeats=1, warmup=0, sync=sync))
            native_op()
            sync()
            times[name, "in-model"].append(median_ms(step, repeats=1, warmup=0, sync=sync))
    return {key: statistics.median(t) for key, t in times.items()}


def run(cases, device: str = "cpu", repeats: int = 20, progress=None) -> list[Row]:
    import torch

    if device == "cpu" and "OMP_NUM_THREADS" not in os.environ and torch.get_num_threads() > 2:
        torch.set_num_threads(2)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows = []
    for case in cases:
        x = _input(torch, case, device)
        in_bytes = x.numel() * x.element_size()
        out_bytes = math.prod(case.shape[:2]) * math.prod(case.output_size) * x.element_size()
        # The machine's read bandwidth, timed in turn with the contenders: a sum over a buffer of the input's size.
        buffer = torch.ones(max(1, in_bytes // 4), device=device)
        scratch = torch.empty_like(x)
        native_op = lambda: torch.clamp_min(x, 0, out=scratch)  # noqa: B023 (a relu; used within this iteration)
        for op in ("avg", "max"):
            contenders = _contenders(torch, case, op)
            for mode in ("fwd", "fwd+bwd"):
                if progress:
                    progress(f"torch {device} {case.label()} {op} {mode}")
                steps = {"bandwidth": buffer.sum}
                for name, fn in contenders.items():
                    try:
                        steps[name] = _step(fn, x, mode, torch)
                        median_ms(steps[name], repeats=1, warmup=1, sync=sync)  # warm-up (and compilation)
                    except Exception as e:  # a contender that cannot run this case is reported as missing
                        if progress:
                            progress(f"  {name} failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
                        steps.pop(name, None)
                if "anypool" not in steps:
                    continue
                times = _interleaved(steps, repeats, sync, native_op)
                moved = in_bytes + out_bytes if mode == "fwd" else 2 * (in_bytes + out_bytes)
                for timing in TIMINGS:
                    rows.append(Row("torch", case.label(), op, mode, times["anypool", timing],
                                    {b: times.get((b, timing)) for b in ("native", "compile")},
                                    bytes_moved=moved,
                                    bandwidth_gbs=buffer.numel() * 4 / (times["bandwidth", "alone"] * 1e6),
                                    timing=timing))
    return rows
