"""ONNX export of adaptive pooling that is exact for every input size, static or dynamic.

:func:`export` exports a torch model whose adaptive pools (torch.nn's, converted, or
anypool's) become graphs of *standard* ONNX ops that compute the windows from the
run-time input shape (:mod:`anypool.backends.onnx` describes the graphs), so one file
is exact for every height/width it is fed.  :func:`verify` runs a file in ONNX Runtime
against a reference; :func:`standalone_model` builds the same graph without torch.

Importing this module also registers the translations with both of PyTorch's exporters
(:mod:`anypool.backends.torch.export`), so a plain ``torch.onnx.export(model, ...,
dynamo=True)`` or ``dynamo=False`` of a model with anypool layers gives the same exact
graph.  Default opset: :data:`DEFAULT_OPSET`.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Sequence

import numpy as np

from .backends.onnx import DEFAULT_OPSET, standalone_model

try:  # registers the translations with both of torch's exporters
    from .backends.torch import export as _torch_export
except ImportError:  # no torch: the standalone graphs and the harness column still work
    _torch_export = None

__all__ = ["DEFAULT_OPSET", "export", "verify", "translation_table", "standalone_model", "harness_columns"]


def translation_table() -> dict[Callable, Callable]:
    """``custom_translation_table`` for ``torch.onnx.export(..., dynamo=True)``."""
    import torch  # noqa: F401  (ImportError without torch)

    return _torch_export.translation_table()


def export(model, args, f, *, dynamic_shapes=None, opset_version: int | None = None, **kwargs):
    """Export ``model`` to ONNX with adaptive pooling that is exact for every input size.

    Plain ``torch.nn.AdaptiveAvgPool*``/``AdaptiveMaxPool*`` are first replaced by anypool's
    layers (``anypool.layers.torch.convert`` on a deep copy; ``model`` is not changed).
    ``dynamic_shapes`` is as in ``torch.export`` (e.g. ``({0: "N", 2: "H", 3: "W"},)``);
    ``opset_version`` defaults to :data:`DEFAULT_OPSET`; other ``kwargs`` go to
    ``torch.onnx.export(..., dynamo=True)``.  The file is checked with
    ``onnx.checker.check_model(full_check=True)`` (which runs shape inference).
    Returns the ``torch.onnx.ONNXProgram``.
    """
    import onnx
    import torch

    model = _converted(copy.deepcopy(model)) if isinstance(model, torch.nn.Module) else model
    if isinstance(model, torch.nn.Module):
        model.eval()
    kwargs.setdefault("verbose", False)
    args = tuple(args) if isinstance(args, (list, tuple)) else (args,)
    _torch_export._exporting = True
    try:
        # Captured here, non-strict only: torch.onnx.export would fall back to strict (Dynamo)
        # capture, which bakes an output_size computed from a dynamic dimension into the graph
        # silently; non-strict capture reports it (anypool._args: output_size must be ints).
        if isinstance(model, torch.nn.Module):
            # backed_size_oblivious: as torch.onnx.export, so an example batch of 1 stays dynamic
            with torch.fx.experimental._config.patch(backed_size_oblivious=True):
                model = torch.export.export(model, args, kwargs=kwargs.pop("kwargs", None),
                                            dynamic_shapes=_export_dims(dynamic_shapes), strict=False)
            args = ()
        program = torch.onnx.export(model, args, f, dynamo=True, dynamic_shapes=dynamic_shapes,
                                    opset_version=opset_version or DEFAULT_OPSET,
                                    custom_translation_table=translation_table(), **kwargs)
    finally:
        _torch_export._exporting = False
    proto = program.model_proto
    onnx.checker.check_model(proto if f is None or hasattr(f, "write") else str(f), full_check=True)
    onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    return program


def _export_dims(spec):
    """``dynamic_shapes`` for ``torch.export``: axis names (``{2: "H"}``) become ``Dim.DYNAMIC``.

    ``torch.onnx.export`` is given the original names, which it uses to name the ONNX axes.
    """
    import torch

    if isinstance(spec, str):
        return torch.export.Dim.DYNAMIC
    if isinstance(spec, dict):
        return {k: _export_dims(v) for k, v in spec.items()}
    if isinstance(spec, (list, tuple)):
        return type(spec)(_export_dims(v) for v in spec)
    return spec


def _converted(model):
    """``model`` with torch.nn's adaptive pools replaced by anypool's layers."""
    import torch

    try:
        from anypool.layers.torch import convert
    except ImportError:
        native = (torch.nn.AdaptiveAvgPool1d, torch.nn.AdaptiveAvgPool2d, torch.nn.AdaptiveAvgPool3d,
                  torch.nn.AdaptiveMaxPool1d, torch.nn.AdaptiveMaxPool2d, torch.nn.AdaptiveMaxPool3d)
        if any(isinstance(m, native) for m in model.modules()):
            raise
        return model
    return convert(model)


# --------------------------------------------------------------------------- verification
def _session(model):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    source = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def verify(f, reference_fn: Callable, shapes: Sequence[Sequence[int]], *, dtype=np.float32, atol: float = 1e-5,
           seed: int = 0, make_input: Callable | None = None) -> int:
    """Run the ONNX model ``f`` (path or ``ModelProto``) in ONNX Runtime on a random input of
    every shape in ``shapes`` and compare each output with ``reference_fn(x)`` (NumPy in,
    an array or a tuple of arrays out).

    Inputs are ``make_input(shape, rng)`` (default: normal values × 4 in ``dtype``).
    Floating outputs must agree within ``atol`` with the same NaN/inf positions; integer
    outputs (indices) exactly.  Raises ``AssertionError`` naming the first mismatching
    shape; returns the number of shapes checked.
    """
    session = _session(f)
    name = session.get_inputs()[0].name
    rng = np.random.default_rng(seed)
    for shape in shapes:
        x = make_input(tuple(shape), rng) if make_input else (rng.standard_normal(tuple(shape)) * 4).astype(dtype)
        got = session.run(None, {name: x})
        want = reference_fn(x)
        want = list(want) if isinstance(want, (tuple, list)) else [want]
        if len(got) != len(want):
            raise AssertionError(f"anypool.onnx.verify: the model has {len(got)} outputs, the reference {len(want)}")
        for k, (g, w) in enumerate(zip(got, want)):
            w = np.asarray(w)
            problem = None
            if g.shape != w.shape:
                problem = f"shape {g.shape} != {w.shape}"
            elif np.issubdtype(w.dtype, np.integer):
                if not np.array_equal(g, w):
                    problem = "integer outputs differ"
            elif not np.array_equal(np.isnan(g), np.isnan(w)):
                problem = "NaN positions differ"
            else:
                ok = np.isfinite(w)
                err = np.abs(g[ok].astype(np.float64) - w[ok]).max(initial=0.0)
                if not np.array_equal(g[np.isinf(w)], w[np.isinf(w)]) or not np.isfinite(g[ok]).all():
                    problem = "inf positions differ"
                elif not err <= atol:
                    problem = f"max abs error {err:.3g} > {atol}"
            if problem:
                raise AssertionError(f"anypool.onnx.verify: input shape {tuple(shape)}, output {k}: {problem}")
    return len(shapes)


# --------------------------------------------------------------------------- harness column
@functools.lru_cache(maxsize=256)
def _harness_session(op: str, output_size: tuple[int | None, ...], dtype: str, valid_sizes: bool,
                     p: float = 3.0, eps: float = 1e-6):
    """An ONNX Runtime session of the dynamic-shape graph for ``(N, C, *S)`` inputs of any size."""
    return _session(standalone_model(op, output_size, dtype, valid_sizes=valid_sizes, p=p, eps=eps))


def harness_columns():
    """The ``onnxruntime`` column of ``anypool check``: the exported dynamic-shape graph, run in ONNX Runtime."""
    import onnxruntime  # noqa: F401  (ImportError: no column)

    from ._harness import GEM_EPS, OPS, REDUCTIONS, Column

    def run(case, x, op):
        spec = case.spec
        if spec.channels_last:  # the graph takes (N, C, *S)
            x = np.moveaxis(x, -1, 1 if spec.batched else 0)
        if not spec.batched:
            x = x[None]
        graph_op = op if op in ("avg", *REDUCTIONS) else "argmax"
        feeds = {"x": np.ascontiguousarray(x)}
        if case.valid is None:
            session = _harness_session(graph_op, spec.output_size, case.dtype, False, case.exponent, GEM_EPS)
        else:  # None entries stay None: each sample's own length
            session = _harness_session(graph_op, case.output_size, case.dtype, True, case.exponent, GEM_EPS)
            feeds["valid_sizes"] = case.valid_sizes
        outs = session.run(None, feeds)
        outs = [o[0] if not spec.batched else o for o in outs][:2 if op == "argmax" else 1]
        if spec.channels_last:
            outs = [np.moveaxis(o, 1 if spec.batched else 0, -1) for o in outs]
        return tuple(outs) if op == "argmax" else outs[0]

    def supports(case, op):
        return case.dtype in ("float32", "float64", "float16") and all(o for o in case.spec.output_size)

    return [Column("onnxruntime", run, supports, ops=OPS + REDUCTIONS)]

