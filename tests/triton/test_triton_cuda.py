"""The Triton kernels on a real GPU: the differential harness at scale, PyTorch's native
CUDA op, bitwise-deterministic backward, tensors beyond 2**31 elements and the public
API under ``torch.use_deterministic_algorithms(True)`` and ``torch.compile``.

Skipped without CUDA (and under ``TRITON_INTERPRET=1``); ``benchmarks/gpu_run.sh`` runs it.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from anypool import _harness  # noqa: E402
from anypool.backends.torch import triton as tk  # noqa: E402

if tk._INTERPRETED or not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU and compiled (not interpreted) Triton", allow_module_level=True)

import torch.nn.functional as F  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _logical(case, x):
    t = torch.from_numpy(x).to(DTYPES[case.dtype]).cuda()
    spec = case.spec
    if spec.channels_last:
        t = t.movedim(-1, 1 if spec.batched else 0)
    return t if spec.batched else t.unsqueeze(0)


def _numpy(t):
    t = t.cpu()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def _bits(t):
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


@pytest.mark.parametrize("seed", range(4))
def test_harness_values_indices_and_gradients(seed):
    """400 random cases (every layout/dtype/value kind; lengths up to 48, 16 in 3-D) against the NumPy reference."""
    dtypes = ("float16", "bfloat16", "float32")
    cases = _harness.random_cases(70, seed=1000 + seed, ranks=(1, 2), dtypes=dtypes, max_length=48) + \
        _harness.random_cases(30, seed=2000 + seed, ranks=(3,), dtypes=dtypes, max_length=16)
    for case in cases:
        x = case.input()
        t = _logical(case, x)
        out = case.spec.output_size
        logical = _harness.Case(tuple(t.shape), tuple(out), "channels_first", case.dtype, case.values, case.seed)
        tn = _numpy(t)
        avg = tk.avg_forward(t, out)
        values, indices = tk.max_forward(t, out)
        want_max = _harness.expected(logical, tn, "argmax")
        for op, got, want in (("avg", avg, _harness.expected(logical, tn, "avg")),
                              ("argmax", (values, indices), want_max)):
            got = tuple(map(_numpy, got)) if op == "argmax" else _numpy(got)
            _, problem = _harness.compare(logical, op, got, want)
            assert problem is None, f"{op} {case.describe()}: {problem}"
        # gradients accumulated in float32 and rounded once; the max gradient placed by the reference's indices
        g = torch.randn(avg.shape, device="cuda").to(DTYPES[case.dtype])
        g64 = _numpy(g).astype(np.float64)
        for op, got in (("avg", tk.avg_backward(g, t.shape[2:])), ("max", tk.max_backward(g, indices, t.shape[2:]))):
            want = _harness.expected_gradient(logical, op, g64, want_max[1])
            problem = want.problem(_numpy(got).astype(np.float64), case.dtype)
            assert problem is None, f"{op} grad {case.describe()}: {problem}"


NATIVE_CASES = [
    ((8, 64, 224, 224), (7, 7)), ((32, 512, 14, 14), (7, 7)), ((64, 2048, 7, 7), (1, 1)), ((8, 64, 100, 100), (33, 33)),
    ((32, 64, 5, 5), (7, 7)), ((16, 256, 37, 53), (5, 9)), ((64, 256, 1000), (333,)), ((4, 64, 16, 56, 56), (4, 7, 7)),
    ((2, 32, 9, 33, 33), (4, 5, 6)), ((4, 8, 3000, 7), (2, 3)),
]


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape,out", NATIVE_CASES)
def test_against_native_cuda(shape, out, channels_last):
    """Values and indices equal PyTorch's own CUDA kernels (avg to rounding), forward and backward."""
    x = torch.randn(shape, device="cuda")
    if channels_last:
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
    rank = len(out)
    avg = getattr(F, f"adaptive_avg_pool{rank}d")
    mx = getattr(F, f"adaptive_max_pool{rank}d")
    size = out if rank > 1 else out[0]
    torch.testing.assert_close(tk.avg_forward(x, out), avg(x, size), rtol=1e-5, atol=1e-5)
    values, indices = tk.max_forward(x, out)
    want_v, want_i = mx(x, size, return_indices=True)
    assert torch.equal(values, want_v) and torch.equal(indices, want_i)
    g = torch.randn(values.shape, device="cuda")
    xr = x.detach().requires_grad_()
    avg(xr, size).backward(g)
    torch.testing.assert_close(tk.avg_backward(g, x.shape[2:]), xr.grad, rtol=1e-5, atol=1e-5)
    xr.grad = None
    mx(xr, size).backward(g)
    torch.testing.assert_close(tk.max_backward(g, indices, x.shape[2:]), xr.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape,out", [((16, 64, 56, 56), (7, 7)), ((16, 64, 13, 17), (40, 50)),
                                       ((8, 32, 9, 33, 33), (4, 5, 6)), ((64, 256, 1000), (333,))])
def test_backward_bitwise_deterministic(shape, out, channels_last, dtype):
    x = torch.randn(shape, device="cuda", dtype=dtype)
    if channels_last:
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
    values, indices = tk.max_forward(x, out)
    g = torch.randn(values.shape, device="cuda", dtype=dtype)
    for f in (lambda: tk.avg_backward(g, x.shape[2:]), lambda: tk.max_backward(g, indices, x.shape[2:])):
        first = _bits(f())
        for _ in range(3):
            assert torch.equal(first, _bits(f()))


def test_beyond_int32_offsets():
    """A tensor of more than 2**31 elements: channel 1 lies past 2**31 and must match the same
    kernels run on that channel alone (int32 offsets), bit for bit."""
    free, _ = torch.cuda.mem_get_info()
    if free < 20 * 2**30:
        pytest.skip("needs 20 GiB of free GPU memory")
    x = torch.randn(1, 2, 2**15, 2**15 + 64, device="cuda", dtype=torch.float16)
    assert x.numel() > 2**31 and tk._needs_int64((x,), (1, *x.shape[2:]), (1, 5, 7))
    part = x[:, 1:].contiguous()
    for f in (lambda t: tk.avg_forward(t, (5, 7)), lambda t: tk.max_forward(t, (5, 7))[0],
              lambda t: tk.max_forward(t, (5, 7))[1]):
        assert torch.equal(f(x)[:, 1:], f(part))
    g = torch.randn(1, 2, 5, 7, device="cuda", dtype=torch.float16)
    dx = tk.avg_backward(g, x.shape[2:])
    assert torch.equal(dx[:, 1:], tk.avg_backward(g[:, 1:].contiguous(), x.shape[2:]))
    del dx
    _, indices = tk.max_forward(x, (5, 7))
    dx = tk.max_backward(g, indices, x.shape[2:])
    assert torch.equal(dx[:, 1:], tk.max_backward(g[:, 1:].contiguous(), indices[:, 1:].contiguous(), x.shape[2:]))


def _public_api():
    import anypool
    try:
        import anypool.backends.torch  # noqa: F401  (the torch backend, another branch)
    except ImportError:
        pytest.skip("anypool's torch backend is not in this checkout")
    return anypool


@pytest.mark.parametrize("reduce", ["avg", "max"])
def test_public_api_deterministic_mode(reduce):
    """Through anypool's public API on CUDA: backward runs under use_deterministic_algorithms(True)
    (PyTorch's own CUDA backward refuses to) and is bitwise reproducible."""
    anypool = _public_api()
    fn = anypool.adaptive_avg_pool2d if reduce == "avg" else anypool.adaptive_max_pool2d
    x = torch.randn(8, 64, 37, 53, device="cuda")
    g = torch.randn(8, 64, 5, 9, device="cuda")
    grads = []
    with torch.use_deterministic_algorithms(True):
        for _ in range(2):
            xr = x.clone().requires_grad_()
            fn(xr, (5, 9)).backward(g)
            grads.append(xr.grad)
    assert torch.equal(grads[0], grads[1])
    native = F.adaptive_avg_pool2d if reduce == "avg" else F.adaptive_max_pool2d
    xr = x.clone().requires_grad_()
    native(xr, (5, 9)).backward(g)
    torch.testing.assert_close(grads[0], xr.grad, rtol=1e-5, atol=1e-5)


def test_public_api_torch_compile_fullgraph():
    anypool = _public_api()

    def f(x):
        return anypool.adaptive_avg_pool2d(x, (5, 9)) + anypool.adaptive_max_pool2d(x, (5, 9))

    x = torch.randn(4, 32, 37, 53, device="cuda", requires_grad=True)
    compiled = torch.compile(f, fullgraph=True)
    got = compiled(x)
    want = F.adaptive_avg_pool2d(x, (5, 9)) + F.adaptive_max_pool2d(x, (5, 9))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got.sum().backward()
    grad = x.grad.clone()
    x.grad = None
    want.sum().backward()
    torch.testing.assert_close(grad, x.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
def test_sizes_against_native_per_sample(channels_last):
    """A padded batch with per-sample sizes equals native CUDA pooling of each cropped sample (values, indices
    mapped into the padded plane, gradients; 0 on the padding)."""
    gen = torch.Generator().manual_seed(5)
    n, c, padded, out = 12, 32, (40, 33), (7, 5)
    valid = torch.stack([torch.randint(1, s + 1, (n,), generator=gen) for s in padded], 1)
    valid[0] = torch.tensor(padded)
    valid[1] = 1
    sizes = torch.cat([valid, torch.tensor(out).expand(n, 2)], 1).cuda()
    x = torch.randn(n, c, *padded, generator=gen).cuda()
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    avg = tk.avg_forward(x, out, sizes=sizes)
    values, indices = tk.max_forward(x, out, sizes=sizes)
    g = torch.randn(avg.shape, generator=gen).cuda()
    ga = tk.avg_backward(g, padded, sizes=sizes)
    gm = tk.max_backward(g, indices, padded, sizes=sizes)
    for i, (h, w) in enumerate(valid.tolist()):
        crop = x[i:i + 1, :, :h, :w].detach().clone().requires_grad_()
        want = F.adaptive_avg_pool2d(crop, out)
        torch.testing.assert_close(avg[i:i + 1], want, rtol=2e-6, atol=2e-6)
        (want * g[i:i + 1]).sum().backward()
        torch.testing.assert_close(ga[i:i + 1, :, :h, :w], crop.grad, rtol=2e-6, atol=2e-6)
        assert ga[i, :, h:].abs().sum() == 0 and ga[i, :, :, w:].abs().sum() == 0
        want_v, want_i = F.adaptive_max_pool2d(crop.detach(), out, return_indices=True)
        assert torch.equal(values[i:i + 1], want_v)
        assert torch.equal(indices[i:i + 1], (want_i // w) * padded[1] + want_i % w)
        assert gm[i, :, h:].abs().sum() == 0 and gm[i, :, :, w:].abs().sum() == 0


@pytest.mark.parametrize("channels_last", [False, True])
def test_reductions_against_native_composites(channels_last):
    """avgmax, GeM (with dL/dp) and LP (libdevice's pow on the GPU) against torch's composites in float64."""
    x = torch.rand(8, 48, 29, 31, generator=torch.Generator().manual_seed(6)).cuda() + 0.05
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    out = (7, 6)
    x64 = x.double().requires_grad_()
    first, values, indices = tk.avgmax_forward(x, out, True)
    want = 0.5 * (F.adaptive_avg_pool2d(x64, out) + F.adaptive_max_pool2d(x64, out))
    torch.testing.assert_close(first.double(), want, rtol=1e-6, atol=1e-6)
    g = torch.randn(first.shape, generator=torch.Generator().manual_seed(7)).cuda()
    (want * g.double()).sum().backward()
    grad = tk.avgmax_backward(0.5 * g, 0.5 * g, indices, x.shape[2:])
    torch.testing.assert_close(grad.double(), x64.grad, rtol=1e-5, atol=1e-6)
    for p in (3.0, 2.7):
        x64 = x.double().requires_grad_()
        p64 = torch.tensor(p, dtype=torch.float64, device="cuda", requires_grad=True)
        want = F.adaptive_avg_pool2d(x64.clamp(1e-6).pow(p64), out).pow(1 / p64)
        torch.testing.assert_close(tk.gem_forward(x, out, p, 1e-6).double(), want, rtol=1e-5, atol=1e-6)
        (want * g.double()).sum().backward()
        gx, gp = tk.gem_backward(g, x, p, 1e-6, True)
        torch.testing.assert_close(gx.double(), x64.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(gp, p64.grad, rtol=1e-4, atol=1e-5)
    x64 = x.double().requires_grad_()
    lp_x = x[..., :28, :30]  # divisible: native lp_pool2d's fixed windows are the adaptive ones
    lp = tk.lp_forward(lp_x, (7, 6), 2.5)
    want = F.lp_pool2d(x64[..., :28, :30], 2.5, (4, 5))
    torch.testing.assert_close(lp.double(), want, rtol=1e-5, atol=1e-6)
