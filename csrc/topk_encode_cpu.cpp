// TopK encode and its backward on CPU (fastsae_cpp::topk_encode*, the `cpp` backend).
//
// Forward, blocked (encode_tiles_cpu.h): the pre-activations are computed a [rows, latents] tile
// at a time, and each row keeps a running top-k (and a top-k_aux among dead latents) as the
// tiles stream by, so the [N, d_sae] matrix is never held. When the latents are split into
// parts (small batches), the partial top-k lists are merged at the end.
//
// Semantics (fastsae/reference.py): top-k of the (rescaled) pre-activations, then ReLU on the
// kept values. NaN ranks above every number, as in torch.topk. AuxK, over a list of latents (the
// dead ones, -1 for an empty entry): the tiles' columns at the listed latents are copied into
// aux_pre [N, C] as they stream by; then each row keeps its best min(k_aux, candidates) entries
// (candidates: not -inf; NaN first) and the others become -inf. The cost follows the list, not
// k_aux or d_sae.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
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

// A listed latent and its entry in the AuxK list.
struct AuxEntry {
  int32_t latent, position;
};

// An unsigned key with the order AuxK ranks by: NaN highest (as torch.topk), then larger values;
// -inf (no candidate) gets 0, below every candidate.
template <typename A>
struct RankKey;
template <>
struct RankKey<float> {
  using type = uint32_t;
  static uint32_t of(float v) {  // branch-free (selects), so the loop over a row vectorizes
    uint32_t b;
    std::memcpy(&b, &v, sizeof b);
    const uint32_t ordered = b ^ (static_cast<uint32_t>(static_cast<int32_t>(b) >> 31) | 0x80000000u);
    const uint32_t key = (b & 0x7FFFFFFFu) > 0x7F800000u ? 0xFFFFFFFFu : ordered;  // NaN highest
    return b == 0xFF800000u ? 0u : key;                                             // -inf: none
  }
};
template <>
struct RankKey<double> {
  using type = uint64_t;
  static uint64_t of(double v) {
    uint64_t b;
    std::memcpy(&b, &v, sizeof b);
    const uint64_t ordered = b ^ (static_cast<uint64_t>(static_cast<int64_t>(b) >> 63) | (uint64_t{1} << 63));
    const uint64_t key = (b & ~(uint64_t{1} << 63)) > 0x7FF0000000000000ull ? ~uint64_t{0} : ordered;
    return b == 0xFFF0000000000000ull ? 0u : key;
  }
};

template <typename K>
inline int64_t count_at_least(const K* keys, int64_t n, K t) {
  K c = 0;  // the key's width: the compare-and-add vectorizes lane for lane (n < 2^31)
#pragma omp simd reduction(+ : c)
  for (int64_t j = 0; j < n; ++j) c += static_cast<K>(keys[j] >= t);
  return static_cast<int64_t>(c);
}

// One row of aux_pre [C]: keeps its best k_aux candidates (not -inf; NaN first, then larger values,
// then earlier entries) and writes -inf over the others. The k_aux-th best key is found by
// bisection over the key range, each step a branch-free count (nth_element's data-dependent
// branches cost ~10x more here); one pass then keeps the keys above it and the earliest equal ones.
template <typename T, typename A>
inline void keep_best_aux(T* row, int64_t width, int64_t k_aux, std::vector<typename RankKey<A>::type>& keys) {
  using K = typename RankKey<A>::type;
  K* key = keys.data();
  for (int64_t j = 0; j < width; ++j) key[j] = RankKey<A>::of(static_cast<A>(row[j]));
  const int64_t count = count_at_least(key, width, K(1));
  if (count <= k_aux) return;
  const T neg_inf = static_cast<T>(-std::numeric_limits<A>::infinity());
  if (k_aux == 0) {
    std::fill(row, row + width, neg_inf);
    return;
  }
  // Bisection for the largest t with at least k_aux keys >= t, from the range of the candidates'
  // keys: lo always qualifies, hi never does. A t with exactly k_aux keys >= t ends it early: those
  // are the row's best k_aux, whatever the ties below.
  K lo = std::numeric_limits<K>::max(), top = 1;
  for (int64_t j = 0; j < width; ++j) {
    lo = std::min(lo, key[j] == 0 ? lo : key[j]);
    top = std::max(top, key[j]);
  }
  if (count_at_least(key, width, top) >= k_aux) lo = top;  // ties at the highest key (NaN, say)
  for (K hi = top; hi - lo > 1;) {
    const K mid = lo + (hi - lo) / 2;
    const int64_t c = count_at_least(key, width, mid);
    if (c == k_aux) {
      for (int64_t j = 0; j < width; ++j)
        if (key[j] < mid) row[j] = neg_inf;
      return;
    }
    (c > k_aux ? lo : hi) = mid;
  }
  const K threshold = lo;
  int64_t ties = k_aux - (threshold == std::numeric_limits<K>::max() ? 0 : count_at_least(key, width, K(threshold + 1)));
  for (int64_t j = 0; j < width; ++j) {
    if (key[j] > threshold) continue;
    if (key[j] == threshold && ties > 0) {
      --ties;
      continue;
    }
    row[j] = neg_inf;
  }
}

template <typename T>
void topk_encode_kernel(const Tensor& x_in, const Tensor& enc, const Tensor& b_enc, const Tensor* norm, int64_t k,
                        T* values, int64_t* indices, const std::vector<AuxEntry>& aux, T* aux_pre, int64_t aux_width,
                        int64_t k_aux) {
  using A = acc_t<T>;
  const int64_t n_rows = x_in.size(0), d_sae = enc.size(0);
  const TileGrid grid(n_rows, d_sae);
  const int64_t parts = grid.parts, block_rows = grid.block_rows;
  const int64_t cap = std::max<int64_t>(4 * k, k + 64);

  // Each (part, row)'s best candidates, merged per row at the end.
  std::vector<Candidate<A>> partial(parts * n_rows * k);
  std::vector<int64_t> partial_count(parts * n_rows);

  const A* bias = b_enc.data_ptr<A>();
  const A* scale = norm ? norm->data_ptr<A>() : nullptr;

  // Per thread: the running top-k of each row of its current row block.
  struct RowBlockBest {
    std::vector<Candidate<A>> slots;
    std::vector<RunningTopK<A>> best;
  };
  for_each_pre_tile<T>(
      x_in, enc, grid,
      [&] { return RowBlockBest{std::vector<Candidate<A>>(block_rows * cap), std::vector<RunningTopK<A>>(block_rows)}; },
      [&](RowBlockBest& s, int64_t, int64_t, int64_t rows) {
        for (int64_t r = 0; r < rows; ++r) s.best[r].reset(s.slots.data() + r * cap, k, cap);
      },
      [&](RowBlockBest& s, int64_t, int64_t r0, int64_t rows, int64_t l0, int64_t cols, const A* p) {
        const A* block_scale = scale ? scale + l0 : nullptr;
        // The listed latents of this tile (the list is sorted by latent): their columns go to aux_pre.
        const auto by_latent = [](const AuxEntry& e, int64_t l) { return e.latent < l; };
        const auto aux_begin = std::lower_bound(aux.begin(), aux.end(), l0, by_latent);
        const auto aux_end = std::lower_bound(aux_begin, aux.end(), l0 + cols, by_latent);
        for (int64_t r = 0; r < rows; ++r) {
          const A* row = p + r * cols;
          scan_row(row, cols, static_cast<int32_t>(l0), bias + l0, block_scale, s.best[r]);
          T* aux_row = aux_pre + (r0 + r) * aux_width;
          for (auto it = aux_begin; it != aux_end; ++it)
            aux_row[it->position] = static_cast<T>(pre_value(row, bias + l0, block_scale, it->latent - l0));
        }
      },
      [&](RowBlockBest& s, int64_t part, int64_t r0, int64_t rows) {
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t slot = grid.slot(part, r0 + r);
          s.best[r].cut();
          std::copy(s.best[r].slots, s.best[r].slots + s.best[r].count, partial.begin() + slot * k);
          partial_count[slot] = s.best[r].count;
        }
      });

  // Merge the parts of each row and write the outputs; AuxK's selection per row.
  auto relu = [](A v) { return std::max(v, A(0)); };  // keeps NaN, as torch.relu
  at::parallel_for(0, n_rows, grain_for(parts * k * 8 + aux_width), [&](int64_t r0, int64_t r1) {
    std::vector<Candidate<A>> merged(parts * k);
    std::vector<typename RankKey<A>::type> keys(aux_width);
    for (int64_t n = r0; n < r1; ++n) {
      int64_t count = 0;
      for (int64_t part = 0; part < parts; ++part) {
        const int64_t slot = grid.slot(part, n);
        std::copy_n(partial.begin() + slot * k, partial_count[slot], merged.begin() + count);
        count += partial_count[slot];
      }
      write_best<T>(merged.data(), count, k, values + n * k, indices + n * k, relu);
      if (aux_width > 0) keep_best_aux<T, A>(aux_pre + n * aux_width, aux_width, k_aux, keys);
    }
  });
}

void topk_encode_out_cpu(const Tensor& x, const Tensor& enc_weight, const Tensor& b_enc,
                         const std::optional<Tensor>& b_dec, const std::optional<Tensor>& dec_norm, int64_t k,
                         const std::optional<Tensor>& aux_latents, int64_t k_aux, const Tensor& values,
                         const Tensor& indices, const Tensor& aux_pre) {
  const BelowAutograd below_autograd;
  check_topk_encode_inputs(x, enc_weight, b_enc, b_dec, dec_norm, k, aux_latents, k_aux);
  const int64_t aux_width = fastsae_cpp::aux_width(aux_latents);
  check_topk_encode_outputs(x, k, aux_width, values, indices, aux_pre);
  const int64_t n = x.size(0), d_sae = enc_weight.size(0);
  if (n == 0) return;

  // The listed latents (-1: an empty entry) with their entries, sorted by latent, so that each
  // tile finds its own in one search. Entries never written stay -inf.
  std::vector<AuxEntry> aux;
  if (aux_width > 0) {
    const Tensor list = aux_latents->contiguous();
    const int64_t* l = list.data_ptr<int64_t>();
    for (int64_t j = 0; j < aux_width; ++j) {
      TORCH_CHECK(l[j] >= -1 && l[j] < d_sae, "aux_latents: expected latents in [0, ", d_sae,
                  ") or -1 (empty), got ", l[j], " at entry ", j);
      if (l[j] >= 0) aux.push_back({static_cast<int32_t>(l[j]), static_cast<int32_t>(j)});
    }
    std::sort(aux.begin(), aux.end(), [](const AuxEntry& a, const AuxEntry& b) { return a.latent < b.latent; });
    aux_pre.fill_(-std::numeric_limits<double>::infinity());
  }

  const Tensor x_in = encoder_input(x, b_dec);
  const Tensor enc = enc_weight.contiguous();
  const Tensor bias = to_acc(b_enc);
  const Tensor norm = present(dec_norm) ? to_acc(*dec_norm) : Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastsae_cpp::topk_encode", [&] {
    topk_encode_kernel<scalar_t>(x_in, enc, bias, norm.defined() ? &norm : nullptr, k, values.data_ptr<scalar_t>(),
                                 indices.data_ptr<int64_t>(), aux, aux_pre.data_ptr<scalar_t>(), aux_width, k_aux);
  });
}

std::tuple<Tensor, Tensor, Tensor> topk_encode_cpu(const Tensor& x, const Tensor& enc_weight, const Tensor& b_enc,
                                                   const std::optional<Tensor>& b_dec,
                                                   const std::optional<Tensor>& dec_norm, int64_t k,
                                                   const std::optional<Tensor>& aux_latents, int64_t k_aux) {
  return topk_encode_functional(topk_encode_out_cpu, plain_empty, x, enc_weight, b_enc, b_dec, dec_norm, k, aux_latents, k_aux);
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
