// Per-row top-k of pre-activations on CUDA (the selection half of fastsae_cpp::topk_encode on
// GPU; the encoder matmul before it is cuBLAS, through ATen, in cuda_binding.cpp).
//
// One thread block per row, for rows of any width (d_sae up to 2^24 and beyond): a radix
// select over order-preserving integer keys of v = (pre + b_enc) * dec_norm, 8 bits per pass
// from the most significant digit (4 passes for 32-bit keys, fewer when the k-th value's
// bucket is taken whole), each pass a shared-memory histogram of the row's candidates. A final
// pass writes the selected latents in ascending latent order, positions from a block-wide
// prefix sum (deterministic: no atomics decide the output, and ties at the k-th value go to
// the lowest latents). Plain CUDA: raw pointers and a stream, no torch headers.
#include <type_traits>

#include "cuda_common.cuh"

namespace fastsae_cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kRadixBits = 8;
constexpr int kBins = 1 << kRadixBits;

// Order-preserving keys: a larger value has a larger unsigned key; every NaN ranks highest
// (as in torch.topk).
__device__ __forceinline__ uint32_t order_key(float v) {
  if (v != v) return 0xffffffffu;
  const uint32_t u = __float_as_uint(v);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ uint64_t order_key(double v) {
  if (v != v) return ~0ull;
  const uint64_t u = static_cast<uint64_t>(__double_as_longlong(v));
  return (u >> 63) ? ~u : (u | (1ull << 63));
}

// Exclusive prefix sum of one int per thread over the block; *total gets the block's sum.
__device__ __forceinline__ int block_exclusive_sum(int v, int* warp_sums, int* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int inclusive = v;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const int n = __shfl_up_sync(kFullMask, inclusive, off);
    if (lane >= off) inclusive += n;
  }
  if (lane == 31) warp_sums[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    const int w = lane < kWarps ? warp_sums[lane] : 0;
    int scanned = w;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const int n = __shfl_up_sync(kFullMask, scanned, off);
      if (lane >= off) scanned += n;
    }
    if (lane < kWarps) warp_sums[lane] = scanned - w;
    if (lane == kWarps - 1) warp_sums[kWarps] = scanned;
  }
  __syncthreads();
  const int exclusive = inclusive - v + warp_sums[warp];
  *total = warp_sums[kWarps];
  __syncthreads();  // warp_sums is reused by the next call
  return exclusive;
}

template <typename T, typename K>
__global__ void __launch_bounds__(kThreads)
    row_topk_kernel(const T* __restrict__ pre, int64_t d, const T* __restrict__ bias, const T* __restrict__ norm,
                    int k, T* __restrict__ values, int64_t* __restrict__ indices) {
  using A = typename Acc<T>::type;
  constexpr int kKeyBits = 8 * sizeof(K);
  __shared__ int hist[kBins];
  __shared__ int warp_sums[kWarps + 1];
  __shared__ int s_digit, s_remaining, s_bucket;

  const int64_t row = blockIdx.x;
  const T* __restrict__ p = pre + row * d;
  const int lane = threadIdx.x & 31;
  auto value_at = [&](int64_t j) -> A {
    A v = to_acc(p[j]) + to_acc(bias[j]);
    if (norm) v *= to_acc(norm[j]);
    return v;
  };

  // Radix select: after each pass, the k-th largest key starts with `prefix` (on the bits of
  // `prefix_mask`), and `remaining` of the k are in that bucket.
  K prefix = 0, prefix_mask = 0;
  int remaining = k;
  for (int shift = kKeyBits - kRadixBits; shift >= 0; shift -= kRadixBits) {
    for (int b = threadIdx.x; b < kBins; b += kThreads) hist[b] = 0;
    __syncthreads();
    for (int64_t base = 0; base < d; base += kThreads) {  // warp-uniform trip count
      const int64_t j = base + threadIdx.x;
      int bin = kBins;  // none
      if (j < d) {
        const K key = order_key(value_at(j));
        if ((key & prefix_mask) == prefix) bin = static_cast<int>((key >> shift) & (kBins - 1));
      }
      // one shared atomic per distinct bin in the warp (most keys share the top digits)
      const unsigned peers = __match_any_sync(kFullMask, bin);
      if (bin < kBins && lane == __ffs(peers) - 1) atomicAdd(&hist[bin], __popc(peers));
    }
    __syncthreads();
    if (threadIdx.x < 32) {  // warp 0 finds the bucket of the remaining-th largest key
      constexpr int kPerLane = kBins / 32;
      int local = 0;
#pragma unroll
      for (int b = 0; b < kPerLane; ++b) local += hist[lane * kPerLane + b];
      int suffix = local;  // keys in the bins of this lane and above
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const int n = __shfl_down_sync(kFullMask, suffix, off);
        if (lane + off < 32) suffix += n;
      }
      int above = suffix - local;
      if (above < remaining && remaining <= suffix) {
        for (int b = kPerLane - 1; b >= 0; --b) {
          const int c = hist[lane * kPerLane + b];
          if (above + c >= remaining) {
            s_digit = lane * kPerLane + b;
            s_remaining = remaining - above;
            s_bucket = c;
            break;
          }
          above += c;
        }
      }
    }
    __syncthreads();
    prefix |= static_cast<K>(s_digit) << shift;
    prefix_mask |= static_cast<K>(kBins - 1) << shift;
    remaining = s_remaining;
    if (s_bucket == remaining) break;  // the whole bucket is taken: its prefix decides
  }

  // Write: keys above the prefix all, keys in the bucket the first `remaining` by latent.
  T* __restrict__ out_v = values + row * k;
  int64_t* __restrict__ out_i = indices + row * k;
  int gt_before = 0, eq_before = 0;
  for (int64_t base = 0; base < d; base += kThreads) {
    const int64_t j = base + threadIdx.x;
    int gt = 0, eq = 0;
    A v = 0;
    if (j < d) {
      v = value_at(j);
      const K key = order_key(v) & prefix_mask;
      gt = key > prefix;
      eq = key == prefix;
    }
    int total;  // counts per tile <= kThreads: two 16-bit fields in one int
    const int before = block_exclusive_sum(gt | (eq << 16), warp_sums, &total);
    const int my_gt = gt_before + (before & 0xffff), my_eq = eq_before + (before >> 16);
    int slot = -1;
    if (gt) slot = my_gt + min(my_eq, remaining);
    if (eq && my_eq < remaining) slot = my_gt + my_eq;
    if (slot >= 0) {
      out_v[slot] = from_acc<T>(v < A(0) ? A(0) : v);  // ReLU; NaN stays NaN
      out_i[slot] = j;
    }
    gt_before += total & 0xffff;
    eq_before += total >> 16;
    if (gt_before + min(eq_before, remaining) == k) break;  // block-uniform
  }
}

}  // namespace

cudaError_t row_topk(DType dtype, const void* pre, int64_t rows, int64_t d, const void* bias, const void* norm,
                     int64_t k, void* values, int64_t* indices, cudaStream_t stream) {
  if (rows == 0 || k == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using K = std::conditional_t<std::is_same<T, double>::value, uint64_t, uint32_t>;
    row_topk_kernel<T, K><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
        static_cast<const T*>(pre), d, static_cast<const T*>(bias), static_cast<const T*>(norm),
        static_cast<int>(k), static_cast<T*>(values), indices);
    return cudaGetLastError();
  });
}

}  // namespace fastsae_cuda
