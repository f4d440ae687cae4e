// The functional form of each op, shared by the CPU and the CUDA implementations: check the
// arguments, allocate the outputs, call the device's `_out` form (which every kernel has, so the
// tests can poison its buffers). `WeightAllocator` allocates the large outputs (the [d_sae, d_in]
// weight gradients, AuxK's [N, C]): the CPU passes its huge-page allocator (cpu_memory.h), CUDA
// plain at::empty.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <optional>
#include <tuple>

#include "op_checks.h"

namespace fastsae_cpp {

using WeightAllocator = at::Tensor (*)(at::IntArrayRef, const at::TensorOptions&);

inline at::Tensor plain_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::empty(sizes, options);
}

template <typename OutForm>
std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_encode_functional(
    OutForm out_form, WeightAllocator alloc_large, const at::Tensor& x, const at::Tensor& enc_weight, const at::Tensor& b_enc,
    const std::optional<at::Tensor>& b_dec, const std::optional<at::Tensor>& dec_norm, int64_t k,
    const std::optional<at::Tensor>& aux_latents, int64_t k_aux) {
  check_topk_encode_inputs(x, enc_weight, b_enc, b_dec, dec_norm, k, aux_latents, k_aux);
  const int64_t n = x.size(0);
  at::Tensor values = at::empty({n, k}, x.options());
  at::Tensor indices = at::empty({n, k}, x.options().dtype(at::kLong));
  at::Tensor aux_pre = alloc_large({n, aux_width(aux_latents)}, x.options());
  out_form(x, enc_weight, b_enc, b_dec, dec_norm, k, aux_latents, k_aux, values, indices, aux_pre);
  return {values, indices, aux_pre};
}

template <typename OutForm>
std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_encode_backward_functional(
    OutForm out_form, WeightAllocator alloc_weight_grad, const at::Tensor& grad_pre, const at::Tensor& indices,
    const at::Tensor& x, const at::Tensor& enc_weight, const std::optional<at::Tensor>& b_dec) {
  check_topk_encode_backward_inputs(grad_pre, indices, x, enc_weight, b_dec);
  at::Tensor grad_x_in = at::empty(x.sizes(), x.options());
  at::Tensor grad_enc_weight = alloc_weight_grad(enc_weight.sizes(), enc_weight.options());
  at::Tensor grad_b_enc = at::empty({enc_weight.size(0)}, enc_weight.options());
  out_form(grad_pre, indices, x, enc_weight, b_dec, grad_x_in, grad_enc_weight, grad_b_enc);
  return {grad_x_in, grad_enc_weight, grad_b_enc};
}

template <typename OutForm>
at::Tensor sparse_decode_functional(OutForm out_form, const at::Tensor& values, const at::Tensor& indices,
                                    const at::Tensor& W_dec, const std::optional<at::Tensor>& b_dec,
                                    const std::optional<at::Tensor>& dec_norm) {
  check_sparse_decode_inputs(values, indices, W_dec, b_dec, dec_norm);
  at::Tensor out = at::empty({values.size(0), W_dec.size(1)}, values.options());
  out_form(values, indices, W_dec, b_dec, dec_norm, out);
  return out;
}

template <typename OutForm>
std::tuple<at::Tensor, at::Tensor> sparse_decode_backward_functional(
    OutForm out_form, WeightAllocator alloc_weight_grad, const at::Tensor& grad_out, const at::Tensor& values,
    const at::Tensor& indices, const at::Tensor& W_dec, const std::optional<at::Tensor>& dec_norm) {
  check_sparse_decode_backward_inputs(grad_out, values, indices, W_dec, dec_norm);
  at::Tensor grad_values = at::empty(values.sizes(), values.options());
  at::Tensor grad_W_dec = alloc_weight_grad(W_dec.sizes(), W_dec.options());
  out_form(grad_out, values, indices, W_dec, dec_norm, grad_values, grad_W_dec);
  return {grad_values, grad_W_dec};
}

}  // namespace fastsae_cpp
