"""Every bad input gets a clear error naming the argument, the value and what was expected."""

import numpy as np
import pytest

import anypool

x4 = np.zeros((2, 3, 5, 6), np.float32)


@pytest.mark.parametrize("call, kind, words", [
    (lambda: anypool.adaptive_avg_pool2d(np.zeros((1, 1, 0, 3), np.float32), 1), ValueError,
     ["adaptive_avg_pool2d(input)", "(1, 1, 0, 3)", "length >= 1"]),
    # the global case where PyTorch returns NaN
    (lambda: anypool.global_avg_pool(np.zeros((2, 3, 0, 4), np.float32)), ValueError,
     ["global_avg_pool(input)", "(2, 3, 0, 4)"]),
    (lambda: anypool.global_max_pool(np.zeros((2, 3, 4, 0), np.float32)), ValueError, ["global_max_pool(input)"]),
    (lambda: anypool.adaptive_avg_pool2d(np.zeros((5,), np.float32), 1), ValueError,
     ["adaptive_avg_pool2d(input)", "(5,)", "3-D (C, *S) or 4-D (N, C, *S)"]),
    (lambda: anypool.adaptive_max_pool1d(np.zeros((1, 2, 3, 4)), 1), ValueError, ["2-D", "3-D", "(1, 2, 3, 4)"]),
    (lambda: anypool.adaptive_avg_pool2d(x4, -1), ValueError, ["adaptive_avg_pool2d(output_size)", "-1", ">= 0"]),
    (lambda: anypool.adaptive_avg_pool2d(x4, (2, -3)), ValueError, ["(2, -3)"]),
    (lambda: anypool.adaptive_avg_pool2d(x4, 2.5), TypeError, ["output_size", "2.5"]),
    (lambda: anypool.adaptive_avg_pool2d(x4, (2.0, 2)), TypeError, ["(2.0, 2)"]),
    (lambda: anypool.adaptive_avg_pool2d(x4, True), TypeError, ["True"]),
    (lambda: anypool.adaptive_avg_pool2d(x4, "7"), TypeError, ["'7'"]),
    (lambda: anypool.adaptive_avg_pool2d(x4, (1, 2, 3)), ValueError, ["2 entries", "got 3"]),
    (lambda: anypool.adaptive_avg_pool(x4, 3), TypeError, ["adaptive_avg_pool(output_size)", "sequence"]),
    (lambda: anypool.adaptive_avg_pool2d(x4.astype(np.int32), 2), TypeError, ["int32", "floating"]),
    (lambda: anypool.adaptive_avg_pool2d(x4, 2, data_format="NHWC"), ValueError,
     ["adaptive_avg_pool2d(data_format)", "'NHWC'", "channels_last"]),
    (lambda: anypool.adaptive_avg_pool2d([[1.0]], 1), TypeError, ["builtins.list", "NumPy"]),
    (lambda: anypool.bins(0, 3), ValueError, ["input_size", "positive"]),
])
def test_errors_name_argument_value_and_expectation(call, kind, words):
    with pytest.raises(kind) as info:
        call()
    for word in words:
        assert word in str(info.value)


def test_valid_edge_cases_are_accepted():
    assert anypool.adaptive_avg_pool2d(x4, (0, 2)).shape == (2, 3, 0, 2)
    assert anypool.adaptive_avg_pool2d(x4, (None, 2)).shape == (2, 3, 5, 2)
    assert anypool.adaptive_avg_pool2d(x4, None).shape == x4.shape
    assert anypool.adaptive_avg_pool2d(np.zeros((0, 3, 5, 6)), 2).shape == (0, 3, 2, 2)
    assert anypool.adaptive_max_pool2d(x4.astype(np.int16), np.int64(3)).dtype == np.int16
    assert anypool.adaptive_avg_pool(np.zeros((1, 2, 3, 4, 5, 6)), (1, 2, 3, 4)).shape == (1, 2, 1, 2, 3, 4)
    assert anypool.global_avg_pool(np.ones((2, 4, 4, 3)), data_format="channels_last").shape == (2, 3)
    assert anypool.global_max_pool(np.ones((2, 3, 4, 4)), keepdims=True).shape == (2, 3, 1, 1)
