// Output buffers for the CPU kernels' large results (the [d_sae, d_in] weight gradients).
//
// A fresh 48 MiB gradient costs ~12k page faults per step when the kernel first writes it,
// which on the machines we measured took longer than the kernel's arithmetic. Buffers of at
// least kHugeMin bytes are therefore allocated 2 MiB-aligned and marked MADV_HUGEPAGE (what
// torch's own allocator does under THP_MEM_ALLOC_ENABLE=1), so they fault in 2 MiB pages where
// the kernel allows transparent huge pages; elsewhere this is a plain at::empty.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/accumulate.h>

#include <cstdlib>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastsae_cpp {

inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr size_t kHugePage = size_t{2} << 20;
  constexpr size_t kHugeMin = size_t{8} << 20;
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  if (bytes >= kHugeMin) {
    const size_t rounded = (bytes + kHugePage - 1) / kHugePage * kHugePage;
    if (void* data = std::aligned_alloc(kHugePage, rounded)) {
      madvise(data, rounded, MADV_HUGEPAGE);  // advisory: ignore failure
      return at::from_blob(data, sizes, [](void* p) { std::free(p); }, options);
    }
  }
#endif
  return at::empty(sizes, options);
}

}  // namespace fastsae_cpp
