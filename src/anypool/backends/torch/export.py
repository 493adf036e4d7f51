"""The torch exporters' side of ONNX export: translations of the ``anypool::`` ops and the export-time check.

Importing this module registers the translations (graphs of :mod:`anypool.backends.onnx`)
with both of PyTorch's exporters, so a plain ``torch.onnx.export(model, ..., dynamo=True)``
or ``dynamo=False`` of a model with anypool layers gives the same exact graph.  The ops
import it only while ``torch.onnx.export`` traces them (:func:`on_export`), so nothing
here costs anything until an export runs.  The translations need opset >= 18 (dynamo
exporter) / >= 13 (TorchScript exporter).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ... import _args
from ..onnx import (
    _AVG,
    _MAX,
    _NAMES,
    _Emitter,
    _output_size,
    build_avg,
    build_avg_valid,
    build_avgmax,
    build_max,
    build_max_valid,
    build_power_mean,
)


class _ScriptEmitter(_Emitter):
    """The dynamo exporter: onnxscript ops recorded by the exporter's tracer."""

    def __init__(self):
        from onnxscript import opset18

        self._op = opset18

    def __call__(self, op_type, *inputs, **attributes):
        return getattr(self._op, op_type)(*inputs, **attributes)

    def const(self, value):
        import onnx_ir as ir

        return self._op.Constant(value=ir.tensor(np.asarray(value)))

    def branch(self):
        return _IrEmitter()

    def if_(self, cond, then, then_out, other, other_out, dtype, ndim):
        import onnx_ir as ir

        graphs = []
        for em, out, tag in ((then, then_out, "then"), (other, other_out, "else")):
            out.type = ir.TensorType(ir.DataType(dtype))
            graphs.append(ir.Graph((), [out], nodes=em.nodes, name=f"anypool_{tag}_{next(_NAMES)}"))
        return self._op.If(cond, then_branch=graphs[0], else_branch=graphs[1])


class _IrEmitter(_Emitter):
    """The nodes of an ``If`` branch for the dynamo exporter (``onnx_ir`` nodes, outer values usable)."""

    def __init__(self):
        self.nodes = []

    def __call__(self, op_type, *inputs, **attributes):
        import onnx_ir as ir
        from onnx_ir import convenience

        node = ir.Node("", op_type, list(inputs), attributes=convenience.convert_attributes(attributes),
                       num_outputs=1, version=18)
        node.outputs[0].name = f"anypool_v{next(_NAMES)}"
        self.nodes.append(node)
        return node.outputs[0]

    def const(self, value):
        import onnx_ir as ir

        return self("Constant", value=ir.tensor(np.asarray(value)))


class _TorchScriptEmitter(_Emitter):
    """The TorchScript exporter: ``g.op`` with typed attribute suffixes."""

    def __init__(self, g, opset: int):
        self.g = g
        self.opset = opset

    def __call__(self, op_type, *inputs, **attributes):
        typed = {}
        for name, v in attributes.items():
            first = v[0] if isinstance(v, (list, tuple)) and v else v
            suffix = "f" if isinstance(first, float) else "i"  # a list takes its element's suffix
            typed[f"{name}_{suffix}"] = v
        return self.g.op(op_type, *inputs, **typed)

    def const(self, value):
        import torch

        return self.g.op("Constant", value_t=torch.from_numpy(np.array(value)))


def _avg_translation(x, output_size):
    """dynamo exporter: ``anypool::adaptive_avg_pool`` as standard ONNX ops."""
    output_size = _output_size(output_size, "anypool::adaptive_avg_pool")
    static = [d if isinstance(d, int) else None for d in x.shape][len(x.shape) - len(output_size):]
    return build_avg(_ScriptEmitter(), x, output_size, len(x.shape), int(x.dtype), static)


def _max_translation(x, output_size):
    """dynamo exporter: ``anypool::adaptive_max_pool`` as standard ONNX ops (values, int64 indices)."""
    output_size = _output_size(output_size, "anypool::adaptive_max_pool")
    static = [d if isinstance(d, int) else None for d in x.shape][len(x.shape) - len(output_size):]
    return build_max(_ScriptEmitter(), x, output_size, len(x.shape), int(x.dtype), static)



def _avg_valid_translation(x, sizes, output_size):
    """dynamo exporter: ``anypool::adaptive_avg_pool_valid`` (a padded batch) as standard ONNX ops."""
    output_size = [o if isinstance(o, int) else None for o in output_size]
    static = [d if isinstance(d, int) else None for d in x.shape][len(x.shape) - len(output_size):]
    return build_avg_valid(_ScriptEmitter(), x, sizes, output_size, len(x.shape), int(x.dtype), static)


def _max_valid_translation(x, sizes, output_size):
    """dynamo exporter: ``anypool::adaptive_max_pool_valid`` as standard ONNX ops (values, int64 indices)."""
    output_size = [o if isinstance(o, int) else None for o in output_size]
    static = [d if isinstance(d, int) else None for d in x.shape][len(x.shape) - len(output_size):]
    return build_max_valid(_ScriptEmitter(), x, sizes, output_size, len(x.shape), int(x.dtype), static)


def _static_of(x, rank: int) -> list:
    return [d if isinstance(d, int) else None for d in x.shape][len(x.shape) - rank:]


def _lp_translation(x, output_size, norm_type):
    """dynamo exporter: ``anypool::adaptive_lp_pool``."""
    output_size = _output_size(output_size, "anypool::adaptive_lp_pool")
    return build_power_mean(_ScriptEmitter(), x, output_size, len(x.shape), int(x.dtype),
                            _static_of(x, len(output_size)), float(norm_type), False, None)


def _gem_translation(x, output_size, p, eps):
    """dynamo exporter: ``anypool::adaptive_gem_pool`` (``p`` a graph value: a learnt p keeps its value)."""
    output_size = _output_size(output_size, "anypool::adaptive_gem_pool")
    return build_power_mean(_ScriptEmitter(), x, output_size, len(x.shape), int(x.dtype),
                            _static_of(x, len(output_size)), p, True, float(eps))


def _avgmax_translation(x, output_size, combine):
    """dynamo exporter: ``anypool::adaptive_avgmax_pool`` -> (0.5·(avg + max) or avg, max, int64 argmax)."""
    output_size = _output_size(output_size, "anypool::adaptive_avgmax_pool")
    return build_avgmax(_ScriptEmitter(), x, output_size, len(x.shape), int(x.dtype),
                        _static_of(x, len(output_size)), combine)


def translation_table() -> dict[Callable, Callable]:
    """``custom_translation_table`` for ``torch.onnx.export(..., dynamo=True)``."""
    ops = torch.ops.anypool  # defined by .ops, which the package imported before this module
    return {ops.adaptive_avg_pool.default: _avg_translation, ops.adaptive_max_pool.default: _max_translation,
            ops.adaptive_avg_pool_valid.default: _avg_valid_translation,
            ops.adaptive_max_pool_valid.default: _max_valid_translation,
            ops.adaptive_lp_pool.default: _lp_translation, ops.adaptive_gem_pool.default: _gem_translation,
            ops.adaptive_avgmax_pool.default: _avgmax_translation}


def _torchscript_symbolic(kind: str):
    def symbolic(g, x, output_size):
        from torch.onnx import symbolic_helper

        opset = symbolic_helper.GLOBALS.export_onnx_opset_version
        try:
            size = symbolic_helper._parse_arg(output_size, "is")
        except Exception:
            size = output_size  # not a constant: reported below
        size = _output_size(size, f"anypool::{kind}")
        rank = len(size)
        ndim = symbolic_helper._get_tensor_rank(x) or rank + 2
        dtype = int(symbolic_helper._type_utils.JitScalarType.from_value(x).onnx_type())
        e = _TorchScriptEmitter(g, opset)
        # The TorchScript exporter may still show traced sizes for dims that dynamic_axes
        # made dynamic, so every length is read from the run-time shape here.
        if kind == _AVG:
            return build_avg(e, x, size, ndim, dtype, [None] * rank)
        return build_max(e, x, size, ndim, dtype, [None] * rank)

    return symbolic


_TORCHSCRIPT_OPSET = 13
_exporting = False  # inside export(): the translations are passed explicitly
registered_with_dynamo = False
"""Whether the translations are in the dynamo exporter's global table (a private torch API)."""


def _register_globally() -> None:
    """Make plain ``torch.onnx.export`` (both exporters) use these translations."""
    global registered_with_dynamo
    import torch.onnx

    for kind in (_AVG, _MAX):
        torch.onnx.register_custom_op_symbolic(f"anypool::{kind}", _torchscript_symbolic(kind), _TORCHSCRIPT_OPSET)
    try:  # private: torch.onnx has no public global registry for dynamo translations
        from torch.onnx._internal.exporter import _registration
        from torch.onnx._internal.exporter._torchlib import _torchlib_registry

        for target, function in translation_table().items():
            _torchlib_registry._registry.append(_registration.OnnxDecompMeta(
                onnx_function=function, fx_target=target, signature=None, is_custom=True))
        registered_with_dynamo = True
    except Exception:  # a future torch: anypool.onnx.export still works, a plain export fails loudly
        registered_with_dynamo = False



def _dynamo_exporting() -> bool:
    """``torch.onnx.export(dynamo=True)`` (rather than the TorchScript exporter) is running."""
    try:
        from torch.onnx._internal.exporter import _flags
    except ImportError:  # a torch without the flag: only the dynamo exporter traces with fake tensors
        return True
    return bool(_flags._is_onnx_exporting)


def on_export(output_size, function: str) -> None:
    """Make the export exact or fail loudly.

    - ``output_size`` must be plain ints (a size derived from a dynamic dimension cannot be baked in);
    - the TorchScript exporter looks up symbolics after tracing, so importing this module
      (as the op does) is enough; the dynamo exporter built its table before tracing, so the translations must
      have been registered before the export began (``import anypool.onnx`` or ``anypool.onnx.export``).
    """
    global _imported_mid_export
    _args.static_output_size(output_size, function)
    late, _imported_mid_export = _imported_mid_export, False
    if not (registered_with_dynamo and not late or _exporting) and _dynamo_exporting():
        raise _args.onnx_not_registered(function)


# Imported by the first op traced in an export: registered too late for that (dynamo) export.
_imported_mid_export = torch.onnx.is_in_onnx_export()
try:
    _register_globally()
except ImportError:  # no onnxscript: anypool.onnx.export reports it
    pass
