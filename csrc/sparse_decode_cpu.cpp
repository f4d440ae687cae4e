// Sparse decode and its backward on CPU (fastsae_cpp::sparse_decode*, the `cpp` backend).
//
//   out[n]          = sum_j values[n,j] / dec_norm[i] * W_dec[i] + b_dec     (i = indices[n,j])
//   grad_values[n,j] = grad_out[n] . W_dec[i] / dec_norm[i]
//   grad_W_dec[i]   = sum over (n,j) with indices[n,j] == i of values[n,j] / dec_norm[i] * grad_out[n]
// The decode is parallel over output rows. The backward groups the (n, j) pairs by latent
// (counting sort) and makes one pass over the latents computing both gradients, each thread
// owning its latents' rows of grad_W_dec: no atomics, no dense products, and each W_dec row
// read once. Float accumulation (double for double).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "cpu_memory.h"
#include "functional_forms.h"
#include "op_checks.h"
#include "sparse_rows_cpu.h"

namespace fastsae_cpp {
namespace {

using at::Tensor;

Tensor contiguous_or_null(const std::optional<Tensor>& t) { return present(t) ? t->contiguous() : Tensor(); }

template <typename T>
const T* ptr_or_null(const Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

void sparse_decode_out_cpu(const Tensor& values, const Tensor& indices, const Tensor& W_dec,
                           const std::optional<Tensor>& b_dec, const std::optional<Tensor>& dec_norm,
                           const Tensor& out) {
  const BelowAutograd below_autograd;
  check_sparse_decode_inputs(values, indices, W_dec, b_dec, dec_norm);
  const int64_t n = values.size(0), m = values.size(1), d_sae = W_dec.size(0), d_in = W_dec.size(1);
  expect_out(out, {n, d_in}, values.scalar_type(), values, "out");
  const Tensor idx = indices.contiguous();
  check_indices(idx.data_ptr<int64_t>(), n * m, d_sae, "indices");
  const Tensor v = values.contiguous(), w = W_dec.contiguous();
  const Tensor bias = contiguous_or_null(b_dec), norm = contiguous_or_null(dec_norm);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, values.scalar_type(), "fastsae_cpp::sparse_decode", [&] {
    gather_sum<scalar_t>(v.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(), n, m, w.data_ptr<scalar_t>(), d_sae, d_in,
                         ptr_or_null<scalar_t>(norm), ptr_or_null<scalar_t>(bias), out.data_ptr<scalar_t>());
  });
}

Tensor sparse_decode_cpu(const Tensor& values, const Tensor& indices, const Tensor& W_dec,
                         const std::optional<Tensor>& b_dec, const std::optional<Tensor>& dec_norm) {
  return sparse_decode_functional(sparse_decode_out_cpu, values, indices, W_dec, b_dec, dec_norm);
}

void sparse_decode_backward_out_cpu(const Tensor& grad_out, const Tensor& values, const Tensor& indices,
                                    const Tensor& W_dec, const std::optional<Tensor>& dec_norm,
                                    const Tensor& grad_values, const Tensor& grad_W_dec) {
  const BelowAutograd below_autograd;
  check_sparse_decode_backward_inputs(grad_out, values, indices, W_dec, dec_norm);
  const int64_t n = values.size(0), m = values.size(1), d_sae = W_dec.size(0), d_in = W_dec.size(1);
  expect_out(grad_values, {n, m}, values.scalar_type(), values, "grad_values");
  expect_out(grad_W_dec, {d_sae, d_in}, values.scalar_type(), values, "grad_W_dec");
  const Tensor idx = indices.contiguous();
  check_indices(idx.data_ptr<int64_t>(), n * m, d_sae, "indices");
  const Tensor g = grad_out.contiguous(), v = values.contiguous(), w = W_dec.contiguous();
  const Tensor norm = contiguous_or_null(dec_norm);
  const LatentGroups groups = group_by_latent(idx.data_ptr<int64_t>(), n * m, d_sae);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, values.scalar_type(), "fastsae_cpp::sparse_decode_backward", [&] {
        // grad_values (gather_dot) and grad_W_dec (scatter_outer) in one pass grouped by latent
        scatter_outer<scalar_t, scalar_t>(groups, v.data_ptr<scalar_t>(), m, g.data_ptr<scalar_t>(), d_in,
                                          ptr_or_null<scalar_t>(norm), d_sae, grad_W_dec.data_ptr<scalar_t>(), nullptr,
                                          w.data_ptr<scalar_t>(), grad_values.data_ptr<scalar_t>());
      });
}

std::tuple<Tensor, Tensor> sparse_decode_backward_cpu(const Tensor& grad_out, const Tensor& values,
                                                      const Tensor& indices, const Tensor& W_dec,
                                                      const std::optional<Tensor>& dec_norm) {
  return sparse_decode_backward_functional(sparse_decode_backward_out_cpu, empty_output, grad_out, values, indices,
                                           W_dec, dec_norm);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastsae_cpp, CPU, m) {
  m.impl("sparse_decode", &sparse_decode_cpu);
  m.impl("sparse_decode_out", &sparse_decode_out_cpu);
  m.impl("sparse_decode_backward", &sparse_decode_backward_cpu);
  m.impl("sparse_decode_backward_out", &sparse_decode_backward_out_cpu);
}

}  // namespace fastsae_cpp
