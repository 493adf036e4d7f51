// Adaptive-pooling window geometry for the C++ kernels: the integer formulas of
// anypool/_bins.py, and nothing else (tests/test_torch_cpu.py checks them against _bins).
//
// For an axis of input length L and output length O, output j reduces [start(j), end(j))
// and input i is covered by the outputs first(i) .. last(i) (inclusive).  Products are
// taken in 128 bits, so any L and O that fit int64 are exact.
#pragma once
#include <cstdint>
#include <vector>

namespace anypool {

inline int64_t bin_start(int64_t j, int64_t L, int64_t O) {
  return static_cast<int64_t>((static_cast<__int128>(j) * L) / O);
}
inline int64_t bin_end(int64_t j, int64_t L, int64_t O) {
  return static_cast<int64_t>(((static_cast<__int128>(j) + 1) * L + O - 1) / O);
}
inline int64_t cover_first(int64_t i, int64_t L, int64_t O) {
  return static_cast<int64_t>((static_cast<__int128>(i) * O) / L);
}
inline int64_t cover_last(int64_t i, int64_t L, int64_t O) {
  return static_cast<int64_t>(((static_cast<__int128>(i) + 1) * O - 1) / L);
}

// One axis' tables: windows start/end (size O) and covers first / one-past-last (size L).
struct Axis {
  int64_t L = 1, O = 1;
  std::vector<int64_t> start, end, first, stop;
  Axis() = default;
  Axis(int64_t L_, int64_t O_, bool covers) : L(L_), O(O_), start(O_), end(O_) {
    for (int64_t j = 0; j < O; ++j) {
      start[j] = bin_start(j, L, O);
      end[j] = bin_end(j, L, O);
    }
    if (covers) {
      first.resize(L);
      stop.resize(L);
      for (int64_t i = 0; i < L; ++i) {
        first[i] = cover_first(i, L, O);
        stop[i] = cover_last(i, L, O) + 1;
      }
    }
  }
  int64_t size(int64_t j) const { return end[j] - start[j]; }
};

}  // namespace anypool
