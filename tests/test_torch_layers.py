"""anypool.layers.torch: drop-in twins of torch.nn's adaptive pools, global pools, and convert(model)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

import anypool  # noqa: E402
from anypool.layers import torch as layers  # noqa: E402

TWINS = [
    (nn.AdaptiveAvgPool1d, layers.AdaptiveAvgPool1d, (2, 3, 17), [5, 1, 20, None]),
    (nn.AdaptiveAvgPool2d, layers.AdaptiveAvgPool2d, (2, 3, 11, 13), [5, (3, 4), (None, 6), (20, 1)]),
    (nn.AdaptiveAvgPool3d, layers.AdaptiveAvgPool3d, (2, 3, 5, 7, 6), [2, (3, None, 4), (7, 1, 9)]),
    (nn.AdaptiveMaxPool1d, layers.AdaptiveMaxPool1d, (2, 3, 17), [5, 1, 20]),
    (nn.AdaptiveMaxPool2d, layers.AdaptiveMaxPool2d, (2, 3, 11, 13), [5, (3, 4), (None, 6), (20, 1)]),
    (nn.AdaptiveMaxPool3d, layers.AdaptiveMaxPool3d, (2, 3, 5, 7, 6), [2, (3, None, 4), (7, 1, 9)]),
]



def _args(native_cls, size):
    # torch's 1-D layers take no None; the twin accepts what the original accepts
    return (17 if size is None else size,) if native_cls in (nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d) else (size,)


@pytest.mark.parametrize("native_cls, twin_cls, shape, sizes", TWINS, ids=lambda v: getattr(v, "__name__", ""))
def test_twin_matches_torch_nn(native_cls, twin_cls, shape, sizes):
    is_max = "Max" in native_cls.__name__
    for size in sizes:
        kwargs = [{}, {"return_indices": True}] if is_max else [{}]
        for kw in kwargs:
            native, twin = native_cls(*_args(native_cls, size), **kw), twin_cls(*_args(native_cls, size), **kw)
            assert isinstance(twin, native_cls)
            assert repr(twin) == repr(native) and twin.extra_repr() == native.extra_repr()
            assert twin.state_dict() == native.state_dict() == {}
            for x in (torch.randn(shape, requires_grad=True), torch.randn(shape[1:], requires_grad=True)):
                got, want = twin(x), native(x)
                if kw:
                    assert torch.equal(got[1], want[1])
                    got, want = got[0], want[0]
                torch.testing.assert_close(got, want)
                g = torch.randn_like(want)
                torch.testing.assert_close(torch.autograd.grad(got, x, g)[0], torch.autograd.grad(want, x, g)[0])


def test_global_pools():
    x = torch.randn(2, 5, 7, 9)
    torch.testing.assert_close(layers.GlobalAvgPool()(x), x.mean((2, 3)))
    torch.testing.assert_close(layers.GlobalAvgPool(flatten=False)(x), x.mean((2, 3), keepdim=True))
    torch.testing.assert_close(layers.GlobalMaxPool()(x), x.amax((2, 3)))
    nhwc = x.permute(0, 2, 3, 1).contiguous()
    torch.testing.assert_close(layers.GlobalMaxPool(data_format="channels_last")(nhwc), x.amax((2, 3)))
    assert layers.GlobalAvgPool(False, "channels_last")(nhwc).shape == (2, 1, 1, 5)
    x3 = torch.randn(2, 4, 3, 5, 6)
    torch.testing.assert_close(layers.GlobalAvgPool()(x3), x3.mean((2, 3, 4)))
    assert repr(layers.GlobalAvgPool()) == "GlobalAvgPool(flatten=True, data_format='channels_first')"
    assert layers.GlobalMaxPool().state_dict() == {}
    with pytest.raises(ValueError, match="data_format"):
        layers.GlobalAvgPool(data_format="NHWC")
    with pytest.raises(ValueError, match="spatial axes"):
        layers.GlobalAvgPool()(torch.randn(2, 5))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveMaxPool2d((6, 5)))
        self.head = nn.Sequential(nn.Conv2d(8, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.side = nn.AdaptiveAvgPool1d(3)

    def forward(self, x):
        y = self.head(self.features(x))
        return y + self.side(y[:, None, :]).sum(-1)


def test_convert_swaps_every_pool_in_place():
    torch.manual_seed(0)
    model = _Net().eval()
    pools = {name: m for name, m in model.named_modules() if "Adaptive" in type(m).__name__}
    calls = []
    handle = model.features[2].register_forward_hook(lambda mod, inp, out: calls.append(out.shape))
    x = torch.randn(2, 3, 15, 14)
    want = model(x)
    converted = layers.convert(model)
    assert converted is model and not model.training
    for name, m in model.named_modules():
        if name in pools:
            assert m is pools[name], "the same module objects stay in the model"
            assert type(m).__module__ == "anypool.layers.torch"
    calls.clear()
    torch.testing.assert_close(model(x), want)
    assert calls == [torch.Size([2, 8, 6, 5])], "forward hooks survive the swap"
    handle.remove()
    assert layers.convert(model) is model  # idempotent
    single = nn.AdaptiveMaxPool2d(3, return_indices=True).train()
    assert layers.convert(single) is single and isinstance(single, layers.AdaptiveMaxPool2d) and single.training


def test_convert_leaves_other_modules_and_subclasses_alone():
    class Custom(nn.AdaptiveAvgPool2d):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(Custom(2), nn.BatchNorm2d(3), nn.MaxPool2d(2))
    layers.convert(model)
    assert [type(m) for m in model] == [Custom, nn.BatchNorm2d, nn.MaxPool2d]


def test_converted_model_compiles_without_graph_breaks():
    torch._dynamo.reset()
    model = layers.convert(_Net())
    x = torch.randn(2, 3, 15, 14, requires_grad=True)
    y = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(y, model(x))
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_layers_use_anypool_ops():
    """The twins run through anypool (the exported graph holds its ops, not aten's adaptive pools)."""
    model = layers.convert(_Net())
    program = torch.export.export(model, (torch.randn(2, 3, 15, 14),))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "anypool.adaptive_max_pool.default" in targets and "anypool.adaptive_avg_pool.default" in targets
    assert not any("adaptive" in t and "aten" in t for t in targets)
    assert anypool.__version__
