"""Properties of the window geometry, checked against first principles (not the code's formulas)."""

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from anypool import _bins, bins

sizes = st.tuples(st.integers(1, 300), st.integers(1, 300))


def test_known_windows():
    # PyTorch's windows for 10 -> 3 (peers.md: Equinox differs here)
    assert list(_bins.axis_bins(10, 3)) == [(0, 4), (3, 7), (6, 10)]
    assert list(_bins.axis_bins(2, 5)) == [(0, 1), (0, 1), (0, 2), (1, 2), (1, 2)]
    assert list(_bins.axis_bins(7, 1)) == [(0, 7)]


@given(sizes)
def test_windows_match_real_floor_and_ceil(lo):
    L, O = lo
    b = _bins.axis_bins(L, O)
    for j in range(O):
        assert b.starts[j] == math.floor(Fraction(j * L, O))
        assert b.ends[j] == math.ceil(Fraction((j + 1) * L, O))


@given(sizes)
def test_windows_non_empty_lengths_and_cover(lo):
    L, O = lo
    b = _bins.axis_bins(L, O)
    shortest = -(-L // O)
    assert (b.lengths >= 1).all()
    assert set(b.lengths.tolist()) <= {shortest, shortest + 1} | ({1} if O > L else set())
    covered = np.zeros(L, bool)
    for start, end in b:
        covered[start:end] = True
    assert covered.all()
    if O <= L:
        assert (b.overlaps <= 1).all()
        assert b.overlaps.any() == bool(L % O)


@given(sizes)
def test_cover_is_exactly_the_outputs_whose_window_holds_i(lo):
    L, O = lo
    b = _bins.axis_bins(L, O)
    first, last = b.cover()
    for i in range(L):
        holding = [j for j, (s, e) in enumerate(b) if s <= i < e]
        assert holding == list(range(first[i], last[i] + 1))


@given(sizes)
def test_window_index_and_averaging_matrix(lo):
    L, O = lo
    b = _bins.axis_bins(L, O)
    idx = _bins.window_index(L, O)
    a = _bins.averaging_matrix(L, O)
    assert idx.shape == (O, _bins.max_window(L, O))
    for j, (s, e) in enumerate(b):
        assert sorted(set(idx[j].tolist())) == list(range(s, e))
        np.testing.assert_allclose(a[j, s:e], 1 / (e - s))
        assert a[j, :s].sum() == 0 and a[j, e:].sum() == 0
    assert _bins.max_window(L, O) <= _bins.max_window_expr(L, O)


@given(sizes)
def test_fixed_pool_equivalence(lo):
    L, O = lo
    pool = _bins.fixed_pool(L, O)
    b = _bins.axis_bins(L, O)
    uniform = [(j * k, j * k + k) for k in [L // O] for j in range(O)]
    assert (pool is not None) == (list(b) == uniform)
    if pool:
        assert pool == (L // O, L // O)


def test_expressions_work_on_arrays_and_ints():
    j = np.arange(5)
    assert (_bins.start_expr(j, 12, 5) == _bins.axis_bins(12, 5).starts).all()
    assert _bins.end_expr(4, 12, 5) == 12


def test_cached_results_are_read_only():
    with pytest.raises(ValueError):
        _bins.axis_bins(10, 3).starts[0] = 1


def test_bins_public():
    h, w = bins((224, 10), (7, None))
    assert h.fixed_pool == (32, 32) and w.output_size == 10 and not h.is_upsampling
    (u,) = bins(3, 8)
    assert u.is_upsampling and len(u.starts) == 8
    assert bins(0 + 5, 0)[0].output_size == 0
