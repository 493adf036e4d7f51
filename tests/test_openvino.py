"""The dynamic-shape ONNX graphs run exactly in OpenVINO (CPU), not only in ONNX Runtime.

One compiled model per graph, fed inputs of many sizes (non-divisible, upsampling, size-1
axes), ties and NaN/inf; compared with the NumPy reference.  One known difference, OpenVINO's
own: a max window holding only -inf gives the lowest finite float instead of -inf
(``test_openvino_max_of_only_minus_inf``).
"""

from __future__ import annotations

import numpy as np
import pytest

ov = pytest.importorskip("openvino")
pytest.importorskip("onnx")

from anypool import _args  # noqa: E402
from anypool.backends import numpy as reference  # noqa: E402
from anypool.backends import onnx as graphs  # noqa: E402

OUTPUT_SIZES = {1: (5,), 2: (3, 7), 3: (2, 3, 4)}


def _compiled(model, tmp_path, name):
    import onnx

    path = tmp_path / f"{name}.onnx"
    onnx.save(model, path)
    return ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})


def _shapes(rank: int, n: int, seed: int) -> list[tuple[int, ...]]:
    rng = np.random.default_rng(seed)
    top = {1: 40, 2: 20, 3: 9}[rank]
    shapes = [(1, 2) + (1,) * rank, (2, 3) + tuple(2 * o for o in OUTPUT_SIZES[rank])]
    while len(shapes) < n:
        spatial = tuple(int(rng.choice([1, rng.integers(1, top + 1)])) for _ in range(rank))
        shapes.append((int(rng.integers(1, 4)), int(rng.integers(1, 4))) + spatial)
    return shapes


def _input(shape, rng, values):
    if values == "ties":
        return rng.integers(-2, 3, shape).astype(np.float32)
    x = (rng.standard_normal(shape) * 4).astype(np.float32)
    if values == "special":
        flat = x.reshape(-1)
        for v in (np.nan, np.inf, -np.inf):
            flat[rng.choice(flat.size, max(1, flat.size // 15))] = v
    return x


@pytest.mark.parametrize("values", ["normal", "ties", "special"])
@pytest.mark.parametrize("op", ["avg", "argmax"])
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_dynamic_graph_exact_in_openvino(tmp_path, rank, op, values):
    output_size = OUTPUT_SIZES[rank]
    compiled = _compiled(graphs.standalone_model(op, output_size), tmp_path, f"{op}{rank}")
    rng = np.random.default_rng(rank)
    for shape in _shapes(rank, 12, seed=rank):
        x = _input(shape, rng, values)
        spec = _args.pool_spec(x.shape, output_size, rank)
        got = [np.asarray(v) for v in compiled(x).values()]
        if op == "avg":
            want = reference.avg_pool(x.astype(np.float64), spec)
            assert got[0].shape == want.shape, shape
            np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-5, err_msg=f"input {shape}")
        else:
            values_want, indices_want = reference.max_pool(x, spec, return_indices=True)
            only_minus_inf = (values_want == -np.inf) & (got[0] == np.finfo(np.float32).min)  # OpenVINO's
            np.testing.assert_array_equal(np.where(only_minus_inf, -np.inf, got[0]), values_want,
                                          err_msg=f"input {shape}")
            np.testing.assert_array_equal(got[1], indices_want, err_msg=f"input {shape}")


def test_torch_export_runs_in_openvino(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    import anypool.onnx

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d((5, 7))).eval()
    path = tmp_path / "model.onnx"
    anypool.onnx.export(model, (torch.randn(1, 3, 32, 32),), path, dynamic_shapes=({0: "N", 2: "H", 3: "W"},))
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    for shape in [(1, 3, 32, 32), (2, 3, 41, 29), (1, 3, 9, 70), (3, 3, 5, 6)]:
        x = torch.randn(shape)
        (got,) = compiled(x.numpy()).values()
        with torch.no_grad():
            np.testing.assert_allclose(got, model(x).numpy(), rtol=1e-4, atol=1e-5, err_msg=f"input {shape}")


@pytest.mark.xfail(strict=True, reason="OpenVINO's ReduceMax of only -inf is the lowest finite float, not -inf")
def test_openvino_max_of_only_minus_inf(tmp_path):
    compiled = _compiled(graphs.standalone_model("max", (2,)), tmp_path, "max")
    x = np.array([[[-np.inf, -np.inf, 1.0, 2.0]]], np.float32)
    (got,) = compiled(x).values()
    np.testing.assert_array_equal(got, [[[-np.inf, 2.0]]])
