"""Compile every Triton kernel variant for an H100 (sm_90) on a machine without a GPU.

Run without ``TRITON_INTERPRET`` (test_triton_kernels.py starts it in a subprocess).
The host code runs as usual on CPU tensors, but each launch is replaced by
``kernel.warmup``: Triton specialises the real arguments exactly as for a launch and
compiles them down to a cubin with the bundled ptxas, then nothing is run.  With
``--ptxas`` it also prints each variant's registers and spills (``ptxas -v``).
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase
from triton.runtime.driver import driver


class CompileOnlyDriver(DriverBase):
    """Just enough of a driver for ``JITFunction.warmup`` to compile for a fixed target."""

    target = GPUTarget("cuda", 90, 32)

    @classmethod
    def is_active(cls):
        return False

    def map_python_to_cpp_type(self, ty):
        raise NotImplementedError

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_benchmarker(self):
        raise NotImplementedError

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


def main(show_ptxas: bool) -> None:
    driver.set_active(CompileOnlyDriver())
    from anypool.backends.torch import triton as tk

    assert not tk._INTERPRETED, "run without TRITON_INTERPRET"
    compiled = {}

    def launch(kernel, grid, *args, **meta):
        k = kernel.warmup(*args, grid=grid, **meta)
        key = (kernel.fn.__name__, tuple(sorted(meta.items())), tuple(a.dtype for a in args[:3]))
        compiled[key] = k

    tk._launch = launch
    start = time.perf_counter()
    # every kernel x {float32 in both layouts, float16 NCHW, bfloat16 channels_last, int64 offsets}
    variants = [(torch.float32, "nchw", False), (torch.float32, "cl", False), (torch.float16, "nchw", False),
                (torch.bfloat16, "cl", False), (torch.float32, "nchw", True)]
    shape, out = (2, 16, 10, 12), (4, 5)
    for dtype, layout, int64 in variants:
        tk._FORCE_INT64 = int64
        x = torch.randn(shape).to(dtype)
        if layout == "cl":
            x = x.movedim(1, -1).contiguous().movedim(-1, 1)
        avg = tk.avg_forward(x, out)
        values, indices = tk.max_forward(x, out)
        tk.avg_backward(avg, shape[2:])
        tk.max_backward(values, indices, shape[2:])
        if (dtype, layout) not in ((torch.float32, "cl"), (torch.bfloat16, "cl")) and not int64:
            continue  # the variants below: in fewer combinations (each compile takes ~1 s)
        # padded batches: per-sample sizes (valid input lengths, then output lengths)
        sizes = torch.tensor([[10, 12, 4, 5], [3, 7, 4, 5]])
        avg = tk.avg_forward(x, out, sizes=sizes)
        values, indices = tk.max_forward(x, out, sizes=sizes)
        tk.avg_backward(avg, shape[2:], sizes=sizes)
        tk.max_backward(values, indices, shape[2:], sizes=sizes)
        if int64:
            continue
        # the reductions: LP (a product power and libdevice's pow), GeM with and without dL/dp, avgmax
        for p in (2.0, 2.5):
            lp = tk.lp_forward(x, out, p)
            tk.lp_backward(lp, x, p)
            gem = tk.gem_forward(x, out, p, 1e-6)
            tk.gem_backward(gem, x, p, 1e-6, True)
        tk.gem_backward(gem, x, 3.0, 1e-6, False)
        for combine in (True, False):
            first, values, indices = tk.avgmax_forward(x, out, combine)
        tk.avgmax_backward(first, values, indices, shape[2:])
    print(f"compiled {len(compiled)} variants for sm_90 in {time.perf_counter() - start:.1f} s")
    if show_ptxas:
        cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        for (name, meta, dtypes), k in sorted(compiled.items(), key=str):
            with tempfile.NamedTemporaryFile("wb", suffix=".cubin") as f:
                f.write(k.asm["cubin"])
                f.flush()
                usage = subprocess.run([str(cuobjdump), "-res-usage", f.name], capture_output=True, text=True).stdout
            regs = re.search(r"REG:(\d+)", usage)
            spills = re.search(r"STACK:(\d+)", usage)
            shown = {m: v for m, v in meta if m.startswith(("BLOCK", "SUM", "MAX", "POWER", "HAS_", "CL", "INT"))}
            print(name, [str(d) for d in dtypes], shown, "registers", regs and regs[1], "stack", spills and spills[1])


if __name__ == "__main__":
    main("--ptxas" in sys.argv)
