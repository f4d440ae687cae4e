// The blocked encoder loop shared by the CPU encode kernels (top-k and threshold).
//
// The pre-activations (x - b_dec) W_enc^T + b_enc [* dec_norm] are computed a [rows, latents]
// tile at a time through ATen's matmul into a reused, cache-sized fp32 (fp64 for fp64) buffer,
// and a per-op scan reads each tile as it comes, so the [N, d_sae] matrix is never held.
// The tile holds the bare product x_in . w: bias and rescale are applied by the scan, on the
// lanes it looks at (`pre_value`, `pre_chunk16`), so the tile is never rewritten.
// Threads own disjoint row blocks; with fewer row blocks than threads (small batches) the
// latents are split into `parts` too, part p covering a contiguous, increasing latent range.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sub.h>

#ifdef __AVX2__
#include <immintrin.h>
#endif
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <type_traits>

#include "op_checks.h"
#include "sparse_rows_cpu.h"

namespace fastsae_cpp {

inline int64_t env_or(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  return v && std::atoll(v) > 0 ? std::atoll(v) : fallback;
}

// Tile shape: block_rows x kBlockLatents pre-activations (256 x 512 floats = 512 KiB, about an
// L2 cache), the matmul reading a [block_rows, d_in] slab of x and [kBlockLatents, d_in] of W.
// FASTSAE_CPP_BLOCK_ROWS / FASTSAE_CPP_BLOCK_LATENTS override them (for tuning only).
inline const int64_t kMaxBlockRows = env_or("FASTSAE_CPP_BLOCK_ROWS", 256);
inline const int64_t kBlockLatents = env_or("FASTSAE_CPP_BLOCK_LATENTS", 512);

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A kept pre-activation and its latent.
template <typename A>
struct Candidate {
  A value;
  int32_t latent;
};

// The pre-activation of one tile entry: (x_in . w + b_enc) [* dec_norm].
template <typename A>
inline A pre_value(const A* tile_row, const A* bias, const A* norm, int64_t t) {
  const A v = tile_row[t] + bias[t];
  return norm ? v * norm[t] : v;
}

#ifdef __AVX2__
// pre_value of 16 consecutive lanes, as two vectors of 8 (the same operations, so the same bits).
inline void pre_chunk16(const float* tile_row, const float* bias, const float* norm, __m256& lo, __m256& hi) {
  lo = _mm256_add_ps(_mm256_loadu_ps(tile_row), _mm256_loadu_ps(bias));
  hi = _mm256_add_ps(_mm256_loadu_ps(tile_row + 8), _mm256_loadu_ps(bias + 8));
  if (norm) {
    lo = _mm256_mul_ps(lo, _mm256_loadu_ps(norm));
    hi = _mm256_mul_ps(hi, _mm256_loadu_ps(norm + 8));
  }
}

inline uint32_t movemask16(__m256 lo_true, __m256 hi_true) {
  return static_cast<uint32_t>(_mm256_movemask_ps(lo_true)) |
         (static_cast<uint32_t>(_mm256_movemask_ps(hi_true)) << 8);
}
#endif

// How the work is cut: row blocks of block_rows, latent blocks of kBlockLatents, and the
// number of latent parts each row block is split into.
struct TileGrid {
  int64_t n_rows, d_sae, block_rows, n_row_blocks, n_latent_blocks, parts;

  TileGrid(int64_t n_rows_, int64_t d_sae_) : n_rows(n_rows_), d_sae(d_sae_) {
    const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
    block_rows = std::max<int64_t>(1, std::min(kMaxBlockRows, ceil_div(n_rows, threads)));
    n_row_blocks = ceil_div(n_rows, block_rows);
    n_latent_blocks = ceil_div(d_sae, kBlockLatents);
    parts = n_row_blocks == 0 || n_row_blocks >= threads
                ? 1
                : std::max<int64_t>(1, std::min(n_latent_blocks, ceil_div(threads, n_row_blocks)));
  }
  // Partial results are laid out [parts, n_rows]: this is (part, row)'s slot.
  int64_t slot(int64_t part, int64_t row) const { return part * n_rows + row; }
};

// Streams the pre-activation tiles of x_in [N, d_in] (accumulation type) against enc
// [d_sae, d_in] (x's type) through per-thread scan state: make_state() builds one state per
// thread; for each (row block, part) the thread calls
//   begin(state, part, r0, rows);
//   tile(state, part, r0, rows, l0, cols, pre)  for each latent block of the part, in increasing
//       l0, where pre[r * cols + t] = x_in[r0 + r] . enc[l0 + t] (r < rows, t < cols);
//   end(state, part, r0, rows).
template <typename T, typename MakeState, typename Begin, typename Tile, typename End>
void for_each_pre_tile(const at::Tensor& x_in, const at::Tensor& enc, const TileGrid& grid, MakeState make_state,
                       Begin begin, Tile tile, End end) {
  using A = acc_t<T>;
  constexpr bool kConvert = !std::is_same<A, T>::value;
  const int64_t d_in = x_in.size(1), parts = grid.parts;
  at::parallel_for(0, grid.n_row_blocks * parts, 1, [&](int64_t w0, int64_t w1) {
    const BelowAutograd below_autograd;  // thread-local: worker threads need their own
    at::Tensor buffer = at::empty({grid.block_rows * kBlockLatents}, x_in.options());
    at::Tensor enc_block_acc;
    if (kConvert) enc_block_acc = at::empty({kBlockLatents, d_in}, x_in.options());
    auto state = make_state();
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t row_block = w / parts, part = w % parts;
      const int64_t r0 = row_block * grid.block_rows, rows = std::min(grid.block_rows, grid.n_rows - r0);
      begin(state, part, r0, rows);
      const at::Tensor x_rows = x_in.narrow(0, r0, rows);
      const int64_t lb_begin = part * grid.n_latent_blocks / parts;
      const int64_t lb_end = (part + 1) * grid.n_latent_blocks / parts;
      for (int64_t lb = lb_begin; lb < lb_end; ++lb) {
        const int64_t l0 = lb * kBlockLatents, cols = std::min(kBlockLatents, grid.d_sae - l0);
        at::Tensor w_block = enc.narrow(0, l0, cols);
        if (kConvert) w_block = enc_block_acc.narrow(0, 0, cols).copy_(w_block);
        at::Tensor pre = buffer.narrow(0, 0, rows * cols).view({rows, cols});
        at::mm_out(pre, x_rows, w_block.t());
        tile(state, part, r0, rows, l0, cols, static_cast<const A*>(pre.data_ptr<A>()));
      }
      end(state, part, r0, rows);
    }
  });
}

// x - b_dec in the accumulation type, contiguous (x itself when nothing changes).
inline at::Tensor encoder_input(const at::Tensor& x, const std::optional<at::Tensor>& b_dec) {
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor x_in = x.to(acc);
  if (const at::Tensor* b = present(b_dec)) x_in = at::sub(x_in, b->to(acc));
  return x_in.contiguous();
}

inline at::Tensor to_acc(const at::Tensor& t) {
  return t.to(t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat).contiguous();
}

}  // namespace fastsae_cpp
