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
