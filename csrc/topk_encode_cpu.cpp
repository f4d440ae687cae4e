// TopK encode and its backward on CPU (fastsae_cpp::topk_encode*, the `cpp` backend).
//
// Forward, blocked (encode_tiles_cpu.h): the pre-activations are computed a [rows, latents] tile
// at a time, and each row keeps a running top-k (and a top-k_aux among dead latents) as the
// tiles stream by, so the [N, d_sae] matrix is never held. When the latents are split into
// parts (small batches), the partial top-k lists are merged at the end.
//
// Semantics (fastsae/reference.py): top-k of the (rescaled) pre-activations, then ReLU on the
// kept values. NaN ranks above every number, as in torch.topk. AuxK: a row's candidates are its
// dead latents whose pre-activation is not -inf; its first min(k_aux, candidates) slots hold the
// best of them (raw values, best first), the others value 0 at distinct unselected latents: the
// live ones ascending, then the row's remaining dead latents (at -inf) ascending.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "cpu_memory.h"
#include "encode_tiles_cpu.h"
#include "functional_forms.h"
#include "op_checks.h"
#include "sparse_rows_cpu.h"

namespace fastsae_cpp {
namespace {

using at::Tensor;

// A strict total order, best first: NaN above numbers (as torch.topk), then larger values, then
// lower latent ids (a deterministic tie-break).
template <typename A>
inline bool ranks_above(const Candidate<A>& a, const Candidate<A>& b) {
  const bool a_nan = std::isnan(a.value), b_nan = std::isnan(b.value);
  if (a_nan || b_nan) return a_nan != b_nan ? a_nan : a.latent < b.latent;
  if (a.value != b.value) return a.value > b.value;
  return a.latent < b.latent;
}

// The k best of a stream of candidates, in `cap` slots of storage: candidates are appended
// while they are not below the threshold (the k-th best kept so far, -inf at first); a full
// buffer is cut back to its k best with nth_element, which raises the threshold.
template <typename A>
struct RunningTopK {
  Candidate<A>* slots = nullptr;
  int64_t k = 0, cap = 0, count = 0;
  A threshold = -std::numeric_limits<A>::infinity();

  void reset(Candidate<A>* storage, int64_t k_, int64_t cap_) {
    slots = storage;
    k = k_;
    cap = cap_;
    count = 0;
    threshold = -std::numeric_limits<A>::infinity();
  }
  // `!(v < threshold)` admits NaN and ties; anything it rejects cannot be among the k best.
  bool admits(A v) const { return !(v < threshold); }
  void push(A v, int32_t latent) {
    slots[count++] = {v, latent};
    if (count == cap) cut();
  }
  void cut() {
    if (count <= k) return;
    std::nth_element(slots, slots + (k - 1), slots + count, ranks_above<A>);
    count = k;
    threshold = slots[k - 1].value;
  }
};

// Which of 16 consecutive pre-activations are admitted (not below thr, or NaN), as a bit mask.
// Nearly all chunks give 0, so this test is the scan's inner loop.
template <typename A>
inline uint32_t admitted_mask(const A* tile_row, const A* bias, const A* norm, A thr) {
  uint32_t mask = 0;
  for (int u = 0; u < 16; ++u) mask |= static_cast<uint32_t>(!(pre_value(tile_row, bias, norm, u) < thr)) << u;
  return mask;
}

#ifdef __AVX2__
template <>
inline uint32_t admitted_mask<float>(const float* tile_row, const float* bias, const float* norm, float thr) {
  __m256 lo, hi;
  pre_chunk16(tile_row, bias, norm, lo, hi);
  const __m256 t = _mm256_set1_ps(thr);
  // _CMP_NLT_UQ: !(v < thr), true for NaN, as RunningTopK::admits
  return movemask16(_mm256_cmp_ps(lo, t, _CMP_NLT_UQ), _mm256_cmp_ps(hi, t, _CMP_NLT_UQ));
}
#endif

// Feed one tile row's pre-activations that beat the running threshold to `best`; the tile
// itself is left as the matmul wrote it.
template <typename A>
inline void scan_row(const A* tile_row, int64_t cols, int32_t first_latent, const A* bias, const A* norm,
                     RunningTopK<A>& best) {
  constexpr int64_t kChunk = 16;
  int64_t t = 0;
  for (; t + kChunk <= cols; t += kChunk) {
    uint32_t hits = admitted_mask(tile_row + t, bias + t, norm ? norm + t : nullptr, best.threshold);
    while (hits) {
      const int64_t u = t + __builtin_ctz(hits);
      hits &= hits - 1;
      const A v = pre_value(tile_row, bias, norm, u);
      if (best.admits(v)) best.push(v, first_latent + static_cast<int32_t>(u));  // the threshold may have risen
    }
  }
  for (; t < cols; ++t) {
    const A v = pre_value(tile_row, bias, norm, t);
    if (best.admits(v)) best.push(v, first_latent + static_cast<int32_t>(t));
  }
}

// One row's final selection from `cands` (modified): the min(k, count) best, best first, written
// as values (through `activation`) and int64 indices; returns how many it wrote.
template <typename T, typename A, typename F>
inline int64_t write_best(Candidate<A>* cands, int64_t count, int64_t k, T* values, int64_t* indices, F activation) {
  if (count > k) std::nth_element(cands, cands + (k - 1), cands + count, ranks_above<A>);
  const int64_t taken = std::min(count, k);
  std::sort(cands, cands + taken, ranks_above<A>);
  for (int64_t s = 0; s < taken; ++s) {
    values[s] = static_cast<T>(activation(cands[s].value));
    indices[s] = cands[s].latent;
  }
  return taken;
}

// AuxK slots [taken, k_aux) of one row: value 0 at distinct latents the row did not select, the
// live ones (`live`, ascending) first, then the row's other dead latents ascending (only when
// every latent is dead or nearly: those are at -inf, as the candidates are all taken).
template <typename T>
inline void fill_aux(T* values, int64_t* indices, int64_t taken, int64_t k_aux, const std::vector<int32_t>& live,
                     const std::vector<int32_t>& dead) {
  int64_t s = taken;
  for (size_t p = 0; s < k_aux && p < live.size(); ++p, ++s) {
    values[s] = T(0);
    indices[s] = live[p];
  }
  if (s == k_aux) return;
  std::vector<int64_t> chosen(indices, indices + taken);
  std::sort(chosen.begin(), chosen.end());
  for (size_t p = 0; s < k_aux && p < dead.size(); ++p) {
    if (std::binary_search(chosen.begin(), chosen.end(), static_cast<int64_t>(dead[p]))) continue;
    values[s] = T(0);
    indices[s++] = dead[p];
  }
}

template <typename T>
void topk_encode_kernel(const Tensor& x_in, const Tensor& enc, const Tensor& b_enc, const Tensor* norm,
                        const std::vector<int32_t>& dead, const std::vector<int32_t>& live, int64_t k,
                        int64_t k_aux_real, T* values, int64_t* indices, T* aux_values, int64_t* aux_indices,
                        int64_t k_aux) {
  using A = acc_t<T>;
  const int64_t n_rows = x_in.size(0), d_sae = enc.size(0);
  const TileGrid grid(n_rows, d_sae);
  const int64_t parts = grid.parts, block_rows = grid.block_rows;
  const int64_t cap = std::max<int64_t>(4 * k, k + 64);
  const int64_t cap_aux = k_aux_real > 0 ? std::max<int64_t>(4 * k_aux_real, k_aux_real + 64) : 0;

  // Each (part, row)'s best candidates, merged per row at the end.
  std::vector<Candidate<A>> partial(parts * n_rows * k), partial_aux(parts * n_rows * k_aux_real);
  std::vector<int64_t> partial_count(parts * n_rows), partial_count_aux(parts * n_rows);

  const A* bias = b_enc.data_ptr<A>();
  const A* scale = norm ? norm->data_ptr<A>() : nullptr;

  // Per thread: the running top-k (and aux top-k) of each row of its current row block.
  struct RowBlockBest {
    std::vector<Candidate<A>> slots, slots_aux;
    std::vector<RunningTopK<A>> best, best_aux;
  };
  for_each_pre_tile<T>(
      x_in, enc, grid,
      [&] {
        return RowBlockBest{std::vector<Candidate<A>>(block_rows * cap), std::vector<Candidate<A>>(block_rows * cap_aux),
                            std::vector<RunningTopK<A>>(block_rows), std::vector<RunningTopK<A>>(block_rows)};
      },
      [&](RowBlockBest& s, int64_t, int64_t, int64_t rows) {
        for (int64_t r = 0; r < rows; ++r) {
          s.best[r].reset(s.slots.data() + r * cap, k, cap);
          if (k_aux_real > 0) s.best_aux[r].reset(s.slots_aux.data() + r * cap_aux, k_aux_real, cap_aux);
        }
      },
      [&](RowBlockBest& s, int64_t, int64_t, int64_t rows, int64_t l0, int64_t cols, const A* p) {
        const auto dead_begin = std::lower_bound(dead.begin(), dead.end(), static_cast<int32_t>(l0));
        const auto dead_end = std::lower_bound(dead_begin, dead.end(), static_cast<int32_t>(l0 + cols));
        const A* block_scale = scale ? scale + l0 : nullptr;
        for (int64_t r = 0; r < rows; ++r) {
          const A* row = p + r * cols;
          scan_row(row, cols, static_cast<int32_t>(l0), bias + l0, block_scale, s.best[r]);
          if (k_aux_real > 0) {
            RunningTopK<A>& aux = s.best_aux[r];
            for (auto it = dead_begin; it != dead_end; ++it) {
              const A v = pre_value(row, bias + l0, block_scale, *it - l0);
              // -inf is no candidate (a switched-off latent); NaN is, as in the top-k.
              if (v != -std::numeric_limits<A>::infinity() && aux.admits(v)) aux.push(v, *it);
            }
          }
        }
      },
      [&](RowBlockBest& s, int64_t part, int64_t r0, int64_t rows) {
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t slot = grid.slot(part, r0 + r);
          s.best[r].cut();
          std::copy(s.best[r].slots, s.best[r].slots + s.best[r].count, partial.begin() + slot * k);
          partial_count[slot] = s.best[r].count;
          if (k_aux_real > 0) {
            s.best_aux[r].cut();
            std::copy(s.best_aux[r].slots, s.best_aux[r].slots + s.best_aux[r].count,
                      partial_aux.begin() + slot * k_aux_real);
            partial_count_aux[slot] = s.best_aux[r].count;
          }
        }
      });

  // Merge the parts of each row and write the outputs.
  auto relu = [](A v) { return std::max(v, A(0)); };  // keeps NaN, as torch.relu
  auto identity = [](A v) { return v; };
  at::parallel_for(0, n_rows, grain_for(parts * (k + k_aux_real) * 8), [&](int64_t r0, int64_t r1) {
    std::vector<Candidate<A>> merged(parts * std::max(k, k_aux_real));
    for (int64_t n = r0; n < r1; ++n) {
      int64_t count = 0;
      for (int64_t part = 0; part < parts; ++part) {
        const int64_t slot = grid.slot(part, n);
        std::copy_n(partial.begin() + slot * k, partial_count[slot], merged.begin() + count);
        count += partial_count[slot];
      }
      write_best<T>(merged.data(), count, k, values + n * k, indices + n * k, relu);
      if (k_aux > 0) {
        int64_t taken = 0;
        if (k_aux_real > 0) {
          count = 0;
          for (int64_t part = 0; part < parts; ++part) {
            const int64_t slot = grid.slot(part, n);
            std::copy_n(partial_aux.begin() + slot * k_aux_real, partial_count_aux[slot], merged.begin() + count);
            count += partial_count_aux[slot];
          }
          taken = write_best<T>(merged.data(), count, k_aux_real, aux_values + n * k_aux, aux_indices + n * k_aux,
                                identity);
        }
        fill_aux<T>(aux_values + n * k_aux, aux_indices + n * k_aux, taken, k_aux, live, dead);
      }
    }
  });
}

void topk_encode_out_cpu(const Tensor& x, const Tensor& enc_weight, const Tensor& b_enc,
                         const std::optional<Tensor>& b_dec, const std::optional<Tensor>& dec_norm, int64_t k,
                         const std::optional<Tensor>& dead_mask, int64_t k_aux, const Tensor& values,
                         const Tensor& indices, const Tensor& aux_values, const Tensor& aux_indices) {
  const BelowAutograd below_autograd;
  check_topk_encode_inputs(x, enc_weight, b_enc, b_dec, dec_norm, k, dead_mask, k_aux);
  check_topk_encode_outputs(x, k, k_aux, values, indices, aux_values, aux_indices);
  const int64_t n = x.size(0), d_sae = enc_weight.size(0);
  if (n == 0) return;

  // Dead latents (sorted), and the first k_aux live ones, which fill aux slots with no candidate.
  std::vector<int32_t> dead, live;
  if (k_aux > 0) {
    const Tensor mask = dead_mask->contiguous();
    const bool* m = mask.data_ptr<bool>();
    for (int64_t i = 0; i < d_sae; ++i) {
      if (m[i]) dead.push_back(static_cast<int32_t>(i));
      else if (static_cast<int64_t>(live.size()) < k_aux) live.push_back(static_cast<int32_t>(i));
    }
  }
  const int64_t k_aux_real = std::min<int64_t>(k_aux, dead.size());

  const Tensor x_in = encoder_input(x, b_dec);
  const Tensor enc = enc_weight.contiguous();
  const Tensor bias = to_acc(b_enc);
  const Tensor norm = present(dec_norm) ? to_acc(*dec_norm) : Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastsae_cpp::topk_encode", [&] {
    topk_encode_kernel<scalar_t>(x_in, enc, bias, norm.defined() ? &norm : nullptr, dead, live, k, k_aux_real,
                                 values.data_ptr<scalar_t>(), indices.data_ptr<int64_t>(),
                                 aux_values.data_ptr<scalar_t>(), aux_indices.data_ptr<int64_t>(), k_aux);
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor> topk_encode_cpu(const Tensor& x, const Tensor& enc_weight,
                                                           const Tensor& b_enc, const std::optional<Tensor>& b_dec,
                                                           const std::optional<Tensor>& dec_norm, int64_t k,
                                                           const std::optional<Tensor>& dead_mask, int64_t k_aux) {
  return topk_encode_functional(topk_encode_out_cpu, x, enc_weight, b_enc, b_dec, dec_norm, k, dead_mask, k_aux);
}

// Backward: grad_x_in = gather_sum(grad_pre, W), grad_enc_weight[i] = sum of grad_pre * x_in over
// the rows that selected latent i (grouped by latent), grad_b_enc[i] = sum of grad_pre there.
void topk_encode_backward_out_cpu(const Tensor& grad_pre, const Tensor& indices, const Tensor& x,
                                  const Tensor& enc_weight, const std::optional<Tensor>& b_dec,
                                  const Tensor& grad_x_in, const Tensor& grad_enc_weight, const Tensor& grad_b_enc) {
  const BelowAutograd below_autograd;
  check_topk_encode_backward_inputs(grad_pre, indices, x, enc_weight, b_dec);
  const int64_t n = x.size(0), m = grad_pre.size(1), d_sae = enc_weight.size(0), d_in = enc_weight.size(1);
  expect_out(grad_x_in, {n, d_in}, x.scalar_type(), x, "grad_x_in");
  expect_out(grad_enc_weight, {d_sae, d_in}, x.scalar_type(), x, "grad_enc_weight");
  expect_out(grad_b_enc, {d_sae}, x.scalar_type(), x, "grad_b_enc");
  const Tensor idx = indices.contiguous();
  check_indices(idx.data_ptr<int64_t>(), n * m, d_sae, "indices");
  const Tensor g = grad_pre.contiguous();
  const Tensor enc = enc_weight.contiguous();
  const Tensor x_in = encoder_input(x, b_dec);
  const LatentGroups groups = group_by_latent(idx.data_ptr<int64_t>(), n * m, d_sae);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastsae_cpp::topk_encode_backward", [&] {
    using A = acc_t<scalar_t>;
    gather_sum<scalar_t>(g.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(), n, m, enc.data_ptr<scalar_t>(), d_sae, d_in,
                         nullptr, nullptr, grad_x_in.data_ptr<scalar_t>());
    scatter_outer<scalar_t, A>(groups, g.data_ptr<scalar_t>(), m, x_in.data_ptr<A>(), d_in, nullptr, d_sae,
                               grad_enc_weight.data_ptr<scalar_t>(), grad_b_enc.data_ptr<scalar_t>());
  });
}

std::tuple<Tensor, Tensor, Tensor> topk_encode_backward_cpu(const Tensor& grad_pre, const Tensor& indices,
                                                            const Tensor& x, const Tensor& enc_weight,
                                                            const std::optional<Tensor>& b_dec) {
  return topk_encode_backward_functional(topk_encode_backward_out_cpu, empty_output, grad_pre, indices, x, enc_weight,
                                         b_dec);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastsae_cpp, CPU, m) {
  m.impl("topk_encode", &topk_encode_cpu);
  m.impl("topk_encode_out", &topk_encode_out_cpu);
  m.impl("topk_encode_backward", &topk_encode_backward_cpu);
  m.impl("topk_encode_backward_out", &topk_encode_backward_out_cpu);
}

}  // namespace fastsae_cpp
