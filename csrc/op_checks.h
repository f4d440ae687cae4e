// Argument checks shared by the CPU kernels and the CUDA binding. fastsae's ops (fastsae.ops and
// the raw torch.ops.fastsae ops) already raise ValueError on bad input (fastsae/validation.py, one
// contract for every backend); these guard the kernels when the fastsae_cpp ops are called
// directly, with the same rules (the index range is checked where the kernels read indices).
#pragma once

#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

namespace fastsae_cpp {

// Kernels call ATen ops (matmul, copies) on inputs that may require grad: they run below
// autograd, as the custom op's own autograd formula covers them. Declare one per kernel entry.
using BelowAutograd = at::AutoDispatchBelowADInplaceOrView;

// The tensor an optional argument holds, or nullptr.
inline const at::Tensor* present(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? &*t : nullptr;
}

// The leading tensor of an op (x, values, grad_pre): a dtype the kernels are built for. The same
// contract as fastsae/validation.py, which the Python ops run before reaching these kernels.
inline void expect_floating(const at::Tensor& t, const char* name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, name,
              ": expected a floating-point dtype (float16, bfloat16, float32 or float64), got ", dt);
}

inline void expect_matrix(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, name, ": expected a 2-D tensor, got shape ", t.sizes());
}

inline void expect_shape(const at::Tensor& t, at::IntArrayRef shape, const char* name) {
  TORCH_CHECK(t.sizes() == shape, name, ": expected shape ", shape, ", got ", t.sizes());
}

// Same dtype and device as `ref`.
inline void expect_like(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, ": expected dtype ", ref.scalar_type(), ", got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), name, ": expected device ", ref.device(), ", got ", t.device());
}

inline void expect_vector(const std::optional<at::Tensor>& t, int64_t size, const at::Tensor& ref, const char* name) {
  if (const at::Tensor* v = present(t)) {
    expect_shape(*v, {size}, name);
    expect_like(*v, ref, name);
  }
}

inline void expect_indices(const at::Tensor& idx, const at::Tensor& like, const char* name) {
  expect_shape(idx, like.sizes(), name);
  TORCH_CHECK(idx.scalar_type() == at::kLong, name, ": expected dtype int64, got ", idx.scalar_type());
  TORCH_CHECK(idx.device() == like.device(), name, ": expected device ", like.device(), ", got ", idx.device());
}

// An output buffer: exact shape, dtype and device, contiguous (kernels write it by raw pointer).
inline void expect_out(const at::Tensor& t, at::IntArrayRef shape, at::ScalarType dtype, const at::Tensor& ref,
                       const char* name) {
  expect_shape(t, shape, name);
  TORCH_CHECK(t.scalar_type() == dtype, name, ": expected dtype ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), name, ": expected device ", ref.device(), ", got ", t.device());
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous output buffer");
}

// Shared checks of the ops' inputs. The encoder's (both encode ops):
inline void check_encoder_inputs(const at::Tensor& x, const at::Tensor& enc_weight, const at::Tensor& b_enc,
                                 const std::optional<at::Tensor>& b_dec, const std::optional<at::Tensor>& dec_norm) {
  expect_matrix(x, "x");
  expect_floating(x, "x");
  expect_matrix(enc_weight, "enc_weight");
  expect_like(enc_weight, x, "enc_weight");
  const int64_t d_sae = enc_weight.size(0), d_in = enc_weight.size(1);
  TORCH_CHECK(x.size(1) == d_in, "x: expected last dimension d_in=", d_in, ", got shape ", x.sizes());
  expect_shape(b_enc, {d_sae}, "b_enc");
  expect_like(b_enc, x, "b_enc");
  expect_vector(b_dec, d_in, x, "b_dec");
  expect_vector(dec_norm, d_sae, x, "dec_norm");
  TORCH_CHECK(d_sae < (int64_t{1} << 31), "enc_weight: at most 2^31 - 1 latents, got ", d_sae);
}

inline void check_topk_encode_inputs(const at::Tensor& x, const at::Tensor& enc_weight, const at::Tensor& b_enc,
                                     const std::optional<at::Tensor>& b_dec,
                                     const std::optional<at::Tensor>& dec_norm, int64_t k,
                                     const std::optional<at::Tensor>& aux_latents, int64_t k_aux) {
  check_encoder_inputs(x, enc_weight, b_enc, b_dec, dec_norm);
  const int64_t d_sae = enc_weight.size(0);
  TORCH_CHECK(k >= 1 && k <= d_sae, "k: expected 1 <= k <= d_sae=", d_sae, ", got ", k);
  TORCH_CHECK(k_aux >= 0 && k_aux <= d_sae, "k_aux: expected 0 <= k_aux <= d_sae=", d_sae, ", got ", k_aux);
  if (const at::Tensor* list = present(aux_latents)) {
    TORCH_CHECK(list->dim() == 1 && list->size(0) <= d_sae, "aux_latents: expected a vector of at most d_sae=", d_sae,
                " latents, got shape ", list->sizes());
    TORCH_CHECK(list->scalar_type() == at::kLong, "aux_latents: expected dtype int64, got ", list->scalar_type());
    TORCH_CHECK(list->device() == x.device(), "aux_latents: expected device ", x.device(), ", got ", list->device());
  }
}

// The width of AuxK's output: the list's capacity (0 without a list).
inline int64_t aux_width(const std::optional<at::Tensor>& aux_latents) {
  const at::Tensor* list = present(aux_latents);
  return list ? list->size(0) : 0;
}

// The cutoff is compared in the kernels' accumulation type: float, or double for double x.
inline void check_threshold_encode_inputs(const at::Tensor& x, const at::Tensor& enc_weight, const at::Tensor& b_enc,
                                          const std::optional<at::Tensor>& b_dec,
                                          const std::optional<at::Tensor>& dec_norm, const at::Tensor& cutoff,
                                          int64_t max_width) {
  check_encoder_inputs(x, enc_weight, b_enc, b_dec, dec_norm);
  const int64_t d_sae = enc_weight.size(0);
  expect_shape(cutoff, {d_sae}, "cutoff");
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(cutoff.scalar_type() == acc, "cutoff: expected dtype ", acc, " (the accumulation type of ",
              x.scalar_type(), " inputs), got ", cutoff.scalar_type());
  TORCH_CHECK(cutoff.device() == x.device(), "cutoff: expected device ", x.device(), ", got ", cutoff.device());
  TORCH_CHECK(max_width >= 0 && max_width <= d_sae, "max_width: expected 0 <= max_width <= d_sae=", d_sae, ", got ",
              max_width);
}

inline void check_topk_encode_outputs(const at::Tensor& x, int64_t k, int64_t aux_width, const at::Tensor& values,
                                      const at::Tensor& indices, const at::Tensor& aux_pre) {
  const int64_t n = x.size(0);
  expect_out(values, {n, k}, x.scalar_type(), x, "values");
  expect_out(indices, {n, k}, at::kLong, x, "indices");
  expect_out(aux_pre, {n, aux_width}, x.scalar_type(), x, "aux_pre");
}

inline void check_topk_encode_backward_inputs(const at::Tensor& grad_pre, const at::Tensor& indices,
                                              const at::Tensor& x, const at::Tensor& enc_weight,
                                              const std::optional<at::Tensor>& b_dec) {
  expect_matrix(grad_pre, "grad_pre");
  expect_matrix(x, "x");
  expect_floating(x, "x");
  expect_matrix(enc_weight, "enc_weight");
  expect_like(grad_pre, x, "grad_pre");
  expect_like(enc_weight, x, "enc_weight");
  TORCH_CHECK(grad_pre.size(0) == x.size(0), "grad_pre: expected ", x.size(0), " rows (as x), got shape ",
              grad_pre.sizes());
  TORCH_CHECK(x.size(1) == enc_weight.size(1), "x: expected last dimension d_in=", enc_weight.size(1),
              ", got shape ", x.sizes());
  expect_indices(indices, grad_pre, "indices");
  expect_vector(b_dec, enc_weight.size(1), x, "b_dec");
}

inline void check_sparse_decode_inputs(const at::Tensor& values, const at::Tensor& indices, const at::Tensor& W_dec,
                                       const std::optional<at::Tensor>& b_dec,
                                       const std::optional<at::Tensor>& dec_norm) {
  expect_matrix(values, "values");
  expect_floating(values, "values");
  expect_matrix(W_dec, "W_dec");
  expect_like(W_dec, values, "W_dec");
  expect_indices(indices, values, "indices");
  expect_vector(b_dec, W_dec.size(1), values, "b_dec");
  expect_vector(dec_norm, W_dec.size(0), values, "dec_norm");
}

inline void check_sparse_decode_backward_inputs(const at::Tensor& grad_out, const at::Tensor& values,
                                                const at::Tensor& indices, const at::Tensor& W_dec,
                                                const std::optional<at::Tensor>& dec_norm) {
  check_sparse_decode_inputs(values, indices, W_dec, std::nullopt, dec_norm);
  expect_like(grad_out, values, "grad_out");
  expect_shape(grad_out, {values.size(0), W_dec.size(1)}, "grad_out");
}

}  // namespace fastsae_cpp
