// anypool's CPU kernels: adaptive avg / max pooling, forward and backward, on torch's
// intra-op pool (at::parallel_for: torch.set_num_threads holds and no second pool runs).
//
// Every op takes the logical (N, C, *S) tensor, spatial rank 1-3, and returns results in
// its memory format.  Both layouts are one buffer of shape (B, D, H, W, K):
//   * channels_last (channels innermost in memory, any rank): B = N, K = C, no copy;
//   * anything else: made NCHW-contiguous (a no-op when it is): B = N*C planes, K = 1.
// Lower ranks have D = 1 (and H = 1); a global pool is one row of prod(S) positions
// (flat index = row-major offset, as PyTorch's indices).  The pooling is separable: the
// rows (d, h) of a window are reduced into one row buffer along W*K (contiguous,
// vectorised), then each window of that row along W.  Work items are output rows
// (b, a, b') times blocks of kBlock channels, so a batch of one still splits across threads.
// Where measured faster, windows of at most kSmallWindow elements are read straight from the
// input instead, and a channels_last float max runs in 16-channel vectors (max_vector_kernel).
// Half types are read into float (at::opmath_type), accumulated there and rounded once.
// Avg backward is a gather: each input row is written by one item from the outputs covering it,
// summed in output order.  Max backward scatters each output's gradient to its argmax, each task
// over a disjoint part of the gradient, in the same order.  Neither uses atomics: the results
// are bitwise identical for any thread count.
// Max: the first maximum in row-major order wins; a window holding NaN reports its last
// NaN; indices are int64 flat offsets into the spatial plane.
// Padded batches: an optional int64 `sizes` (N, 2k) gives per sample the valid input lengths
// L_i then the valid output lengths O_i.  Each sample then uses the windows of its own
// (L_i, O_i) (bins.h) inside the padded buffers: the padding is never read, outputs j >= O_i
// are 0, and a backward writes 0 to the padding.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "bins.h"
#include "common.h"
#include "ops.h"

namespace anypool {
namespace {

using at::Tensor;

using namespace common;  // the canonical buffer, its windows and the work items (common.h)

inline int64_t max_window(const Axis& a) {
  int64_t m = 0;
  for (int64_t j = 0; j < a.O; ++j) m = std::max(m, a.size(j));
  return m;
}

inline bool downsamples(const Problem& p) { return p.d.O <= p.d.L && p.h.O <= p.h.L && p.w.O <= p.w.L; }

// out[c * K + k] = 0 for the columns c0 <= c < c1 (nk channels each): outputs past a sample's own.
template <typename T>
inline void zero_cols(T* __restrict__ out, int64_t c0, int64_t c1, int64_t nk, int64_t K) {
  for (int64_t c = c0; c < c1; ++c)
    for (int64_t k = 0; k < nk; ++k) out[c * K + k] = T(0);
}

// The kernels below are templated on NK, the channels per work item when the compiler
// should know it: 1 (planar: positions contiguous), kBlock (a full channels_last block),
// or 0 (a channels_last tail, known at run time).  With NK fixed the loops over k vectorise.
template <typename F>
inline void with_nk(int64_t nk, F&& f) {
  if (nk == 1) f(std::integral_constant<int, 1>{});
  else if (nk == kBlock) f(std::integral_constant<int, static_cast<int>(kBlock)>{});
  else f(std::integral_constant<int, 0>{});
}

// row[i, k] (+)= src[i * K + k] for the n positions of one input row (nk channels each).
template <int NK, typename acc_t, typename T>
inline void add_row(const T* __restrict__ src, int64_t K, int64_t n, int64_t nk_, acc_t* __restrict__ row,
                    bool first) {
  const int64_t nk = NK ? NK : nk_;
  if (first) {
    for (int64_t i = 0; i < n; ++i)
      for (int64_t k = 0; k < nk; ++k) row[i * nk + k] = static_cast<acc_t>(src[i * K + k]);
  } else {
    for (int64_t i = 0; i < n; ++i)
      for (int64_t k = 0; k < nk; ++k) row[i * nk + k] += static_cast<acc_t>(src[i * K + k]);
  }
}

// Per column of one input row (flat offset rf): best[i, k] becomes src[i * K + k] where
// that is greater or NaN, rows[i, k] then rf — with rows visited in flat order, the first
// maximum and the last NaN.
template <int NK, typename acc_t, typename T>
inline void max_into_row(const T* __restrict__ src, int64_t K, int64_t n, int64_t nk_, acc_t* __restrict__ best,
                         int64_t* __restrict__ rows, int64_t rf, bool first) {
  const int64_t nk = NK ? NK : nk_;
  if (first) {
    for (int64_t i = 0; i < n; ++i)
      for (int64_t k = 0; k < nk; ++k) {
        best[i * nk + k] = static_cast<acc_t>(src[i * K + k]);
        rows[i * nk + k] = rf;
      }
    return;
  }
  for (int64_t i = 0; i < n; ++i)
    for (int64_t k = 0; k < nk; ++k) {
      const acc_t v = static_cast<acc_t>(src[i * K + k]);
      const acc_t b = best[i * nk + k];
      const bool take = (v > b) | (v != v);
      best[i * nk + k] = take ? v : b;
      rows[i * nk + k] = take ? rf : rows[i * nk + k];
    }
}

// ---- small windows: each output read straight from its window ------------------------------
// Windows of at most kSmallWindow elements, where that beats the separable passes (their row
// buffers and per-row set-up cost more than such a window's few elements).  Measured on both
// layouts: planar avg stays faster separable (its row sums vectorise along W), so does a planar
// 1-D max (already read straight from the input) and a channels_last max that upsamples (its
// windows of 1 or 2 make the direct loops' trip counts unpredictable).

constexpr int64_t kSmallWindow = 16;

inline bool small_windows(const Problem& p, bool is_max) {
  if (p.per_sample() || max_window(p.d) * max_window(p.h) * max_window(p.w) > kSmallWindow) return false;
  if (p.K == 1) return is_max && p.d.L * p.h.L > 1;
  return !is_max || downsamples(p);
}

// Calls row(NK, n, a, b, k0, nk) for every output row (n, a, b) and block of nk channels from k0
// (NK as in with_nk), spread over torch's pool.
template <typename Row>
void for_output_rows(const Problem& p, Row&& row) {
  const Axis &D = p.d, &H = p.h;
  if (p.K == 1) {
    at::parallel_for(0, p.B, grain(D.L * H.L * p.w.L), [&](int64_t lo, int64_t hi) {
      for (int64_t n = lo; n < hi; ++n)
        for (int64_t a = 0; a < D.O; ++a)
          for (int64_t b = 0; b < H.O; ++b) row(std::integral_constant<int, 1>{}, n, a, b, 0, 1);
    });
    return;
  }
  const int64_t KB = p.blocks(), items = p.B * D.O * H.O * KB;
  at::parallel_for(0, items, grain(kSmallWindow * p.w.O * std::min(p.K, kBlock)), [&](int64_t lo, int64_t hi) {
    for_items(lo, hi, D.O, H.O, KB, [&](int64_t n, int64_t a, int64_t b, int64_t kb) {
      const int64_t k0 = kb * kBlock, nk = std::min(p.K - k0, kBlock);
      with_nk(nk, [&](auto NK) { row(NK, n, a, b, k0, nk); });
    });
  });
}

template <typename T>
void avg_small_kernel(const T* x, T* y, const Problem& p) {
  using acc_t = at::opmath_type<T>;
  const Axis &D = p.d, &H = p.h, &W = p.w;
  const int64_t K = p.K;
  for_output_rows(p, [&](auto NKc, int64_t n, int64_t a, int64_t b, int64_t k0, int64_t nk_) {
    constexpr int NK = decltype(NKc)::value;
    const int64_t nk = NK ? NK : nk_;
    const T* __restrict__ xn = x + n * D.L * H.L * p.in_row() + k0;
    T* __restrict__ out = y + ((n * D.O + a) * H.O + b) * p.out_row() + k0;
    const acc_t rows = acc_t(D.size(a) * H.size(b));
    acc_t acc[NK ? NK : kBlock];
    for (int64_t c = 0; c < W.O; ++c) {
      for (int64_t k = 0; k < nk; ++k) acc[k] = acc_t(0);
      for (int64_t d = D.start[a]; d < D.end[a]; ++d)
        for (int64_t h = H.start[b]; h < H.end[b]; ++h) {
          const T* __restrict__ r = xn + (d * H.L + h) * p.in_row();
          for (int64_t i = W.start[c]; i < W.end[c]; ++i)
            for (int64_t k = 0; k < nk; ++k) acc[k] += static_cast<acc_t>(r[i * K + k]);
        }
      const acc_t count = rows * acc_t(W.size(c));
      for (int64_t k = 0; k < nk; ++k) out[c * K + k] = static_cast<T>(acc[k] / count);
    }
  });
}

// One planar output row (a, b) of windows at most wmax wide along W, every window advanced one
// position per step (clamped to its last: revisiting it changes nothing), rows in flat order.  The
// windows' branch-free chains are independent, so they overlap: one window at a time, each waits
// on its own chain.  From kLockstep windows per row this is the faster order (measured).
constexpr int64_t kLockstep = 16;
constexpr int64_t kNarrow = 4;  // the widest windows along W that the general planar max takes in lockstep (measured)

template <typename T>
ANYPOOL_SCALAR_LOOPS inline void max_lockstep_row(const T* __restrict__ xn, const Axis& D, const Axis& H, const Axis& W, int64_t wmax,
                             int64_t a, int64_t b, T* __restrict__ out, int64_t* __restrict__ idx) {
  using acc_t = at::opmath_type<T>;
  constexpr int64_t kChunk = 64;  // windows per pass: the chains' state stays on the stack
  acc_t bv[kChunk];
  int64_t bf[kChunk];
  for (int64_t c0 = 0; c0 < W.O; c0 += kChunk) {
    const int64_t n = std::min(kChunk, W.O - c0);
    const int64_t* __restrict__ start = W.start.data() + c0;
    const int64_t* __restrict__ end = W.end.data() + c0;
    const int64_t r0 = (D.start[a] * H.L + H.start[b]) * W.L;
    for (int64_t c = 0; c < n; ++c) {
      bv[c] = static_cast<acc_t>(xn[r0 + start[c]]);
      bf[c] = r0 + start[c];
    }
    for (int64_t d = D.start[a]; d < D.end[a]; ++d)
      for (int64_t h = H.start[b]; h < H.end[b]; ++h) {
        const int64_t rf = (d * H.L + h) * W.L;
        const T* __restrict__ xr = xn + rf;
        for (int64_t u = 0; u < wmax; ++u)
          ANYPOOL_SCALAR_LOOP
          for (int64_t c = 0; c < n; ++c) {
            const int64_t i = std::min(start[c] + u, end[c] - 1);
            const acc_t v = static_cast<acc_t>(xr[i]);
            const bool take = (v > bv[c]) | (v != v);
            bv[c] = pick(take, v, bv[c]);
            bf[c] = pick(take, rf + i, bf[c]);
          }
      }
    for (int64_t c = 0; c < n; ++c) {
      out[c0 + c] = static_cast<T>(bv[c]);
      idx[c0 + c] = bf[c];
    }
  }
}

// Positions in flat order, each taken where greater or NaN: the first maximum, the last NaN.
template <typename T>
void max_small_kernel(const T* x, T* y, int64_t* yi, const Problem& p) {
  using acc_t = at::opmath_type<T>;
  const Axis &D = p.d, &H = p.h, &W = p.w;
  const int64_t K = p.K, wmax = max_window(W);
  for_output_rows(p, [&](auto NKc, int64_t n, int64_t a, int64_t b, int64_t k0, int64_t nk_) {
    constexpr int NK = decltype(NKc)::value;
    const int64_t nk = NK ? NK : nk_;
    const T* __restrict__ xn = x + n * D.L * H.L * p.in_row() + k0;
    const int64_t r = ((n * D.O + a) * H.O + b) * p.out_row() + k0;
    T* __restrict__ out = y + r;
    int64_t* __restrict__ idx = yi + r;
    if constexpr (NK == 1)
      if (W.O >= kLockstep) return max_lockstep_row(xn, D, H, W, wmax, a, b, out, idx);
    acc_t bv[NK ? NK : kBlock];
    int64_t bf[NK ? NK : kBlock];
    for (int64_t c = 0; c < W.O; ++c) {
      const int64_t f0 = (D.start[a] * H.L + H.start[b]) * W.L + W.start[c];  // the window's first position
      for (int64_t k = 0; k < nk; ++k) {
        bv[k] = static_cast<acc_t>(xn[f0 * K + k]);
        bf[k] = f0;
      }
      for (int64_t d = D.start[a]; d < D.end[a]; ++d)
        for (int64_t h = H.start[b]; h < H.end[b]; ++h) {
          const int64_t rf = (d * H.L + h) * W.L;
          const T* __restrict__ row = xn + rf * K;
          for (int64_t i = W.start[c]; i < W.end[c]; ++i)
            for (int64_t k = 0; k < nk; ++k) {
              const acc_t v = static_cast<acc_t>(row[i * K + k]);
              const bool take = (v > bv[k]) | (v != v);
              if constexpr (NK == 1) {  // a scalar chain: branch-free
                bv[k] = pick(take, v, bv[k]);
                bf[k] = pick(take, rf + i, bf[k]);
              } else {  // vectorised over k: selects
                bv[k] = take ? v : bv[k];
                bf[k] = take ? rf + i : bf[k];
              }
            }
        }
      for (int64_t k = 0; k < nk; ++k) {
        out[c * K + k] = static_cast<T>(bv[k]);
        idx[c * K + k] = bf[k];
      }
    }
  });
}

// ---- avg forward --------------------------------------------------------------------------

// One output row: the windows along W of `src` (nk channels per position, position stride
// `step`), each divided by `rows` * its length.
template <int NK, typename T, typename acc_t, typename S>
inline void avg_row(const S* __restrict__ src, int64_t step, int64_t nk_, acc_t rows, const Axis& w,
                    T* __restrict__ out, int64_t K) {
  const int64_t nk = NK ? NK : nk_;
  acc_t acc[kBlock];
  for (int64_t c = 0; c < w.O; ++c) {
    const acc_t count = rows * acc_t(w.size(c));
    if constexpr (NK == 1) {  // planar: one long contiguous span
      out[c * K] = static_cast<T>(span_sum<acc_t>(src + w.start[c], w.size(c)) / count);
    } else {
      const S* s0 = src + w.start[c] * step;
      for (int64_t k = 0; k < nk; ++k) acc[k] = static_cast<acc_t>(s0[k]);
      for (int64_t i = w.start[c] + 1; i < w.end[c]; ++i)
        for (int64_t k = 0; k < nk; ++k) acc[k] += static_cast<acc_t>(src[i * step + k]);
      for (int64_t k = 0; k < nk; ++k) out[c * K + k] = static_cast<T>(acc[k] / count);
    }
  }
}

template <typename T>
void avg_forward_kernel(const T* x, T* y, const Problem& p) {
  using acc_t = at::opmath_type<T>;
  const Axis &Dp = p.d, &Hp = p.h, &Wp = p.w;  // the buffers' extents
  if (planar_global(p)) {
    // planar global pool: each plane one span; the general loop's per-item set-up costs more than
    // a short plane's sum (e.g. 7x7).  Same span_sum and divisor as avg_row: the same bits.
    const int64_t L = Wp.L;
    at::parallel_for(0, p.B, grain(L), [&](int64_t lo, int64_t hi) {
      for (int64_t b = lo; b < hi; ++b) {
        acc_t sum;
        if constexpr (std::is_same_v<T, float>) sum = span_sum_vector(x + b * L, L);
        else sum = span_sum<acc_t>(x + b * L, L);
        y[b] = static_cast<T>(sum / acc_t(L));
      }
    });
    return;
  }
  if (small_windows(p, false)) return avg_small_kernel(x, y, p);
  const int64_t KB = p.blocks(), items = p.B * Dp.O * Hp.O * KB;
  const int64_t per_item = std::max<int64_t>(1, Dp.L * Hp.L * p.in_row() / (Dp.O * Hp.O * KB));
  at::parallel_for(0, items, grain(per_item), [&](int64_t lo, int64_t hi) {
    std::vector<acc_t> row(Wp.L * std::min(p.K, kBlock));
    for_items(lo, hi, Dp.O, Hp.O, KB, [&](int64_t n, int64_t a, int64_t b, int64_t kb) {
      const int64_t r = (n * Dp.O + a) * Hp.O + b;  // output row
      const int64_t k0 = kb * kBlock, nk = std::min(p.K - k0, kBlock);
      const T* xn = x + n * Dp.L * Hp.L * p.in_row() + k0;
      T* out = y + r * p.out_row() + k0;
      const Axis &D = p.axis(n, 0), &H = p.axis(n, 1), &W = p.axis(n, 2);  // this sample's windows
      if (a >= D.O || b >= H.O) return zero_cols(out, 0, Wp.O, nk, p.K);
      zero_cols(out, W.O, Wp.O, nk, p.K);
      const int64_t rows = D.size(a) * H.size(b);
      with_nk(nk, [&](auto NKc) {
        constexpr int NK = decltype(NKc)::value;
        if (rows == 1) {  // one input row: its windows straight from the input
          avg_row<NK>(xn + (D.start[a] * Hp.L + H.start[b]) * p.in_row(), p.K, nk, acc_t(1), W, out, p.K);
          return;
        }
        bool first = true;
        for (int64_t d = D.start[a]; d < D.end[a]; ++d)
          for (int64_t h = H.start[b]; h < H.end[b]; ++h, first = false)
            add_row<NK>(xn + (d * Hp.L + h) * p.in_row(), p.K, W.L, nk, row.data(), first);
        avg_row<NK>(row.data(), nk, nk, acc_t(rows), W, out, p.K);
      });
    });
  });
}

// ---- avg backward: gin[i] = sum over covering outputs j of g[j] / |window j| ----------

template <typename T>
void avg_backward_kernel(const T* g, T* gin, const Problem& p) {
  using acc_t = at::opmath_type<T>;
  const Axis &Dp = p.d, &Hp = p.h, &Wp = p.w;  // the buffers' extents
  if (flat_global(p)) {  // every input of a sample's channel gets the same g / L: the gather without its set-up
    const int64_t L = Wp.L, K = p.K;
    const acc_t scale = acc_t(1) / acc_t(L);
    at::parallel_for(0, p.B, grain(L * K), [&](int64_t lo, int64_t hi) {
      std::vector<T> row(K);
      for (int64_t b = lo; b < hi; ++b) {
        for (int64_t k = 0; k < K; ++k) row[k] = static_cast<T>(acc_t(0) + static_cast<acc_t>(g[b * K + k]) * scale);
        T* __restrict__ out = gin + b * L * K;
        if (K == 1) std::fill(out, out + L, row[0]);
        else
          for (int64_t i = 0; i < L; ++i) std::copy(row.begin(), row.end(), out + i * K);
      }
    });
    return;
  }
  const int64_t KB = p.blocks(), items = p.B * Dp.L * Hp.L * KB;
  at::parallel_for(0, items, grain(p.in_row() / KB + p.out_row() / KB), [&](int64_t lo, int64_t hi) {
    std::vector<acc_t> acc_buffer(Wp.O * std::min(p.K, kBlock));
    for_items(lo, hi, Dp.L, Hp.L, KB, [&](int64_t n, int64_t d, int64_t h, int64_t kb) {
      const int64_t r = (n * Dp.L + d) * Hp.L + h;  // input row
      const int64_t k0 = kb * kBlock;
      const Axis &D = p.axis(n, 0), &H = p.axis(n, 1), &W = p.axis(n, 2);  // this sample's windows
      T* __restrict__ out = gin + r * p.in_row() + k0;
      if (d >= D.L || h >= H.L) return zero_cols(out, 0, Wp.L, std::min(p.K - k0, kBlock), p.K);
      zero_cols(out, W.L, Wp.L, std::min(p.K - k0, kBlock), p.K);
      with_nk(std::min(p.K - k0, kBlock), [&](auto NKc) {
        constexpr int NK = decltype(NKc)::value;
        const int64_t nk = NK ? NK : std::min(p.K - k0, kBlock);
        acc_t* __restrict__ acc = acc_buffer.data();
        std::fill(acc, acc + W.O * nk, acc_t(0));
        for (int64_t a = D.first[d]; a < D.stop[d]; ++a)
          for (int64_t b = H.first[h]; b < H.stop[h]; ++b) {
            const int64_t rows = D.size(a) * H.size(b);
            const T* __restrict__ gr = g + ((n * Dp.O + a) * Hp.O + b) * p.out_row() + k0;
            for (int64_t c = 0; c < W.O; ++c) {
              const acc_t scale = acc_t(1) / acc_t(rows * W.size(c));
              for (int64_t k = 0; k < nk; ++k) acc[c * nk + k] += static_cast<acc_t>(gr[c * p.K + k]) * scale;
            }
          }
        // input i gets acc[first(i)] + ... + acc[stop(i) - 1]
        const auto covered = [&](int64_t i) {
          const acc_t* a0 = acc + W.first[i] * nk;
          for (int64_t k = 0; k < nk; ++k) {
            acc_t s = a0[k];
            for (int64_t c = 1; c < W.stop[i] - W.first[i]; ++c) s += a0[c * nk + k];
            out[i * p.K + k] = static_cast<T>(s);
          }
        };
        if constexpr (NK == 1) {
          // planar: the inputs only window c covers, [max(start c, end c-1), min(end c, start c+1)), are
          // one run of the same value; windows are monotone, so the others lie between two such runs
          int64_t done = 0;
          for (int64_t c = 0; c < W.O; ++c) {
            const int64_t lo = c > 0 ? std::max(W.start[c], W.end[c - 1]) : W.start[c];
            const int64_t hi = c + 1 < W.O ? std::min(W.end[c], W.start[c + 1]) : W.end[c];
            for (int64_t i = done; i < lo; ++i) covered(i);
            if (lo < hi) {
              std::fill(out + lo, out + hi, static_cast<T>(acc[c]));
              done = hi;
            } else {
              done = std::max(done, lo);
            }
          }
          for (int64_t i = done; i < W.L; ++i) covered(i);
        } else {
          for (int64_t i = 0; i < W.L; ++i) covered(i);
        }
      });
    });
  });
}

// ---- max forward --------------------------------------------------------------------------

template <typename V>
inline bool is_nan(V v) { return v != v; }

// PyTorch's rule as an order-free comparison of (value, flat index): any NaN beats a
// number and the later NaN wins; else the larger value, then the smaller index.
// Written with bitwise operators so that loops over it compile to selects.
template <typename V>
inline bool better(V v, int64_t f, V bv, int64_t bf) {
  const bool vn = is_nan(v), bn = is_nan(bv);
  return (vn & (!bn | (f > bf))) | (!vn & !bn & ((v > bv) | ((v == bv) & (f < bf))));
}

// One output row: the windows along W of per-column winners `src` (value, nk channels per
// position, position stride `step`) found at flat offsets row_of(i, k) + i.  When every
// candidate lies in one input row, flat order is column order and the rule is simply
// "greater, or NaN" (a later NaN wins, a tie keeps the earlier).
template <int NK, bool kOneRow, typename T, typename acc_t, typename S, typename RowOf>
inline void max_row(const S* __restrict__ src, int64_t step, RowOf row_of, int64_t nk_, const Axis& w,
                    T* __restrict__ out, int64_t* __restrict__ idx, int64_t K) {
  const int64_t nk = NK ? NK : nk_;
  acc_t bv[kBlock];
  int64_t bf[kBlock];
  for (int64_t c = 0; c < w.O; ++c) {
    const int64_t i0 = w.start[c];
    if constexpr (NK == 1 && kOneRow) {
      if (w.size(c) >= kLanes) {  // planar, one long contiguous span
        const int64_t i = i0 + span_argmax<acc_t>(src + i0, w.size(c));
        out[c * K] = static_cast<T>(src[i]);
        idx[c * K] = row_of(i, 0) + i;
        continue;
      }
    }
    for (int64_t k = 0; k < nk; ++k) {
      bv[k] = static_cast<acc_t>(src[i0 * step + k]);
      bf[k] = row_of(i0, k) + i0;
    }
    for (int64_t i = i0 + 1; i < w.end[c]; ++i)
      for (int64_t k = 0; k < nk; ++k) {
        const acc_t v = static_cast<acc_t>(src[i * step + k]);
        const int64_t f = row_of(i, k) + i;
        const bool take = kOneRow ? ((v > bv[k]) | is_nan(v)) : better(v, f, bv[k], bf[k]);
        bv[k] = take ? v : bv[k];
        bf[k] = take ? f : bf[k];
      }
    for (int64_t k = 0; k < nk; ++k) {
      out[c * K + k] = static_cast<T>(bv[k]);
      idx[c * K + k] = bf[k];
    }
  }
}

// ---- channels_last float max: 16 channels in one vector, in registers down the whole window --
// (GCC/Clang vector types: AVX-512, two AVX2 halves or NEON quarters, as the machine has.)  The
// window's positions are visited in flat order, so "greater, or NaN" keeps the first maximum and
// the last NaN; indices are int32 lanes, widened on the store (planes under 2^31 positions).

using i32x16 = int32_t __attribute__((vector_size(64)));
using i64x16 = int64_t __attribute__((vector_size(128)));
constexpr int64_t kVector = 16;

// (upsampling is left to the other paths: its windows of 1 or 2 make these loops' trip counts unpredictable)
inline bool vector_max(const Problem& p) {
  return p.K >= kVector && !p.per_sample() && downsamples(p) &&
         p.d.L * p.h.L * p.w.L < std::numeric_limits<int32_t>::max();
}

void max_vector_kernel(const float* x, float* y, int64_t* yi, const Problem& p) {
  const Axis &D = p.d, &H = p.h, &W = p.w;
  const int64_t K = p.K, vectors = K / kVector, full = vectors * kVector;
  const int64_t per_row = std::max<int64_t>(1, D.L * H.L * p.in_row() / (D.O * H.O));
  at::parallel_for(0, p.B * D.O * H.O, grain(per_row), [&](int64_t lo, int64_t hi) {
    std::vector<f32x16> best(vectors);  // one output's running maxima and their positions, all channels
    std::vector<i32x16> where(vectors);
    for_items(lo, hi, D.O, H.O, 1, [&](int64_t n, int64_t a, int64_t b, int64_t) {
      const float* xn = x + n * D.L * H.L * p.in_row();
      const int64_t r = ((n * D.O + a) * H.O + b) * p.out_row();
      for (int64_t c = 0; c < W.O; ++c) {
        const int64_t f0 = (D.start[a] * H.L + H.start[b]) * W.L + W.start[c];
        for (int64_t v = 0; v < vectors; ++v) {
          std::memcpy(&best[v], xn + f0 * K + v * kVector, sizeof(f32x16));
          where[v] = i32x16{} + static_cast<int32_t>(f0);
        }
        // positions outer, channels inner: the input is read in memory order
        for (int64_t d = D.start[a]; d < D.end[a]; ++d)
          for (int64_t h = H.start[b]; h < H.end[b]; ++h) {
            const int64_t rf = (d * H.L + h) * W.L;
            for (int64_t i = W.start[c]; i < W.end[c]; ++i) {
              const float* xi = xn + (rf + i) * K;
              const i32x16 at = i32x16{} + static_cast<int32_t>(rf + i);
              for (int64_t v = 0; v < vectors; ++v) {
                f32x16 t;
                std::memcpy(&t, xi + v * kVector, sizeof t);
                const i32x16 take = (t > best[v]) | (t != t);
                best[v] = take ? t : best[v];
                where[v] = take ? at : where[v];
              }
            }
          }
        for (int64_t v = 0; v < vectors; ++v) {
          std::memcpy(y + r + c * K + v * kVector, &best[v], sizeof(f32x16));
          const i64x16 wide = __builtin_convertvector(where[v], i64x16);
          std::memcpy(yi + r + c * K + v * kVector, &wide, sizeof wide);
        }
        for (int64_t k = full; k < K; ++k) {  // the channels past the last full vector
          float bv = xn[f0 * K + k];
          int64_t bf = f0;
          for (int64_t d = D.start[a]; d < D.end[a]; ++d)
            for (int64_t h = H.start[b]; h < H.end[b]; ++h) {
              const int64_t rf = (d * H.L + h) * W.L;
              for (int64_t i = W.start[c]; i < W.end[c]; ++i) {
                const float t = xn[(rf + i) * K + k];
                const bool take = (t > bv) | (t != t);
                bv = take ? t : bv;
                bf = take ? rf + i : bf;
              }
            }
          y[r + c * K + k] = bv;
          yi[r + c * K + k] = bf;
        }
      }
    });
  });
}

template <typename T>
void max_forward_kernel(const T* x, T* y, int64_t* yi, const Problem& p) {
  using acc_t = at::opmath_type<T>;
  const Axis &Dp = p.d, &Hp = p.h, &Wp = p.w;  // the buffers' extents
  if (planar_global(p) && Wp.L >= kLanes) {  // each plane one span, without the general loop's per-item set-up
    const int64_t L = Wp.L;
    at::parallel_for(0, p.B, grain(L), [&](int64_t lo, int64_t hi) {
      for (int64_t b = lo; b < hi; ++b) {
        const int64_t i = span_argmax<acc_t>(x + b * L, L);
        y[b] = x[b * L + i];
        yi[b] = i;
      }
    });
    return;
  }
  if constexpr (std::is_same_v<T, float>)
    if (vector_max(p)) return max_vector_kernel(x, y, yi, p);
  if (small_windows(p, true)) return max_small_kernel(x, y, yi, p);
  const int64_t KB = p.blocks(), items = p.B * Dp.O * Hp.O * KB;
  const int64_t per_item = std::max<int64_t>(1, Dp.L * Hp.L * p.in_row() / (Dp.O * Hp.O * KB));
  at::parallel_for(0, items, grain(per_item), [&](int64_t lo, int64_t hi) {
    const int64_t width = Wp.L * std::min(p.K, kBlock);
    const int64_t wmax = max_window(Wp);
    const bool narrow = p.K == 1 && wmax <= kNarrow && !p.per_sample();  // (its tables are the batch's)
    std::vector<acc_t> best_buffer(width);
    std::vector<int64_t> rows_buffer(width);  // flat offset of the row holding best[.]
    for_items(lo, hi, Dp.O, Hp.O, KB, [&](int64_t n, int64_t a, int64_t b, int64_t kb) {
      const int64_t r = (n * Dp.O + a) * Hp.O + b;  // output row
      const int64_t k0 = kb * kBlock;
      const T* xn = x + n * Dp.L * Hp.L * p.in_row() + k0;
      T* out = y + r * p.out_row() + k0;
      int64_t* idx = yi + r * p.out_row() + k0;
      const Axis &D = p.axis(n, 0), &H = p.axis(n, 1), &W = p.axis(n, 2);  // this sample's windows
      if (a >= D.O || b >= H.O) {
        zero_cols(out, 0, Wp.O, std::min(p.K - k0, kBlock), p.K);
        return zero_cols(idx, 0, Wp.O, std::min(p.K - k0, kBlock), p.K);
      }
      zero_cols(out, W.O, Wp.O, std::min(p.K - k0, kBlock), p.K);
      zero_cols(idx, W.O, Wp.O, std::min(p.K - k0, kBlock), p.K);
      const int64_t r0 = (D.start[a] * Hp.L + H.start[b]) * Wp.L;  // flat offset of the window's first row
      const T* x0 = xn + r0 / Wp.L * p.in_row();
      with_nk(std::min(p.K - k0, kBlock), [&](auto NKc) {
        constexpr int NK = decltype(NKc)::value;
        const int64_t nk = NK ? NK : std::min(p.K - k0, kBlock);
        if (D.size(a) * H.size(b) == 1) {
          max_row<NK, true, T, acc_t>(x0, p.K, [r0](int64_t, int64_t) { return r0; }, nk, W, out, idx, p.K);
          return;
        }
        if constexpr (NK == 1) {
          if (narrow) return max_lockstep_row(xn, D, H, W, wmax, a, b, out, idx);
        }
        // down the window's rows, per column: the first max, or the last NaN (rows in flat order)
        acc_t* best = best_buffer.data();
        int64_t* rows = rows_buffer.data();
        for (int64_t d = D.start[a]; d < D.end[a]; ++d)
          for (int64_t h = H.start[b]; h < H.end[b]; ++h) {
            const int64_t rf = (d * Hp.L + h) * Wp.L;
            max_into_row<NK>(xn + (d * Hp.L + h) * p.in_row(), p.K, W.L, nk, best, rows, rf, rf == r0);
          }
        max_row<NK, false, T, acc_t>(best, nk, [rows, nk](int64_t i, int64_t k) { return rows[i * nk + k]; }, nk, W,
                                     out, idx, p.K);
      });
    });
  });
}

// ---- max backward: each input sums the g of the covering outputs whose argmax it is ----
// A scatter of each output's g to its argmax, item by item over disjoint parts of gin (one
// plane, or one sample's block of channels): no atomics, and each input receives its outputs in
// flat output order — the order a gather over the covering outputs would sum them in.

// A channels_last item is one whole sample (its gin zeroed in one contiguous fill) when the batch
// keeps the threads busy, else kScatterBlock channels of it, so that a batch of one still splits.
constexpr int64_t kScatterBlock = 16;

template <typename T>
void max_backward_kernel(const T* g, const int64_t* gi, T* gin, const Problem& p) {
  using acc_t = at::opmath_type<T>;
  constexpr bool direct = std::is_same_v<acc_t, T>;  // else sum in acc_t and round once
  const Axis &Dp = p.d, &Hp = p.h, &Wp = p.w;  // the buffers' extents
  const int64_t plane_in = Dp.L * Hp.L * Wp.L, plane_out = Dp.O * Hp.O * Wp.O, K = p.K;
  const int64_t block = p.B >= 4 * at::get_num_threads() ? K : std::min(K, kScatterBlock), KB = ceil_div(K, block);
  at::parallel_for(0, p.B * KB, grain((plane_in + plane_out) * block), [&](int64_t lo, int64_t hi) {
    std::vector<acc_t> buffer(direct ? 0 : plane_in * block);
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t b = t / KB, k0 = t % KB * block, nk = std::min(K - k0, block);
      const Axis &D = p.axis(b, 0), &H = p.axis(b, 1), &W = p.axis(b, 2);  // this sample's windows
      T* __restrict__ out = gin + b * plane_in * K + k0;
      acc_t* __restrict__ acc;
      int64_t step;  // acc's stride between positions
      if constexpr (direct) {
        acc = out;
        step = K;
      } else {
        acc = buffer.data();
        step = nk;
      }
      if (step == nk) std::fill(acc, acc + plane_in * nk, acc_t(0));
      else zero_cols(acc, 0, plane_in, nk, step);
      for (int64_t a = 0; a < D.O; ++a)
        for (int64_t bb = 0; bb < H.O; ++bb) {
          const int64_t o = ((b * Dp.O + a) * Hp.O + bb) * Wp.O * K + k0;
          for (int64_t c = 0; c < W.O; ++c)
            for (int64_t k = 0; k < nk; ++k) {
              const int64_t f = gi[o + c * K + k];
              TORCH_CHECK(f >= 0 && f < plane_in, "anypool_cpu: index ", f, " outside the plane of ", plane_in);
              acc[f * step + k] += static_cast<acc_t>(g[o + c * K + k]);
            }
        }
      if constexpr (!direct) {
        if (nk == K) {  // one contiguous run: the rounding loop vectorises
          for (int64_t i = 0; i < plane_in * K; ++i) out[i] = static_cast<T>(acc[i]);
        } else {
          for (int64_t i = 0; i < plane_in; ++i)
            for (int64_t k = 0; k < nk; ++k) out[i * K + k] = static_cast<T>(acc[i * nk + k]);
        }
      }
    }
  });
}

}  // namespace

// ---- the ops (ops.h) ----------------------------------------------------------------------

Tensor avg_forward(const Tensor& x, at::IntArrayRef output_size, const std::optional<Tensor>& sizes) {
  check(x, output_size, "output_size");
  const bool cl = channels_last(x);
  const Tensor xp = physical(x, cl);
  Tensor out = layout_empty(x, output_size, cl, x.scalar_type());
  const Problem p = problem(x.size(0), x.size(1), x.sizes().slice(2), output_size, cl, false, sizes);
  ANYPOOL_DISPATCH(x.scalar_type(), "avg_forward", [&] {
    avg_forward_kernel(xp.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), p);
  });
  return out;
}

Tensor avg_backward(const Tensor& grad_out, at::IntArrayRef input_size, const std::optional<Tensor>& sizes) {
  check(grad_out, input_size, "input_size");
  const bool cl = channels_last(grad_out);
  const Tensor gp = physical(grad_out, cl);
  Tensor gin = layout_empty(grad_out, input_size, cl, grad_out.scalar_type());
  const Problem p = problem(grad_out.size(0), grad_out.size(1), input_size, grad_out.sizes().slice(2), cl, true, sizes);
  ANYPOOL_DISPATCH(grad_out.scalar_type(), "avg_backward", [&] {
    avg_backward_kernel(gp.const_data_ptr<scalar_t>(), gin.mutable_data_ptr<scalar_t>(), p);
  });
  return gin;
}

std::tuple<Tensor, Tensor> max_forward(const Tensor& x, at::IntArrayRef output_size,
                                       const std::optional<Tensor>& sizes) {
  check(x, output_size, "output_size");
  const bool cl = channels_last(x);
  const Tensor xp = physical(x, cl);
  Tensor out = layout_empty(x, output_size, cl, x.scalar_type());
  Tensor idx = layout_empty(x, output_size, cl, at::kLong);
  const Problem p = problem(x.size(0), x.size(1), x.sizes().slice(2), output_size, cl, false, sizes);
  ANYPOOL_DISPATCH(x.scalar_type(), "max_forward", [&] {
    max_forward_kernel(xp.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                       idx.mutable_data_ptr<int64_t>(), p);
  });
  return {out, idx};
}

Tensor max_backward(const Tensor& grad_out, const Tensor& indices, at::IntArrayRef input_size,
                    const std::optional<Tensor>& sizes) {
  check(grad_out, input_size, "input_size");
  TORCH_CHECK(indices.sizes() == grad_out.sizes() && indices.scalar_type() == at::kLong,
              "anypool_cpu: indices must be int64 of grad_out's shape");
  const bool cl = channels_last(grad_out);
  const Tensor gp = physical(grad_out, cl);
  const Tensor ip = physical(indices, cl);  // read in g's order (a copy only if the layouts differ)
  Tensor gin = layout_empty(grad_out, input_size, cl, grad_out.scalar_type());
  const Problem p = problem(grad_out.size(0), grad_out.size(1), input_size, grad_out.sizes().slice(2), cl, false, sizes);
  ANYPOOL_DISPATCH(grad_out.scalar_type(), "max_backward", [&] {
    max_backward_kernel(gp.const_data_ptr<scalar_t>(), ip.const_data_ptr<int64_t>(),
                        gin.mutable_data_ptr<scalar_t>(), p);
  });
  return gin;
}

// bins.h's tables for one axis, stacked (start, end, cover first, cover last) and padded
// with -1 to max(L, O): what the test compares with _bins.
Tensor bins(int64_t L, int64_t O) {
  const Axis ax(L, O, true);
  const int64_t n = std::max(L, O);
  Tensor t = at::full({4, n}, -1, at::TensorOptions().dtype(at::kLong));
  int64_t* p = t.mutable_data_ptr<int64_t>();
  for (int64_t j = 0; j < O; ++j) {
    p[j] = ax.start[j];
    p[n + j] = ax.end[j];
  }
  for (int64_t i = 0; i < L; ++i) {
    p[2 * n + i] = ax.first[i];
    p[3 * n + i] = ax.stop[i] - 1;
  }
  return t;
}

// Single values of bins.h for axes too long to tabulate.
std::vector<int64_t> bin_at(int64_t k, int64_t L, int64_t O) {
  return {bin_start(k, L, O), bin_end(k, L, O), cover_first(k, L, O), cover_last(k, L, O)};
}

}  // namespace anypool
