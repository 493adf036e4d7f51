"""ONNX export (anypool.onnx): exported graphs checked in ONNX Runtime against the NumPy reference.

Every exported model is run at many input sizes it was not traced with (dynamic shapes),
including non-divisible sizes, upsampling (O > L) and size-1 axes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
torch = pytest.importorskip("torch")

import anypool  # noqa: E402
import anypool.onnx as aox  # noqa: E402
from anypool import _args, _harness  # noqa: E402
from anypool.backends import numpy as reference  # noqa: E402
from anypool.backends import onnx as graphs  # noqa: E402

OUTPUT_SIZES = {1: (5,), 2: (3, 7), 3: (2, 3, 4)}


class Pool(torch.nn.Module):
    def __init__(self, op: str, output_size):
        super().__init__()
        self.op, self.output_size = op, output_size

    def forward(self, x):
        if self.op == "avg":
            return anypool.adaptive_avg_pool(x, self.output_size)
        return anypool.adaptive_max_pool(x, self.output_size, return_indices=True)


def reference_fn(op: str, output_size):
    def fn(x):
        spec = _args.pool_spec(x.shape, output_size, len(output_size))
        if op == "avg":
            return reference.avg_pool(x.astype(np.float64), spec)
        return reference.max_pool(x, spec, return_indices=True)

    return fn


def random_shapes(rank: int, n: int, seed: int, batch=True) -> list[tuple[int, ...]]:
    """Spatial sizes 1..max: size-1 axes, non-divisible sizes and O > L all occur; N and C vary."""
    rng = np.random.default_rng(seed)
    top = {1: 40, 2: 20, 3: 9}[rank]
    shapes = [(1, 2) + (1,) * rank, (2, 3) + tuple(2 * o for o in OUTPUT_SIZES[rank])]
    while len(shapes) < n:
        spatial = tuple(int(rng.choice([1, rng.integers(1, top + 1)])) for _ in range(rank))
        shapes.append(((int(rng.integers(1, 4)) if batch else 2), int(rng.integers(1, 4))) + spatial)
    return shapes


def make_input(values: str):
    def fn(shape, rng):
        if values == "ties":
            return rng.integers(-2, 3, shape).astype(np.float32)
        x = (rng.standard_normal(shape) * 4).astype(np.float32)
        if values == "special":
            flat = x.reshape(-1)
            for v in (np.nan, np.inf, -np.inf):
                flat[rng.choice(flat.size, max(1, flat.size // 15))] = v
        return x

    return fn


def _exported(tmp_path, op, rank, dynamic: bool, example_spatial):
    output_size = OUTPUT_SIZES[rank]
    x = torch.randn(2, 3, *example_spatial)
    dims = {0: "N", 1: "C", **{2 + i: f"S{i}" for i in range(rank)}} if dynamic else None
    path = tmp_path / f"{op}{rank}d.onnx"
    aox.export(Pool(op, output_size), (x,), path, dynamic_shapes=(dims,) if dynamic else None)
    return path


@pytest.mark.parametrize("op", ["avg", "max"])
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_dynamic_export_exact_at_every_size(tmp_path, op, rank):
    path = _exported(tmp_path, op, rank, True, [7, 6, 5][:rank])
    model = onnx.load(path)
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}, "standard ONNX ops only"
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)
    fn = reference_fn(op, OUTPUT_SIZES[rank])
    assert aox.verify(path, fn, random_shapes(rank, 50, seed=rank)) == 50
    # ties (first maximum) and NaN/inf (last NaN, no leaking out of a window) on fewer sizes
    aox.verify(path, fn, random_shapes(rank, 15, seed=10 + rank), make_input=make_input("ties"))
    aox.verify(path, fn, random_shapes(rank, 15, seed=20 + rank), make_input=make_input("special"))


@pytest.mark.parametrize("op", ["avg", "max"])
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_static_export_exact(tmp_path, op, rank):
    # one torch export with static shapes (non-divisible, with an upsampled axis) ...
    spatial = [9, 2, 5][:rank]
    path = _exported(tmp_path, op, rank, False, spatial)
    fn = reference_fn(op, OUTPUT_SIZES[rank])
    aox.verify(path, fn, [(2, 3, *spatial)] * 3, make_input=make_input("special"))
    aox.verify(path, fn, [(2, 3, *spatial)] * 3, make_input=make_input("ties"))
    # ... and the very graph builder with static sizes baked in, at 50 random sizes
    # (constant windows, and AveragePool where every axis divides)
    onnx_op = "avg" if op == "avg" else "argmax"
    for shape in random_shapes(rank, 50, seed=30 + rank, batch=False):
        model = aox.standalone_model(onnx_op, OUTPUT_SIZES[rank], input_size=shape[2:])
        aox.verify(model, fn, [shape])


def test_static_divisible_export_uses_a_fixed_pool(tmp_path):
    x = torch.randn(1, 2, 14, 21)
    path = tmp_path / "div.onnx"
    aox.export(Pool("avg", (7, 7)), (x,), path)
    assert "AveragePool" in {n.op_type for n in onnx.load(path).graph.node}
    aox.verify(path, reference_fn("avg", (7, 7)), [(1, 2, 14, 21)], make_input=make_input("special"))


def test_torch_nn_layers_are_converted_on_a_copy(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 1), torch.nn.AdaptiveMaxPool2d((3, 4), return_indices=True))
    before = type(model[1])
    path = tmp_path / "nn.onnx"
    aox.export(model.eval(), (torch.randn(2, 2, 9, 10),), path, dynamic_shapes=({0: "N", 2: "H", 3: "W"},))
    assert type(model[1]) is before, "the caller's model is left as it was"
    session = aox._session(str(path))
    for shape in [(1, 2, 1, 1), (3, 2, 7, 11), (1, 2, 25, 4)]:
        x = torch.randn(shape)
        with torch.no_grad():
            want = model(x)
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        np.testing.assert_allclose(got[0], want[0].numpy(), atol=1e-5, rtol=0)
        np.testing.assert_array_equal(got[1], want[1].numpy())
    names = [d.dim_param for d in onnx.load(path).graph.input[0].type.tensor_type.shape.dim]
    assert names == ["N", "", "H", "W"]


def test_harness_column_agrees_with_reference():
    # the dynamic graph over the shared random cases: every layout, unbatched, float16/32/64, NaN/inf, ties
    column = aox.harness_columns()[0]
    report = _harness.check(column, _harness.random_cases(60, seed=4))
    assert report.cases > 100 and not report.failures, report.failures[:3]


def test_harness_column_reductions_agree_with_reference():
    # LP, GeM, avgmax and catavgmax graphs (p and eps baked in) over the shared random cases
    column = aox.harness_columns()[0]
    report = _harness.check(column, _harness.random_cases(80, seed=24), ops=_harness.REDUCTIONS)
    assert report.cases > 150 and not report.failures, report.failures[:3]


def test_window_arithmetic_in_graph_matches_bins():
    # the _bins formulas evaluated on ONNX int64 values, for many (L, O) in one graph run
    from onnx import helper

    from anypool import _bins

    for out in (1, 3, 7, 13):
        e = graphs._ProtoEmitter()
        axis = graphs._Axis(e, graphs._Int(e, "L"), out)
        outs = ["starts", "ends", "index", "valid"]
        e.nodes += [helper.make_node("Identity", [axis.get(n)], [n]) for n in outs]
        graph = helper.make_graph(e.nodes, "g", [helper.make_tensor_value_info("L", onnx.TensorProto.INT64, [])],
                                  [helper.make_tensor_value_info(n, t, None) for n, t in
                                   zip(outs, [onnx.TensorProto.INT64] * 3 + [onnx.TensorProto.BOOL])])
        session = aox._session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
        for length in range(1, 40):
            starts, ends, index, valid = session.run(None, {"L": np.asarray(length, np.int64)})
            b = _bins.axis_bins(length, out)
            np.testing.assert_array_equal(starts, b.starts)
            np.testing.assert_array_equal(ends, b.ends)
            np.testing.assert_array_equal(index, _bins.window_index(length, out))
            np.testing.assert_array_equal(valid.sum(1), b.lengths)


@pytest.mark.parametrize("dynamo", [True, False])
def test_plain_torch_onnx_export_is_exact_after_import(tmp_path, dynamo):
    path = tmp_path / "plain.onnx"
    model = Pool("max", (3, 5)).eval()
    x = torch.randn(2, 3, 10, 12)
    if dynamo:
        torch.onnx.export(model, (x,), path, dynamo=True, verbose=False, dynamic_shapes=({2: "H", 3: "W"},))
    else:
        torch.onnx.export(model, (x,), path, dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "N", 2: "H", 3: "W"}})
    onnx.checker.check_model(str(path), full_check=True)
    aox.verify(path, reference_fn("max", (3, 5)), [(2, 3, h, w) for h, w in [(1, 1), (7, 9), (30, 2), (10, 12)]])
    aox.verify(path, reference_fn("max", (3, 5)), [(2, 3, 6, 11)], make_input=make_input("special"))


@pytest.mark.parametrize("opset", [13, 17])
def test_torchscript_export_older_opsets_rank3(tmp_path, opset):
    path = tmp_path / "ts.onnx"
    for op in ("avg", "max"):
        torch.onnx.export(Pool(op, (2, 3, 4)), (torch.randn(1, 2, 5, 6, 7),), path, dynamo=False, opset_version=opset,
                          input_names=["x"], dynamic_axes={"x": {0: "N", 1: "C", 2: "D", 3: "H", 4: "W"}})
        aox.verify(path, reference_fn(op, (2, 3, 4)), random_shapes(3, 8, seed=opset))


def test_plain_torch_onnx_export_without_anypool_onnx_is_exact_or_loud(tmp_path):
    # a fresh process that never imports anypool.onnx: each exporter either fails loudly or is exact
    script = textwrap.dedent(f"""
        import warnings; warnings.filterwarnings("ignore")
        import sys, torch, numpy as np, anypool
        class M(torch.nn.Module):
            def forward(self, x):
                return anypool.adaptive_avg_pool2d(x, (3, 5))
        x = torch.randn(2, 3, 10, 12)
        for dynamo in (True, False):
            path = r"{tmp_path}/m%d.onnx" % dynamo
            try:
                if dynamo:
                    torch.onnx.export(M(), (x,), path, dynamo=True, verbose=False,
                                      dynamic_shapes=({{2: "H", 3: "W"}},))
                else:
                    torch.onnx.export(M(), (x,), path, dynamo=False, input_names=["x"],
                                      dynamic_axes={{"x": {{2: "H", 3: "W"}}}})
            except Exception as e:
                print("LOUD", dynamo, type(e).__name__, str(e).replace(chr(10), " ")[-3000:])
                continue
            import anypool.onnx
            from anypool import _args
            from anypool.backends import numpy as ref
            fn = lambda a: ref.avg_pool(a.astype(np.float64), _args.pool_spec(a.shape, (3, 5), 2))
            anypool.onnx.verify(path, fn, [(2, 3, 7, 9), (2, 3, 31, 4), (2, 3, 10, 12)])
            print("EXACT", dynamo)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith(("LOUD", "EXACT"))]
    assert len(lines) == 2, done.stdout[-3000:]
    # the dynamo exporter built its table before tracing: it fails loudly, naming the anypool op;
    # the torch backend's export hook gives the TorchScript exporter anypool's symbolic: exact
    assert lines[0].startswith("EXACT True") or ("LOUD True" in lines[0] and "anypool" in lines[0]), lines[0]
    assert lines[1] == "EXACT False", lines[1]


def test_output_size_not_static_at_export_time_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"output_size\): got \[None, 3\]; expected ints >= 0 fixed at export"):
        aox.standalone_model("avg", [None, 3])

    class FromShape(torch.nn.Module):
        def forward(self, x):
            return anypool.adaptive_avg_pool2d(x, (x.shape[2] // 2, 3))

    # not silently baked in (as torch.onnx.export's strict-capture fallback does): a clear error
    with pytest.raises(TypeError, match=r"adaptive_avg_pool2d\(output_size\): got \(\(s\d+//2\), 3\)"):
        aox.export(FromShape(), (torch.randn(1, 2, 10, 12),), tmp_path / "bad.onnx",
                   dynamic_shapes=({2: "H", 3: "W"},))


def test_export_hook_for_the_torch_backend():
    from anypool.backends.torch import export

    with pytest.raises(ValueError, match=r"anypool::adaptive_max_pool\(output_size\): got \[None, 3\]"):
        export.on_export([None, 3], "anypool::adaptive_max_pool")
    assert export.registered_with_dynamo  # so a plain dynamo export that began after `import anypool.onnx` is exact
    export.on_export([2, 3], "anypool::adaptive_max_pool")  # no export running: nothing to complain about


def test_verify_catches_a_wrong_graph(tmp_path):
    # a graph of the right shape but the wrong windows must not pass verify
    model = aox.standalone_model("avg", (3,), input_size=(10,))
    with pytest.raises(AssertionError, match="max abs error"):
        aox.verify(model, lambda x: reference.avg_pool(x, _args.pool_spec(x.shape, (3,), 1))[..., ::-1],
                   [(1, 1, 10)])
