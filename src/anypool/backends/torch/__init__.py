"""The PyTorch backend: any device, float16/bfloat16/float32/float64, both layouts.

Every call is mapped — with views only — onto the logical batched channels-first
tensor ``(N, C, *S)`` that the ``anypool::`` custom ops take (:mod:`.ops`):
unbatched input gets ``unsqueeze(0)``, ``data_format="channels_last"`` input
``(N, *S, C)`` is viewed as ``movedim(-1, 1)`` (a channels_last-strided view, never
a copy), and the result is mapped back the same way.  The ops keep the memory
format, so an NHWC tensor stays NHWC end to end.
"""

from __future__ import annotations

import numpy as np
import torch

from ..._args import PoolSpec, require_supported
from . import ops, portable

name = "torch"
VALID_SIZES = True  # pools padded batches (``valid_sizes``)

_UNSUPPORTED = (torch.bool, torch.complex32, torch.complex64, torch.complex128)


def is_array(x) -> bool:
    return isinstance(x, torch.Tensor)


def shape(x) -> tuple[int | None, ...]:
    # a symbolic size (torch.compile with dynamic shapes) is reported unknown rather
    # than forced to an int, which would specialise the compiled graph to it
    if type(x) is torch.Tensor and not torch.compiler.is_compiling() and not torch.jit.is_tracing():
        return tuple(x.shape)  # plain ints (the common eager call: skips the per-entry test)
    return tuple(s if isinstance(s, int) else None for s in x.shape)


def dtype_name(x) -> str:
    return str(x.dtype).removeprefix("torch.")


def is_floating(x) -> bool:
    return x.is_floating_point()


def is_tracing() -> bool:
    """Whether torch.compile is tracing: it must trace the argument checks, not a cache lookup."""
    return torch.compiler.is_compiling()


def from_numpy(a: np.ndarray, dtype: str) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).to(getattr(torch, dtype))


def to_numpy(x) -> np.ndarray:
    x = x.detach().cpu()
    return (x.float() if x.dtype == torch.bfloat16 else x).numpy()


def squeeze(x, axes):
    return x.squeeze(tuple(axes))


def _logical(x: torch.Tensor, spec: PoolSpec) -> tuple[torch.Tensor, list]:
    """``x`` as ``(N, C, *S)`` (a view) and the concrete output size."""
    if not spec.batched:
        x = x.unsqueeze(0)
    if spec.channels_last:
        x = x.movedim(-1, 1)
    out = [x.shape[2 + d] if o is None else o for d, o in enumerate(spec.output_size)]
    return x, out


def _back(y: torch.Tensor, spec: PoolSpec) -> torch.Tensor:
    if spec.channels_last:
        y = y.movedim(1, -1)
    return y if spec.batched else y.squeeze(0)


def known_values(valid_sizes: torch.Tensor) -> np.ndarray | None:
    """The entries of ``valid_sizes`` for the range check (``None`` while torch traces them)."""
    return None if torch.compiler.is_compiling() else to_numpy(valid_sizes)


def as_sizes(valid_sizes, x: torch.Tensor, rank: int) -> torch.Tensor:
    """Checked ``valid_sizes`` (a tensor, NumPy array or list) as int64 ``(N, rank)`` on ``x``'s device."""
    v = torch.as_tensor(np.asarray(valid_sizes)) if not isinstance(valid_sizes, torch.Tensor) else valid_sizes
    return v.to(device=x.device, dtype=torch.int64).reshape(v.shape[0], rank)


def _sizes(valid_sizes: torch.Tensor, out, keep) -> torch.Tensor:
    """The ops' per-sample table ``(N, 2k)``: valid input lengths, then valid output lengths
    (the output size, or the sample's own length on an axis that keeps its size)."""
    outs = [valid_sizes[:, d] if k else torch.full_like(valid_sizes[:, d], o)
            for d, (o, k) in enumerate(zip(out, keep))]
    return torch.cat([valid_sizes, torch.stack(outs, 1)], 1)


def avg_pool(x: torch.Tensor, spec: PoolSpec, valid_sizes=None, keep=None) -> torch.Tensor:
    """Mean over each window; float16/bfloat16 accumulate in float32."""
    v, out = _logical(x, spec)
    if valid_sizes is not None:
        return _back(ops.avg_pool_valid(v, _sizes(valid_sizes, out, keep), out), spec)
    return _back(ops.avg_pool(v, out), spec)


def max_pool(x: torch.Tensor, spec: PoolSpec, return_indices: bool = False, valid_sizes=None, keep=None):
    """Max over each window (NaN propagates); indices are int64 flat offsets in the spatial plane."""
    require_supported(dtype_name(x), x.dtype not in _UNSUPPORTED, "adaptive_max_pool", name)
    v, out = _logical(x, spec)
    if valid_sizes is not None:
        values, indices = ops.max_pool_valid(v, _sizes(valid_sizes, out, keep), out)
    else:
        values, indices = ops.max_pool(v, out)
    return (_back(values, spec), _back(indices, spec)) if return_indices else _back(values, spec)


# --- more reductions ----------------------------------------------------------------------------


def lp_pool(x: torch.Tensor, spec: PoolSpec, norm_type: float, valid_sizes=None, keep=None) -> torch.Tensor:
    """``(Σ_window x^p)^(1/p)``, ``p = norm_type`` (torch's lp_pool conventions)."""
    v, out = _logical(x, spec)
    if valid_sizes is not None:
        return _back(portable.power_mean_valid(v, out, _sizes(valid_sizes, out, keep), float(norm_type), False,
                                               None), spec)
    return _back(ops.lp_pool(v, out, float(norm_type)), spec)


def gem_pool(x: torch.Tensor, spec: PoolSpec, p, eps: float, valid_sizes=None, keep=None) -> torch.Tensor:
    """``(mean_window max(x, eps)^p)^(1/p)``; a tensor ``p`` gets a gradient."""
    v, out = _logical(x, spec)
    if valid_sizes is not None:
        exponent = p.reshape(()) if isinstance(p, torch.Tensor) else float(p)
        return _back(portable.power_mean_valid(v, out, _sizes(valid_sizes, out, keep), exponent, True,
                                               float(eps)), spec)
    return _back(ops.gem_pool(v, out, p, float(eps)), spec)


def avgmax_pool(x: torch.Tensor, spec: PoolSpec, valid_sizes=None, keep=None) -> torch.Tensor:
    """``0.5·(avg + max)`` of each window, from one pass, rounded once (a padded batch: two pools)."""
    if valid_sizes is not None:
        acc = portable._acc_dtype(x.dtype)
        mean = avg_pool(x.to(acc), spec, valid_sizes, keep)  # not yet rounded to a half type
        return (0.5 * (mean + max_pool(x, spec, False, valid_sizes, keep).to(acc))).to(x.dtype)
    v, out = _logical(x, spec)
    return _back(ops.avgmax_pool(v, out, True)[0], spec)


def catavgmax_pool(x: torch.Tensor, spec: PoolSpec, valid_sizes=None, keep=None) -> torch.Tensor:
    """Averages then maxima along the channel axis (``2C`` channels), from one pass (a padded batch: two pools)."""
    if valid_sizes is not None:
        return torch.cat([avg_pool(x, spec, valid_sizes, keep), max_pool(x, spec, False, valid_sizes, keep)],
                         spec.channel_axis)
    v, out = _logical(x, spec)
    avg, values, _ = ops.avgmax_pool(v, out, False)
    return _back(torch.cat([avg, values], 1), spec)


def flatten(x: torch.Tensor) -> torch.Tensor:
    """Every axis after the first as one (timm's ``nn.Flatten(1)``)."""
    return x.flatten(1)
