// Declarations of the C++ CPU kernels (ATen tensors in, ATen tensors out); bound in binding_cpu.cpp.
// Boxes are [x1, y1, x2, y2] inclusive pixels (width = x2 - x1 + 1); RoIs are [R, 5] (batch_idx, x1, y1, x2, y2).
#pragma once
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

// Channels per block: the RoI kernels work on channel-blocked copies [nblocks][B][H*W][kChannelBlock] of the
// feature map, so the innermost loop runs over contiguous channels (vectorised, branch-free), a block's planes
// (243 KB of a 38x50 float map) stay in L2 while every RoI visits them, and each block has one owner thread.
constexpr int64_t kChannelBlock = 32;

inline int64_t channel_blocks(int64_t channels) { return (channels + kChannelBlock - 1) / kChannelBlock; }

// Runs fn(block, c0, c1) for each block of channels [c0, c1), in parallel over blocks.
template <typename Fn>
inline void for_channel_blocks(int64_t channels, Fn fn) {
  at::parallel_for(0, channel_blocks(channels), 1, [&](int64_t a, int64_t b) {
    for (int64_t k = a; k < b; ++k) fn(k, k * kChannelBlock, std::min((k + 1) * kChannelBlock, channels));
  });
}

// [B, C, HW] -> [nblocks][B][HW][kChannelBlock], padding channels with zeros.
template <typename T>
inline std::vector<T> to_channel_blocks(const T* src, int64_t B, int64_t C, int64_t HW) {
  std::vector<T> dst(channel_blocks(C) * B * HW * kChannelBlock, T(0));
  for_channel_blocks(C, [&](int64_t blk, int64_t c0, int64_t c1) {
    for (int64_t b = 0; b < B; ++b)
      for (int64_t c = c0; c < c1; ++c) {
        const T* plane = src + (b * C + c) * HW;
        T* out = dst.data() + ((blk * B + b) * HW) * kChannelBlock + (c - c0);
        for (int64_t i = 0; i < HW; ++i) out[i * kChannelBlock] = plane[i];
      }
  });
  return dst;
}

// Inverse of to_channel_blocks: [nblocks][B][HW][kChannelBlock] -> [B, C, HW].
template <typename T>
inline void from_channel_blocks(const T* src, int64_t B, int64_t C, int64_t HW, T* dst) {
  for_channel_blocks(C, [&](int64_t blk, int64_t c0, int64_t c1) {
    for (int64_t b = 0; b < B; ++b)
      for (int64_t c = c0; c < c1; ++c) {
        const T* in = src + ((blk * B + b) * HW) * kChannelBlock + (c - c0);
        T* plane = dst + (b * C + c) * HW;
        for (int64_t i = 0; i < HW; ++i) plane[i] = in[i * kChannelBlock];
      }
  });
}

// Raises ValueError unless every RoI [R, 5] is finite with an integer batch index in [0, batch).
template <typename T>
inline void check_rois(const T* rois, int64_t R, int64_t batch) {
  for (int64_t r = 0; r < R; ++r) {
    const T* roi = rois + 5 * r;
    for (int k = 0; k < 5; ++k) TORCH_CHECK_VALUE(std::isfinite(roi[k]), "rois contain NaN or infinite values");
    TORCH_CHECK_VALUE(roi[0] == std::floor(roi[0]) && roi[0] >= 0 && roi[0] < static_cast<T>(batch),
                      "rois[:, 0] must hold integer batch indices in [0, ", batch, "), got ", roi[0]);
  }
}

// Greedy NMS: boxes [N, 4], scores [N] (float/double, contiguous) -> int64 [K] kept indices, decreasing score,
// ties by higher index; suppress when IoU > iou_threshold; +1 areas. max_keep > 0: only the first max_keep kept
// indices, found by stopping the greedy scan there (the same as truncating the full answer).
at::Tensor nms_cpu(const at::Tensor& boxes, const at::Tensor& scores, double iou_threshold, int64_t max_keep);

// Caffe ROIPooling: features [B, C, H, W] -> (output [R, C, ph, pw], argmax int32 [R, C, ph, pw], -1 if empty).
std::tuple<at::Tensor, at::Tensor> roi_pool_forward_cpu(const at::Tensor& features, const at::Tensor& rois,
                                                        int64_t pooled_h, int64_t pooled_w, double spatial_scale);
// Gradient w.r.t. features [B, C, H, W] from grad [R, C, ph, pw] through argmax.
at::Tensor roi_pool_backward_cpu(const at::Tensor& grad, const at::Tensor& rois, const at::Tensor& argmax,
                                 int64_t batch, int64_t channels, int64_t height, int64_t width);

// torchvision RoIAlign: features [B, C, H, W] -> [R, C, ph, pw].
at::Tensor roi_align_forward_cpu(const at::Tensor& features, const at::Tensor& rois, int64_t pooled_h,
                                 int64_t pooled_w, double spatial_scale, int64_t sampling_ratio, bool aligned);
// Gradient w.r.t. features [B, C, H, W] from grad [R, C, ph, pw]; deterministic (one thread per channel plane).
at::Tensor roi_align_backward_cpu(const at::Tensor& grad, const at::Tensor& rois, int64_t batch, int64_t channels,
                                  int64_t height, int64_t width, int64_t pooled_h, int64_t pooled_w,
                                  double spatial_scale, int64_t sampling_ratio, bool aligned);
