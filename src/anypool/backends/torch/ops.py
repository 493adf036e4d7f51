"""The ``anypool::`` custom ops: one opaque op per direction, with fake impls and autograd.

Forward schemas (the ONNX exporter translates these, and the reductions below, by name)::

    anypool::adaptive_avg_pool(Tensor x, int[] output_size) -> Tensor
    anypool::adaptive_max_pool(Tensor x, int[] output_size) -> (Tensor, Tensor)   # values, int64 indices

and their backward ops::

    anypool::adaptive_avg_pool_backward(Tensor grad_out, SymInt[] input_size) -> Tensor
    anypool::adaptive_max_pool_backward(Tensor grad_out, Tensor indices, SymInt[] input_size) -> Tensor

``x`` is the logical ``(N, C, *S)`` tensor with ``len(S) == len(output_size)``, any
strides; ``input_size`` is ``S``.  Results keep the input's memory format: a tensor
whose channels are innermost in memory (channels_last, in any rank) gives results
with that layout, anything else gives contiguous results — the fake impls promise
exactly the strides the real ones return.

Avg backward is itself linear: its backward is the forward pooling again, so double
backward (and ``gradgradcheck``) work to any order.  Max backward's backward gathers
the incoming gradient at the argmax.

Each op picks its implementation per call from :data:`IMPLEMENTATIONS` (device type ->
module), falling back to :mod:`.portable`.  A module there exposes
``supports(x, output_size) -> bool`` (asked with the tensor the function reads — the
input for a forward, ``grad_out`` for a backward — and the pooled spatial size) and
``avg_forward(x, output_size)``, ``avg_backward(grad_out, input_size)``,
``max_forward(x, output_size) -> (values, indices)``,
``max_backward(grad_out, indices, input_size)``, all on logical ``(N, C, *S)`` tensors.
The further reductions (LP, GeM, avgmax; schemas at the end of this file) ask the same module
for ``lp_forward``/``lp_backward``, ``gem_forward``/``gem_backward`` and
``avgmax_forward``/``avgmax_backward`` and use :mod:`.portable` where it has none.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import warnings
from types import ModuleType

import torch

from . import portable

# device type -> module with the fast implementation.  A module that does not exist
# (not written yet, or its compiler is missing) leaves that device on the portable path.
IMPLEMENTATIONS = {
    "cpu": "anypool.backends.torch.cpu",
    "cuda": "anypool.backends.torch.triton",
}

_loaded: dict[str, ModuleType | None] = {}
_forced: str | None = None


def _module(name: str) -> ModuleType | None:
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(name)
        except ImportError as e:
            if getattr(e, "name", None) != name:  # present but broken, or its compiler is missing: say so once
                warnings.warn(f"anypool: {name} unavailable ({e}); using the portable torch path", stacklevel=3)
            _loaded[name] = None
    return _loaded[name]


def implementation(x: torch.Tensor, output_size) -> ModuleType:
    """The module that runs this call: the device's fast one if it exists and supports it, else portable."""
    if _forced is not None:
        return portable if _forced == "portable" else importlib.import_module(_forced)
    name = IMPLEMENTATIONS.get("cpu" if x.is_cpu else x.device.type)
    module = _loaded[name] if name in _loaded else _module(name) if name else None
    if module is not None and module.supports(x, list(output_size)):
        return module
    return portable


@contextlib.contextmanager
def force_implementation(name: str | None):
    """Run every op with one implementation (``"portable"`` or a module name); for tests and benchmarks."""
    global _forced
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous


def _layout_empty(x: torch.Tensor, spatial, dtype=None) -> torch.Tensor:
    """An uninitialised ``(N, C, *spatial)`` tensor in ``x``'s memory format."""
    n, c = x.shape[0], x.shape[1]
    if portable.channels_last(x):
        return x.new_empty((n, *spatial, c), dtype=dtype).movedim(-1, 1)
    return x.new_empty((n, c, *spatial), dtype=dtype)


def _layout_strides(x: torch.Tensor, spatial) -> tuple[int, ...]:
    """The strides :func:`_layout_empty` gives, without allocating (real, int sizes)."""
    return _strides(x.shape[0], x.shape[1], tuple(spatial), portable.channels_last(x))


@functools.lru_cache(maxsize=512)
def _strides(n: int, c: int, spatial: tuple, cl: bool) -> tuple[int, ...]:
    physical = (n, *spatial, c) if cl else (n, c, *spatial)
    strides, step = [], 1
    for size in reversed(physical):
        strides.append(step)
        step *= max(int(size), 1)
    strides.reverse()
    return (strides[0], strides[-1], *strides[1:-1]) if cl else tuple(strides)


def _conform(out: torch.Tensor, x: torch.Tensor, spatial, dtype=None) -> torch.Tensor:
    """``out`` with exactly the strides the fake impl promised; a copy only when they differ."""
    if out.stride() == _layout_strides(x, spatial):
        return out
    return _layout_empty(x, spatial, dtype).copy_(out)


# --- forward ops --------------------------------------------------------------------------------


def _on_onnx_export(output_size, op: str) -> None:
    """During ``torch.onnx.export``: make the export exact (registers anypool's translations) or fail loudly."""
    if torch.onnx.is_in_onnx_export():
        from . import export  # here, not at the top: costs nothing until an export runs

        export.on_export(output_size, op)



@torch.library.custom_op("anypool::adaptive_avg_pool", mutates_args=(),
                         schema="(Tensor x, int[] output_size) -> Tensor")
def adaptive_avg_pool(x: torch.Tensor, output_size: list[int]) -> torch.Tensor:
    _on_onnx_export(output_size, "anypool::adaptive_avg_pool")
    out = implementation(x, output_size).avg_forward(x, output_size)
    return _conform(out, x, output_size)


@adaptive_avg_pool.register_fake
def _(x, output_size):
    _on_onnx_export(output_size, "anypool::adaptive_avg_pool")
    return _layout_empty(x, output_size)


@torch.library.custom_op("anypool::adaptive_max_pool", mutates_args=(),
                         schema="(Tensor x, int[] output_size) -> (Tensor, Tensor)")
def adaptive_max_pool(x: torch.Tensor, output_size: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    _on_onnx_export(output_size, "anypool::adaptive_max_pool")
    values, indices = implementation(x, output_size).max_forward(x, output_size)
    return _conform(values, x, output_size), _conform(indices, x, output_size, torch.int64)


@adaptive_max_pool.register_fake
def _(x, output_size):
    _on_onnx_export(output_size, "anypool::adaptive_max_pool")
    return _layout_empty(x, output_size), _layout_empty(x, output_size, torch.int64)


# --- backward ops -------------------------------------------------------------------------------


@torch.library.custom_op("anypool::adaptive_avg_pool_backward", mutates_args=(),
                         schema="(Tensor grad_out, SymInt[] input_size) -> Tensor")
def adaptive_avg_pool_backward(grad_out: torch.Tensor, input_size: list[int]) -> torch.Tensor:
    out = implementation(grad_out, grad_out.shape[2:]).avg_backward(grad_out, input_size)
    return _conform(out, grad_out, input_size)


@adaptive_avg_pool_backward.register_fake
def _(grad_out, input_size):
    return _layout_empty(grad_out, input_size)


@torch.library.custom_op("anypool::adaptive_max_pool_backward", mutates_args=(),
                         schema="(Tensor grad_out, Tensor indices, SymInt[] input_size) -> Tensor")
def adaptive_max_pool_backward(grad_out: torch.Tensor, indices: torch.Tensor, input_size: list[int]) -> torch.Tensor:
    out = implementation(grad_out, grad_out.shape[2:]).max_backward(grad_out, indices, input_size)
    return _conform(out, grad_out, input_size)


@adaptive_max_pool_backward.register_fake
def _(grad_out, indices, input_size):
    return _layout_empty(grad_out, input_size)


# --- autograd -----------------------------------------------------------------------------------


def _avg_setup(ctx, inputs, output):
    ctx.input_size = list(inputs[0].shape[2:])


def _avg_grad(ctx, grad):
    return adaptive_avg_pool_backward(grad, ctx.input_size), None


def _avg_backward_setup(ctx, inputs, output):
    ctx.output_size = [int(s) for s in inputs[0].shape[2:]]


def _avg_backward_grad(ctx, grad):
    # avg backward is linear in grad_out; its adjoint is the forward pooling
    return adaptive_avg_pool(grad, ctx.output_size), None


def _max_setup(ctx, inputs, output):
    ctx.input_size = list(inputs[0].shape[2:])
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])


def _max_grad(ctx, grad_values, grad_indices):
    (indices,) = ctx.saved_tensors
    return adaptive_max_pool_backward(grad_values, indices, ctx.input_size), None


def _max_backward_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _max_backward_grad(ctx, grad):
    (indices,) = ctx.saved_tensors
    # d(max backward)/d(grad_out) reads the incoming gradient at each argmax
    picked = grad.flatten(2).gather(2, indices.flatten(2)).reshape(indices.shape)
    return picked, None, None


adaptive_avg_pool.register_autograd(_avg_grad, setup_context=_avg_setup)
adaptive_avg_pool_backward.register_autograd(_avg_backward_grad, setup_context=_avg_backward_setup)
adaptive_max_pool.register_autograd(_max_grad, setup_context=_max_setup)
adaptive_max_pool_backward.register_autograd(_max_backward_grad, setup_context=_max_backward_setup)


# --- eager fast path ----------------------------------------------------------------------------
# A custom-op call costs tens of microseconds of dispatch in eager mode, more than the
# whole pooling of a small tensor.  Plain eager calls therefore run the implementation
# directly (through an autograd.Function when a gradient is needed); anything that traces
# — torch.compile, torch.export, jit.trace, ONNX export, dispatch modes, functorch — keeps
# the custom ops, which are what those systems understand.
# The Functions take ``ctx`` in ``forward`` (no separate ``setup_context``): with one,
# ``Function.apply`` binds the arguments through ``inspect.signature`` on every call (~20 µs).
# Functorch transforms need ``setup_context``, and they take the custom ops anyway.


def _eager(x: torch.Tensor) -> bool:
    # (the TorchScript ONNX exporter traces, so jit.is_tracing covers it)
    return (type(x) is torch.Tensor
            and not torch.compiler.is_compiling()
            and not torch.jit.is_tracing()
            and torch._C._len_torch_dispatch_stack() == 0
            and not torch._C._are_functorch_transforms_active()
            and not torch._C._functorch.is_functorch_wrapped_tensor(x))


def _fit(module: ModuleType, out: torch.Tensor, x: torch.Tensor, spatial, dtype=None) -> torch.Tensor:
    """:func:`_conform`, skipped for a module whose results already have those strides (``EXACT_LAYOUT``)."""
    return out if getattr(module, "EXACT_LAYOUT", False) else _conform(out, x, spatial, dtype)


def _avg_eager(x: torch.Tensor, output_size) -> torch.Tensor:
    impl = implementation(x, output_size)
    return _fit(impl, impl.avg_forward(x, output_size), x, output_size)


def _max_eager(x: torch.Tensor, output_size) -> tuple[torch.Tensor, torch.Tensor]:
    impl = implementation(x, output_size)
    values, indices = impl.max_forward(x, output_size)
    return _fit(impl, values, x, output_size), _fit(impl, indices, x, output_size, torch.int64)


class _EagerAvg(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, output_size):
        ctx.input_size = list(x.shape[2:])
        return _avg_eager(x, output_size)

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():  # double backward: the differentiable op
            return _avg_grad(ctx, grad)
        impl = implementation(grad, grad.shape[2:])
        return _fit(impl, impl.avg_backward(grad, ctx.input_size), grad, ctx.input_size), None


class _EagerMax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, output_size):
        values, indices = _max_eager(x, output_size)
        ctx.input_size = list(x.shape[2:])
        ctx.save_for_backward(indices)
        ctx.mark_non_differentiable(indices)
        return values, indices

    @staticmethod
    def backward(ctx, grad_values, grad_indices):
        if torch.is_grad_enabled():
            return _max_grad(ctx, grad_values, grad_indices)
        (indices,) = ctx.saved_tensors
        impl = implementation(grad_values, grad_values.shape[2:])
        grad = impl.max_backward(grad_values, indices, ctx.input_size)
        return _fit(impl, grad, grad_values, ctx.input_size), None


def avg_pool(x: torch.Tensor, output_size: list[int]) -> torch.Tensor:
    """``anypool::adaptive_avg_pool``, run directly in plain eager mode."""
    if not _eager(x):
        return adaptive_avg_pool(x, output_size)
    if x.requires_grad and torch.is_grad_enabled():
        return _EagerAvg.apply(x, output_size)
    return _avg_eager(x, output_size)  # no graph to record: skip autograd's bookkeeping too


def max_pool(x: torch.Tensor, output_size: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``anypool::adaptive_max_pool``, run directly in plain eager mode."""
    if not _eager(x):
        return adaptive_max_pool(x, output_size)
    if x.requires_grad and torch.is_grad_enabled():
        return _EagerMax.apply(x, output_size)
    return _max_eager(x, output_size)


# --- padded batches (valid_sizes) ---------------------------------------------------------------
# The same four ops with per-sample sizes ``sizes``: int64 ``(N, 2k)``, per sample the valid
# input lengths then the valid output lengths (see :mod:`.portable`).  Separate ops, so the
# schemas above (and their ONNX translations) stay as they are::
#
#     anypool::adaptive_avg_pool_valid(Tensor x, Tensor sizes, SymInt[] output_size) -> Tensor
#     anypool::adaptive_max_pool_valid(Tensor x, Tensor sizes, SymInt[] output_size) -> (Tensor, Tensor)
#     anypool::adaptive_avg_pool_valid_backward(Tensor grad_out, Tensor sizes, SymInt[] input_size) -> Tensor
#     anypool::adaptive_max_pool_valid_backward(Tensor grad_out, Tensor indices, Tensor sizes,
#                                               SymInt[] input_size) -> Tensor
#
# An implementation module serves them when it sets ``VALID_SIZES = True`` (its four functions
# then take ``sizes=``); otherwise the portable path does.


def _on_onnx_export_valid(output_size, op: str) -> None:
    """As :func:`_on_onnx_export`.  A symbolic entry here is an axis that keeps its (dynamic) size, which
    the translation reads from the run-time shape, so only the plain ints are checked."""
    _on_onnx_export([o for o in output_size if isinstance(o, int)] or [1], op)


def implementation_valid(x: torch.Tensor, output_size) -> ModuleType:
    module = implementation(x, output_size)
    return module if getattr(module, "VALID_SIZES", False) else portable


@torch.library.custom_op("anypool::adaptive_avg_pool_valid", mutates_args=(),
                         schema="(Tensor x, Tensor sizes, SymInt[] output_size) -> Tensor")
def adaptive_avg_pool_valid(x: torch.Tensor, sizes: torch.Tensor, output_size: list[int]) -> torch.Tensor:
    _on_onnx_export_valid(output_size, "anypool::adaptive_avg_pool_valid")
    out = implementation_valid(x, output_size).avg_forward(x, output_size, sizes=sizes)
    return _conform(out, x, output_size)


@adaptive_avg_pool_valid.register_fake
def _(x, sizes, output_size):
    _on_onnx_export_valid(output_size, "anypool::adaptive_avg_pool_valid")
    return _layout_empty(x, output_size)


@torch.library.custom_op("anypool::adaptive_max_pool_valid", mutates_args=(),
                         schema="(Tensor x, Tensor sizes, SymInt[] output_size) -> (Tensor, Tensor)")
def adaptive_max_pool_valid(x: torch.Tensor, sizes: torch.Tensor,
                            output_size: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    _on_onnx_export_valid(output_size, "anypool::adaptive_max_pool_valid")
    values, indices = implementation_valid(x, output_size).max_forward(x, output_size, sizes=sizes)
    return _conform(values, x, output_size), _conform(indices, x, output_size, torch.int64)


@adaptive_max_pool_valid.register_fake
def _(x, sizes, output_size):
    _on_onnx_export_valid(output_size, "anypool::adaptive_max_pool_valid")
    return _layout_empty(x, output_size), _layout_empty(x, output_size, torch.int64)


@torch.library.custom_op("anypool::adaptive_avg_pool_valid_backward", mutates_args=(),
                         schema="(Tensor grad_out, Tensor sizes, SymInt[] input_size) -> Tensor")
def adaptive_avg_pool_valid_backward(grad_out: torch.Tensor, sizes: torch.Tensor,
                                     input_size: list[int]) -> torch.Tensor:
    impl = implementation_valid(grad_out, grad_out.shape[2:])
    return _conform(impl.avg_backward(grad_out, input_size, sizes=sizes), grad_out, input_size)


@adaptive_avg_pool_valid_backward.register_fake
def _(grad_out, sizes, input_size):
    return _layout_empty(grad_out, input_size)


@torch.library.custom_op("anypool::adaptive_max_pool_valid_backward", mutates_args=(),
                         schema="(Tensor grad_out, Tensor indices, Tensor sizes, SymInt[] input_size) -> Tensor")
def adaptive_max_pool_valid_backward(grad_out: torch.Tensor, indices: torch.Tensor, sizes: torch.Tensor,
                                     input_size: list[int]) -> torch.Tensor:
    impl = implementation_valid(grad_out, grad_out.shape[2:])
    return _conform(impl.max_backward(grad_out, indices, input_size, sizes=sizes), grad_out, input_size)


@adaptive_max_pool_valid_backward.register_fake
def _(grad_out, indices, sizes, input_size):
    return _layout_empty(grad_out, input_size)


def _present(sizes: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Which outputs of ``like`` (logical ``(N, C, *O)``) exist for their sample: ``j < O_i`` on every axis."""
    rank = like.dim() - 2
    present = None
    for d in range(rank):
        j = torch.arange(like.shape[2 + d], device=like.device)
        here = j < sizes[:, rank + d, None].to(like.device)
        here = here.reshape((here.shape[0], 1) + (1,) * d + (here.shape[1],) + (1,) * (rank - d - 1))
        present = here if present is None else present & here
    return present


def _avg_valid_setup(ctx, inputs, output):
    ctx.input_size = list(inputs[0].shape[2:])
    ctx.save_for_backward(inputs[1])


def _avg_valid_grad(ctx, grad):
    (sizes,) = ctx.saved_tensors
    return adaptive_avg_pool_valid_backward(grad, sizes, ctx.input_size), None, None


def _avg_valid_backward_setup(ctx, inputs, output):
    ctx.output_size = list(inputs[0].shape[2:])
    ctx.save_for_backward(inputs[1])


def _avg_valid_backward_grad(ctx, grad):
    (sizes,) = ctx.saved_tensors
    # per sample the backward is linear in grad_out; its adjoint is the forward pooling again
    return adaptive_avg_pool_valid(grad, sizes, ctx.output_size), None, None


def _max_valid_setup(ctx, inputs, output):
    ctx.input_size = list(inputs[0].shape[2:])
    ctx.save_for_backward(output[1], inputs[1])
    ctx.mark_non_differentiable(output[1])


def _max_valid_grad(ctx, grad_values, grad_indices):
    indices, sizes = ctx.saved_tensors
    return adaptive_max_pool_valid_backward(grad_values, indices, sizes, ctx.input_size), None, None


def _max_valid_backward_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1], inputs[2])


def _max_valid_backward_grad(ctx, grad):
    indices, sizes = ctx.saved_tensors
    # reads the incoming gradient at each argmax; outputs beyond a sample's own length read nothing
    picked = grad.flatten(2).gather(2, indices.flatten(2)).reshape(indices.shape)
    return torch.where(_present(sizes, indices), picked, 0), None, None, None


adaptive_avg_pool_valid.register_autograd(_avg_valid_grad, setup_context=_avg_valid_setup)
adaptive_avg_pool_valid_backward.register_autograd(_avg_valid_backward_grad, setup_context=_avg_valid_backward_setup)
adaptive_max_pool_valid.register_autograd(_max_valid_grad, setup_context=_max_valid_setup)
adaptive_max_pool_valid_backward.register_autograd(_max_valid_backward_grad, setup_context=_max_valid_backward_setup)


class _EagerAvgValid(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, output_size):
        _avg_valid_setup(ctx, (x, sizes, output_size), None)
        return _EagerAvgValid.run(x, sizes, output_size)

    @staticmethod
    def run(x, sizes, output_size):
        return _conform(implementation_valid(x, output_size).avg_forward(x, output_size, sizes=sizes), x, output_size)

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():  # double backward: the differentiable op
            return _avg_valid_grad(ctx, grad)
        (sizes,) = ctx.saved_tensors
        impl = implementation_valid(grad, grad.shape[2:])
        return _conform(impl.avg_backward(grad, ctx.input_size, sizes=sizes), grad, ctx.input_size), None, None


class _EagerMaxValid(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, output_size):
        values, indices = _EagerMaxValid.run(x, sizes, output_size)
        _max_valid_setup(ctx, (x, sizes, output_size), (values, indices))
        return values, indices

    @staticmethod
    def run(x, sizes, output_size):
        values, indices = implementation_valid(x, output_size).max_forward(x, output_size, sizes=sizes)
        return _conform(values, x, output_size), _conform(indices, x, output_size, torch.int64)

    @staticmethod
    def backward(ctx, grad_values, grad_indices):
        if torch.is_grad_enabled():
            return _max_valid_grad(ctx, grad_values, grad_indices)
        indices, sizes = ctx.saved_tensors
        impl = implementation_valid(grad_values, grad_values.shape[2:])
        grad = impl.max_backward(grad_values, indices, ctx.input_size, sizes=sizes)
        return _conform(grad, grad_values, ctx.input_size), None, None


def _run_valid(function: type[torch.autograd.Function], op, x: torch.Tensor, sizes: torch.Tensor, output_size):
    if not _eager(x):
        return op(x, sizes, output_size)
    if torch.is_grad_enabled() and x.requires_grad:
        return function.apply(x, sizes, output_size)
    return function.run(x, sizes, output_size)


def avg_pool_valid(x: torch.Tensor, sizes: torch.Tensor, output_size: list[int]) -> torch.Tensor:
    """``anypool::adaptive_avg_pool_valid``, run directly in plain eager mode."""
    return _run_valid(_EagerAvgValid, adaptive_avg_pool_valid, x, sizes, output_size)


def max_pool_valid(x: torch.Tensor, sizes: torch.Tensor, output_size: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``anypool::adaptive_max_pool_valid``, run directly in plain eager mode."""
    return _run_valid(_EagerMaxValid, adaptive_max_pool_valid, x, sizes, output_size)
# --- more reductions: LP, GeM, avgmax -----------------------------------------------------------
#
#     anypool::adaptive_lp_pool(Tensor x, int[] output_size, float norm_type) -> Tensor
#     anypool::adaptive_gem_pool(Tensor x, int[] output_size, Tensor p, float eps) -> Tensor
#     anypool::adaptive_avgmax_pool(Tensor x, int[] output_size, bool combine) -> (Tensor, Tensor, Tensor)
#
# avgmax returns (first, max, int64 argmax) with first = 0.5·(avg + max) when ``combine`` (timm's
# avgmax, rounded once) and the average otherwise (catavgmax concatenates it with the max).
# GeM's ``p`` is a one-value tensor so that a learnable p has a gradient and nothing syncs
# at trace time.  Their backward ops are not differentiable again (no double backward).


def _impl(x: torch.Tensor, output_size, function: str) -> ModuleType:
    """:func:`implementation`, or the portable path where that module lacks ``function`` (e.g. Triton)."""
    module = implementation(x, output_size)
    return module if hasattr(module, function) else portable


@torch.library.custom_op("anypool::adaptive_lp_pool", mutates_args=(),
                         schema="(Tensor x, int[] output_size, float norm_type) -> Tensor")
def adaptive_lp_pool(x: torch.Tensor, output_size: list[int], norm_type: float) -> torch.Tensor:
    _on_onnx_export(output_size, "anypool::adaptive_lp_pool")
    return _conform(_impl(x, output_size, "lp_forward").lp_forward(x, output_size, norm_type), x, output_size)


@adaptive_lp_pool.register_fake
def _(x, output_size, norm_type):
    _on_onnx_export(output_size, "anypool::adaptive_lp_pool")
    return _layout_empty(x, output_size)


@torch.library.custom_op("anypool::adaptive_lp_pool_backward", mutates_args=(),
                         schema="(Tensor grad_out, Tensor x, float norm_type) -> Tensor")
def adaptive_lp_pool_backward(grad_out: torch.Tensor, x: torch.Tensor, norm_type: float) -> torch.Tensor:
    impl = _impl(x, grad_out.shape[2:], "lp_backward")
    return _conform(impl.lp_backward(grad_out, x, norm_type), x, x.shape[2:])


@adaptive_lp_pool_backward.register_fake
def _(grad_out, x, norm_type):
    return _layout_empty(x, x.shape[2:])


@torch.library.custom_op("anypool::adaptive_gem_pool", mutates_args=(),
                         schema="(Tensor x, int[] output_size, Tensor p, float eps) -> Tensor")
def adaptive_gem_pool(x: torch.Tensor, output_size: list[int], p: torch.Tensor, eps: float) -> torch.Tensor:
    _on_onnx_export(output_size, "anypool::adaptive_gem_pool")
    out = _impl(x, output_size, "gem_forward").gem_forward(x, output_size, float(p), eps)
    return _conform(out, x, output_size)


@adaptive_gem_pool.register_fake
def _(x, output_size, p, eps):
    _on_onnx_export(output_size, "anypool::adaptive_gem_pool")
    return _layout_empty(x, output_size)


@torch.library.custom_op("anypool::adaptive_gem_pool_backward", mutates_args=(),
                         schema="(Tensor grad_out, Tensor x, Tensor p, float eps, bool p_grad) -> (Tensor, Tensor)")
def adaptive_gem_pool_backward(grad_out: torch.Tensor, x: torch.Tensor, p: torch.Tensor, eps: float,
                               p_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    impl = _impl(x, grad_out.shape[2:], "gem_backward")
    gin, gp = impl.gem_backward(grad_out, x, float(p), eps, p_grad)
    gp = torch.zeros_like(p) if gp is None else gp.to(p.dtype).reshape(p.shape)
    return _conform(gin, x, x.shape[2:]), gp


@adaptive_gem_pool_backward.register_fake
def _(grad_out, x, p, eps, p_grad):
    return _layout_empty(x, x.shape[2:]), torch.empty_like(p)


@torch.library.custom_op("anypool::adaptive_avgmax_pool", mutates_args=(),
                         schema="(Tensor x, int[] output_size, bool combine) -> (Tensor, Tensor, Tensor)")
def adaptive_avgmax_pool(x: torch.Tensor, output_size: list[int],
                         combine: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _on_onnx_export(output_size, "anypool::adaptive_avgmax_pool")
    first, values, indices = _impl(x, output_size, "avgmax_forward").avgmax_forward(x, output_size, combine)
    return (_conform(first, x, output_size), _conform(values, x, output_size),
            _conform(indices, x, output_size, torch.int64))


@adaptive_avgmax_pool.register_fake
def _(x, output_size, combine):
    _on_onnx_export(output_size, "anypool::adaptive_avgmax_pool")
    return _layout_empty(x, output_size), _layout_empty(x, output_size), _layout_empty(x, output_size, torch.int64)


@torch.library.custom_op("anypool::adaptive_avgmax_pool_backward", mutates_args=(),
                         schema="(Tensor grad_avg, Tensor grad_max, Tensor indices, SymInt[] input_size) -> Tensor")
def adaptive_avgmax_pool_backward(grad_avg: torch.Tensor, grad_max: torch.Tensor, indices: torch.Tensor,
                                  input_size: list[int]) -> torch.Tensor:
    impl = _impl(grad_avg, grad_avg.shape[2:], "avgmax_backward")
    return _conform(impl.avgmax_backward(grad_avg, grad_max, indices, input_size), grad_avg, input_size)


@adaptive_avgmax_pool_backward.register_fake
def _(grad_avg, grad_max, indices, input_size):
    return _layout_empty(grad_avg, input_size)


def _lp_setup(ctx, inputs, output):
    x, _, ctx.norm_type = inputs
    ctx.save_for_backward(x)


def _lp_grad(ctx, grad):
    (x,) = ctx.saved_tensors
    return adaptive_lp_pool_backward(grad, x, ctx.norm_type), None, None


def _gem_setup(ctx, inputs, output):
    x, _, p, ctx.eps = inputs
    ctx.save_for_backward(x, p)


def _gem_grad(ctx, grad):
    x, p = ctx.saved_tensors
    gx, gp = adaptive_gem_pool_backward(grad, x, p, ctx.eps, ctx.needs_input_grad[2])
    return gx, None, (gp if ctx.needs_input_grad[2] else None), None


def _avgmax_setup(ctx, inputs, output):
    ctx.input_size = list(inputs[0].shape[2:])
    ctx.channels_last = portable.channels_last(inputs[0])
    ctx.combine = inputs[2]
    ctx.save_for_backward(output[2])
    ctx.mark_non_differentiable(output[2])


def _avgmax_grad(ctx, grad_first, grad_values, grad_indices):
    (indices,) = ctx.saved_tensors
    if grad_first is None:
        grad_first = torch.zeros_like(grad_values)
    if ctx.combine:  # d(0.5·(avg + max)); a gradient of the max output (if used too) adds to the max part
        grad_avg = 0.5 * grad_first
        grad_max = grad_avg if grad_values is None else grad_avg + grad_values
    else:
        grad_avg = grad_first
        grad_max = grad_values if grad_values is not None else torch.zeros_like(grad_avg)
    # (slices of catavgmax's gradient): in the input's memory format, which the gradient keeps
    grad_avg, grad_max = (_like(g, ctx.channels_last) for g in (grad_avg, grad_max))
    return adaptive_avgmax_pool_backward(grad_avg, grad_max, indices, ctx.input_size), None, None


def _like(g: torch.Tensor, cl: bool) -> torch.Tensor:
    return g.movedim(1, -1).contiguous().movedim(-1, 1) if cl else g.contiguous()


adaptive_lp_pool.register_autograd(_lp_grad, setup_context=_lp_setup)
adaptive_gem_pool.register_autograd(_gem_grad, setup_context=_gem_setup)
adaptive_avgmax_pool.register_autograd(_avgmax_grad, setup_context=_avgmax_setup)


# --- eager fast path of the reductions (as for avg and max above) -------------------------------


class _EagerLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, output_size, norm_type):
        _lp_setup(ctx, (x, output_size, norm_type), None)
        return _EagerLP.run(x, output_size, norm_type)

    @staticmethod
    def run(x, output_size, norm_type):
        return _conform(_impl(x, output_size, "lp_forward").lp_forward(x, output_size, norm_type), x, output_size)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        impl = _impl(x, grad.shape[2:], "lp_backward")
        return _conform(impl.lp_backward(grad, x, ctx.norm_type), x, x.shape[2:]), None, None


class _EagerGeM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, output_size, p, eps):
        _gem_setup(ctx, (x, output_size, p, eps), None)
        return _EagerGeM.run(x, output_size, p, eps)

    @staticmethod
    def run(x, output_size, p, eps):
        out = _impl(x, output_size, "gem_forward").gem_forward(x, output_size, float(p), eps)
        return _conform(out, x, output_size)

    @staticmethod
    def backward(ctx, grad):
        x, p = ctx.saved_tensors
        p_grad = ctx.needs_input_grad[2]
        gin, gp = _impl(x, grad.shape[2:], "gem_backward").gem_backward(grad, x, float(p), ctx.eps, p_grad)
        gp = gp.to(p.dtype).reshape(p.shape) if p_grad else None
        return _conform(gin, x, x.shape[2:]), None, gp, None


class _EagerAvgMax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, output_size, combine):
        out = _EagerAvgMax.run(x, output_size, combine)
        _avgmax_setup(ctx, (x, output_size, combine), out)
        return out

    @staticmethod
    def run(x, output_size, combine):
        first, values, indices = _impl(x, output_size, "avgmax_forward").avgmax_forward(x, output_size, combine)
        return (_conform(first, x, output_size), _conform(values, x, output_size),
                _conform(indices, x, output_size, torch.int64))

    @staticmethod
    def backward(ctx, grad_first, grad_values, grad_indices):
        return _avgmax_grad(ctx, grad_first, grad_values, grad_indices)  # itself the eager path below


def _exponent(p) -> torch.Tensor:
    return p.reshape(()) if isinstance(p, torch.Tensor) else torch.tensor(float(p), dtype=torch.float64)


def lp_pool(x: torch.Tensor, output_size: list[int], norm_type: float) -> torch.Tensor:
    """``anypool::adaptive_lp_pool``, run directly in plain eager mode."""
    if not _eager(x):
        return adaptive_lp_pool(x, output_size, norm_type)
    if torch.is_grad_enabled() and x.requires_grad:
        return _EagerLP.apply(x, output_size, norm_type)
    return _EagerLP.run(x, output_size, norm_type)


def gem_pool(x: torch.Tensor, output_size: list[int], p, eps: float) -> torch.Tensor:
    """``anypool::adaptive_gem_pool`` (``p`` a float or a one-value tensor), run directly in plain eager mode."""
    tensor_p = isinstance(p, torch.Tensor)
    if not _eager(x) or (tensor_p and not _eager(p)):
        return adaptive_gem_pool(x, output_size, _exponent(p), eps)
    if torch.is_grad_enabled() and (x.requires_grad or (tensor_p and p.requires_grad)):
        return _EagerGeM.apply(x, output_size, _exponent(p), eps)
    return _EagerGeM.run(x, output_size, p, eps)


def avgmax_pool(x: torch.Tensor, output_size: list[int], combine: bool):
    """``anypool::adaptive_avgmax_pool``, run directly in plain eager mode."""
    if not _eager(x):
        return adaptive_avgmax_pool(x, output_size, combine)
    if torch.is_grad_enabled() and x.requires_grad:
        return _EagerAvgMax.apply(x, output_size, combine)
    return _EagerAvgMax.run(x, output_size, combine)
