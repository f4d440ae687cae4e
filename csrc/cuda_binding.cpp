// The CUDA implementations of the fastsae_cpp ops (the `cuda` backend): argument checks,
// allocation and the encoder matmul (cuBLAS) through ATen; the kernels themselves are the
// torch-free launchers of cuda_launchers.h, given raw pointers and the current stream.
// Compiled only when the extension is built with CUDA (fastsae/ops/backend_cpp.py).
#include <ATen/core/Tensor.h>
#include <ATen/ops/aminmax.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/sub.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "cuda_launchers.h"
#include "functional_forms.h"
#include "op_checks.h"

namespace fastsae_cpp {
namespace {

using at::Tensor;
using fastsae_cuda::DType;

// The pre-activations of at most this many bytes are held at once (a chunk of rows).
constexpr int64_t kPreActivationBudget = int64_t{512} << 20;

DType dtype_of(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default:
      TORCH_CHECK(false, "fastsae_cpp (CUDA): expected float32, float64, bfloat16 or float16 tensors, got ",
                  t.scalar_type());
  }
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "fastsae_cpp (CUDA): ", what, " failed: ", cudaGetErrorString(err));
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

const void* ptr_or_null(const Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

Tensor contiguous_or_null(const std::optional<Tensor>& t) { return present(t) ? t->contiguous() : Tensor(); }

// Every index in [0, d_sae) (one device sync): the kernels index weights with them unchecked.
void check_indices_cuda(const Tensor& idx, int64_t d_sae, const char* what) {
  if (idx.numel() == 0) return;
  auto [lo, hi] = at::aminmax(idx);
  const Tensor bounds = at::stack({lo, hi}).cpu();
  const int64_t l = bounds[0].item<int64_t>(), h = bounds[1].item<int64_t>();
  TORCH_CHECK(l >= 0 && h < d_sae, what, ": expected latent indices in [0, ", d_sae, "), got values in [", l, ", ",
              h, "]");
}

void check_pair_count(int64_t count) {
  TORCH_CHECK(count < (int64_t{1} << 31), "fastsae_cpp (CUDA): at most 2^31 - 1 (row, slot) pairs, got ", count);
}

// out[i] = sum over idx == i of coef / norm[i] * (rows - row_bias); sums[i] = sum of coef.
void scatter_outer(const Tensor& coef, const Tensor& idx, const Tensor& rows, const Tensor& row_bias,
                   const Tensor& norm, int64_t d_sae, const Tensor& out, const Tensor& sums) {
  const int64_t n = idx.size(0), m = idx.size(1), d = rows.size(1);
  check_pair_count(n * m);
  const size_t bytes = fastsae_cuda::scatter_outer_workspace_bytes(n * m, d_sae);
  Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, coef.options().dtype(at::kByte));
  check_launch(fastsae_cuda::scatter_outer(dtype_of(coef), coef.data_ptr(), idx.data_ptr<int64_t>(), n, m,
                                           rows.data_ptr(), ptr_or_null(row_bias), d, ptr_or_null(norm), d_sae,
                                           out.data_ptr(), sums.defined() ? sums.data_ptr() : nullptr,
                                           workspace.data_ptr(), bytes, current_stream()),
               "scatter_outer");
}

void topk_encode_out_cuda(const Tensor& x, const Tensor& enc_weight, const Tensor& b_enc,
                          const std::optional<Tensor>& b_dec, const std::optional<Tensor>& dec_norm, int64_t k,
                          const std::optional<Tensor>& aux_latents, int64_t k_aux, const Tensor& values,
                          const Tensor& indices, const Tensor& aux_pre) {
  const BelowAutograd below_autograd;
  check_topk_encode_inputs(x, enc_weight, b_enc, b_dec, dec_norm, k, aux_latents, k_aux);
  // AuxK runs on the chunked path shared by the GPU backends (fastsae/ops/chunked.py), which the
  // cuda backend takes whenever a list is given; this kernel has none.
  TORCH_CHECK(!present(aux_latents), "fastsae_cpp (CUDA) topk_encode: no AuxK path here (aux_latents given); "
              "fastsae's cuda backend computes AuxK on the chunked path");
  check_topk_encode_outputs(x, k, 0, values, indices, aux_pre);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const int64_t n = x.size(0), d_sae = enc_weight.size(0);
  if (n == 0) return;
  const DType dtype = dtype_of(x);
  const cudaStream_t stream = current_stream();

  const Tensor x_in = (present(b_dec) ? at::sub(x, *b_dec) : x).contiguous();
  const Tensor enc = enc_weight.contiguous(), bias = b_enc.contiguous();
  const Tensor norm = contiguous_or_null(dec_norm);
  const int64_t chunk = std::clamp<int64_t>(kPreActivationBudget / (d_sae * x.element_size()), 1, n);
  Tensor pre_buffer = at::empty({chunk, d_sae}, x.options());
  for (int64_t r0 = 0; r0 < n; r0 += chunk) {
    const int64_t rows = std::min(chunk, n - r0);
    Tensor pre = pre_buffer.narrow(0, 0, rows);
    at::mm_out(pre, x_in.narrow(0, r0, rows), enc.t());
    check_launch(fastsae_cuda::row_topk(dtype, pre.data_ptr(), rows, d_sae, bias.data_ptr(), ptr_or_null(norm), k,
                                        values.narrow(0, r0, rows).data_ptr(),
                                        indices.narrow(0, r0, rows).data_ptr<int64_t>(), stream),
                 "row_topk");
  }
}

std::tuple<Tensor, Tensor, Tensor> topk_encode_cuda(const Tensor& x, const Tensor& enc_weight, const Tensor& b_enc,
                                                    const std::optional<Tensor>& b_dec,
                                                    const std::optional<Tensor>& dec_norm, int64_t k,
                                                    const std::optional<Tensor>& aux_latents, int64_t k_aux) {
  return topk_encode_functional(topk_encode_out_cuda, plain_empty, x, enc_weight, b_enc, b_dec, dec_norm, k, aux_latents, k_aux);
}

void topk_encode_backward_out_cuda(const Tensor& grad_pre, const Tensor& indices, const Tensor& x,
                                   const Tensor& enc_weight, const std::optional<Tensor>& b_dec,
                                   const Tensor& grad_x_in, const Tensor& grad_enc_weight, const Tensor& grad_b_enc) {
  const BelowAutograd below_autograd;
  check_topk_encode_backward_inputs(grad_pre, indices, x, enc_weight, b_dec);
  const int64_t n = x.size(0), m = grad_pre.size(1), d_sae = enc_weight.size(0), d_in = enc_weight.size(1);
  expect_out(grad_x_in, {n, d_in}, x.scalar_type(), x, "grad_x_in");
  expect_out(grad_enc_weight, {d_sae, d_in}, x.scalar_type(), x, "grad_enc_weight");
  expect_out(grad_b_enc, {d_sae}, x.scalar_type(), x, "grad_b_enc");
  const c10::cuda::CUDAGuard device_guard(x.device());
  const Tensor idx = indices.contiguous();
  check_indices_cuda(idx, d_sae, "indices");
  const Tensor g = grad_pre.contiguous(), enc = enc_weight.contiguous(), rows = x.contiguous();
  const Tensor shift = contiguous_or_null(b_dec);
  check_launch(fastsae_cuda::gather_sum(dtype_of(x), g.data_ptr(), idx.data_ptr<int64_t>(), n, m, enc.data_ptr(),
                                        d_in, nullptr, nullptr, grad_x_in.data_ptr(), current_stream()),
               "gather_sum");
  scatter_outer(g, idx, rows, shift, Tensor(), d_sae, grad_enc_weight, grad_b_enc);
}

std::tuple<Tensor, Tensor, Tensor> topk_encode_backward_cuda(const Tensor& grad_pre, const Tensor& indices,
                                                             const Tensor& x, const Tensor& enc_weight,
                                                             const std::optional<Tensor>& b_dec) {
  return topk_encode_backward_functional(topk_encode_backward_out_cuda, plain_empty, grad_pre, indices, x, enc_weight,
                                         b_dec);
}

void sparse_decode_out_cuda(const Tensor& values, const Tensor& indices, const Tensor& W_dec,
                            const std::optional<Tensor>& b_dec, const std::optional<Tensor>& dec_norm,
                            const Tensor& out) {
  const BelowAutograd below_autograd;
  check_sparse_decode_inputs(values, indices, W_dec, b_dec, dec_norm);
  const int64_t n = values.size(0), m = values.size(1), d_sae = W_dec.size(0), d_in = W_dec.size(1);
  expect_out(out, {n, d_in}, values.scalar_type(), values, "out");
  const c10::cuda::CUDAGuard device_guard(values.device());
  const Tensor idx = indices.contiguous();
  check_indices_cuda(idx, d_sae, "indices");
  const Tensor v = values.contiguous(), w = W_dec.contiguous();
  const Tensor bias = contiguous_or_null(b_dec), norm = contiguous_or_null(dec_norm);
  check_launch(fastsae_cuda::gather_sum(dtype_of(values), v.data_ptr(), idx.data_ptr<int64_t>(), n, m, w.data_ptr(),
                                        d_in, ptr_or_null(norm), ptr_or_null(bias), out.data_ptr(), current_stream()),
               "gather_sum");
}

Tensor sparse_decode_cuda(const Tensor& values, const Tensor& indices, const Tensor& W_dec,
                          const std::optional<Tensor>& b_dec, const std::optional<Tensor>& dec_norm) {
  return sparse_decode_functional(sparse_decode_out_cuda, values, indices, W_dec, b_dec, dec_norm);
}

void sparse_decode_backward_out_cuda(const Tensor& grad_out, const Tensor& values, const Tensor& indices,
                                     const Tensor& W_dec, const std::optional<Tensor>& dec_norm,
                                     const Tensor& grad_values, const Tensor& grad_W_dec) {
  const BelowAutograd below_autograd;
  check_sparse_decode_backward_inputs(grad_out, values, indices, W_dec, dec_norm);
  const int64_t n = values.size(0), m = values.size(1), d_sae = W_dec.size(0), d_in = W_dec.size(1);
  expect_out(grad_values, {n, m}, values.scalar_type(), values, "grad_values");
  expect_out(grad_W_dec, {d_sae, d_in}, values.scalar_type(), values, "grad_W_dec");
  const c10::cuda::CUDAGuard device_guard(values.device());
  const Tensor idx = indices.contiguous();
  check_indices_cuda(idx, d_sae, "indices");
  const Tensor g = grad_out.contiguous(), v = values.contiguous(), w = W_dec.contiguous();
  const Tensor norm = contiguous_or_null(dec_norm);
  check_launch(fastsae_cuda::gather_dot(dtype_of(values), g.data_ptr(), idx.data_ptr<int64_t>(), n, m, w.data_ptr(),
                                        d_in, ptr_or_null(norm), grad_values.data_ptr(), current_stream()),
               "gather_dot");
  scatter_outer(v, idx, g, Tensor(), norm, d_sae, grad_W_dec, Tensor());
}

std::tuple<Tensor, Tensor> sparse_decode_backward_cuda(const Tensor& grad_out, const Tensor& values,
                                                       const Tensor& indices, const Tensor& W_dec,
                                                       const std::optional<Tensor>& dec_norm) {
  return sparse_decode_backward_functional(sparse_decode_backward_out_cuda, plain_empty, grad_out, values, indices,
                                           W_dec, dec_norm);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastsae_cpp, CUDA, m) {
  m.impl("topk_encode", &topk_encode_cuda);
  m.impl("topk_encode_out", &topk_encode_out_cuda);
  m.impl("topk_encode_backward", &topk_encode_backward_cuda);
  m.impl("topk_encode_backward_out", &topk_encode_backward_out_cuda);
  m.impl("sparse_decode", &sparse_decode_cuda);
  m.impl("sparse_decode_out", &sparse_decode_out_cuda);
  m.impl("sparse_decode_backward", &sparse_decode_backward_cuda);
  m.impl("sparse_decode_backward_out", &sparse_decode_backward_out_cuda);
}

}  // namespace fastsae_cpp
