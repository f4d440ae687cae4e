// Row-sparse primitives shared by the CPU kernels of both ops (fastsae's `cpp` backend).
//
// A sparse batch is values/coefficients [N, m] with int64 latent indices [N, m] into a
// latent-major weight [d_sae, d]. Two primitives cover every sparse product of the forward
// and backward passes:
//   gather_sum     out[n]    = sum_j c[n,j] / norm[i] * W[i]          (i = idx[n,j]), + bias
//   scatter_outer  out[i]    = sum over (n,j) with idx[n,j] == i of c[n,j] / norm[i] * rows[n]
//                  and, optionally in the same pass, dots[n,j] = rows[n] . W[i] / norm[i]
// scatter_outer groups the (n, j) pairs by latent with a counting sort, so each latent's output
// row is owned by one thread: no atomics, no dense [N, d_sae] products, and a fixed summation
// order (deterministic results). Everything accumulates in float (double for double inputs).
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

namespace fastsae_cpp {

// Accumulation type: float for float, bfloat16 and half; double for double.
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccType<T>::type;

// Rows per parallel chunk, so each chunk does at least ~64k multiply-adds.
inline int64_t grain_for(int64_t work_per_row) {
  return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, work_per_row));
}

// y[0:d] += a * w[0:d]   (no reduction: vectorizes as is)
template <typename A, typename T>
inline void axpy(int64_t d, A a, const T* __restrict w, A* __restrict y) {
  for (int64_t t = 0; t < d; ++t) y[t] += a * static_cast<A>(w[t]);
}

// a . b with 16 independent partial sums, so the loop vectorizes without -ffast-math.
template <typename A, typename T, typename U>
inline A dot(int64_t d, const T* __restrict a, const U* __restrict b) {
  constexpr int kLanes = 16;
  A lane[kLanes] = {};
  int64_t t = 0;
  for (; t + kLanes <= d; t += kLanes)
    for (int l = 0; l < kLanes; ++l) lane[l] += static_cast<A>(a[t + l]) * static_cast<A>(b[t + l]);
  for (int l = 0; t < d; ++t, ++l) lane[l] += static_cast<A>(a[t]) * static_cast<A>(b[t]);
  for (int w = kLanes / 2; w > 0; w /= 2)
    for (int l = 0; l < w; ++l) lane[l] += lane[l + w];
  return lane[0];
}

// Throws unless every index is in [0, d_sae): the kernels index weights with them unchecked.
inline void check_indices(const int64_t* idx, int64_t count, int64_t d_sae, const char* what) {
  int64_t lo = 0, hi = 0;
  for (int64_t p = 0; p < count; ++p) {
    lo = std::min(lo, idx[p]);
    hi = std::max(hi, idx[p]);
  }
  TORCH_CHECK(count == 0 || (lo >= 0 && hi < d_sae), what, ": expected latent indices in [0, ", d_sae,
              "), got values in [", lo, ", ", hi, "]");
}

// The (n, j) pairs of an [N, m] index matrix grouped by latent (a stable counting sort):
// latent i's flat positions p = n * m + j are items[offsets[i] .. offsets[i + 1]), ascending.
struct LatentGroups {
  std::vector<int32_t> offsets;  // d_sae + 1 entries
  std::vector<int32_t> items;
};

inline LatentGroups group_by_latent(const int64_t* idx, int64_t count, int64_t d_sae) {
  TORCH_CHECK(count < std::numeric_limits<int32_t>::max(), "fastsae_cpp: at most 2^31 - 1 (row, slot) pairs, got ",
              count);
  LatentGroups g;
  // counts at offsets[i + 2], so that after the prefix sum offsets[i + 1] is the start of latent i
  // and, after the fill advanced each cursor, offsets[i] is the start of latent i.
  g.offsets.assign(d_sae + 2, 0);
  for (int64_t p = 0; p < count; ++p) ++g.offsets[idx[p] + 2];
  for (int64_t i = 2; i < d_sae + 2; ++i) g.offsets[i] += g.offsets[i - 1];
  g.items.resize(count);
  for (int64_t p = 0; p < count; ++p) g.items[g.offsets[idx[p] + 1]++] = static_cast<int32_t>(p);
  g.offsets.pop_back();
  return g;
}

// out[n] = sum_j coef[n,j] / norm[idx[n,j]] * weight[idx[n,j]] + bias   (norm, bias may be null)
//
// Each thread takes a block of rows. When the block has many pairs per latent row of the
// weight, its pairs are grouped by latent so that each weight row is read once per block
// (sequentially) and added into the block's output rows, which stay in cache; otherwise each
// row gathers its own weight rows.
template <typename T>
void gather_sum(const T* coef, const int64_t* idx, int64_t n_rows, int64_t m, const T* weight, int64_t d_sae,
                int64_t d, const T* norm, const T* bias, T* out) {
  using A = acc_t<T>;
  constexpr bool kInPlace = std::is_same<A, T>::value;
  at::parallel_for(0, n_rows, grain_for(m * d), [&](int64_t r0, int64_t r1) {
    const int64_t rows = r1 - r0, pairs = rows * m;
    std::vector<A> buffer(kInPlace ? 0 : rows * d);
    A* acc = kInPlace ? reinterpret_cast<A*>(out + r0 * d) : buffer.data();
    std::fill(acc, acc + rows * d, A(0));
    const int64_t* block_idx = idx + r0 * m;
    const T* block_coef = coef + r0 * m;
    auto add_pair = [&](int64_t p, int64_t i) {
      A c = static_cast<A>(block_coef[p]);
      if (norm) c /= static_cast<A>(norm[i]);
      axpy(d, c, weight + i * d, acc + (p / m) * d);
    };
    if (4 * pairs >= d_sae) {
      const LatentGroups g = group_by_latent(block_idx, pairs, d_sae);
      for (int64_t i = 0; i < d_sae; ++i)
        for (int32_t q = g.offsets[i]; q < g.offsets[i + 1]; ++q) add_pair(g.items[q], i);
    } else {
      for (int64_t p = 0; p < pairs; ++p) add_pair(p, block_idx[p]);
    }
    T* o = out + r0 * d;
    if (bias) {
      for (int64_t n = 0; n < rows; ++n)
        for (int64_t t = 0; t < d; ++t) o[n * d + t] = static_cast<T>(acc[n * d + t] + static_cast<A>(bias[t]));
    } else if (!kInPlace) {
      for (int64_t t = 0; t < rows * d; ++t) o[t] = static_cast<T>(acc[t]);
    }
  });
}

// out[i] = sum over p in group i of coef[p] / norm[i] * rows[p / m]  (norm may be null), and
// sums[i] = sum over p of coef[p] (when sums is not null). Every row of out is written.
// rows has type R (the inputs' type, or the accumulation type when precomputed in it).
// With `weight` and `dots` (the decode backward), also dots[p] = rows[p / m] . weight[i] /
// norm[i] in the same pass: each weight row is then read once, not once per pair.
template <typename T, typename R>
void scatter_outer(const LatentGroups& g, const T* coef, int64_t m, const R* rows, int64_t d, const T* norm,
                   int64_t d_sae, T* out, T* sums, const T* weight = nullptr, T* dots = nullptr) {
  using A = acc_t<T>;
  constexpr bool kInPlace = std::is_same<A, T>::value;
  // Balance chunks by work: one unit per (pair, d) plus one per latent row written.
  const int64_t total = static_cast<int64_t>(g.items.size()) + d_sae;
  const int64_t n_chunks = std::max<int64_t>(1, std::min<int64_t>(d_sae, 8 * at::get_num_threads()));
  auto chunk_start = [&](int64_t c) -> int64_t {
    if (c >= n_chunks) return d_sae;
    const int64_t target = total * c / n_chunks;
    int64_t lo = 0, hi = d_sae;  // first latent i with offsets[i] + i >= target
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (g.offsets[mid] + mid < target) lo = mid + 1; else hi = mid;
    }
    return lo;
  };
  at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<A> buffer(kInPlace ? 0 : d);
    for (int64_t i = chunk_start(c0), end = chunk_start(c1); i < end; ++i) {
      A* acc = kInPlace ? reinterpret_cast<A*>(out + i * d) : buffer.data();
      std::fill(acc, acc + d, A(0));
      A total_coef = 0;
      for (int32_t q = g.offsets[i]; q < g.offsets[i + 1]; ++q) {
        const int64_t p = g.items[q];
        const R* row = rows + (p / m) * d;
        A c = static_cast<A>(coef[p]);
        total_coef += c;
        if (norm) c /= static_cast<A>(norm[i]);
        axpy(d, c, row, acc);
        if (dots) {
          A s = dot<A>(d, row, weight + i * d);
          if (norm) s /= static_cast<A>(norm[i]);
          dots[p] = static_cast<T>(s);
        }
      }
      if (!kInPlace)
        for (int64_t t = 0; t < d; ++t) out[i * d + t] = static_cast<T>(acc[t]);
      if (sums) sums[i] = static_cast<T>(total_coef);
    }
  });
}

}  // namespace fastsae_cpp
