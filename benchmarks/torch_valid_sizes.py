"""Padded batches on the CPU: anypool with ``valid_sizes`` against anypool on the same padded tensor without it
(target: at most 1.3x its time) and against a per-sample loop of native torch calls on the crops (target: at
least 5x faster).  Each call is timed right after an untimed native op on a tensor of the input's size.

    python benchmarks/torch_valid_sizes.py [--quick] [--json FILE]

The batch is (32, 256, 64, 64) pooled to 7x7, valid sizes drawn from 16..64 per axis (seed 0); avg and max,
forward and forward+backward, NCHW and channels_last.
"""

import json

import numpy as np
import torch
import torch.nn.functional as F
from _timing import fwd_bwd, interleaved, machine, native_op_like, options

import anypool

SHAPE, OUT = (32, 256, 64, 64), (7, 7)


def contenders(x, sizes, op, mode):
    ours = anypool.adaptive_avg_pool2d if op == "avg" else anypool.adaptive_max_pool2d
    native = F.adaptive_avg_pool2d if op == "avg" else F.adaptive_max_pool2d
    rows = [(int(h), int(w)) for h, w in sizes]

    def loop(t):  # one native call per sample, on its crop
        return torch.cat([native(t[i:i + 1, :, :h, :w], OUT) for i, (h, w) in enumerate(rows)])

    fns = {"valid_sizes": lambda t: ours(t, OUT, valid_sizes=sizes), "padded": lambda t: ours(t, OUT),
           "native loop": loop}
    if mode == "fwd":
        return {name: (lambda f=f: f(x)) for name, f in fns.items()}
    return {name: fwd_bwd(f, x) for name, f in fns.items()}


def main():
    args, rounds, reps = options(__doc__)
    print(machine())
    rng = np.random.default_rng(0)
    sizes = torch.from_numpy(rng.integers(16, SHAPE[2] + 1, (SHAPE[0], 2)))
    results = []
    print(f"{SHAPE} -> {OUT}, valid sizes 16..64; ms (ratio: padded / valid_sizes, native loop / valid_sizes)")
    for layout in ("NCHW", "channels_last"):
        x = torch.randn(SHAPE)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        for op in ("avg", "max"):
            for mode in ("fwd", "fwd+bwd"):
                t = interleaved(contenders(x, sizes, op, mode), native_op_like(x), rounds, reps)
                v = t["valid_sizes"]
                row = {"layout": layout, "op": op, "mode": mode, **{k: round(ms, 4) for k, ms in t.items()},
                       "padded_over_valid": t["padded"] / v, "loop_over_valid": t["native loop"] / v}
                results.append(row)
                print(f"{layout:14} {op} {mode:8} valid_sizes {v:8.3f}  padded {t['padded']:8.3f}  "
                      f"loop {t['native loop']:8.3f}   valid/padded {v / t['padded']:5.2f}x (target <= 1.3)  "
                      f"speed-up vs loop {t['native loop'] / v:5.2f}x (target >= 5)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "shape": SHAPE, "output_size": OUT, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
