"""ONNX Runtime timing of anypool's exported graph: dynamic shapes vs static shapes vs torch eager.

For each 2-D case of the suite (float32, channels_first — an ONNX graph has no memory
layout) and each op, three contenders on the same input:

- ``anypool``: the graph ``anypool.onnx`` exports with dynamic N/C/H/W (windows computed
  in the graph at run time), in ONNX Runtime (CPU);
- ``ort-static``: the same export with the input shape fixed (constant windows, a plain
  ``AveragePool`` when the sizes divide), in ONNX Runtime;
- ``torch``: ``torch.nn.functional.adaptive_{avg,max}_pool2d`` in eager mode.

The graphs are built by :func:`anypool.onnx.standalone_model`, the builder the exporters'
translations call, so no torch export runs here.  ``max`` times values only, as
``AdaptiveMaxPool2d`` without ``return_indices`` exports.
"""

from __future__ import annotations

import numpy as np

from . import BenchCase, Row, median_ms


def _cases(cases: list[BenchCase]) -> list[BenchCase]:
    return [c for c in cases if c.rank == 2 and c.dtype == "float32" and not c.channels_last]


def run(cases, device: str = "cpu", repeats: int = 20, progress=None) -> list[Row]:
    import torch
    import torch.nn.functional as F

    from .. import onnx as aox

    if device != "cpu":  # ONNX Runtime's CPU provider only; nothing to compare on another device
        return []
    rows = []
    rng = np.random.default_rng(0)
    for case in _cases(cases):
        x = rng.standard_normal(case.shape, dtype=np.float32)
        xt = torch.from_numpy(x)
        for op in ("avg", "max"):
            dynamic = aox._session(aox.standalone_model(op, case.output_size))
            static = aox._session(aox.standalone_model(op, case.output_size, input_size=case.shape[2:]))
            native = F.adaptive_avg_pool2d if op == "avg" else F.adaptive_max_pool2d
            feed = {"x": x}
            with torch.inference_mode():
                t_dynamic = median_ms(lambda s=dynamic: s.run(None, feed), repeats)  # noqa: B023
                t_static = median_ms(lambda s=static: s.run(None, feed), repeats)  # noqa: B023
                t_torch = median_ms(lambda f=native: f(xt, case.output_size), repeats)  # noqa: B023
            out_bytes = case.nbytes * int(np.prod(case.output_size)) // int(np.prod(case.shape[2:]))
            rows.append(Row("onnx", case.label(), op, "fwd", t_dynamic, {"ort-static": t_static, "torch": t_torch},
                            bytes_moved=case.nbytes + out_bytes))
            if progress:
                progress(f"onnx {op} {case.label()}")
    return rows
