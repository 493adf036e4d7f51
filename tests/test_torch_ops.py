"""The anypool:: custom ops under PyTorch's program machinery: compile, export, trace, autograd checks, determinism."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402
from torch.fx.experimental.proxy_tensor import make_fx  # noqa: E402

import anypool  # noqa: E402
from anypool.backends.torch import ops, portable  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
IMPLEMENTATIONS = [None, "portable"]  # the device's own path, and the portable one



def _both(x, size):
    """avg and max of a 2-D input through the public functions (what users compile)."""
    return anypool.adaptive_avg_pool2d(x, size) + anypool.adaptive_max_pool2d(x, size)


def _native_both(x, size):
    return F.adaptive_avg_pool2d(x, size) + F.adaptive_max_pool2d(x, size)


# --- torch.compile --------------------------------------------------------------------------------


def test_compile_fullgraph_inductor_forward_backward():
    torch._dynamo.reset()
    x = torch.randn(2, 3, 10, 11, requires_grad=True)
    compiled = torch.compile(lambda t: _both(t, (3, 5)), fullgraph=True)
    y = compiled(x)
    (gx,) = torch.autograd.grad(y.sum(), x)
    x2 = x.detach().requires_grad_()
    want = _native_both(x2, (3, 5))
    torch.testing.assert_close(y, want)
    torch.testing.assert_close(gx, torch.autograd.grad(want.sum(), x2)[0])


def test_compile_dynamic_shapes_do_not_recompile():
    """dynamic=True: new batch and spatial sizes reuse the graph (fake impls take SymInt sizes)."""
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: _both(t, (3, 4)), fullgraph=True, dynamic=True, backend="aot_eager")
    shapes = [(2, 3, 10, 11), (3, 4, 13, 17), (1, 2, 7, 6)]
    for i, shape in enumerate(shapes):
        x = torch.randn(shape, requires_grad=True)
        if i == 1:  # compiled once for the first shape; afterwards a recompile is an error
            torch.compiler.set_stance("fail_on_recompile")
        try:
            y = compiled(x)
            (gx,) = torch.autograd.grad(y.sum(), x)
        finally:
            torch.compiler.set_stance("default")
        x2 = x.detach().requires_grad_()
        want = _native_both(x2, (3, 4))
        torch.testing.assert_close(y, want)
        torch.testing.assert_close(gx, torch.autograd.grad(want.sum(), x2)[0])


@pytest.mark.parametrize("layout", ["1d", "3d", "channels_last", "nhwc", "unbatched"])
def test_compile_fullgraph_layouts(layout):
    """Compiled values and gradients against torch's own ops; the output layout as anypool's eager call."""
    torch._dynamo.reset()
    fn, native, x = {
        "1d": (lambda t: anypool.adaptive_max_pool1d(t, 4) * anypool.adaptive_avg_pool1d(t, 4),
               lambda t: F.adaptive_max_pool1d(t, 4) * F.adaptive_avg_pool1d(t, 4), torch.randn(2, 3, 9)),
        "3d": (lambda t: anypool.adaptive_avg_pool3d(t, (2, 3, 4)), lambda t: F.adaptive_avg_pool3d(t, (2, 3, 4)),
               torch.randn(2, 3, 5, 7, 6)),
        "channels_last": (lambda t: _both(t, (3, 4)), lambda t: _native_both(t, (3, 4)),
                          torch.randn(2, 3, 7, 9).contiguous(memory_format=torch.channels_last)),
        "nhwc": (lambda t: anypool.global_avg_pool(t, data_format="channels_last"), lambda t: t.mean(dim=(1, 2)),
                 torch.randn(2, 7, 9, 3)),
        "unbatched": (lambda t: anypool.adaptive_max_pool2d(t, (5, 2)), lambda t: F.adaptive_max_pool2d(t, (5, 2)),
                      torch.randn(3, 7, 9)),
    }[layout]
    x.requires_grad_()
    y = torch.compile(fn, fullgraph=True, backend="aot_eager")(x)
    (gx,) = torch.autograd.grad(y.sum(), x)
    assert y.stride() == fn(x.detach()).stride()
    x2 = x.detach().requires_grad_()
    want = native(x2)
    torch.testing.assert_close(y, want)
    torch.testing.assert_close(gx, torch.autograd.grad(want.sum(), x2)[0])


@torch._dynamo.config.patch(recompile_limit=64)  # one graph per output size and layout
def test_compiled_random_cases_against_reference():
    """torch.compile (dynamic shapes) on the harness' random cases: values, indices and gradients against
    the NumPy reference (max gradients placed by the reference's indices)."""
    from anypool import _harness

    torch._dynamo.reset()

    def pools(t, output_size, data_format):
        avg = anypool.adaptive_avg_pool(t, output_size, data_format=data_format)
        values, indices = anypool.adaptive_max_pool(t, output_size, data_format=data_format, return_indices=True)
        return avg, values, indices

    compiled = torch.compile(pools, fullgraph=True, dynamic=True, backend="aot_eager")
    cases = [c for c in _harness.random_cases(20, seed=61, dtypes=("float32", "float64"), long_length=80)
             if c.values != "special"]
    rng = torch.Generator().manual_seed(0)
    for case in cases:
        xn = case.input()
        x = _harness.restride(torch.from_numpy(xn), case.storage).requires_grad_()
        avg, values, indices = compiled(x, case.output_size, case.data_format)
        what = case.describe()
        _, problem = _harness.compare(case, "avg", avg.detach().numpy(), _harness.expected(case, xn, "avg"))
        assert problem is None, f"avg {what}: {problem}"
        want_max = _harness.expected(case, xn, "argmax")
        _, problem = _harness.compare(case, "argmax", (values.detach().numpy(), indices.numpy()), want_max)
        assert problem is None, f"argmax {what}: {problem}"
        if avg.numel() == 0:
            continue
        g_avg = torch.randn(avg.shape, generator=rng, dtype=x.dtype)
        g_max = torch.randn(values.shape, generator=rng, dtype=x.dtype)
        grad_avg = torch.autograd.grad(avg, x, g_avg, retain_graph=True)[0]
        grad_max = torch.autograd.grad(values, x, g_max)[0]
        for op, got, g in (("avg", grad_avg, g_avg), ("max", grad_max, g_max)):
            want = _harness.expected_gradient(case, op, g.numpy(), want_max[1])
            problem = want.problem(got.numpy(), case.dtype)
            assert problem is None, f"{op} grad {what}: {problem}"


# --- torch.export / jit.trace ---------------------------------------------------------------------


class _Net(torch.nn.Module):
    def forward(self, x):
        return anypool.adaptive_avg_pool2d(x, (3, 5)), anypool.adaptive_max_pool2d(x, (3, 5), return_indices=True)


def test_export_with_dynamic_batch_and_spatial_dims():
    """One exported program, exact at sizes other than the traced one (the native decomposition is not)."""
    dims = {"x": {0: torch.export.Dim("n"), 2: torch.export.Dim("h", min=2), 3: torch.export.Dim("w", min=2)}}
    program = torch.export.export(_Net(), (torch.randn(2, 3, 10, 11),), dynamic_shapes=dims)
    ops_used = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert {"anypool.adaptive_avg_pool.default", "anypool.adaptive_max_pool.default"} <= ops_used
    for shape in [(2, 3, 10, 11), (3, 3, 17, 23), (1, 3, 3, 40)]:
        x = torch.randn(shape)
        avg, (v, i) = program.module()(x)
        torch.testing.assert_close(avg, F.adaptive_avg_pool2d(x, (3, 5)))
        want_v, want_i = F.adaptive_max_pool2d(x, (3, 5), return_indices=True)
        assert torch.equal(v, want_v) and torch.equal(i, want_i)


def test_export_training_graph_has_backward_ops():
    x = torch.randn(2, 3, 10, 11, requires_grad=True)

    class Loss(torch.nn.Module):
        def forward(self, t):
            return (anypool.adaptive_avg_pool2d(t, 4) * anypool.adaptive_max_pool2d(t, 4)).sum()

    gm = make_fx(lambda t: torch.autograd.grad(Loss()(t), t))(x)
    targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert {"anypool.adaptive_avg_pool_backward.default", "anypool.adaptive_max_pool_backward.default"} <= targets


def test_jit_trace():
    x = torch.randn(2, 3, 10, 11)
    traced = torch.jit.trace(_Net(), (x,))
    assert "anypool::adaptive_avg_pool" in str(traced.graph)
    x2 = torch.randn(4, 3, 19, 7)  # another size than the traced one: the windows follow it
    avg, (v, i) = traced(x2)
    want_v, want_i = F.adaptive_max_pool2d(x2, (3, 5), return_indices=True)
    torch.testing.assert_close(avg, F.adaptive_avg_pool2d(x2, (3, 5)))
    assert torch.equal(v, want_v) and torch.equal(i, want_i)


def test_opcheck_schema_fake_and_autograd_registrations():
    """torch.library.opcheck: fake impl strides/dtypes match the real ones, autograd registered correctly."""
    samples = [
        torch.randn(2, 3, 7, 9, dtype=torch.float64),
        torch.randn(2, 3, 7, 9).contiguous(memory_format=torch.channels_last),
        torch.randn(2, 5, 13, dtype=torch.bfloat16),
        torch.randn(1, 2, 4, 6, 5, dtype=torch.float16),
    ]
    for x in samples:
        size = [3, 4, 2][: x.dim() - 2]
        grad = torch.randn((*x.shape[:2], *size), dtype=x.dtype)
        values, indices = ops.adaptive_max_pool(x, size)
        for op, args in [(ops.adaptive_avg_pool, (x.requires_grad_(), size)),
                         (ops.adaptive_max_pool, (x, size)),
                         (ops.adaptive_avg_pool_backward, (grad.requires_grad_(), list(x.shape[2:]))),
                         (ops.adaptive_max_pool_backward, (grad, indices, list(x.shape[2:])))]:
            torch.library.opcheck(op, args)
        x.requires_grad_(False)


def test_portable_path_traces_with_symbolic_sizes():
    """The portable functions themselves run on symbolic sizes: one traced graph serves other shapes."""
    x = torch.randn(2, 3, 10, 11)
    for fn, check in [
        (lambda t: portable.avg_forward(t, [3, 4]), lambda t, y: torch.testing.assert_close(
            y, F.adaptive_avg_pool2d(t, (3, 4)))),
        (lambda t: portable.max_forward(t, [3, 4])[1], lambda t, y: torch.testing.assert_close(
            y, F.adaptive_max_pool2d(t, (3, 4), return_indices=True)[1])),
        (lambda t: portable.avg_backward(t, [t.shape[2] * 2 + 1, t.shape[3] + 3]), None),
    ]:
        gm = make_fx(fn, tracing_mode="symbolic")(x)
        for shape in [(2, 3, 10, 11), (1, 2, 23, 5), (3, 1, 4, 7)]:
            t = torch.randn(shape)
            y = gm(t)
            if check:
                check(t, y)
            else:
                torch.testing.assert_close(y, portable.avg_backward(t, [shape[2] * 2 + 1, shape[3] + 3]))


# --- autograd checks ------------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS + ["portable-gather"])
@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_and_gradgradcheck(device, implementation, monkeypatch):
    # (shape, output_size, memory layouts): downsampling with overlaps, upsampling, 1-D/2-D/3-D
    cases = [((1, 2, 9), [4], ("contiguous",)), ((1, 2, 7, 9), [3, 4], ("contiguous", "channels_last")),
             ((1, 2, 3, 4), [5, 7], ("channels_last",)), ((1, 2, 3, 4, 5), [2, 2, 3], ("contiguous",))]
    gen = torch.Generator().manual_seed(0)
    if implementation == "portable-gather":
        monkeypatch.setattr(portable, "SCATTER_DEVICES", ())
        implementation = "portable"
    with ops.force_implementation(implementation):
        for shape, size, memories in cases:
            for memory in memories:
                x = torch.randn(shape, generator=gen, dtype=torch.float64)
                if memory == "channels_last":
                    x = x.movedim(1, -1).contiguous().movedim(-1, 1)
                x = x.to(device).requires_grad_()
                avg = lambda t, s=size: ops.adaptive_avg_pool(t, s)
                mx = lambda t, s=size: ops.adaptive_max_pool(t, s)[0]
                assert torch.autograd.gradcheck(avg, (x,))
                assert torch.autograd.gradgradcheck(avg, (x,))
                assert torch.autograd.gradcheck(mx, (x,))  # distinct random values: no ties within eps
                if len(size) == 2:
                    assert torch.autograd.gradgradcheck(mx, (x,))


# --- determinism ----------------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS + ["portable-gather"])
@pytest.mark.parametrize("device", DEVICES)
def test_backward_is_deterministic(device, implementation, monkeypatch):
    """Bitwise identical gradients run to run, and no error under use_deterministic_algorithms(True)."""
    if implementation == "portable-gather":  # the atomic-free max backward other devices use
        monkeypatch.setattr(portable, "SCATTER_DEVICES", ())
        implementation = "portable"
    x = torch.randint(-2, 3, (2, 8, 37, 29), dtype=torch.float32).to(device)  # many ties: overlapping argmaxes
    xs = [x, x.contiguous(memory_format=torch.channels_last)]
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with ops.force_implementation(implementation):
            for t in xs:
                for size in [(5, 7), (40, 31), (1, 1)]:
                    results = []
                    for _ in range(3):
                        leaf = t.detach().requires_grad_()
                        y = anypool.adaptive_avg_pool2d(leaf, size) * 3 + anypool.adaptive_max_pool2d(leaf, size)
                        g = torch.linspace(-1, 1, y.numel(), device=device).reshape(y.shape) ** 3
                        results.append(torch.autograd.grad(y, leaf, g)[0])
                    assert all(torch.equal(results[0], r) for r in results[1:])
    finally:
        torch.use_deterministic_algorithms(before)


def test_ops_pick_the_implementation_table():
    """The device table is the single switch: an unknown device type falls back to portable."""
    assert set(ops.IMPLEMENTATIONS) >= {"cpu", "cuda"}
    x = torch.randn(1, 1, 4, 4)
    with ops.force_implementation("portable"):
        assert ops.implementation(x, [2, 2]) is portable
    assert ops.implementation(torch.randn(1, 1, 4, 4, device="meta"), [2, 2]) is portable


def test_first_call_inside_compile_has_no_graph_break():
    """A fresh process whose first anypool call is inside torch.compile(fullgraph=True) (no import to trace)."""
    import os
    import subprocess
    import sys

    code = ("import torch, anypool\n"
            "f = torch.compile(lambda t: anypool.adaptive_max_pool2d(t, 3), fullgraph=True, backend='eager')\n"
            "print(f(torch.randn(1, 2, 7, 7)).shape)\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "torch.Size([1, 2, 3, 3])" in done.stdout
