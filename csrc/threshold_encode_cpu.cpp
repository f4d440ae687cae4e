// ReLU / JumpReLU encode on CPU (fastsae_cpp::threshold_encode, the `cpp` backend): each row's
// pre-activations above a per-latent cutoff, in row-wise sparse form.
//
// Blocked like the top-k encode (encode_tiles_cpu.h): each tile row is compared with the cutoff
// 16 lanes at a time (AVX2 compare + movemask; scalar elsewhere), only the kept lanes are
// visited, and their (pre-activation, latent) pairs are appended, in latent order, to the row's
// list. Once every tile is done the width m = min(largest count, max_width) is known: the
// [N, m] outputs are allocated then and written whole (padding slots: -inf at latent 0).
// Memory beyond the outputs: one tile per thread and the kept lists, at most
// parts * max_width entries per row (not [N, d_sae]).
//
// Forward only: the backward is the encoder backward of the top-k op (topk_encode_backward),
// which takes any [N, m] (grad, index) pairs.
//
// Semantics (fastsae/reference.py::threshold_encode): latent i is kept iff !(pre <= cutoff[i]):
// above the cutoff (strictly), or NaN (so NaN reaches the output as on the dense path; -inf is
// never kept, so it marks padding). Counts are the true counts, and a row with more than max_width kept
// latents keeps its first max_width in latent order. bf16/fp16: selection on fp32
// pre-activations, values rounded to the input type.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <limits>
#include <tuple>
#include <vector>

#include "encode_tiles_cpu.h"
#include "op_checks.h"
#include "sparse_rows_cpu.h"

namespace fastsae_cpp {
namespace {

using at::Tensor;

// Whether a pre-activation is kept: above its cutoff or NaN (not <=, which is false for NaN).
template <typename A>
inline bool is_kept(A pre, A cutoff) {
  return !(pre <= cutoff);
}

// Which of 16 consecutive pre-activations are kept (is_kept), as a bit mask.
template <typename A>
inline uint32_t kept_mask(const A* tile_row, const A* bias, const A* norm, const A* cutoff) {
  uint32_t mask = 0;
  for (int u = 0; u < 16; ++u)
    mask |= static_cast<uint32_t>(is_kept(pre_value(tile_row, bias, norm, u), cutoff[u])) << u;
  return mask;
}

#ifdef __AVX2__
template <>
inline uint32_t kept_mask<float>(const float* tile_row, const float* bias, const float* norm, const float* cutoff) {
  __m256 lo, hi;
  pre_chunk16(tile_row, bias, norm, lo, hi);
  // _CMP_NLE_UQ: !(v <= cutoff), true for NaN (is_kept)
  return movemask16(_mm256_cmp_ps(lo, _mm256_loadu_ps(cutoff), _CMP_NLE_UQ),
                    _mm256_cmp_ps(hi, _mm256_loadu_ps(cutoff + 8), _CMP_NLE_UQ));
}
#endif

// One row's kept entries (in one latent part): the first `cap` in latent order, and how many
// were kept in all.
template <typename A>
struct KeptRow {
  std::vector<Candidate<A>> entries;
  int64_t count = 0;
};

template <typename A>
inline void scan_row_above_cutoff(const A* tile_row, int64_t cols, int32_t first_latent, const A* bias, const A* norm,
                                  const A* cutoff, int64_t cap, KeptRow<A>& kept) {
  auto keep = [&](int64_t t) {
    ++kept.count;
    if (static_cast<int64_t>(kept.entries.size()) < cap)
      kept.entries.push_back({pre_value(tile_row, bias, norm, t), first_latent + static_cast<int32_t>(t)});
  };
  constexpr int64_t kChunk = 16;
  int64_t t = 0;
  for (; t + kChunk <= cols; t += kChunk) {
    uint32_t hits = kept_mask(tile_row + t, bias + t, norm ? norm + t : nullptr, cutoff + t);
    while (hits) {
      keep(t + __builtin_ctz(hits));
      hits &= hits - 1;
    }
  }
  for (; t < cols; ++t)
    if (is_kept(pre_value(tile_row, bias, norm, t), cutoff[t])) keep(t);
}

template <typename T>
std::tuple<Tensor, Tensor, Tensor> threshold_encode_kernel(const Tensor& x, const Tensor& x_in, const Tensor& enc,
                                                           const Tensor& b_enc, const Tensor* norm,
                                                           const Tensor& cutoff, int64_t max_width) {
  using A = acc_t<T>;
  const int64_t n_rows = x_in.size(0), d_sae = enc.size(0);
  const TileGrid grid(n_rows, d_sae);
  const int64_t parts = grid.parts;
  const A* bias = b_enc.data_ptr<A>();
  const A* scale = norm ? norm->data_ptr<A>() : nullptr;
  const A* cut = cutoff.data_ptr<A>();

  std::vector<KeptRow<A>> kept(parts * n_rows);  // [parts, n_rows]; parts cover increasing latents
  struct NoState {};
  for_each_pre_tile<T>(
      x_in, enc, grid, [] { return NoState{}; }, [](NoState&, int64_t, int64_t, int64_t) {},
      [&](NoState&, int64_t part, int64_t r0, int64_t rows, int64_t l0, int64_t cols, const A* p) {
        const A* block_scale = scale ? scale + l0 : nullptr;
        for (int64_t r = 0; r < rows; ++r)
          scan_row_above_cutoff(p + r * cols, cols, static_cast<int32_t>(l0), bias + l0, block_scale, cut + l0,
                                max_width, kept[grid.slot(part, r0 + r)]);
      },
      [](NoState&, int64_t, int64_t, int64_t) {});

  Tensor counts = at::empty({n_rows}, x.options().dtype(at::kLong));
  int64_t* count = counts.data_ptr<int64_t>();
  int64_t largest = 0;
  for (int64_t n = 0; n < n_rows; ++n) {
    count[n] = 0;
    for (int64_t part = 0; part < parts; ++part) count[n] += kept[grid.slot(part, n)].count;
    largest = std::max(largest, count[n]);
  }
  const int64_t m = std::min(largest, max_width);
  Tensor values = at::empty({n_rows, m}, x.options());
  Tensor indices = at::empty({n_rows, m}, x.options().dtype(at::kLong));
  T* v = values.data_ptr<T>();
  int64_t* idx = indices.data_ptr<int64_t>();
  const T padding = static_cast<T>(-std::numeric_limits<A>::infinity());
  // Each row: its parts' entries in part (= latent) order, up to m, then padding.
  at::parallel_for(0, n_rows, grain_for(4 * m), [&](int64_t r0, int64_t r1) {
    for (int64_t n = r0; n < r1; ++n) {
      T* row_v = v + n * m;
      int64_t* row_i = idx + n * m;
      int64_t s = 0;
      for (int64_t part = 0; part < parts && s < m; ++part) {
        for (const Candidate<A>& e : kept[grid.slot(part, n)].entries) {
          if (s == m) break;
          row_v[s] = static_cast<T>(e.value);
          row_i[s++] = e.latent;
        }
      }
      std::fill(row_v + s, row_v + m, padding);
      std::fill(row_i + s, row_i + m, int64_t{0});
    }
  });
  return {values, indices, counts};
}

std::tuple<Tensor, Tensor, Tensor> threshold_encode_cpu(const Tensor& x, const Tensor& enc_weight, const Tensor& b_enc,
                                                        const std::optional<Tensor>& b_dec,
                                                        const std::optional<Tensor>& dec_norm, const Tensor& cutoff,
                                                        int64_t max_width) {
  const BelowAutograd below_autograd;
  check_threshold_encode_inputs(x, enc_weight, b_enc, b_dec, dec_norm, cutoff, max_width);
  const Tensor x_in = encoder_input(x, b_dec);
  const Tensor enc = enc_weight.contiguous();
  const Tensor bias = to_acc(b_enc);
  const Tensor norm = present(dec_norm) ? to_acc(*dec_norm) : Tensor();
  const Tensor cut = cutoff.contiguous();
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastsae_cpp::threshold_encode",
                                         [&] {
                                           return threshold_encode_kernel<scalar_t>(
                                               x, x_in, enc, bias, norm.defined() ? &norm : nullptr, cut, max_width);
                                         });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastsae_cpp, CPU, m) { m.impl("threshold_encode", &threshold_encode_cpu); }

}  // namespace fastsae_cpp
