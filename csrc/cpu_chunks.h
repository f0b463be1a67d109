// CPU helpers for the chunked kernels: the CUDA launcher's chunk numbering (csrc/cuda/
// multi_tensor_apply.cuh) and the reduction layout of csrc/hd_math.h, so a CPU kernel reduces in
// the same order as the CUDA one and its result does not depend on the thread count.
#pragma once

#include "hd_math.h"

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <vector>

namespace hyperlr {
namespace cpu {

using math::kChunkSize;
using math::kLanes;

// Elements [offset, offset + size) of tensor `tensor`: what one CUDA block works on.
struct ChunkRef {
  size_t tensor;
  int64_t offset;
  int64_t size;
};

// The chunks of a tensor list in the CUDA launcher's block order (zero-size tensors: none).
// first_chunk[t] is tensor t's first chunk number and chunk_count[t] its number of chunks.
struct ChunkList {
  std::vector<ChunkRef> chunks;
  std::vector<int64_t> first_chunk;
  std::vector<int64_t> chunk_count;
};

inline ChunkList make_chunks(at::TensorList tensors) {
  ChunkList out;
  for (size_t t = 0; t < tensors.size(); ++t) {
    const int64_t numel = tensors[t].numel();
    out.first_chunk.push_back(static_cast<int64_t>(out.chunks.size()));
    for (int64_t offset = 0; offset < numel; offset += kChunkSize) {
      out.chunks.push_back({t, offset, std::min(kChunkSize, numel - offset)});
    }
    out.chunk_count.push_back(static_cast<int64_t>(out.chunks.size()) - out.first_chunk.back());
  }
  return out;
}

// Where `chunk` starts in list[chunk.tensor], or null for an absent (empty) list.
template <typename scalar_t>
scalar_t* chunk_ptr(const std::vector<at::Tensor>& list, const ChunkRef& chunk) {
  return list.empty() ? nullptr : list[chunk.tensor].mutable_data_ptr<scalar_t>() + chunk.offset;
}
template <typename scalar_t>
const scalar_t* chunk_const_ptr(const std::vector<at::Tensor>& list, const ChunkRef& chunk) {
  return list.empty() ? nullptr : list[chunk.tensor].const_data_ptr<scalar_t>() + chunk.offset;
}

// lanes[0] after the fixed tree over all lanes (hd_math.h, tree_level).
template <typename acc_t>
acc_t tree_reduce(std::array<acc_t, kLanes>& lanes) {
  for (int stride = kLanes / 2; stride > 0; stride /= 2) {
    for (int lane = 0; lane < stride; ++lane) {
      math::tree_level(lanes.data(), lane, stride);
    }
  }
  return lanes[0];
}

// The sum of values[first], ..., values[first + count - 1] as the last CUDA block forms it:
// value i goes to lane (i - first) % kLanes, in order, then the tree.
template <typename acc_t>
acc_t reduce_range(const std::vector<acc_t>& values, int64_t first, int64_t count) {
  std::array<acc_t, kLanes> lanes{};
  for (int64_t i = 0; i < count; ++i) {
    lanes[i % kLanes] = math::sum_step(lanes[i % kLanes], values[first + i]);
  }
  return tree_reduce(lanes);
}

}  // namespace cpu
}  // namespace hyperlr
