// Pieces shared by the C++ kernels (pool.cpp, reductions.cpp): the canonical (B, D, H, W, K)
// buffer of a logical (N, C, *S) tensor, its windows (per sample with `sizes`), and the
// work-item helpers; the layout rules are described atop pool.cpp.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

#include "bins.h"

namespace anypool {
namespace common {

using at::Tensor;

constexpr int64_t kBlock = 64;            // channels per work item (channels_last)
constexpr int64_t kGrainElements = 1 << 15;  // elements touched per task at least: small calls run inline

inline int64_t grain(int64_t per_item) { return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(per_item, 1)); }
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
// The canonical buffer (B, D, H, W, K) of one side (input or output) and its windows.
struct Problem {
  int64_t B = 1, K = 1;
  Axis d, h, w;  // L = input length, O = output length of each canonical axis (padded extents)
  std::vector<Axis> samples;  // with per-sample sizes: (d, h, w) of each sample
  int64_t per = 1;            // buffer rows b per sample (planar: C)
  int64_t blocks() const { return ceil_div(K, kBlock); }
  bool per_sample() const { return !samples.empty(); }
  // the windows of axis k (0 = d, 1 = h, 2 = w) for buffer row b
  const Axis& axis(int64_t b, int k) const {
    if (samples.empty()) return k == 0 ? d : k == 1 ? h : w;
    return samples[3 * (b / per) + k];
  }
  int64_t in_row() const { return w.L * K; }
  int64_t out_row() const { return w.O * K; }
};

inline bool channels_last(const Tensor& x) {
  return x.dim() >= 3 && !x.is_contiguous() && x.movedim(1, -1).is_contiguous();
}

// x's buffer in the kernels' order: (N, *S, C) for channels_last, (N, C, *S) otherwise.
inline Tensor physical(const Tensor& x, bool cl) { return cl ? x.movedim(1, -1).contiguous() : x.contiguous(); }

// (N, C, *spatial) uninitialised, in the memory format the kernels write.
inline Tensor layout_empty(const Tensor& x, at::IntArrayRef spatial, bool cl, at::ScalarType dtype) {
  std::vector<int64_t> shape{x.size(0)};
  if (!cl) shape.push_back(x.size(1));
  shape.insert(shape.end(), spatial.begin(), spatial.end());
  if (cl) shape.push_back(x.size(1));
  Tensor t = at::empty(shape, x.options().dtype(dtype));
  return cl ? t.movedim(-1, 1) : t;
}

inline Problem problem(int64_t N, int64_t C, at::IntArrayRef in, at::IntArrayRef out, bool cl, bool covers,
                       const std::optional<Tensor>& sizes = std::nullopt) {
  int64_t L[3] = {1, 1, 1}, O[3] = {1, 1, 1};
  // a global pool is one row of the flat plane, but a sample's valid region is not a prefix of it
  const bool global = !sizes.has_value() && std::all_of(out.begin(), out.end(), [](int64_t o) { return o == 1; });
  if (global) {
    for (int64_t s : in) L[2] *= s;
  } else {
    const int64_t pad = 3 - static_cast<int64_t>(in.size());
    for (size_t k = 0; k < in.size(); ++k) {
      L[pad + k] = in[k];
      O[pad + k] = out[k];
    }
  }
  Problem p;
  p.B = cl ? N : N * C;
  p.K = cl ? C : 1;
  p.d = Axis(L[0], O[0], covers);
  p.h = Axis(L[1], O[1], covers);
  p.w = Axis(L[2], O[2], covers);
  if (sizes.has_value()) {
    const int64_t k = static_cast<int64_t>(in.size()), pad = 3 - k;
    const Tensor t = sizes->to(at::kLong).contiguous();
    TORCH_CHECK(t.dim() == 2 && t.size(0) == N && t.size(1) == 2 * k, "anypool_cpu: sizes must be (N, 2k) = (", N,
                ", ", 2 * k, "), got ", t.sizes());
    const int64_t* v = t.const_data_ptr<int64_t>();
    p.per = cl ? 1 : C;
    p.samples.reserve(3 * N);
    for (int64_t n = 0; n < N; ++n) {
      int64_t l[3] = {1, 1, 1}, o[3] = {1, 1, 1};
      for (int64_t a = 0; a < k; ++a) {
        l[pad + a] = v[n * 2 * k + a];
        o[pad + a] = v[n * 2 * k + k + a];
        TORCH_CHECK(l[pad + a] >= 1 && l[pad + a] <= in[a] && o[pad + a] >= 1 && o[pad + a] <= out[a],
                    "anypool_cpu: sample ", n, " has sizes (", l[pad + a], ", ", o[pad + a], ") on axis ", a,
                    "; expected 1..", in[a], " and 1..", out[a]);
      }
      for (int a = 0; a < 3; ++a) p.samples.emplace_back(l[a], o[a], covers);
    }
  }
  return p;
}

// Calls f(n, a, b, kb) for the items lo..hi of the row-major grid (N, A, B, KB): lo is
// decomposed once and the counters stepped (no divisions per item: items can be tiny).
template <typename F>
inline void for_items(int64_t lo, int64_t hi, int64_t A, int64_t Bn, int64_t KB, F&& f) {
  int64_t kb = lo % KB, r = lo / KB, b = r % Bn, a = r / Bn % A, n = r / (Bn * A);
  for (int64_t t = lo; t < hi; ++t) {
    f(n, a, b, kb);
    if (++kb == KB) {
      kb = 0;
      if (++b == Bn) {
        b = 0;
        if (++a == A) {
          a = 0;
          ++n;
        }
      }
    }
  }
}

inline void check(const Tensor& x, at::IntArrayRef sizes, const char* what) {
  TORCH_CHECK(x.dim() >= 3 && x.dim() <= 5, "anypool_cpu: expected (N, C, *S) with 1-3 spatial axes, got ", x.sizes());
  TORCH_CHECK(static_cast<int64_t>(sizes.size()) == x.dim() - 2, "anypool_cpu: ", what, " has ", sizes.size(),
              " entries for ", x.dim() - 2, " spatial axes");
  for (int64_t s : sizes) TORCH_CHECK(s > 0, "anypool_cpu: ", what, " must be positive, got ", sizes);
  for (int64_t s : x.sizes()) TORCH_CHECK(s > 0, "anypool_cpu: empty input ", x.sizes());
}

}  // namespace common
}  // namespace anypool
