// NMS on the GPU: the 64-bit-mask kernel of py-faster-rcnn / torchvision, 64 threads per block, upper triangle,
// then a greedy reduction of the mask on the host. Suppress when IoU > thr; +1 areas; plain CUDA C++.
#include <cuda_runtime.h>

#include <vector>

#include "kernels_cuda.h"

namespace {

template <typename T>
__device__ inline bool suppresses(const T* a, const T* b, T thr) {
  T w = max(T(0), min(a[2], b[2]) - max(a[0], b[0]) + T(1));
  T h = max(T(0), min(a[3], b[3]) - max(a[1], b[1]) + T(1));
  T inter = w * h;
  T area_a = (a[2] - a[0] + T(1)) * (a[3] - a[1] + T(1));
  T area_b = (b[2] - b[0] + T(1)) * (b[3] - b[1] + T(1));
  return inter / (area_a + area_b - inter) > thr;
}

template <typename T>
__global__ void nms_mask_kernel(const T* boxes, int64_t n, T thr, uint64_t* mask) {
  const int64_t row_block = blockIdx.y, col_block = blockIdx.x;
  if (row_block > col_block) return;  // upper triangle only
  const int64_t blocks = (n + kNmsThreadsPerBlock - 1) / kNmsThreadsPerBlock;
  const int row_size = static_cast<int>(min(n - row_block * kNmsThreadsPerBlock, int64_t(kNmsThreadsPerBlock)));
  const int col_size = static_cast<int>(min(n - col_block * kNmsThreadsPerBlock, int64_t(kNmsThreadsPerBlock)));
  __shared__ T block_boxes[kNmsThreadsPerBlock * 4];
  if (threadIdx.x < col_size)
    for (int k = 0; k < 4; ++k)
      block_boxes[threadIdx.x * 4 + k] = boxes[(col_block * kNmsThreadsPerBlock + threadIdx.x) * 4 + k];
  __syncthreads();
  if (threadIdx.x >= row_size) return;
  const int64_t i = row_block * kNmsThreadsPerBlock + threadIdx.x;
  const T* cur = boxes + i * 4;
  uint64_t bits = 0;
  const int start = row_block == col_block ? threadIdx.x + 1 : 0;
  for (int k = start; k < col_size; ++k)
    if (suppresses(cur, block_boxes + k * 4, thr)) bits |= 1ULL << k;
  mask[i * blocks + col_block] = bits;
}

}  // namespace

template <typename T>
int nms_mask_launch(const T* sorted_boxes, int64_t n, double iou_threshold, uint64_t* mask, void* stream) {
  if (n == 0) return 0;
  const int64_t blocks = (n + kNmsThreadsPerBlock - 1) / kNmsThreadsPerBlock;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  cudaMemsetAsync(mask, 0, sizeof(uint64_t) * n * blocks, s);
  dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(blocks));
  nms_mask_kernel<T><<<grid, kNmsThreadsPerBlock, 0, s>>>(sorted_boxes, n, static_cast<T>(iou_threshold), mask);
  return static_cast<int>(cudaGetLastError());
}

int64_t nms_reduce_mask(const uint64_t* host_mask, int64_t n, int64_t* host_keep, int64_t max_keep) {
  const int64_t blocks = (n + kNmsThreadsPerBlock - 1) / kNmsThreadsPerBlock;
  std::vector<uint64_t> removed(blocks, 0);
  int64_t kept = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t b = i / kNmsThreadsPerBlock, k = i % kNmsThreadsPerBlock;
    if (removed[b] & (1ULL << k)) continue;
    host_keep[kept++] = i;
    if (kept == max_keep) break;
    const uint64_t* row = host_mask + i * blocks;
    for (int64_t j = b; j < blocks; ++j) removed[j] |= row[j];
  }
  return kept;
}

template int nms_mask_launch<float>(const float*, int64_t, double, uint64_t*, void*);
template int nms_mask_launch<double>(const double*, int64_t, double, uint64_t*, void*);
