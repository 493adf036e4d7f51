"""anypool vs native torch on the CPU, each pool timed right after a native op (a relu into a tensor of the
input's size, untimed), as in a model: medians of 15 calls, three interleaved rounds, 2 threads.

    python benchmarks/torch_cpu_in_model.py {avg|max} {fwd|bwd} [shape filter]
"""

import statistics
import sys

import torch
import torch.nn.functional as F
from _timing import after_native_op, machine, native_op_like

import anypool

CASES = [((32, 512, 14, 14), (7, 7)), ((8, 64, 224, 224), (7, 7)), ((64, 2048, 7, 7), (1, 1)),
         ((8, 256, 64, 64), (6, 6)), ((8, 64, 100, 100), (33, 33)), ((32, 64, 5, 5), (7, 7)),
         ((16, 256, 37, 53), (5, 9)), ((1, 2048, 7, 7), (1, 1)), ((1, 512, 14, 14), (7, 7)),
         ((1, 64, 224, 224), (7, 7)), ((64, 256, 1000), (10,)), ((64, 256, 1000), (333,)),
         ((4, 64, 16, 56, 56), (4, 7, 7)), ((2, 32, 9, 33, 33), (4, 5, 6))]


def steps(x, out, op, mode):
    native = getattr(F, f"adaptive_{op}_pool{len(out)}d")
    ours = anypool.adaptive_avg_pool if op == "avg" else anypool.adaptive_max_pool
    if mode == "fwd":
        return (lambda: ours(x, out)), (lambda: native(x, out))
    xg = x.detach().requires_grad_()
    g = torch.ones_like(native(x, out))
    return (lambda: torch.autograd.grad(ours(xg, out), xg, g)), (lambda: torch.autograd.grad(native(xg, out), xg, g))


def main(op="avg", mode="fwd", only=None):
    torch.set_num_threads(2)
    print(machine())
    for channels_last in (False, True):
        for shape, out in CASES:
            if (only and only not in str(shape)) or (channels_last and len(shape) == 3):
                continue
            x = torch.randn(shape)
            if channels_last:
                x = x.movedim(1, -1).contiguous().movedim(-1, 1)
            relu = native_op_like(x)
            ours, native = steps(x, out, op, mode)
            ours(), native()
            rounds = [(after_native_op(ours, relu), after_native_op(native, relu)) for _ in range(3)]
            a, n = statistics.median(r[0] for r in rounds), statistics.median(r[1] for r in rounds)
            layout = "cl" if channels_last else "  "
            print(f"{shape!s:22} {out!s:10} {layout}  anypool {a:8.3f}  native {n:8.3f}  x{n / a:5.2f}", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
