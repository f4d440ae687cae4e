// Row-sparse products on CUDA, shared by the sparse decode and the backward of both ops
// (the GPU counterparts of sparse_rows_cpu.h):
//   gather_sum     out[n]   = sum_j c[n,j] / norm[i] * W[i] (+ bias)           (i = idx[n,j])
//   gather_dot     out[n,j] = rows[n] . W[i] / norm[i]
//   scatter_outer  out[i]   = sum over idx[n,j] == i of c[n,j] / norm[i] * (rows[n] - row_bias)
// scatter_outer first groups the (n, j) pairs by latent with a stable radix sort (CUB), then
// one thread block per (latent, column chunk) sums its pairs in a fixed order: no floating
// point atomics, deterministic results, every output row written (zeros where no pair).
// Plain CUDA: raw pointers and a stream, no torch headers.
#include <cub/device/device_radix_sort.cuh>

#include <algorithm>
#include <type_traits>

#include "cuda_common.cuh"

namespace fastsae_cuda {
namespace {

constexpr int kColumns = 128;  // threads per block = output columns per block
constexpr int kTile = kColumns;

template <typename T>
__global__ void __launch_bounds__(kColumns)
    gather_sum_kernel(const T* __restrict__ coef, const int64_t* __restrict__ idx, int64_t m,
                      const T* __restrict__ weight, int64_t d, const T* __restrict__ norm, const T* __restrict__ bias,
                      T* __restrict__ out) {
  using A = typename Acc<T>::type;
  __shared__ A s_coef[kTile];
  __shared__ int64_t s_idx[kTile];
  const int64_t n = blockIdx.x;
  const int64_t col = static_cast<int64_t>(blockIdx.y) * kColumns + threadIdx.x;
  A acc = 0;
  for (int64_t j0 = 0; j0 < m; j0 += kTile) {
    const int64_t j = j0 + threadIdx.x;
    if (j < m) {
      const int64_t i = idx[n * m + j];
      A c = to_acc(coef[n * m + j]);
      if (norm) c /= to_acc(norm[i]);
      s_coef[threadIdx.x] = c;
      s_idx[threadIdx.x] = i;
    }
    __syncthreads();
    const int count = static_cast<int>(min(static_cast<int64_t>(kTile), m - j0));
    if (col < d)
      for (int t = 0; t < count; ++t) acc += s_coef[t] * to_acc(weight[s_idx[t] * d + col]);
    __syncthreads();
  }
  if (col < d) {
    if (bias) acc += to_acc(bias[col]);
    out[n * d + col] = from_acc<T>(acc);
  }
}

// One warp per (n, j) pair.
template <typename T>
__global__ void __launch_bounds__(256)
    gather_dot_kernel(const T* __restrict__ rows, const int64_t* __restrict__ idx, int64_t pairs, int64_t m,
                      const T* __restrict__ weight, int64_t d, const T* __restrict__ norm, T* __restrict__ out) {
  using A = typename Acc<T>::type;
  const int64_t pair = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (pair >= pairs) return;  // warp-uniform
  const int64_t n = pair / m, i = idx[pair];
  const T* __restrict__ a = rows + n * d;
  const T* __restrict__ b = weight + i * d;
  A s = 0;
  for (int64_t c = lane; c < d; c += 32) s += to_acc(a[c]) * to_acc(b[c]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(kFullMask, s, off);
  if (lane == 0) {
    if (norm) s /= to_acc(norm[i]);
    out[pair] = from_acc<T>(s);
  }
}

__global__ void pair_keys_kernel(const int64_t* __restrict__ idx, int count, unsigned* __restrict__ keys,
                                 int* __restrict__ positions) {
  const int p = blockIdx.x * blockDim.x + threadIdx.x;
  if (p < count) {
    keys[p] = static_cast<unsigned>(idx[p]);
    positions[p] = p;
  }
}

// First position q in sorted[0, count) with sorted[q] >= value.
__device__ __forceinline__ int lower_bound(const unsigned* __restrict__ sorted, int count, unsigned value) {
  int lo = 0, hi = count;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (sorted[mid] < value) lo = mid + 1; else hi = mid;
  }
  return lo;
}

template <typename T>
__global__ void __launch_bounds__(kColumns)
    scatter_outer_kernel(const T* __restrict__ coef, const unsigned* __restrict__ sorted_latents,
                         const int* __restrict__ sorted_positions, int count, int64_t m, const T* __restrict__ rows,
                         const T* __restrict__ row_bias, int64_t d, const T* __restrict__ norm, T* __restrict__ out,
                         T* __restrict__ sums) {
  using A = typename Acc<T>::type;
  __shared__ A s_coef[kTile];
  __shared__ A s_raw[kTile];
  __shared__ int64_t s_row[kTile];
  __shared__ int s_begin, s_end;
  const unsigned latent = blockIdx.x;
  const int64_t col = static_cast<int64_t>(blockIdx.y) * kColumns + threadIdx.x;
  if (threadIdx.x == 0) {
    s_begin = lower_bound(sorted_latents, count, latent);
    s_end = lower_bound(sorted_latents, count, latent + 1);
  }
  __syncthreads();
  const int begin = s_begin, end = s_end;
  const A scale = norm ? to_acc(norm[latent]) : A(1);
  const A shift = (row_bias && col < d) ? to_acc(row_bias[col]) : A(0);
  A acc = 0, total = 0;
  for (int q0 = begin; q0 < end; q0 += kTile) {
    const int q = q0 + threadIdx.x;
    if (q < end) {
      const int p = sorted_positions[q];
      const A c = to_acc(coef[p]);
      s_raw[threadIdx.x] = c;
      s_coef[threadIdx.x] = norm ? c / scale : c;
      s_row[threadIdx.x] = p / m;
    }
    __syncthreads();
    const int n_pairs = min(kTile, end - q0);
    if (col < d)
      for (int t = 0; t < n_pairs; ++t) acc += s_coef[t] * (to_acc(rows[s_row[t] * d + col]) - shift);
    if (threadIdx.x == 0)
      for (int t = 0; t < n_pairs; ++t) total += s_raw[t];
    __syncthreads();
  }
  if (col < d) out[static_cast<int64_t>(latent) * d + col] = from_acc<T>(acc);
  if (sums && blockIdx.y == 0 && threadIdx.x == 0) sums[latent] = from_acc<T>(total);
}

int key_bits(int64_t d_sae) {
  int bits = 1;
  while ((int64_t{1} << bits) < d_sae) ++bits;
  return bits;
}

size_t align256(size_t bytes) { return (bytes + 255) & ~size_t{255}; }

size_t sort_temp_bytes(int count, int64_t d_sae) {
  size_t bytes = 0;
  cub::DeviceRadixSort::SortPairs(nullptr, bytes, static_cast<const unsigned*>(nullptr), static_cast<unsigned*>(nullptr),
                                  static_cast<const int*>(nullptr), static_cast<int*>(nullptr), count, 0,
                                  key_bits(d_sae));
  return bytes;
}

}  // namespace

cudaError_t gather_sum(DType dtype, const void* coef, const int64_t* idx, int64_t rows, int64_t m,
                       const void* weight, int64_t d, const void* norm, const void* bias, void* out,
                       cudaStream_t stream) {
  if (rows == 0 || d == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const dim3 grid(static_cast<unsigned>(rows), ceil_div(d, kColumns));
    gather_sum_kernel<T><<<grid, kColumns, 0, stream>>>(static_cast<const T*>(coef), idx, m,
                                                        static_cast<const T*>(weight), d, static_cast<const T*>(norm),
                                                        static_cast<const T*>(bias), static_cast<T*>(out));
    return cudaGetLastError();
  });
}

cudaError_t gather_dot(DType dtype, const void* rows, const int64_t* idx, int64_t n_rows, int64_t m,
                       const void* weight, int64_t d, const void* norm, void* out, cudaStream_t stream) {
  const int64_t pairs = n_rows * m;
  if (pairs == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    constexpr int kThreads = 256;
    gather_dot_kernel<T><<<ceil_div(pairs, kThreads / 32), kThreads, 0, stream>>>(
        static_cast<const T*>(rows), idx, pairs, m, static_cast<const T*>(weight), d, static_cast<const T*>(norm),
        static_cast<T*>(out));
    return cudaGetLastError();
  });
}

size_t scatter_outer_workspace_bytes(int64_t count, int64_t d_sae) {
  const size_t ints = align256(sizeof(int) * static_cast<size_t>(count));
  return 4 * ints + align256(sort_temp_bytes(static_cast<int>(count), d_sae));
}

cudaError_t scatter_outer(DType dtype, const void* coef, const int64_t* idx, int64_t n_rows, int64_t m,
                          const void* rows, const void* row_bias, int64_t d, const void* norm, int64_t d_sae,
                          void* out, void* sums, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (d_sae == 0) return cudaSuccess;
  const int count = static_cast<int>(n_rows * m);
  const size_t ints = align256(sizeof(int) * static_cast<size_t>(count));
  char* ws = static_cast<char*>(workspace);
  unsigned* keys = reinterpret_cast<unsigned*>(ws);
  unsigned* sorted_keys = reinterpret_cast<unsigned*>(ws + ints);
  int* positions = reinterpret_cast<int*>(ws + 2 * ints);
  int* sorted_positions = reinterpret_cast<int*>(ws + 3 * ints);
  if (count > 0) {
    if (workspace_bytes < scatter_outer_workspace_bytes(count, d_sae)) return cudaErrorInvalidValue;
    size_t temp_bytes = workspace_bytes - 4 * ints;
    pair_keys_kernel<<<ceil_div(count, 256), 256, 0, stream>>>(idx, count, keys, positions);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    err = cub::DeviceRadixSort::SortPairs(ws + 4 * ints, temp_bytes, keys, sorted_keys, positions, sorted_positions,
                                          count, 0, key_bits(d_sae), stream);
    if (err != cudaSuccess) return err;
  }
  return dispatch(dtype, [&](auto tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const dim3 grid(static_cast<unsigned>(d_sae), std::max(1u, ceil_div(d, kColumns)));  // sums even when d == 0
    scatter_outer_kernel<T><<<grid, kColumns, 0, stream>>>(
        static_cast<const T*>(coef), sorted_keys, sorted_positions, count, m, static_cast<const T*>(rows),
        static_cast<const T*>(row_bias), d, static_cast<const T*>(norm), static_cast<T*>(out), static_cast<T*>(sums));
    return cudaGetLastError();
  });
}

}  // namespace fastsae_cuda
