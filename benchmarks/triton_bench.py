"""Time anypool's Triton kernels against PyTorch's native CUDA adaptive pooling (GPU only).

    PYTHONPATH=src python3 benchmarks/triton_bench.py [--json FILE] [--compile] [--sweep] [--quick]

For every case of the shared suite (``anypool.bench.SUITE``) and the same cases with
a batch large enough to fill the GPU (input >= 512 MB): avg and max, forward and
forward+backward, float32 and bfloat16.  Reports milliseconds (median of CUDA-event
timings via ``triton.testing.do_bench``, which also flushes L2 between runs), the
speed-up over native (and ``torch.compile`` with ``--compile``, forward only), and the
fraction of the device's measured copy bandwidth achieved, counting the fewest bytes
the op must move (inputs read once, outputs written once).  ``--sweep`` times the
kernels' tile size and warp count on the large cases (to choose the defaults).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from anypool.backends.torch import triton as tk
from anypool.bench import SUITE, BenchCase

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy of 1 GiB, counting bytes read plus written."""
    src = torch.randn(2**28, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * src.numel() * 4 / (ms * 1e6)


def cases(quick: bool) -> list[BenchCase]:
    suite = [dataclasses.replace(c, dtype=d) for c in SUITE for d in ("float32", "bfloat16")
             if c.dtype == "float32" or d == "bfloat16"]
    suite = list(dict.fromkeys(suite))
    large = []
    for c in SUITE:
        if c.dtype != "float32":
            continue
        scale = math.ceil(512 * 2**20 / c.nbytes)  # batch large enough for >= 512 MB of float32 input
        for d in ("float32", "bfloat16"):
            large.append(dataclasses.replace(c, name=c.name + "-large", shape=(c.shape[0] * scale, *c.shape[1:]),
                                             dtype=d))
    return (suite[:4] + large[:4]) if quick else suite + large


def make_input(c: BenchCase) -> torch.Tensor:
    x = torch.randn(c.shape, device="cuda", dtype=DTYPES[c.dtype])
    return x.movedim(1, -1).contiguous().movedim(-1, 1) if c.channels_last else x


def contenders(c: BenchCase, op: str, use_compile: bool):
    """``({name: (forward fn, forward+backward fn or None)}, bytes moved forward, bytes moved backward)``."""
    x = make_input(c)
    out = c.output_size
    native = getattr(F, f"adaptive_{op}_pool{c.rank}d")
    size = out if c.rank > 1 else out[0]
    y = tk.avg_forward(x, out)
    g = torch.randn_like(y)
    index_bytes = 0 if op == "avg" else y.numel() * 8  # max writes int64 indices, its backward reads them

    if op == "avg":
        def ours_f():
            return tk.avg_forward(x, out)

        def ours_fb():
            tk.avg_forward(x, out)
            return tk.avg_backward(g, x.shape[2:])
    else:
        def ours_f():
            return tk.max_forward(x, out)

        def ours_fb():
            _, indices = tk.max_forward(x, out)
            return tk.max_backward(g, indices, x.shape[2:])

    xr = x.detach().clone().requires_grad_()

    def native_fb():
        return torch.autograd.grad(native(xr, size), xr, g)

    result = {"anypool": (ours_f, ours_fb), "native": (lambda: native(x, size), native_fb)}
    if use_compile:
        compiled = torch.compile(lambda t: native(t, size), dynamic=False)
        result["compile"] = (lambda: compiled(x), None)
    x_bytes, y_bytes = x.numel() * x.element_size(), y.numel() * y.element_size()
    return result, x_bytes + y_bytes + index_bytes, y_bytes + index_bytes + x_bytes


def time_ms(fn) -> float:
    return do_bench(fn, warmup=10, rep=60, return_mode="median")


def run(args) -> list[dict]:
    bandwidth = copy_bandwidth_gbs()
    print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  "
          f"copy bandwidth {bandwidth:.0f} GB/s", flush=True)
    rows = []
    for c in cases(args.quick):
        for op in ("avg", "max"):
            try:
                fns, moved_f, moved_b = contenders(c, op, args.compile)
            except torch.OutOfMemoryError:
                print(f"skip {c.label()} {op}: out of memory", flush=True)
                continue
            for mode, k, moved in (("fwd", 0, moved_f), ("fwd+bwd", 1, moved_f + moved_b)):
                times = {name: time_ms(f[k]) for name, f in fns.items() if f[k] is not None}
                row = {"case": c.label() + (" large" if c.name.endswith("large") else ""), "op": op, "mode": mode,
                       "bytes": moved, "ms": times, "fraction_of_copy_bw": moved / (times["anypool"] * 1e6) / bandwidth,
                       "speedup": {b: t / times["anypool"] for b, t in times.items() if b != "anypool"}}
                rows.append(row)
                speed = "  ".join(f"x{s:5.2f} {b}" for b, s in row["speedup"].items())
                print(f"{row['case']:<52} {op:<3} {mode:<7} {times['anypool']:8.3f} ms  {speed}  "
                      f"{100 * row['fraction_of_copy_bw']:4.0f}% bw", flush=True)
            del fns
            torch.cuda.empty_cache()
    for mode in ("fwd", "fwd+bwd"):
        sel = [r["speedup"]["native"] for r in rows if r["mode"] == mode]
        if sel:
            geo = math.exp(sum(map(math.log, sel)) / len(sel))
            print(f"{mode}: vs native geomean x{geo:.2f}, min x{min(sel):.2f} over {len(sel)} cases")
    big = [r["fraction_of_copy_bw"] for r in rows if r["mode"] == "fwd" and r["bytes"] >= 256 * 2**20]
    if big:
        print(f"fwd on cases moving >= 256 MB: {100 * min(big):.0f}%..{100 * max(big):.0f}% of copy bandwidth")
    return [{"bandwidth_gbs": bandwidth, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
             "triton": triton.__version__}] + rows


def sweep(args) -> list[dict]:
    """Time each (tile, warps) on the large cases; print the best and the default's distance to it."""
    rows = []
    default = (tk._TILE, tk._NUM_WARPS)
    picked = {((64, 224, 224), (7, 7)), ((2048, 7, 7), (1, 1)), ((64, 5, 5), (7, 7)), ((256, 1000), (333,)),
              ((64, 16, 56, 56), (4, 7, 7))}
    large = [c for c in cases(args.quick) if c.name.endswith("large") and c.dtype == "float32"]
    for c in [c for c in large if (c.shape[1:], c.output_size) in picked]:
        for op in ("avg", "max"):
            results = {}
            for tile in (1024, 2048, 4096, 8192):
                for warps in (4, 8):
                    tk._TILE, tk._NUM_WARPS = tile, warps
                    fns, _, _ = contenders(c, op, False)
                    results[(tile, warps)] = (time_ms(fns["anypool"][0]), time_ms(fns["anypool"][1]))
                    del fns
            tk._TILE, tk._NUM_WARPS = default
            best_f = min(results, key=lambda k: results[k][0])
            best_b = min(results, key=lambda k: results[k][1])
            row = {"case": c.label(), "op": op, "default": list(default),
                   "best_fwd": list(best_f), "default_over_best_fwd": results[default][0] / results[best_f][0],
                   "best_fwd_bwd": list(best_b), "default_over_best_fwd_bwd": results[default][1] / results[best_b][1],
                   "all": {f"{t}x{w}": v for (t, w), v in results.items()}}
            rows.append(row)
            print(f"{c.label():<48} {op}  best fwd {best_f} ({row['default_over_best_fwd']:.2f}x default)  "
                  f"best fwd+bwd {best_b} ({row['default_over_best_fwd_bwd']:.2f}x default)", flush=True)
            torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the native op (forward)")
    parser.add_argument("--sweep", action="store_true", help="sweep tile size and warps instead")
    parser.add_argument("--quick", action="store_true", help="a few cases only")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 1
    rows = sweep(args) if args.sweep else run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
