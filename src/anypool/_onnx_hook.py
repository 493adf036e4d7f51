"""What the torch backend calls while ``torch.onnx.export`` traces an anypool op.

Kept apart from :mod:`anypool.onnx` so that checking costs nothing until an export
runs (``anypool.onnx`` imports onnxscript).  Backend use, in the forward ops' fake
*and* real kernels (``output_size`` as given to the op)::

    if torch.onnx.is_in_onnx_export():
        from anypool import _onnx_hook
        _onnx_hook.on_export(output_size, "anypool::adaptive_avg_pool")
"""

from __future__ import annotations

import sys

from . import _args


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
    - the TorchScript exporter looks up symbolics after tracing, so importing :mod:`anypool.onnx`
      here is enough; the dynamo exporter built its table before tracing, so the translations must
      have been registered before the export began (``import anypool.onnx`` or ``anypool.onnx.export``).
    """
    _args.static_output_size(output_size, function)
    module = sys.modules.get("anypool.onnx")
    ready = module is not None and (module.registered_with_dynamo or module._exporting)
    import anypool.onnx  # noqa: F401  (registers with both exporters for this and later exports)

    if not ready and _dynamo_exporting():
        raise _args.onnx_not_registered(function)
