// The kernels' entry points (pool.cpp, reductions.cpp), bound to Python in bindings.cpp.  Each takes
// the logical (N, C, *S) tensor (any strides) and returns results in its memory format.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace anypool {

using at::Tensor;

// pool.cpp.  `sizes`: a padded batch's per-sample lengths (see the comment atop pool.cpp).
Tensor avg_forward(const Tensor& x, at::IntArrayRef output_size, const std::optional<Tensor>& sizes);
Tensor avg_backward(const Tensor& grad_out, at::IntArrayRef input_size, const std::optional<Tensor>& sizes);
std::tuple<Tensor, Tensor> max_forward(const Tensor& x, at::IntArrayRef output_size, const std::optional<Tensor>& sizes);
Tensor max_backward(const Tensor& grad_out, const Tensor& indices, at::IntArrayRef input_size,
                    const std::optional<Tensor>& sizes);
Tensor bins(int64_t L, int64_t O);
std::vector<int64_t> bin_at(int64_t k, int64_t L, int64_t O);

// reductions.cpp
Tensor lp_forward(const Tensor& x, at::IntArrayRef output_size, double norm_type);
Tensor lp_backward(const Tensor& grad_out, const Tensor& x, double norm_type);
Tensor gem_forward(const Tensor& x, at::IntArrayRef output_size, double p, double eps);
std::tuple<Tensor, Tensor> gem_backward(const Tensor& grad_out, const Tensor& x, double p, double eps, bool p_grad);
std::tuple<Tensor, Tensor, Tensor> avgmax_forward(const Tensor& x, at::IntArrayRef output_size, bool combine);
Tensor avgmax_backward(const Tensor& grad_avg, const Tensor& grad_max, const Tensor& indices,
                       at::IntArrayRef input_size);

}  // namespace anypool
