// Our chunked launcher over lists of tensors (layer 3 helper, docs/design.md, Conventions).
//
// multi_tensor_apply<kDepth>(lists, functor, args...) runs `functor(chunk, args...)` once per
// chunk of kChunkSize elements, one CUDA block of kBlockThreads threads per chunk. `lists` holds
// kDepth lists of equally long, contiguous tensors on the current device; tensor i of every list
// has the same numel. The tensors' addresses travel by value in the kernel's parameter space (a
// TensorListMeta), so a launch needs no host-to-device copy; lists too long for one launch are
// split over several launches on the current stream, in order. Blocks are numbered globally
// across launches (Chunk::block), in list order, skipping zero-size tensors; reductions use that
// number as the index of their per-block partial result.
#pragma once

#include "cuda/runtime.cuh"
#include "hd_math.h"

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <array>
#include <cstdint>
#include <limits>
#include <vector>

namespace hyperlr {
namespace cuda {

constexpr int64_t kChunkSize = math::kChunkSize;
constexpr int kBlockThreads = math::kLanes;

// One launch covers at most kMaxBlocksPerLaunch chunks and TensorListMeta<kDepth>::kMaxTensors
// tensors; the sizes keep the struct below 3.5 KB, inside the 4 KB kernel-parameter limit that
// every architecture and CUDA version accepts.
constexpr int kMaxBlocksPerLaunch = 320;
constexpr int kMetaBytesBudget = 3500;
constexpr int max_tensors_per_launch(int depth) {
  // addresses + numel + tag per tensor; block tables and first_block are fixed.
  return (kMetaBytesBudget - kMaxBlocksPerLaunch * 5 - 8) / (8 * (depth + 1) + 4);
}

template <int kDepth>
struct TensorListMeta {
  static constexpr int kMaxTensors = max_tensors_per_launch(kDepth);
  static_assert(kMaxTensors > 0 && kMaxTensors <= 256, "block_to_tensor is one byte");

  void* addresses[kDepth][kMaxTensors];
  int64_t numel[kMaxTensors];
  int32_t tag[kMaxTensors];  // the caller's per-tensor tag (default: the tensor's list index)
  uint8_t block_to_tensor[kMaxBlocksPerLaunch];  // slot in addresses/numel
  int32_t block_to_chunk[kMaxBlocksPerLaunch];   // chunk index inside that tensor
  int64_t first_block;                           // global number of this launch's block 0
};

// What one block works on: elements [offset, offset + size) of tensor slot `slot`.
template <int kDepth>
struct Chunk {
  const TensorListMeta<kDepth>* meta;
  int slot;
  int64_t offset;
  int64_t size;   // <= kChunkSize
  int64_t block;  // global block number, 0 .. total blocks - 1
  int32_t tag;    // the tensor's tag (multi_tensor_apply_tagged), else its index in the lists

  // Pointer to the chunk's first element in list `list` (64-bit offset).
  template <typename T>
  __device__ T* data(int list) const {
    return static_cast<T*>(meta->addresses[list][slot]) + offset;
  }
};

template <int kDepth, typename Functor, typename... Args>
__global__ void __launch_bounds__(kBlockThreads)
    multi_tensor_apply_kernel(const __grid_constant__ TensorListMeta<kDepth> meta,
                              Functor functor, Args... args) {
  Chunk<kDepth> chunk;
  chunk.meta = &meta;
  chunk.slot = meta.block_to_tensor[blockIdx.x];
  chunk.offset = static_cast<int64_t>(meta.block_to_chunk[blockIdx.x]) * kChunkSize;
  const int64_t remaining = meta.numel[chunk.slot] - chunk.offset;
  chunk.size = remaining < kChunkSize ? remaining : kChunkSize;
  chunk.block = meta.first_block + blockIdx.x;
  chunk.tag = meta.tag[chunk.slot];
  functor(chunk, args...);
}

// Number of chunks (= blocks) that multi_tensor_apply launches for a list.
inline int64_t count_chunks(at::TensorList tensors) {
  int64_t chunks = 0;
  for (const at::Tensor& t : tensors) {
    chunks += (t.numel() + kChunkSize - 1) / kChunkSize;
  }
  return chunks;
}

// Returns the number of blocks launched (count_chunks(lists[0])). `tags` is empty (each chunk's
// tag is its tensor's index in the lists) or holds one int32 tag per tensor (flags, slot numbers:
// per-tensor values that reach the device without a host-to-device copy).
template <int kDepth, typename Functor, typename... Args>
int64_t multi_tensor_apply_tagged(const std::array<at::TensorList, kDepth>& lists,
                                  const std::vector<int32_t>& tags, Functor functor,
                                  Args... args) {
  using Meta = TensorListMeta<kDepth>;
  const size_t num_tensors = lists[0].size();
  TORCH_INTERNAL_ASSERT(tags.empty() || tags.size() == num_tensors,
                        "multi_tensor_apply: one tag per tensor");
  for (int d = 1; d < kDepth; ++d) {
    TORCH_INTERNAL_ASSERT(lists[d].size() == num_tensors, "multi_tensor_apply: list ", d,
                          " has ", lists[d].size(), " tensors, list 0 has ", num_tensors);
  }
  const cudaStream_t stream = current_stream();

  Meta meta{};
  meta.first_block = 0;
  int slots_used = 0;
  int blocks_used = 0;
  auto launch = [&]() {
    HYPERLR_LAUNCH_KERNEL(multi_tensor_apply_kernel<kDepth>, blocks_used, kBlockThreads, stream,
                          meta, functor, args...);
    check_launch();
    meta.first_block += blocks_used;
    blocks_used = 0;
  };

  for (size_t t = 0; t < num_tensors; ++t) {
    const int64_t numel = lists[0][t].numel();
    if (numel == 0) {
      continue;
    }
    for (int d = 0; d < kDepth; ++d) {
      TORCH_INTERNAL_ASSERT(lists[d][t].numel() == numel && lists[d][t].is_contiguous(),
                            "multi_tensor_apply: tensor ", t, " of list ", d,
                            " must be contiguous with ", numel, " elements");
      meta.addresses[d][slots_used] = lists[d][t].data_ptr();
    }
    meta.numel[slots_used] = numel;
    meta.tag[slots_used] = tags.empty() ? static_cast<int32_t>(t) : tags[t];
    ++slots_used;

    const int64_t chunks = (numel + kChunkSize - 1) / kChunkSize;
    TORCH_CHECK(chunks <= std::numeric_limits<int32_t>::max(), "multi_tensor_apply: tensor ", t,
                " has ", numel, " elements, too many for 32-bit chunk numbers");
    for (int64_t c = 0; c < chunks; ++c) {
      meta.block_to_tensor[blocks_used] = static_cast<uint8_t>(slots_used - 1);
      meta.block_to_chunk[blocks_used] = static_cast<int32_t>(c);
      ++blocks_used;
      const bool tensor_done = (c == chunks - 1);
      const bool blocks_full = (blocks_used == kMaxBlocksPerLaunch);
      const bool slots_full = (slots_used == Meta::kMaxTensors);
      if (blocks_full || (slots_full && tensor_done)) {
        launch();
        if (tensor_done) {
          slots_used = 0;
        } else {
          // The tensor goes on in the next launch: it becomes slot 0.
          for (int d = 0; d < kDepth; ++d) {
            meta.addresses[d][0] = meta.addresses[d][slots_used - 1];
          }
          meta.numel[0] = meta.numel[slots_used - 1];
          meta.tag[0] = meta.tag[slots_used - 1];
          slots_used = 1;
        }
      }
    }
  }
  if (blocks_used > 0) {
    launch();
  }
  return meta.first_block;
}

template <int kDepth, typename Functor, typename... Args>
int64_t multi_tensor_apply(const std::array<at::TensorList, kDepth>& lists, Functor functor,
                           Args... args) {
  return multi_tensor_apply_tagged<kDepth>(lists, {}, functor, args...);
}

}  // namespace cuda
}  // namespace hyperlr
