// Caffe ROIPooling forward/backward on the GPU (one thread per output element; backward by atomicAdd, or
// deterministically with one thread per feature plane).
// start/end = round(x * scale) (half away from zero); roi w/h = max(end - start + 1, 1); cells
// [floor(p * bin), ceil((p + 1) * bin)) + start clipped to the map; an empty cell gives 0 and argmax -1.
#include <cuda_runtime.h>

#include <cfloat>

#include "kernels_cuda.h"

namespace {

constexpr int kThreads = 256;
constexpr int kPlaneThreads = 64;  // the deterministic backward has only B * C threads: spread them over more SMs

inline unsigned grid_for(int64_t n, int threads = kThreads) {
  return static_cast<unsigned>((n + threads - 1) / threads);
}

__device__ inline long long clip(long long v, long long hi) { return v < 0 ? 0 : (v > hi ? hi : v); }

template <typename T>
__device__ inline long long to_ll(T v) {
  const double d = static_cast<double>(v);
  return static_cast<long long>(d < -1e15 ? -1e15 : (d > 1e15 ? 1e15 : d));
}

template <typename T>
__global__ void roi_pool_forward_kernel(const T* features, const T* rois, int64_t total, int64_t C, int64_t H,
                                        int64_t W, int64_t ph_n, int64_t pw_n, T scale, T* output, int* argmax) {
  for (int64_t index = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; index < total;
       index += int64_t(blockDim.x) * gridDim.x) {
    const int64_t pw = index % pw_n, ph = (index / pw_n) % ph_n, c = (index / pw_n / ph_n) % C;
    const int64_t r = index / pw_n / ph_n / C;
    const T* roi = rois + r * 5;
    const int64_t b = static_cast<int64_t>(roi[0]);
    const T sw = round(roi[1] * scale), sh = round(roi[2] * scale);
    const T ew = round(roi[3] * scale), eh = round(roi[4] * scale);
    const T roi_w = max(ew - sw + T(1), T(1)), roi_h = max(eh - sh + T(1), T(1));
    const T bin_w = roi_w / static_cast<T>(pw_n), bin_h = roi_h / static_cast<T>(ph_n);
    const long long hs = clip(to_ll(floor(static_cast<T>(ph) * bin_h)) + to_ll(sh), H);
    const long long he = clip(to_ll(ceil(static_cast<T>(ph + 1) * bin_h)) + to_ll(sh), H);
    const long long ws = clip(to_ll(floor(static_cast<T>(pw) * bin_w)) + to_ll(sw), W);
    const long long we = clip(to_ll(ceil(static_cast<T>(pw + 1) * bin_w)) + to_ll(sw), W);
    if (he <= hs || we <= ws) {
      output[index] = T(0);
      argmax[index] = -1;
      continue;
    }
    const T* plane = features + (b * C + c) * H * W;
    T best = -FLT_MAX;
    int arg = -1;
    for (long long h = hs; h < he; ++h)
      for (long long w = ws; w < we; ++w)
        if (plane[h * W + w] > best) {
          best = plane[h * W + w];
          arg = static_cast<int>(h * W + w);
        }
    output[index] = best;
    argmax[index] = arg;
  }
}

template <typename T>
__global__ void roi_pool_backward_kernel(const T* grad, const T* rois, const int* argmax, int64_t total, int64_t C,
                                         int64_t H, int64_t W, int64_t P, T* grad_features) {
  for (int64_t index = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; index < total;
       index += int64_t(blockDim.x) * gridDim.x) {
    const int a = argmax[index];
    if (a < 0) continue;
    const int64_t c = (index / P) % C, r = index / P / C;
    const int64_t b = static_cast<int64_t>(rois[r * 5]);
    atomicAdd(grad_features + (b * C + c) * H * W + a, grad[index]);
  }
}

// One thread per (image b, channel c) plane of grad_features: walks the RoIs of image b in index order and their
// cells in row-major order (the CPU backward's order), so the float sums do not depend on thread scheduling.
template <typename T>
__global__ void roi_pool_backward_plane_kernel(const T* grad, const T* rois, const int* argmax, int64_t R,
                                               int64_t planes, int64_t C, int64_t HW, int64_t P, T* grad_features) {
  for (int64_t bc = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; bc < planes;
       bc += int64_t(blockDim.x) * gridDim.x) {
    const int64_t b = bc / C, c = bc % C;
    T* plane = grad_features + bc * HW;
    for (int64_t r = 0; r < R; ++r) {
      if (static_cast<int64_t>(rois[r * 5]) != b) continue;
      const int64_t base = (r * C + c) * P;
      for (int64_t p = 0; p < P; ++p) {
        const int a = argmax[base + p];
        if (a >= 0) plane[a] += grad[base + p];
      }
    }
  }
}

}  // namespace

template <typename T>
int roi_pool_forward_launch(const T* features, const T* rois, int64_t R, int64_t C, int64_t H, int64_t W,
                            int64_t ph, int64_t pw, double spatial_scale, T* output, int* argmax, void* stream) {
  const int64_t total = R * C * ph * pw;
  if (total == 0) return 0;
  roi_pool_forward_kernel<T><<<grid_for(total), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      features, rois, total, C, H, W, ph, pw, static_cast<T>(spatial_scale), output, argmax);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int roi_pool_backward_launch(const T* grad, const T* rois, const int* argmax, int64_t R, int64_t C, int64_t H,
                             int64_t W, int64_t ph, int64_t pw, T* grad_features, void* stream) {
  const int64_t total = R * C * ph * pw;
  if (total == 0) return 0;
  roi_pool_backward_kernel<T><<<grid_for(total), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      grad, rois, argmax, total, C, H, W, ph * pw, grad_features);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int roi_pool_backward_deterministic_launch(const T* grad, const T* rois, const int* argmax, int64_t R, int64_t B,
                                           int64_t C, int64_t H, int64_t W, int64_t ph, int64_t pw, T* grad_features,
                                           void* stream) {
  const int64_t planes = B * C;
  if (R * ph * pw == 0 || planes * H * W == 0) return 0;
  roi_pool_backward_plane_kernel<T><<<grid_for(planes, kPlaneThreads), kPlaneThreads, 0,
                                      static_cast<cudaStream_t>(stream)>>>(grad, rois, argmax, R, planes, C, H * W,
                                                                           ph * pw, grad_features);
  return static_cast<int>(cudaGetLastError());
}

template int roi_pool_forward_launch<float>(const float*, const float*, int64_t, int64_t, int64_t, int64_t, int64_t,
                                            int64_t, double, float*, int*, void*);
template int roi_pool_forward_launch<double>(const double*, const double*, int64_t, int64_t, int64_t, int64_t,
                                             int64_t, int64_t, double, double*, int*, void*);
template int roi_pool_backward_launch<float>(const float*, const float*, const int*, int64_t, int64_t, int64_t,
                                             int64_t, int64_t, int64_t, float*, void*);
template int roi_pool_backward_launch<double>(const double*, const double*, const int*, int64_t, int64_t, int64_t,
                                              int64_t, int64_t, int64_t, double*, void*);
template int roi_pool_backward_deterministic_launch<float>(const float*, const float*, const int*, int64_t, int64_t,
                                                           int64_t, int64_t, int64_t, int64_t, int64_t, float*,
                                                           void*);
template int roi_pool_backward_deterministic_launch<double>(const double*, const double*, const int*, int64_t,
                                                            int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                                                            double*, void*);
