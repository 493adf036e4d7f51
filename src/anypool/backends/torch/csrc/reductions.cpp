// anypool's CPU kernels for the reductions beyond avg and max, on torch's intra-op pool:
//   * power means: LP  y = (Σ_w x^p)^(1/p)  and GeM  y = (mean_w max(x, eps)^p)^(1/p);
//   * avgmax: the window's mean, maximum and argmax from one pass (timm's avgmax / catavgmax).
// Same buffers as pool.cpp (common.h): the logical (N, C, *S) tensor as (B, D, H, W, K),
// results in its memory format.  Half types are read into float, accumulated there, rounded once.
//
// A power mean is computed as s·(Σ (t/s)^p)^(1/p) with s the power of two just above the window's
// m = max |t|, so no term exceeds 1: a large p neither overflows nor (for the window's largest
// terms) underflows, and t/s is an exact product.  A window with m = inf is (Σ_{|t|=inf} t^p)^(1/p)
// (the finite terms cannot matter, unless their power is NaN: a negative t with a non-integer p, NaN in
// torch.pow too), m = NaN is NaN.  Each window is read twice (its maximum, then
// the powers), from cache.
//
// Backward passes are gathers, as in pool.cpp: one pass over the outputs computes each
// window's coefficient, then each input row is written by one work item from the outputs
// covering it, in output order — no atomics, bitwise identical for any thread count.
//   LP:  dy/dx_i = y · u_i^(p-1) / (s·T)            (u = x/s, T = Σ u^p; 0 where T = 0, as torch)
//   GeM: dy/dx_i = y · u_i^(p-1) / (s·T) · [x_i >= eps]    (u = max(x, eps)/s; n = window size),
//        dy/dp   = (y/p) · (Σ u^p ln u / T - ln(T/n) / p)   (summed over outputs in float64).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/aminmax.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <cmath>
#include <limits>

#include "common.h"
#include "ops.h"

namespace anypool {
namespace {

using at::Tensor;
using namespace common;

// u^p with the small integer powers as products (IP = p; 0: any p, std::pow).
template <int IP, typename V>
inline V power(V u, V p) {
  if constexpr (IP == 1) return u;
  else if constexpr (IP == 2) return u * u;
  else if constexpr (IP == 3) return u * u * u;
  else if constexpr (IP == 4) return (u * u) * (u * u);
  else return std::pow(u, p);
}

template <typename F>
inline void with_power(double p, F&& f) {
  if (p == 1.0) f(std::integral_constant<int, 1>{});
  else if (p == 2.0) f(std::integral_constant<int, 2>{});
  else if (p == 3.0) f(std::integral_constant<int, 3>{});
  else if (p == 4.0) f(std::integral_constant<int, 4>{});
  else f(std::integral_constant<int, 0>{});
}

template <typename V>
inline bool is_nan(V v) { return v != v; }

// Visits the elements of output (n, a, b, c)'s window, in row-major order, as f(pointer to its nk channels).
template <typename T, typename F>
inline void window(const T* xn, const Problem& p, int64_t a, int64_t b, int64_t c, F&& f) {
  const Axis &D = p.d, &H = p.h, &W = p.w;
  for (int64_t d = D.start[a]; d < D.end[a]; ++d)
    for (int64_t h = H.start[b]; h < H.end[b]; ++h) {
      const T* row = xn + (d * H.L + h) * p.in_row();
      for (int64_t i = W.start[c]; i < W.end[c]; ++i) f(row + i * p.K, (d * H.L + h) * W.L + i);
    }
}

// Calls f(offset, length) for the contiguous spans of planar window (a, b, c), in row-major order:
// a window spanning whole rows (a global pool: the whole plane) is one span per plane or per
// block of rows, so its loops vectorise over more than one row's few elements.
template <typename F>
inline void planar_spans(const Problem& p, int64_t a, int64_t b, int64_t c, F&& f) {
  const Axis &D = p.d, &H = p.h, &W = p.w;
  if (W.size(c) == W.L && H.size(b) == H.L) return f(D.start[a] * H.L * W.L, D.size(a) * H.L * W.L);
  if (W.size(c) == W.L) {
    for (int64_t d = D.start[a]; d < D.end[a]; ++d) f((d * H.L + H.start[b]) * W.L, H.size(b) * W.L);
    return;
  }
  for (int64_t d = D.start[a]; d < D.end[a]; ++d)
    for (int64_t h = H.start[b]; h < H.end[b]; ++h) f((d * H.L + h) * W.L + W.start[c], W.size(c));
}

// The reciprocal 2^-e of a window's scale 2^e, m < 2^e <= 2m for its largest term m (1 when m is
// 0, inf or NaN): multiplying by it is exact, and u = t·2^-e < 1.  Below the normal range the
// scale stays at the smallest normal exponent, so that 2^-e is finite.
template <typename acc_t>
inline acc_t inverse_scale(acc_t m) {
  if (!(std::isfinite(m) && m > 0)) return acc_t(1);
  int e;
  std::frexp(m, &e);
  return std::ldexp(acc_t(1), -std::max(e, std::numeric_limits<acc_t>::min_exponent));
}

// The largest term t of a planar window (K == 1), with independent lanes folded by halving, so
// the loops vectorise.  It skips NaN (NaN never compares greater); a NaN term then makes the
// total NaN, as the sticky maximum of the channels_last loop does.
template <typename acc_t, typename T, typename Term>
inline acc_t planar_max(const T* xn, const Problem& p, int64_t a, int64_t b, int64_t c, Term&& term) {
  // (the tails in a scalar of their own: lanes indexed only by constants stay in registers)
  acc_t m[kLanes] = {}, tail = 0;  // every t here is >= 0 (|x|, or clamped to eps > 0)
  planar_spans(p, a, b, c, [&](int64_t offset, int64_t n) {
    const T* __restrict__ v = xn + offset;
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes)
      for (int l = 0; l < kLanes; ++l) {
        const acc_t t = term(static_cast<acc_t>(v[i + l]));
        m[l] = t > m[l] ? t : m[l];
      }
    for (; i < n; ++i) {
      const acc_t t = term(static_cast<acc_t>(v[i]));
      tail = t > tail ? t : tail;
    }
  });
  const acc_t lanes = fold(m, [](acc_t x, acc_t y) { return y > x ? y : x; });
  return tail > lanes ? tail : lanes;
}

// Σ u^p (and, with LOG, Σ u^p ln u) over the terms of a planar window, u = t·inv; `keep(t)`
// picks the terms from t and its power (all of them unless the window's maximum is inf).
template <int IP, bool LOG, typename acc_t, typename T, typename Term, typename Keep>
inline void planar_powers(const T* xn, const Problem& p, int64_t a, int64_t b, int64_t c, acc_t pw, acc_t inv,
                          Term&& term, Keep&& keep, acc_t* total, acc_t* logs) {
  acc_t s[kLanes] = {}, g[kLanes] = {}, s_tail = 0, g_tail = 0;
  const auto add = [&](acc_t& sum, acc_t& log_sum, acc_t x) {
    const acc_t t = term(x), u = t * inv, power_u = power<IP>(u, pw);
    sum += keep(t, power_u) ? power_u : acc_t(0);
    if (LOG) log_sum += keep(t, power_u) ? power_u * std::log(u) : acc_t(0);
  };
  planar_spans(p, a, b, c, [&](int64_t offset, int64_t n) {
    const T* __restrict__ v = xn + offset;
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes)
      for (int l = 0; l < kLanes; ++l) add(s[l], g[l], static_cast<acc_t>(v[i + l]));
    for (; i < n; ++i) add(s_tail, g_tail, static_cast<acc_t>(v[i]));  // (see planar_max)
  });
  const auto plus = [](acc_t x, acc_t y) { return x + y; };
  total[0] = fold(s, plus) + s_tail;
  if (LOG) logs[0] = fold(g, plus) + g_tail;
}

template <bool GEM, int IP, bool LOG, typename T, typename acc_t>
inline void planar_window_sums(const T* xn, const Problem& p, int64_t a, int64_t b, int64_t c, acc_t pw,
                               acc_t eps, acc_t* inv, acc_t* total, acc_t* logs) {
  const auto term = [eps](acc_t t) { return GEM ? (t < eps ? eps : t) : t; };
  const acc_t m = planar_max<acc_t>(xn, p, a, b, c, [&](acc_t t) { return GEM ? term(t) : std::abs(t); });
  inv[0] = inverse_scale(m);
  if (std::isinf(m))  // only the infinite and the NaN terms count
    planar_powers<IP, LOG>(xn, p, a, b, c, pw, inv[0], term,
                           [](acc_t t, acc_t power_t) { return !(t - t == 0) || is_nan(power_t); }, total, logs);
  else
    planar_powers<IP, LOG>(xn, p, a, b, c, pw, inv[0], term, [](acc_t, acc_t) { return true; }, total, logs);
}

// The scaled sums of one window, per channel: inv (inverse_scale of its largest |t|), T = Σ u^p
// (u = t·inv, terms restricted to |t| = inf when that is the largest) and, with LOG, Σ u^p ln u.
template <bool GEM, int IP, bool LOG, typename T, typename acc_t>
inline void window_sums(const T* xn, const Problem& p, int64_t a, int64_t b, int64_t c, int64_t nk, acc_t pw,
                        acc_t eps, acc_t* inv, acc_t* total, acc_t* logs) {
  if (p.K == 1) return planar_window_sums<GEM, IP, LOG>(xn, p, a, b, c, pw, eps, inv, total, logs);
  acc_t m[kBlock];
  for (int64_t k = 0; k < nk; ++k) m[k] = 0;
  window(xn, p, a, b, c, [&](const T* v, int64_t) {
    for (int64_t k = 0; k < nk; ++k) {
      acc_t t = static_cast<acc_t>(v[k]);
      t = GEM ? (t < eps ? eps : t) : std::abs(t);  // (t < eps) is false for NaN: NaN stays
      m[k] = (t > m[k] || is_nan(t)) ? t : m[k];
    }
  });
  bool any_inf = false;
  for (int64_t k = 0; k < nk; ++k) {
    any_inf |= std::isinf(m[k]);
    inv[k] = inverse_scale(m[k]);
    total[k] = 0;
    if (LOG) logs[k] = 0;
  }
  // The block's windows without an infinite maximum (nearly always: one branch per window, not
  // per term, so the loop over channels vectorises), then the general loop.
  if (!any_inf) {
    window(xn, p, a, b, c, [&](const T* v, int64_t) {
      for (int64_t k = 0; k < nk; ++k) {
        acc_t t = static_cast<acc_t>(v[k]);
        if (GEM) t = t < eps ? eps : t;
        const acc_t u = t * inv[k], power_u = power<IP>(u, pw);
        total[k] += power_u;
        if (LOG) logs[k] += power_u * std::log(u);
      }
    });
    return;
  }
  window(xn, p, a, b, c, [&](const T* v, int64_t) {
    for (int64_t k = 0; k < nk; ++k) {
      acc_t t = static_cast<acc_t>(v[k]);
      if (GEM) t = t < eps ? eps : t;
      const acc_t u = t * inv[k], power_u = power<IP>(u, pw);
      const bool skip = std::isinf(m[k]) & !std::isinf(t) & !is_nan(power_u);
      total[k] += skip ? acc_t(0) : power_u;
      if (LOG) logs[k] += skip ? acc_t(0) : power_u * std::log(u);
    }
  });
}

// Planar global windows of few elements (a classifier head's 7x7 planes): kBlock planes at a time
// are transposed into a channels_last block, so that the loops over channels vectorise across
// planes instead of each small plane paying its own lanes' set-up and folds.
constexpr int64_t kTransposedPlane = 256;

// block[i * kBlock + k] = planes[k * L + i] for the nk planes of L elements each.
template <typename T>
inline void transpose_planes(const T* __restrict__ planes, int64_t L, int64_t nk, T* __restrict__ block) {
  // large planes a few positions per pass, so that the block's lines being written stay in cache
  // (measured: 224x224 planes 1.7x faster; planes up to 64x64 are as fast or faster in one pass)
  const int64_t tile = L <= 4096 ? L : 16;
  for (int64_t i0 = 0; i0 < L; i0 += tile) {
    const int64_t i1 = std::min(L, i0 + tile);
    for (int64_t k = 0; k < nk; ++k)
      for (int64_t i = i0; i < i1; ++i) block[i * kBlock + k] = planes[k * L + i];
  }
}

template <bool GEM, int IP, typename T>
void planar_global_power_forward(const T* x, T* y, const Problem& p, double pw_, double eps_) {
  using acc_t = at::opmath_type<T>;
  const acc_t pw = static_cast<acc_t>(pw_), eps = static_cast<acc_t>(eps_), root = acc_t(1) / pw;
  const int64_t L = p.w.L, one = 1;
  const Problem block = problem(1, kBlock, at::IntArrayRef(&L, 1), at::IntArrayRef(&one, 1), true, false);
  at::parallel_for(0, ceil_div(p.B, kBlock), grain(kBlock * L), [&](int64_t lo, int64_t hi) {
    std::vector<T> buffer(L * kBlock);
    acc_t inv[kBlock], total[kBlock];
    for (int64_t blk = lo; blk < hi; ++blk) {
      const int64_t r0 = blk * kBlock, nk = std::min(kBlock, p.B - r0);
      transpose_planes(x + r0 * L, L, nk, buffer.data());
      window_sums<GEM, IP, false>(buffer.data(), block, 0, 0, 0, nk, pw, eps, inv, total,
                                  static_cast<acc_t*>(nullptr));
      for (int64_t k = 0; k < nk; ++k) {
        const acc_t s = GEM ? total[k] / acc_t(L) : total[k];
        y[r0 + k] = static_cast<T>(std::pow(s, root) / inv[k]);
      }
    }
  });
}

template <bool GEM, int IP, typename T>
void power_forward_kernel(const T* x, T* y, const Problem& p, double pw_, double eps_) {
  if (planar_global(p) && p.w.L <= kTransposedPlane)
    return planar_global_power_forward<GEM, IP>(x, y, p, pw_, eps_);
  using acc_t = at::opmath_type<T>;
  const acc_t pw = static_cast<acc_t>(pw_), eps = static_cast<acc_t>(eps_), root = acc_t(1) / pw;
  const Axis &D = p.d, &H = p.h, &W = p.w;
  const int64_t KB = p.blocks(), items = p.B * D.O * H.O * KB;
  const int64_t per_item = std::max<int64_t>(1, 2 * D.L * H.L * p.in_row() / (D.O * H.O * KB));
  at::parallel_for(0, items, grain(per_item), [&](int64_t lo, int64_t hi) {
    acc_t inv[kBlock], total[kBlock];
    for_items(lo, hi, D.O, H.O, KB, [&](int64_t n, int64_t a, int64_t b, int64_t kb) {
      const int64_t k0 = kb * kBlock, nk = std::min(p.K - k0, kBlock);
      const T* xn = x + n * D.L * H.L * p.in_row() + k0;
      T* out = y + ((n * D.O + a) * H.O + b) * p.out_row() + k0;
      for (int64_t c = 0; c < W.O; ++c) {
        window_sums<GEM, IP, false>(xn, p, a, b, c, nk, pw, eps, inv, total, static_cast<acc_t*>(nullptr));
        const acc_t count = acc_t(D.size(a) * H.size(b) * W.size(c));
        for (int64_t k = 0; k < nk; ++k) {
          const acc_t s = GEM ? total[k] / count : total[k];
          out[c * p.K + k] = static_cast<T>(std::pow(s, root) / inv[k]);
        }
      }
    });
  });
}

// Backward: coefficients per output (coef = g·y·inv/T [/n], and inv), then the gather.
template <bool GEM, int IP, typename T>
void power_backward_kernel(const T* g, const T* x, T* gin, double* gp, const Problem& p, double pw_, double eps_) {
  using acc_t = at::opmath_type<T>;
  const acc_t pw = static_cast<acc_t>(pw_), eps = static_cast<acc_t>(eps_), root = acc_t(1) / pw;
  const Axis &D = p.d, &H = p.h, &W = p.w;
  const int64_t KB = p.blocks();
  const int64_t outputs = p.B * D.O * H.O * p.out_row();
  std::vector<acc_t> coef(outputs), invs(outputs);
  const int64_t per_item = std::max<int64_t>(1, 2 * D.L * H.L * p.in_row() / (D.O * H.O * KB));
  at::parallel_for(0, p.B * D.O * H.O * KB, grain(per_item), [&](int64_t lo, int64_t hi) {
    acc_t inv[kBlock], total[kBlock], logs[kBlock];
    for_items(lo, hi, D.O, H.O, KB, [&](int64_t n, int64_t a, int64_t b, int64_t kb) {
      const int64_t k0 = kb * kBlock, nk = std::min(p.K - k0, kBlock);
      const T* xn = x + n * D.L * H.L * p.in_row() + k0;
      const int64_t o0 = ((n * D.O + a) * H.O + b) * p.out_row() + k0;
      for (int64_t c = 0; c < W.O; ++c) {
        if (gp) window_sums<GEM, IP, true>(xn, p, a, b, c, nk, pw, eps, inv, total, logs);
        else window_sums<GEM, IP, false>(xn, p, a, b, c, nk, pw, eps, inv, total, logs);
        const acc_t count = acc_t(D.size(a) * H.size(b) * W.size(c));
        for (int64_t k = 0; k < nk; ++k) {
          const int64_t o = o0 + c * p.K + k;
          const acc_t gk = static_cast<acc_t>(g[o]);
          const acc_t s = GEM ? total[k] / count : total[k];
          const acc_t yk = std::pow(s, root) / inv[k];
          coef[o] = total[k] == 0 ? acc_t(0) : gk * yk * inv[k] / total[k];
          invs[o] = inv[k];
          if (gp) gp[o] = static_cast<double>(gk) * static_cast<double>(yk) / pw_ *
                          (static_cast<double>(logs[k]) / static_cast<double>(total[k]) -
                           std::log(static_cast<double>(s)) / pw_);
        }
      }
    });
  });
  if (planar_global(p)) {  // one coefficient per plane: the gather below without its per-row set-up
    const int64_t L = W.L;
    at::parallel_for(0, p.B, grain(L), [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        const T* __restrict__ xr = x + r * L;
        T* __restrict__ out = gin + r * L;
        const acc_t cf = coef[r], inv = invs[r];
        for (int64_t i = 0; i < L; ++i) {
          const acc_t t = static_cast<acc_t>(xr[i]);
          const acc_t v = acc_t(0) + cf * power<IP == 0 ? 0 : IP - 1>((GEM && t < eps ? eps : t) * inv, pw - acc_t(1));
          out[i] = static_cast<T>(!GEM || !(t < eps) ? v : acc_t(0));
        }
      }
    });
    return;
  }
  at::parallel_for(0, p.B * D.L * H.L * KB, grain(2 * p.in_row() / KB), [&](int64_t lo, int64_t hi) {
    std::vector<acc_t> acc_buffer(W.L * std::min(p.K, kBlock));
    for_items(lo, hi, D.L, H.L, KB, [&](int64_t n, int64_t d, int64_t h, int64_t kb) {
      const int64_t k0 = kb * kBlock, nk = std::min(p.K - k0, kBlock);
      const int64_t r = (n * D.L + d) * H.L + h;  // input row
      const T* xr = x + r * p.in_row() + k0;
      acc_t* __restrict__ acc = acc_buffer.data();
      std::fill(acc, acc + W.L * nk, acc_t(0));
      for (int64_t a = D.first[d]; a < D.stop[d]; ++a)
        for (int64_t b = H.first[h]; b < H.stop[h]; ++b) {
          const int64_t o0 = ((n * D.O + a) * H.O + b) * p.out_row() + k0;
          for (int64_t i = 0; i < W.L; ++i)
            for (int64_t c = W.first[i]; c < W.stop[i]; ++c)
              for (int64_t k = 0; k < nk; ++k) {
                acc_t t = static_cast<acc_t>(xr[i * p.K + k]);
                if (GEM) t = t < eps ? eps : t;
                const int64_t o = o0 + c * p.K + k;
                const acc_t u = t * invs[o];
                acc[i * nk + k] += coef[o] * power<IP == 0 ? 0 : IP - 1>(u, pw - acc_t(1));
              }
        }
      T* out = gin + r * p.in_row() + k0;
      for (int64_t i = 0; i < W.L; ++i)
        for (int64_t k = 0; k < nk; ++k) {
          // the clamp passes the gradient where x >= eps (torch.clamp's rule); NaN passes
          const bool pass = !GEM || !(static_cast<acc_t>(xr[i * p.K + k]) < eps);
          out[i * p.K + k] = static_cast<T>(pass ? acc[i * nk + k] : acc_t(0));
        }
    });
  });
}

// ---- avgmax: mean, max and argmax of each window in one pass -----------------------------

// Output o of avgmax (combine: 0.5·(mean + max)) or catavgmax's two halves, and the argmax.
template <typename T, typename acc_t>
inline void write_avgmax(T* ya, T* ym, int64_t* yi, int64_t o, acc_t mean, acc_t best, int64_t where, bool combine) {
  ya[o] = static_cast<T>(combine ? acc_t(0.5) * (mean + best) : mean);
  ym[o] = static_cast<T>(best);
  yi[o] = where;
}

// Contiguous spans (planar windows): sum and maximum with independent lanes, so they vectorise,
// folded by halving (a fixed order: the same bits for any thread count); NaN never compares
// greater, so the maximum skips it and the sum reveals it.  The argmax is then found by a short
// scan (first position equal to the maximum, or the last NaN).
template <typename acc_t, typename T>
inline void span_sum_max(const T* __restrict__ v, int64_t n, acc_t& sum, acc_t& best) {
  if (n < kLanes) {  // short spans: the lanes' set-up and fold would cost more than the loop
    for (int64_t i = 0; i < n; ++i) {
      const acc_t t = static_cast<acc_t>(v[i]);
      sum += t;
      best = t > best ? t : best;
    }
    return;
  }
  acc_t s[kLanes] = {}, m[kLanes];
  for (int l = 0; l < kLanes; ++l) m[l] = -std::numeric_limits<acc_t>::infinity();
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const acc_t t = static_cast<acc_t>(v[i + l]);
      s[l] += t;
      m[l] = t > m[l] ? t : m[l];
    }
  for (int l = 0; i < n; ++i, ++l) {
    const acc_t t = static_cast<acc_t>(v[i]);
    s[l] += t;
    m[l] = t > m[l] ? t : m[l];
  }
  for (int w = kLanes / 2; w > 0; w /= 2)
    for (int l = 0; l < w; ++l) {
      s[l] += s[l + w];
      m[l] = m[l + w] > m[l] ? m[l + w] : m[l];
    }
  sum += s[0];
  best = m[0] > best ? m[0] : best;
}

template <typename T>
void avgmax_planar_kernel(const T* x, T* ya, T* ym, int64_t* yi, const Problem& p, bool combine) {
  using acc_t = at::opmath_type<T>;
  const Axis &D = p.d, &H = p.h, &W = p.w;
  const int64_t items = p.B * D.O * H.O;
  const int64_t per_item = std::max<int64_t>(1, D.L * H.L * W.L / (D.O * H.O));
  at::parallel_for(0, items, grain(per_item), [&](int64_t lo, int64_t hi) {
    for_items(lo, hi, D.O, H.O, 1, [&](int64_t n, int64_t a, int64_t b, int64_t) {
      const T* xn = x + n * D.L * H.L * W.L;
      const int64_t o0 = ((n * D.O + a) * H.O + b) * W.O;
      for (int64_t c = 0; c < W.O; ++c) {
        acc_t sum = 0, best = -std::numeric_limits<acc_t>::infinity();
        planar_spans(p, a, b, c, [&](int64_t offset, int64_t n) { span_sum_max(xn + offset, n, sum, best); });
        int64_t where = -1;  // PyTorch's pick, in row-major order
        if (is_nan(sum))  // a NaN, or inf - inf
          for (int64_t d = D.end[a] - 1; d >= D.start[a] && where < 0; --d)
            for (int64_t h = H.end[b] - 1; h >= H.start[b] && where < 0; --h) {
              const int64_t r = (d * H.L + h) * W.L + W.start[c], i = find_last_nan<acc_t>(xn + r, W.size(c));
              where = i < 0 ? -1 : r + i;
            }
        // no NaN: the first maximum (an all -inf window's first -inf; the maximum skipped only NaN)
        if (where < 0)
          planar_spans(p, a, b, c, [&](int64_t offset, int64_t n) {
            const int64_t i = where < 0 ? find_equal<acc_t>(xn + offset, n, best) : -1;
            if (i >= 0) where = offset + i;
          });
        const acc_t value = static_cast<acc_t>(xn[where]);  // its own value (-0.0 vs 0.0 as torch)
        write_avgmax(ya, ym, yi, o0 + c, sum / acc_t(D.size(a) * H.size(b) * W.size(c)), value, where, combine);
      }
    });
  });
}

// Sum, maximum and argmax (a flat index: the first maximum in row-major order, or the last NaN,
// PyTorch's rule) of window (a, b, c) of a channels_last block, nk channels at once.
template <typename T, typename acc_t>
inline void window_avgmax(const T* xn, const Problem& p, int64_t a, int64_t b, int64_t c, int64_t nk, acc_t* sum,
                          acc_t* best, int64_t* where) {
  bool first = true;
  window(xn, p, a, b, c, [&](const T* v, int64_t f) {
    if (first) {
      for (int64_t k = 0; k < nk; ++k) sum[k] = best[k] = static_cast<acc_t>(v[k]);
      std::fill(where, where + nk, f);
      first = false;
      return;
    }
#pragma omp simd  // (GCC keeps the select chain scalar without it)
    for (int64_t k = 0; k < nk; ++k) {
      const acc_t t = static_cast<acc_t>(v[k]);
      const bool take = (t > best[k]) | is_nan(t);
      sum[k] += t;
      best[k] = take ? t : best[k];
      where[k] = take ? f : where[k];
    }
  });
}

// Planar windows, kBlock planes at a time transposed into a channels_last block (as
// planar_global_power_forward), so that the loops over channels vectorise across planes: a plane's
// own windows are short spans, and its argmax a scalar scan after them.
template <typename T>
void planar_avgmax_in_blocks(const T* x, T* ya, T* ym, int64_t* yi, const Problem& p, bool combine) {
  using acc_t = at::opmath_type<T>;
  const Axis &D = p.d, &H = p.h, &W = p.w;
  const int64_t L = D.L * H.L * W.L, O = D.O * H.O * W.O;
  Problem block = p;
  block.B = 1;
  block.K = kBlock;
  at::parallel_for(0, ceil_div(p.B, kBlock), grain(kBlock * L), [&](int64_t lo, int64_t hi) {
    std::vector<T> buffer(L * kBlock);
    acc_t sum[kBlock], best[kBlock];
    int64_t where[kBlock];
    for (int64_t blk = lo; blk < hi; ++blk) {
      const int64_t r0 = blk * kBlock, nk = std::min(kBlock, p.B - r0);
      transpose_planes(x + r0 * L, L, nk, buffer.data());
      for (int64_t a = 0; a < D.O; ++a)
        for (int64_t b = 0; b < H.O; ++b)
          for (int64_t c = 0; c < W.O; ++c) {
            window_avgmax(buffer.data(), block, a, b, c, nk, sum, best, where);
            const acc_t count = acc_t(D.size(a) * H.size(b) * W.size(c));
            const int64_t o = (a * H.O + b) * W.O + c;
            for (int64_t k = 0; k < nk; ++k)
              write_avgmax(ya, ym, yi, (r0 + k) * O + o, sum[k] / count, best[k], where[k], combine);
          }
    }
  });
}

// Non-global planar windows go through the blocks of planes when every thread gets a block and the
// planes hold at most 2^16 positions (a block of float32: 16 MiB).  One block of 64 planes of 224x224
// on two threads was 0.6-0.9x the windows in place, eight of them 1.5-2.4x.
inline bool transposed_blocks_pay(const Problem& p) {
  return ceil_div(p.B, kBlock) >= at::get_num_threads() && p.d.L * p.h.L * p.w.L <= (int64_t(1) << 16);
}

template <typename T>
void avgmax_forward_kernel(const T* x, T* ya, T* ym, int64_t* yi, const Problem& p, bool combine) {
  if (p.K == 1 && (planar_global(p) ? p.w.L <= kTransposedPlane : transposed_blocks_pay(p)))
    return planar_avgmax_in_blocks(x, ya, ym, yi, p, combine);
  if (p.K == 1) return avgmax_planar_kernel(x, ya, ym, yi, p, combine);
  using acc_t = at::opmath_type<T>;
  const Axis &D = p.d, &H = p.h, &W = p.w;
  const int64_t KB = p.blocks(), items = p.B * D.O * H.O * KB;
  const int64_t per_item = std::max<int64_t>(1, D.L * H.L * p.in_row() / (D.O * H.O * KB));
  at::parallel_for(0, items, grain(per_item), [&](int64_t lo, int64_t hi) {
    acc_t sum[kBlock], best[kBlock];
    int64_t where[kBlock];
    for_items(lo, hi, D.O, H.O, KB, [&](int64_t n, int64_t a, int64_t b, int64_t kb) {
      const int64_t k0 = kb * kBlock, nk = std::min(p.K - k0, kBlock);
      const T* xn = x + n * D.L * H.L * p.in_row() + k0;
      const int64_t o0 = ((n * D.O + a) * H.O + b) * p.out_row() + k0;
      for (int64_t c = 0; c < W.O; ++c) {
        window_avgmax(xn, p, a, b, c, nk, sum, best, where);
        const acc_t count = acc_t(D.size(a) * H.size(b) * W.size(c));
        for (int64_t k = 0; k < nk; ++k)
          write_avgmax(ya, ym, yi, o0 + c * p.K + k, sum[k] / count, best[k], where[k], combine);
      }
    });
  });
}

// gin[r, i] += g[r, o] at i = index[r, o], plane by plane, in output order: how windowed planar avgmax
// (float and double) adds its max part to pool.cpp's avg backward; the half types take the gather
// below, which rounds the sum once.  Each plane is one task's: deterministic.  The gather, walking the
// covering outputs one input row at a time, was 1.1-3x slower on two threads ((8,256,64,64)->7 21-28
// against 13-20 ms, (8,256,37,53)->5 5.0-5.9 against 1.7-3.0 ms).
template <typename T>
void add_at_indices(const T* g, const int64_t* index, T* gin, int64_t planes, int64_t O, int64_t L) {
  at::parallel_for(0, planes, grain(O), [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r)
      for (int64_t o = 0; o < O; ++o) gin[r * L + index[r * O + o]] += g[r * O + o];
  });
}

// gin = avg backward of g_avg + max backward of g_max at the indices (each a gather, as pool.cpp).
template <typename T>
void avgmax_backward_kernel(const T* ga, const T* gm, const int64_t* gi, T* gin, const Problem& p) {
  using acc_t = at::opmath_type<T>;
  const Axis &D = p.d, &H = p.h, &W = p.w;
  if (planar_global(p)) {  // the gather below without its per-row set-up (same sums: the same bits)
    const int64_t L = W.L;
    at::parallel_for(0, p.B, grain(L), [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        const acc_t av = acc_t(0) + static_cast<acc_t>(ga[r]) * (acc_t(1) / acc_t(L));
        const acc_t hit = acc_t(0) + static_cast<acc_t>(gm[r]);
        const int64_t f = gi[r];
        T* __restrict__ out = gin + r * L;
        for (int64_t i = 0; i < L; ++i) out[i] = static_cast<T>((i == f ? hit : acc_t(0)) + av);
      }
    });
    return;
  }
  const int64_t KB = p.blocks(), items = p.B * D.L * H.L * KB;
  at::parallel_for(0, items, grain(p.in_row() / KB + 2 * p.out_row() / KB), [&](int64_t lo, int64_t hi) {
    std::vector<acc_t> avg_buffer(W.O * std::min(p.K, kBlock)), acc_buffer(W.L * std::min(p.K, kBlock));
    for_items(lo, hi, D.L, H.L, KB, [&](int64_t n, int64_t d, int64_t h, int64_t kb) {
      const int64_t k0 = kb * kBlock, nk = std::min(p.K - k0, kBlock);
      const int64_t r = (n * D.L + d) * H.L + h;  // input row
      const int64_t row0 = (d * H.L + h) * W.L;   // its flat offset in the plane
      acc_t* __restrict__ av = avg_buffer.data();
      acc_t* __restrict__ acc = acc_buffer.data();
      std::fill(av, av + W.O * nk, acc_t(0));
      std::fill(acc, acc + W.L * nk, acc_t(0));
      for (int64_t a = D.first[d]; a < D.stop[d]; ++a)
        for (int64_t b = H.first[h]; b < H.stop[h]; ++b) {
          const int64_t rows = D.size(a) * H.size(b);
          const int64_t o0 = ((n * D.O + a) * H.O + b) * p.out_row() + k0;
          for (int64_t c = 0; c < W.O; ++c) {
            const acc_t s = acc_t(1) / acc_t(rows * W.size(c));
            for (int64_t k = 0; k < nk; ++k) {
              const int64_t o = o0 + c * p.K + k;
              av[c * nk + k] += static_cast<acc_t>(ga[o]) * s;
              const int64_t f = gi[o] - row0;
              if (f >= 0 && f < W.L) acc[f * nk + k] += static_cast<acc_t>(gm[o]);
            }
          }
        }
      T* out = gin + r * p.in_row() + k0;
      for (int64_t i = 0; i < W.L; ++i)
        for (int64_t k = 0; k < nk; ++k) {
          acc_t s = acc[i * nk + k];
          for (int64_t c = W.first[i]; c < W.stop[i]; ++c) s += av[c * nk + k];
          out[i * p.K + k] = static_cast<T>(s);
        }
    });
  });
}

}  // namespace

// ---- the ops (ops.h) ----------------------------------------------------------------------

namespace {

Tensor power_forward(const Tensor& x, at::IntArrayRef output_size, double pw, double eps, bool gem) {
  check(x, output_size, "output_size");
  TORCH_CHECK(pw > 0 && std::isfinite(pw), "anypool_cpu: the exponent must be positive and finite, got ", pw);
  const bool cl = channels_last(x);
  const Tensor xp = physical(x, cl);
  Tensor out = layout_empty(x, output_size, cl, x.scalar_type());
  const Problem p = problem(x.size(0), x.size(1), x.sizes().slice(2), output_size, cl, false);
  ANYPOOL_DISPATCH(x.scalar_type(), "power_forward", [&] {
    with_power(pw, [&](auto IPc) {
      constexpr int IP = decltype(IPc)::value;
      if (gem) power_forward_kernel<true, IP>(xp.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), p, pw, eps);
      else power_forward_kernel<false, IP>(xp.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), p, pw, eps);
    });
  });
  return out;
}

}  // namespace

Tensor lp_forward(const Tensor& x, at::IntArrayRef output_size, double norm_type) {
  return power_forward(x, output_size, norm_type, 0.0, false);
}

Tensor gem_forward(const Tensor& x, at::IntArrayRef output_size, double pw, double eps) {
  return power_forward(x, output_size, pw, eps, true);
}

namespace {

// (grad x, per-output contributions to grad p in float64 — empty unless p_grad)
std::tuple<Tensor, Tensor> power_backward(const Tensor& grad_out, const Tensor& x, double pw, double eps, bool gem,
                                          bool p_grad) {
  check(x, grad_out.sizes().slice(2), "grad_out's spatial size");
  TORCH_CHECK(grad_out.size(0) == x.size(0) && grad_out.size(1) == x.size(1) && grad_out.scalar_type() == x.scalar_type(),
              "anypool_cpu: grad_out must match x in batch, channels and dtype");
  const bool cl = channels_last(x);
  const Tensor xp = physical(x, cl);
  const Tensor gp = physical(grad_out, cl);  // read in x's order
  Tensor gin = layout_empty(x, x.sizes().slice(2), cl, x.scalar_type());
  Tensor pg = at::empty({p_grad ? gp.numel() : 0}, x.options().dtype(at::kDouble));
  const Problem p = problem(x.size(0), x.size(1), x.sizes().slice(2), grad_out.sizes().slice(2), cl, true);
  ANYPOOL_DISPATCH(x.scalar_type(), "power_backward", [&] {
    with_power(pw, [&](auto IPc) {
      constexpr int IP = decltype(IPc)::value;
      double* pgp = p_grad ? pg.mutable_data_ptr<double>() : nullptr;
      if (gem) power_backward_kernel<true, IP>(gp.const_data_ptr<scalar_t>(), xp.const_data_ptr<scalar_t>(),
                                               gin.mutable_data_ptr<scalar_t>(), pgp, p, pw, eps);
      else power_backward_kernel<false, IP>(gp.const_data_ptr<scalar_t>(), xp.const_data_ptr<scalar_t>(),
                                            gin.mutable_data_ptr<scalar_t>(), nullptr, p, pw, eps);
    });
  });
  return {gin, pg};
}

}  // namespace

Tensor lp_backward(const Tensor& grad_out, const Tensor& x, double norm_type) {
  return std::get<0>(power_backward(grad_out, x, norm_type, 0.0, false, false));
}

std::tuple<Tensor, Tensor> gem_backward(const Tensor& grad_out, const Tensor& x, double pw, double eps, bool p_grad) {
  return power_backward(grad_out, x, pw, eps, true, p_grad);
}

std::tuple<Tensor, Tensor, Tensor> avgmax_forward(const Tensor& x, at::IntArrayRef output_size, bool combine) {
  check(x, output_size, "output_size");
  const bool cl = channels_last(x);
  const Tensor xp = physical(x, cl);
  Tensor a = layout_empty(x, output_size, cl, x.scalar_type());
  Tensor m = layout_empty(x, output_size, cl, x.scalar_type());
  Tensor idx = layout_empty(x, output_size, cl, at::kLong);
  const Problem p = problem(x.size(0), x.size(1), x.sizes().slice(2), output_size, cl, false);
  ANYPOOL_DISPATCH(x.scalar_type(), "avgmax_forward", [&] {
    avgmax_forward_kernel(xp.const_data_ptr<scalar_t>(), a.mutable_data_ptr<scalar_t>(),
                          m.mutable_data_ptr<scalar_t>(), idx.mutable_data_ptr<int64_t>(), p, combine);
  });
  return {a, m, idx};
}

Tensor avgmax_backward(const Tensor& grad_avg, const Tensor& grad_max, const Tensor& indices,
                       at::IntArrayRef input_size) {
  check(grad_avg, input_size, "input_size");
  TORCH_CHECK(grad_max.sizes() == grad_avg.sizes() && grad_max.scalar_type() == grad_avg.scalar_type(),
              "anypool_cpu: grad_max must match grad_avg");
  TORCH_CHECK(indices.sizes() == grad_avg.sizes() && indices.scalar_type() == at::kLong,
              "anypool_cpu: indices must be int64 of grad_avg's shape");
  const bool cl = channels_last(grad_avg);
  const Tensor ga = physical(grad_avg, cl), gm = physical(grad_max, cl), ip = physical(indices, cl);
  const Problem p = problem(grad_avg.size(0), grad_avg.size(1), input_size, grad_avg.sizes().slice(2), cl, true);
  const int64_t plane = p.d.L * p.h.L * p.w.L;
  if (ip.numel() > 0) {  // (one pass over the outputs' indices; the kernels below trust them)
    const auto [lo, hi] = at::aminmax(ip);
    TORCH_CHECK(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < plane, "anypool_cpu: an index outside the plane of ",
                plane, " elements");
  }
  const bool single_rounding = ga.scalar_type() == at::kFloat || ga.scalar_type() == at::kDouble;
  if (!cl && !planar_global(p) && single_rounding) {  // see add_at_indices
    Tensor gin = avg_backward(ga, input_size, std::nullopt);
    AT_DISPATCH_FLOATING_TYPES(ga.scalar_type(), "avgmax_backward", [&] {
      add_at_indices(gm.const_data_ptr<scalar_t>(), ip.const_data_ptr<int64_t>(), gin.mutable_data_ptr<scalar_t>(),
                     p.B, p.d.O * p.h.O * p.w.O, plane);
    });
    return gin;
  }
  Tensor gin = layout_empty(grad_avg, input_size, cl, grad_avg.scalar_type());
  ANYPOOL_DISPATCH(grad_avg.scalar_type(), "avgmax_backward", [&] {
    avgmax_backward_kernel(ga.const_data_ptr<scalar_t>(), gm.const_data_ptr<scalar_t>(), ip.const_data_ptr<int64_t>(),
                           gin.mutable_data_ptr<scalar_t>(), p);
  });
  return gin;
}

}  // namespace anypool
