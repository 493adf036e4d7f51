"""``torch.nn`` twins of PyTorch's adaptive pools, backed by anypool, and :func:`convert`.

Each twin subclasses its ``torch.nn`` original and only replaces ``forward``, so the
constructor arguments, ``extra_repr``, ``state_dict`` (empty) and ``isinstance``
checks are exactly torch's; the numbers are torch's too, computed by anypool
(deterministic backward on every device, ``torch.compile``/``torch.export`` safe).
``forward(input, valid_sizes=None)`` also pools padded batches: ``valid_sizes`` ``(N, k)``
gives each sample's unpadded spatial size (see :mod:`anypool`).

    >>> model = anypool.layers.torch.convert(torchvision.models.resnet18())   # in place
"""

from __future__ import annotations

import torch
from torch import nn

import anypool
from anypool.backends import torch as _backend  # noqa: F401  (imported here, not inside a compiled forward)

__all__ = [
    "AdaptiveAvgPool1d", "AdaptiveAvgPool2d", "AdaptiveAvgPool3d",
    "AdaptiveMaxPool1d", "AdaptiveMaxPool2d", "AdaptiveMaxPool3d",
    "GlobalAvgPool", "GlobalMaxPool", "convert",
    "AdaptiveLPPool1d", "AdaptiveLPPool2d", "AdaptiveLPPool3d",
    "AdaptiveGeMPool1d", "AdaptiveGeMPool2d", "AdaptiveGeMPool3d", "SelectAdaptivePool2d",
]


class AdaptiveAvgPool1d(nn.AdaptiveAvgPool1d):
    """``(N, C, L)`` or ``(C, L)`` → ``(…, output_size)``; as :class:`torch.nn.AdaptiveAvgPool1d`."""

    def forward(self, input: torch.Tensor, valid_sizes=None) -> torch.Tensor:
        return anypool.adaptive_avg_pool1d(input, self.output_size, valid_sizes=valid_sizes)


class AdaptiveAvgPool2d(nn.AdaptiveAvgPool2d):
    """``(N, C, H, W)`` or ``(C, H, W)`` → ``(…, *output_size)``; as :class:`torch.nn.AdaptiveAvgPool2d`."""

    def forward(self, input: torch.Tensor, valid_sizes=None) -> torch.Tensor:
        return anypool.adaptive_avg_pool2d(input, self.output_size, valid_sizes=valid_sizes)


class AdaptiveAvgPool3d(nn.AdaptiveAvgPool3d):
    """``(N, C, D, H, W)`` or ``(C, D, H, W)``; as :class:`torch.nn.AdaptiveAvgPool3d`."""

    def forward(self, input: torch.Tensor, valid_sizes=None) -> torch.Tensor:
        return anypool.adaptive_avg_pool3d(input, self.output_size, valid_sizes=valid_sizes)


class AdaptiveMaxPool1d(nn.AdaptiveMaxPool1d):
    """As :class:`torch.nn.AdaptiveMaxPool1d` (``return_indices`` gives int64 flat offsets)."""

    def forward(self, input: torch.Tensor, valid_sizes=None):
        return anypool.adaptive_max_pool1d(input, self.output_size, return_indices=self.return_indices,
                                            valid_sizes=valid_sizes)


class AdaptiveMaxPool2d(nn.AdaptiveMaxPool2d):
    """As :class:`torch.nn.AdaptiveMaxPool2d` (``return_indices`` gives int64 flat offsets)."""

    def forward(self, input: torch.Tensor, valid_sizes=None):
        return anypool.adaptive_max_pool2d(input, self.output_size, return_indices=self.return_indices,
                                            valid_sizes=valid_sizes)


class AdaptiveMaxPool3d(nn.AdaptiveMaxPool3d):
    """As :class:`torch.nn.AdaptiveMaxPool3d` (``return_indices`` gives int64 flat offsets)."""

    def forward(self, input: torch.Tensor, valid_sizes=None):
        return anypool.adaptive_max_pool3d(input, self.output_size, return_indices=self.return_indices,
                                            valid_sizes=valid_sizes)


class _GlobalPool(nn.Module):
    _reduce: str

    def __init__(self, flatten: bool = True, data_format: str = "channels_first") -> None:
        super().__init__()
        anypool._args.check_data_format(data_format, type(self).__name__)
        self.flatten = flatten
        self.data_format = data_format

    def forward(self, input: torch.Tensor, valid_sizes=None) -> torch.Tensor:
        pool = anypool.global_avg_pool if self._reduce == "avg" else anypool.global_max_pool
        return pool(input, data_format=self.data_format, keepdims=not self.flatten, valid_sizes=valid_sizes)

    def extra_repr(self) -> str:
        return f"flatten={self.flatten}, data_format={self.data_format!r}"


class GlobalAvgPool(_GlobalPool):
    """Mean over every spatial axis of a batch: ``(N, C, *S)`` / ``(N, *S, C)`` → ``(N, C)``.

    ``flatten=False`` keeps the spatial axes with length 1 (like timm's
    ``SelectAdaptivePool2d(flatten=False)``).  Any spatial rank.
    """

    _reduce = "avg"


class GlobalMaxPool(_GlobalPool):
    """Max over every spatial axis of a batch; shapes as :class:`GlobalAvgPool`."""

    _reduce = "max"


_TWINS: dict[type, type] = {
    nn.AdaptiveAvgPool1d: AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d: AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d: AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d: AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d: AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d: AdaptiveMaxPool3d,
}


def convert(module: nn.Module) -> nn.Module:
    """Swap every ``torch.nn`` adaptive pool in ``module`` for its anypool twin, in place; returns ``module``.

    The swap changes each pool's class only (a twin adds no state), so the same
    objects stay in the model: hooks, training mode, attributes and any outside
    reference to them are kept.  Subclasses of the torch.nn pools are left alone
    (their ``forward`` may be their own).
    """
    for sub in module.modules():
        twin = _TWINS.get(type(sub))
        if twin is not None:
            sub.__class__ = twin
    return module


# --- more reductions ----------------------------------------------------------------------------


class _AdaptiveLPPool(nn.Module):
    _rank: int

    def __init__(self, norm_type: float, output_size) -> None:
        super().__init__()
        name = type(self).__name__
        if anypool._args.positive_exponent(norm_type, f"{name}(norm_type)") is None:
            raise anypool._args.number_expected(norm_type, f"{name}(norm_type)")
        self.norm_type = float(norm_type)
        self.output_size = output_size

    def forward(self, input: torch.Tensor, valid_sizes=None) -> torch.Tensor:
        return getattr(anypool, f"adaptive_lp_pool{self._rank}d")(input, self.norm_type, self.output_size,
                                                                 valid_sizes=valid_sizes)

    def extra_repr(self) -> str:
        return f"norm_type={self.norm_type}, output_size={self.output_size}"


class AdaptiveLPPool1d(_AdaptiveLPPool):
    """``(Σ_window x^p)^(1/p)`` over adaptive windows (:func:`anypool.adaptive_lp_pool1d`): ``(N, C, L)``."""

    _rank = 1


class AdaptiveLPPool2d(_AdaptiveLPPool):
    """LP pooling over adaptive windows (:func:`anypool.adaptive_lp_pool2d`): ``(N, C, H, W)`` or ``(C, H, W)``."""

    _rank = 2


class AdaptiveLPPool3d(_AdaptiveLPPool):
    """LP pooling over adaptive windows (:func:`anypool.adaptive_lp_pool3d`): ``(N, C, D, H, W)``."""

    _rank = 3


class _AdaptiveGeMPool(nn.Module):
    _rank: int

    def __init__(self, output_size=1, p: float = 3.0, eps: float = 1e-6, p_trainable: bool = True) -> None:
        super().__init__()
        name = type(self).__name__
        if anypool._args.positive_exponent(p, f"{name}(p)") is None:
            raise anypool._args.number_expected(p, f"{name}(p)")
        self.output_size = output_size
        self.eps = anypool._args.positive_eps(eps, f"{name}(eps)")
        self.p = nn.Parameter(torch.tensor(float(p))) if p_trainable else float(p)

    def forward(self, input: torch.Tensor, valid_sizes=None) -> torch.Tensor:
        return getattr(anypool, f"adaptive_gem_pool{self._rank}d")(input, self.output_size, p=self.p, eps=self.eps,
                                                                  valid_sizes=valid_sizes)

    def extra_repr(self) -> str:
        p = f"{float(self.p.detach()):.4g} (trainable)" if isinstance(self.p, nn.Parameter) else f"{self.p}"
        return f"output_size={self.output_size}, p={p}, eps={self.eps}"


class AdaptiveGeMPool1d(_AdaptiveGeMPool):
    """Generalised-mean pooling ``(mean_window max(x, eps)^p)^(1/p)`` (:func:`anypool.adaptive_gem_pool1d`).

    ``p`` is an ``nn.Parameter`` (a scalar, learnt with the model) unless ``p_trainable=False``.
    """

    _rank = 1


class AdaptiveGeMPool2d(_AdaptiveGeMPool):
    """Generalised-mean pooling of ``(N, C, H, W)``; ``p`` learnable as in :class:`AdaptiveGeMPool1d`."""

    _rank = 2


class AdaptiveGeMPool3d(_AdaptiveGeMPool):
    """Generalised-mean pooling of ``(N, C, D, H, W)``; ``p`` learnable as in :class:`AdaptiveGeMPool1d`."""

    _rank = 3


class SelectAdaptivePool2d(nn.Module):
    """timm's ``SelectAdaptivePool2d``, same arguments, anypool's windows and kernels.

    ``pool_type``: ``'avg'``, ``'max'``, ``'avgmax'``, ``'catavgmax'`` (``2C`` output channels),
    ``'fast…'`` (a global pool: ``output_size`` must be 1; ``'fast'`` is avg) or ``''`` (no pooling).
    ``input_fmt``: ``'NCHW'`` or ``'NHWC'`` (any output size, where timm's NHWC is global only).
    ``flatten`` flattens every axis after the batch axis.  ``feat_mult()`` is the channel factor (2 for
    catavgmax) and ``is_identity()`` whether it pools at all, as a timm classifier head asks.
    """

    def __init__(self, output_size=1, pool_type: str = "fast", flatten: bool = False, input_fmt: str = "NCHW") -> None:
        super().__init__()
        name = type(self).__name__
        kind = anypool._args.pool_type(pool_type, name)
        if kind.startswith("fast"):
            anypool._args.fast_output_size(output_size, kind, name)
        self.data_format = anypool._args.input_fmt(input_fmt, name)
        self.input_fmt = input_fmt
        self.pool_type = pool_type or ""
        self.output_size = output_size
        self.flatten = bool(flatten)

    def forward(self, x: torch.Tensor, valid_sizes=None) -> torch.Tensor:
        return anypool.select_adaptive_pool2d(x, self.pool_type, self.output_size, self.flatten,
                                              data_format=self.data_format, valid_sizes=valid_sizes)

    def is_identity(self) -> bool:
        return not self.pool_type

    def feat_mult(self) -> int:
        return anypool._args.feat_mult(self.pool_type.lower())

    def extra_repr(self) -> str:
        return (f"output_size={self.output_size}, pool_type={self.pool_type!r}, flatten={self.flatten}, "
                f"input_fmt={self.input_fmt!r}")
