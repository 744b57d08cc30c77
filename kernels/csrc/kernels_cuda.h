// Plain-C++ declarations of the CUDA launchers (no torch, no CUDA headers): implemented in the .cu files,
// called by binding_cuda.cpp. All pointers are device pointers unless named host_*; `stream` is a cudaStream_t.
// Boxes are [x1, y1, x2, y2] inclusive pixels (width = x2 - x1 + 1); RoIs are [R, 5] (batch_idx, x1, y1, x2, y2).
// Each launcher returns 0 on success or a cudaError_t code.
#pragma once
#include <cstdint>

constexpr int kNmsThreadsPerBlock = 64;  // one bit per box in a 64-bit mask word

// NMS suppression mask: boxes [n, 4] already sorted by decreasing score; mask [n, ceil(n / 64)] uint64 where bit k
// of mask[i][b] says box 64 * b + k (ranked after i) has IoU > thr with box i. Upper triangle only.
template <typename T>
int nms_mask_launch(const T* sorted_boxes, int64_t n, double iou_threshold, uint64_t* mask, void* stream);
// Greedy reduction of a host copy of the mask: writes the kept ranks (increasing) and returns how many; with
// max_keep > 0 it stops once that many are kept (the full answer truncated).
int64_t nms_reduce_mask(const uint64_t* host_mask, int64_t n, int64_t* host_keep, int64_t max_keep);

// Caffe ROIPooling. output, argmax [R, C, ph, pw] (argmax: index in the H*W plane, -1 for an empty cell).
template <typename T>
int roi_pool_forward_launch(const T* features, const T* rois, int64_t R, int64_t C, int64_t H, int64_t W,
                            int64_t ph, int64_t pw, double spatial_scale, T* output, int* argmax, void* stream);
// grad_features [B, C, H, W] must be zeroed; accumulates grad [R, C, ph, pw] through argmax (atomicAdd).
template <typename T>
int roi_pool_backward_launch(const T* grad, const T* rois, const int* argmax, int64_t R, int64_t C, int64_t H,
                             int64_t W, int64_t ph, int64_t pw, T* grad_features, void* stream);
// As roi_pool_backward_launch, deterministically: one thread per (b, c) plane sums in the CPU kernel's order
// (RoIs of image b by index, cells row-major), so repeated calls give bitwise identical gradients.
template <typename T>
int roi_pool_backward_deterministic_launch(const T* grad, const T* rois, const int* argmax, int64_t R, int64_t B,
                                           int64_t C, int64_t H, int64_t W, int64_t ph, int64_t pw, T* grad_features,
                                           void* stream);

// torchvision RoIAlign.
template <typename T>
int roi_align_forward_launch(const T* features, const T* rois, int64_t R, int64_t C, int64_t H, int64_t W,
                             int64_t ph, int64_t pw, double spatial_scale, int64_t sampling_ratio, bool aligned,
                             T* output, void* stream);
// grad_features [B, C, H, W] must be zeroed; scatters grad [R, C, ph, pw] to the bilinear taps (atomicAdd).
template <typename T>
int roi_align_backward_launch(const T* grad, const T* rois, int64_t R, int64_t C, int64_t H, int64_t W, int64_t ph,
                              int64_t pw, double spatial_scale, int64_t sampling_ratio, bool aligned,
                              T* grad_features, void* stream);
// As roi_align_backward_launch, deterministically: one thread per (b, c) plane sums in the CPU kernel's order
// (RoIs of image b by index, bins row-major, samples row-major, taps in order).
template <typename T>
int roi_align_backward_deterministic_launch(const T* grad, const T* rois, int64_t R, int64_t B, int64_t C, int64_t H,
                                            int64_t W, int64_t ph, int64_t pw, double spatial_scale,
                                            int64_t sampling_ratio, bool aligned, T* grad_features, void* stream);
