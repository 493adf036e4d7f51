// Pieces shared by the C++ kernels (pool.cpp, reductions.cpp): the canonical (B, D, H, W, K)
// buffer of a logical (N, C, *S) tensor, its windows (per sample with `sizes`), and the
// work-item helpers; the layout rules are described atop pool.cpp.
#pragma once
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "bins.h"

// The dtypes every kernel serves: float, double and the half types (accumulated in float).
#define ANYPOOL_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

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

// A global pool, its spatial axes flattened into one (see problem()): each buffer row b one window.
inline bool flat_global(const Problem& p) {
  return !p.per_sample() && p.d.L == 1 && p.h.L == 1 && p.d.O == 1 && p.h.O == 1 && p.w.O == 1;
}

// A global pool of planar (NCHW) input: every plane one contiguous window.
inline bool planar_global(const Problem& p) { return p.K == 1 && flat_global(p); }

// Keeps the compiler from vectorising a function's loops: where they would need gathers, the
// scalar loop is faster (measured 3x on the lockstep max).
#if defined(__clang__)
#define ANYPOOL_SCALAR_LOOPS
#define ANYPOOL_SCALAR_LOOP _Pragma("clang loop vectorize(disable)")
#elif defined(__GNUC__)
#define ANYPOOL_SCALAR_LOOPS __attribute__((optimize("no-tree-vectorize")))
#define ANYPOOL_SCALAR_LOOP
#else
#define ANYPOOL_SCALAR_LOOPS
#define ANYPOOL_SCALAR_LOOP
#endif

// take ? a : b without a branch.  A scalar max compiled as a branch mispredicts on about every
// other element of unordered data (~20 cycles each); masks on the bits cost one or two.
template <typename V>
inline V pick(bool take, V a, V b) {
  if constexpr (std::is_floating_point_v<V>) {
    using U = std::conditional_t<sizeof(V) == 8, uint64_t, uint32_t>;
    return std::bit_cast<V>(pick<U>(take, std::bit_cast<U>(a), std::bit_cast<U>(b)));
  } else {
    using U = std::make_unsigned_t<V>;
    const U mask = U(0) - static_cast<U>(take);
    return static_cast<V>((static_cast<U>(a) & mask) | (static_cast<U>(b) & ~mask));
  }
}

// ---- contiguous spans (planar windows) ----------------------------------------------------
// Independent lanes, so the loops vectorise, folded by halving: a fixed order (the same bits
// for any thread count) and log2(kLanes) dependent steps instead of kLanes.

constexpr int kLanes = 16;

template <typename V, typename Op>
inline V fold(V* lane, Op op) {
  for (int w = kLanes / 2; w > 0; w /= 2)
    for (int l = 0; l < w; ++l) lane[l] = op(lane[l], lane[l + w]);
  return lane[0];
}

template <typename acc_t, typename S>
inline acc_t span_sum(const S* __restrict__ v, int64_t n) {
  if (n < kLanes) {
    acc_t s = 0;
    for (int64_t i = 0; i < n; ++i) s += static_cast<acc_t>(v[i]);
    return s;
  }
  acc_t part[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) part[l] += static_cast<acc_t>(v[i + l]);
  acc_t tail = 0;
  for (; i < n; ++i) tail += static_cast<acc_t>(v[i]);
  return fold(part, [](acc_t a, acc_t b) { return a + b; }) + tail;
}

// span_sum of float with its lanes as one GCC/Clang vector (AVX-512, AVX2 halves, NEON quarters),
// folded in register halves in the same order (the same bits).  The array's fold goes through the
// stack: this is 1.5x faster on a 7x7 plane, but slower inside the separable passes (measured).
using f32x16 = float __attribute__((vector_size(64)));
using f32x8 = float __attribute__((vector_size(32)));
using f32x4 = float __attribute__((vector_size(16)));

template <typename Half, typename V>
inline Half halves_sum(const V& v) {
  Half lo, hi;
  std::memcpy(&lo, &v, sizeof lo);
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof lo, sizeof hi);
  return lo + hi;
}

inline float span_sum_vector(const float* __restrict__ v, int64_t n) {
  static_assert(kLanes == 16, "one f32x16 of lanes");
  if (n < kLanes) return span_sum<float>(v, n);
  f32x16 part{};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    f32x16 t;
    std::memcpy(&t, v + i, sizeof t);
    part += t;
  }
  float tail = 0;
  for (; i < n; ++i) tail += v[i];
  const f32x4 q = halves_sum<f32x4>(halves_sum<f32x8>(part));  // lanes l + l+8, then l + l+4
  return ((q[0] + q[2]) + (q[1] + q[3])) + tail;                   // then l + l+2, then l + l+1
}

// The first i < n with v[i] == m, or -1.
template <typename acc_t, typename T>
inline int64_t find_equal(const T* __restrict__ v, int64_t n, acc_t m) {
  for (int64_t i = 0; i < n; ++i)
    if (static_cast<acc_t>(v[i]) == m) return i;
  return -1;
}

// The last i < n with v[i] NaN, or -1.
template <typename acc_t, typename T>
inline int64_t find_last_nan(const T* __restrict__ v, int64_t n) {
  for (int64_t i = n - 1; i >= 0; --i) {
    const acc_t t = static_cast<acc_t>(v[i]);
    if (t != t) return i;
  }
  return -1;
}

// PyTorch's argmax of a span (the first maximum; the last NaN if there is one).  The lanes'
// maximum skips NaN (it never compares greater); t - t, NaN for NaN and inf alone, flags them.
template <typename acc_t, typename T>
inline int64_t span_argmax(const T* __restrict__ v, int64_t n) {
  acc_t m[kLanes], flag[kLanes] = {};
  for (int l = 0; l < kLanes; ++l) m[l] = -std::numeric_limits<acc_t>::infinity();
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
#pragma omp simd  // (GCC keeps a select chain on floats scalar without it)
    for (int l = 0; l < kLanes; ++l) {
      const acc_t t = static_cast<acc_t>(v[i + l]);
      m[l] = t > m[l] ? t : m[l];
      flag[l] += t - t;
    }
  acc_t tail_max = -std::numeric_limits<acc_t>::infinity(), tail_flag = 0;
  for (; i < n; ++i) {
    const acc_t t = static_cast<acc_t>(v[i]);
    tail_max = t > tail_max ? t : tail_max;
    tail_flag += t - t;
  }
  const acc_t f = fold(flag, [](acc_t a, acc_t b) { return a + b; }) + tail_flag;
  if (f != f) {
    const int64_t last = find_last_nan<acc_t>(v, n);
    if (last >= 0) return last;
  }
  // an all -inf span's first -inf: the maximum skipped only NaN
  const acc_t best = fold(m, [](acc_t a, acc_t b) { return b > a ? b : a; });
  return find_equal<acc_t>(v, n, tail_max > best ? tail_max : best);
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
