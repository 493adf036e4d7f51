"""The NumPy reference: hand-worked examples, then PyTorch's native op on thousands of random cases."""

import numpy as np
import pytest

import anypool
from anypool import _harness


def test_hand_worked_avg_and_max():
    x = np.arange(10, dtype=np.float64)[None, None]  # windows 10 -> 3: [0,4) [3,7) [6,10)
    np.testing.assert_array_equal(anypool.adaptive_avg_pool1d(x, 3)[0, 0], [1.5, 4.5, 7.5])
    values, idx = anypool.adaptive_max_pool1d(x, 3, return_indices=True)
    np.testing.assert_array_equal(values[0, 0], [3, 6, 9])
    np.testing.assert_array_equal(idx[0, 0], [3, 6, 9])
    up = anypool.adaptive_avg_pool1d(np.array([[1.0, 3.0]]), 5)  # 2 -> 5: [0,1) [0,1) [0,2) [1,2) [1,2)
    np.testing.assert_array_equal(up, [[1, 1, 2, 3, 3]])


def test_tie_and_nan_rules():
    x = np.array([[[1.0, 5.0], [5.0, 2.0]]])  # ties: first in row-major order
    _, idx = anypool.adaptive_max_pool2d(x, 1, return_indices=True)
    assert idx.item() == 1
    x = np.array([[[np.nan, 5.0], [1.0, np.nan]]])  # NaN propagates; the last NaN is reported
    values, idx = anypool.adaptive_max_pool2d(x, 1, return_indices=True)
    assert np.isnan(values.item()) and idx.item() == 3
    x = np.array([[[-np.inf, -np.inf]]])
    values, idx = anypool.adaptive_max_pool2d(x, 1, return_indices=True)
    assert values.item() == -np.inf and idx.item() == 0
    assert np.isnan(anypool.adaptive_avg_pool1d(np.array([[np.inf, -np.inf]]), 1).item())


def test_layouts_agree():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 7, 9))
    first = anypool.adaptive_max_pool2d(x, (4, 5), return_indices=True)
    last = anypool.adaptive_max_pool2d(np.moveaxis(x, 1, -1), (4, 5), return_indices=True,
                                       data_format="channels_last")
    for a, b in zip(first, last):
        np.testing.assert_array_equal(np.moveaxis(a, 1, -1), b)
    single = anypool.adaptive_avg_pool2d(x[0], (4, 5))
    np.testing.assert_array_equal(single, anypool.adaptive_avg_pool2d(x, (4, 5))[0])


def test_float64_is_exact_and_float16_keeps_dtype():
    x = np.random.default_rng(1).standard_normal((1, 1, 7)).astype(np.float16)
    out = anypool.adaptive_avg_pool1d(x, 3)
    assert out.dtype == np.float16
    windows = [(0, 3), (2, 5), (4, 7)]
    want = [np.float16(np.mean(x[0, 0, s:e].astype(np.float64))) for s, e in windows]
    np.testing.assert_array_equal(out[0, 0], want)


def test_nd_generic_matches_separable_definition():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 4, 5, 6, 7))
    out = anypool.adaptive_avg_pool(x, (3, 2, 4, 9))
    h = anypool.bins((4, 5, 6, 7), (3, 2, 4, 9))
    for idx in np.ndindex(3, 2, 4, 9):
        window = tuple(slice(b.starts[k], b.ends[k]) for b, k in zip(h, idx))
        np.testing.assert_allclose(out[(slice(None), slice(None)) + idx], x[(...,) + window].mean(axis=(2, 3, 4, 5)))


@pytest.mark.parametrize("seed", range(4))
def test_against_torch_native(seed):
    pytest.importorskip("torch")
    report = _harness.check(_harness.torch_native_column(), _harness.random_cases(800, seed=100 + seed))
    assert report.cases > 1500
    assert not report.failures, "\n".join(report.failures[:10])
