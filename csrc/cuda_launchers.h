// Host-side declarations of fastsae's CUDA kernels (topk_encode_cuda.cu, sparse_rows_cuda.cu).
//
// Plain C++: raw pointers, element counts, a dtype tag and a stream; no torch and no CUDA
// device types, so the .cu files compile with plain nvcc and the torch binding
// (cuda_binding.cpp) with the host compiler. Matrices are row-major and contiguous; every
// function returns the launch's cudaError_t. Accumulation is float (double for kFloat64).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace fastsae_cuda {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

// For each row r of pre [rows, d]: v[j] = (pre[r, j] + bias[j]) * norm[j] (norm may be null);
// writes the k largest (NaN ranks highest), through ReLU, to values/indices [rows, k], in
// ascending latent order. Ties at the k-th value go to the lowest latents; k <= d. One thread
// block per row, radix select on order-preserving keys.
cudaError_t row_topk(DType dtype, const void* pre, int64_t rows, int64_t d, const void* bias, const void* norm,
                     int64_t k, void* values, int64_t* indices, cudaStream_t stream);

// out[n] = sum_j coef[n, j] / norm[i] * weight[i] (+ bias), i = idx[n, j]; out [rows, d].
cudaError_t gather_sum(DType dtype, const void* coef, const int64_t* idx, int64_t rows, int64_t m,
                       const void* weight, int64_t d, const void* norm, const void* bias, void* out,
                       cudaStream_t stream);

// out[n, j] = rows[n] . weight[i] / norm[i], i = idx[n, j]; out [n_rows, m].
cudaError_t gather_dot(DType dtype, const void* rows, const int64_t* idx, int64_t n_rows, int64_t m,
                       const void* weight, int64_t d, const void* norm, void* out, cudaStream_t stream);

// Bytes of device workspace scatter_outer needs for `count` = n_rows * m pairs.
size_t scatter_outer_workspace_bytes(int64_t count, int64_t d_sae);

// out[i] = sum over (n, j) with idx[n, j] == i of coef[n, j] / norm[i] * (rows[n] - row_bias)
// (norm, row_bias may be null), and sums[i] = sum of coef[n, j] there (when sums is not null).
// The pairs are grouped by latent with a stable radix sort: one thread block per latent and
// column chunk owns its output, so no atomics, and a fixed summation order. out [d_sae, d].
cudaError_t scatter_outer(DType dtype, const void* coef, const int64_t* idx, int64_t n_rows, int64_t m,
                          const void* rows, const void* row_bias, int64_t d, const void* norm, int64_t d_sae,
                          void* out, void* sums, void* workspace, size_t workspace_bytes, cudaStream_t stream);

}  // namespace fastsae_cuda
