"""Timing helpers shared by the torch CPU benchmark scripts (run them as ``python benchmarks/<script>.py``).

Each timed call comes right after an untimed native op on a tensor of the input's size (a relu into
a scratch tensor), as a pool runs in a model; contenders are timed in interleaved rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from anypool import bench


def machine() -> str:
    """The CPU model, torch's thread count and the torch version, for the head of a report."""
    return f"{bench.machine()['cpu']}; torch {torch.__version__}, {torch.get_num_threads()} threads"


def options(doc: str):
    """The scripts' command line: ``(args, rounds, reps)``; ``--quick`` only checks that a script runs."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repeats: checks the script runs")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    return (args, *((1, 2) if args.quick else (3, 15)))


def native_op_like(x: torch.Tensor):
    """An untimed native op on a tensor of ``x``'s size: what runs before the pool in a model."""
    scratch = torch.empty_like(x)
    return lambda: torch.clamp_min(x, 0, out=scratch)


def after_native_op(fn, native_op, reps=15):
    """Median ms of ``fn()``, each call timed right after an untimed ``native_op()``."""
    times = []
    for _ in range(reps):
        native_op()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def interleaved(contenders: dict, native_op, rounds=3, reps=15) -> dict:
    """``{name: median ms}`` of each contender, timed in ``rounds`` interleaved rounds after ``native_op``."""
    for fn in contenders.values():
        fn()  # warm up (allocator, first-call costs)
    runs = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            runs[name].append(after_native_op(fn, native_op, reps))
    return {name: statistics.median(t) for name, t in runs.items()}


def fwd_bwd(fn, x: torch.Tensor, *params):
    """``fn`` as forward+backward: the gradient of ``fn(x).sum()``-like output with respect to ``x`` (and params)."""
    xg = x.detach().requires_grad_()
    inputs = (xg, *params)
    g = torch.ones_like(fn(xg))
    return lambda: torch.autograd.grad(fn(xg), inputs, g)
