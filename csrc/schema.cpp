// The fastsae_cpp operator namespace: the schemas of the C++/CUDA kernels.
//
// These are the kernels behind fastsae's `cpp` (CPU) and `cuda` backends; the public ops
// (fastsae::topk_encode, ...) and their autograd live in Python (fastsae/ops/, one file per op)
// and call these through fastsae/ops/backend_cpp.py and backend_cuda.py. Each op has a functional
// form and an `_out` form that writes into caller-provided buffers (every element written),
// except threshold_encode, whose output width depends on the data (the batch's largest kept
// count), so that no caller could size the buffers beforehand.
// Semantics and shapes are those of fastsae/reference.py.
#include <torch/library.h>

TORCH_LIBRARY(fastsae_cpp, m) {
  m.def(
      "topk_encode(Tensor x, Tensor enc_weight, Tensor b_enc, Tensor? b_dec, Tensor? dec_norm, int k, "
      "Tensor? aux_latents, int k_aux) -> (Tensor, Tensor, Tensor)");
  m.def(
      "topk_encode_out(Tensor x, Tensor enc_weight, Tensor b_enc, Tensor? b_dec, Tensor? dec_norm, int k, "
      "Tensor? aux_latents, int k_aux, *, Tensor(a!) values, Tensor(b!) indices, Tensor(c!) aux_pre) -> ()");
  m.def(
      "topk_encode_backward(Tensor grad_pre, Tensor indices, Tensor x, Tensor enc_weight, Tensor? b_dec) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "topk_encode_backward_out(Tensor grad_pre, Tensor indices, Tensor x, Tensor enc_weight, Tensor? b_dec, *, "
      "Tensor(a!) grad_x_in, Tensor(b!) grad_enc_weight, Tensor(c!) grad_b_enc) -> ()");
  m.def(
      "threshold_encode(Tensor x, Tensor enc_weight, Tensor b_enc, Tensor? b_dec, Tensor? dec_norm, Tensor cutoff, "
      "int max_width) -> (Tensor, Tensor, Tensor)");
  m.def("sparse_decode(Tensor values, Tensor indices, Tensor W_dec, Tensor? b_dec, Tensor? dec_norm) -> Tensor");
  m.def(
      "sparse_decode_out(Tensor values, Tensor indices, Tensor W_dec, Tensor? b_dec, Tensor? dec_norm, *, "
      "Tensor(a!) out) -> ()");
  m.def(
      "sparse_decode_backward(Tensor grad_out, Tensor values, Tensor indices, Tensor W_dec, Tensor? dec_norm) "
      "-> (Tensor, Tensor)");
  m.def(
      "sparse_decode_backward_out(Tensor grad_out, Tensor values, Tensor indices, Tensor W_dec, Tensor? dec_norm, "
      "*, Tensor(a!) grad_values, Tensor(b!) grad_W_dec) -> ()");
}
