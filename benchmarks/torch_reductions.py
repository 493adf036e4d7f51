"""anypool's further reductions on the CPU against the composites of native torch ops that models use:
avgmax and catavgmax against timm's (``0.5 * (avg + max)``, ``torch.cat`` of both), GeM against
``adaptive_avg_pool2d(x.clamp(eps).pow(p), o).pow(1 / p)`` with a learnable tensor ``p``, LP against
``F.lp_pool2d`` where the windows are equal (the input size a multiple of the output size).  Forward and
forward+backward, each call timed right after an untimed native op on a tensor of the input's size.

    python benchmarks/torch_reductions.py [--quick] [--json FILE]

Ratios are composite time / anypool time (> 1: anypool faster).
"""

import json
import math

import torch
import torch.nn.functional as F
from _timing import fwd_bwd, interleaved, machine, native_op_like, options

import anypool

CASES = [((32, 2048, 7, 7), 1, False), ((8, 256, 64, 64), 7, False), ((32, 512, 14, 14), 1, False),
         ((32, 2048, 7, 7), 1, True), ((8, 256, 64, 64), 7, True)]
EPS = 1e-6


def pairs(x, out):
    """``{reduction: (anypool, composite or None, extra inputs with a gradient)}`` for ``x`` pooled to ``out``."""
    p = torch.tensor(3.0, requires_grad=True)
    h = x.shape[2]
    lp = None
    if h % out == 0 and x.shape[3] % out == 0:
        kernel = (h // out, x.shape[3] // out)
        lp = lambda t: F.lp_pool2d(t, 2.0, kernel)  # noqa: E731
    return {
        "avgmax": (lambda t: anypool.adaptive_avgmax_pool2d(t, out),
                   lambda t: 0.5 * (F.adaptive_avg_pool2d(t, out) + F.adaptive_max_pool2d(t, out)), ()),
        "catavgmax": (lambda t: anypool.adaptive_catavgmax_pool2d(t, out),
                      lambda t: torch.cat([F.adaptive_avg_pool2d(t, out), F.adaptive_max_pool2d(t, out)], 1), ()),
        "gem": (lambda t: anypool.adaptive_gem_pool2d(t, out, p, EPS),
                lambda t: F.adaptive_avg_pool2d(t.clamp(EPS).pow(p), out).pow(1.0 / p), (p,)),
        "lp": (lambda t: anypool.adaptive_lp_pool2d(t, 2.0, out), lp, ()),
    }


def main():
    args, rounds, reps = options(__doc__)
    print(machine())
    results = []
    for shape, out, channels_last in CASES:
        x = torch.randn(shape)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        for name, (ours, composite, params) in pairs(x, out).items():
            if composite is None:
                continue
            for mode in ("fwd", "fwd+bwd"):
                if mode == "fwd":
                    fns = {"anypool": lambda f=ours, t=x: f(t), "composite": lambda f=composite, t=x: f(t)}
                else:
                    fns = {"anypool": fwd_bwd(ours, x, *params), "composite": fwd_bwd(composite, x, *params)}
                with torch.no_grad() if mode == "fwd" else torch.enable_grad():
                    t = interleaved(fns, native_op_like(x), rounds, reps)
                ratio = t["composite"] / t["anypool"]
                layout = "cl" if channels_last else "  "
                results.append({"shape": shape, "output_size": out, "channels_last": channels_last, "reduction": name,
                                "mode": mode, "anypool_ms": t["anypool"], "composite_ms": t["composite"],
                                "ratio": ratio})
                print(f"{shape!s:20} -> {out} {layout} {name:9} {mode:8} anypool {t['anypool']:8.3f}  "
                      f"composite {t['composite']:8.3f}  x{ratio:5.2f}", flush=True)
    for mode in ("fwd", "fwd+bwd"):
        ratios = [r["ratio"] for r in results if r["mode"] == mode]
        print(f"{mode}: geomean x{math.exp(sum(map(math.log, ratios)) / len(ratios)):.2f}, min x{min(ratios):.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
