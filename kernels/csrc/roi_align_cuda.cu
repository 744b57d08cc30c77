// torchvision RoIAlign forward/backward on the GPU (one thread per output element; backward by atomicAdd, or
// deterministically with one thread per feature plane).
#include <cuda_runtime.h>

#include "kernels_cuda.h"
#include "roi_align_taps.h"

namespace {

constexpr int kThreads = 256;
constexpr int kPlaneThreads = 64;  // the deterministic backward has only B * C threads: spread them over more SMs

inline unsigned grid_for(int64_t n, int threads = kThreads) {
  return static_cast<unsigned>((n + threads - 1) / threads);
}

template <typename T>
struct Bin {
  int64_t batch, gh, gw;
  T y0, x0, bin_h, bin_w, count;
};

template <typename T>
__device__ Bin<T> bin_of(const T* roi, int64_t ph, int64_t pw, int64_t ph_n, int64_t pw_n, T scale,
                         int64_t sampling_ratio, bool aligned) {
  Bin<T> g;
  g.batch = static_cast<int64_t>(roi[0]);
  const T offset = aligned ? T(0.5) : T(0);
  const T sw = roi[1] * scale - offset, sh = roi[2] * scale - offset;
  T roi_w = roi[3] * scale - offset - sw, roi_h = roi[4] * scale - offset - sh;
  if (!aligned) {
    roi_w = max(roi_w, T(1));
    roi_h = max(roi_h, T(1));
  }
  g.bin_h = roi_h / static_cast<T>(ph_n);
  g.bin_w = roi_w / static_cast<T>(pw_n);
  g.gh = sampling_ratio > 0 ? sampling_ratio : static_cast<int64_t>(ceil(roi_h / static_cast<T>(ph_n)));
  g.gw = sampling_ratio > 0 ? sampling_ratio : static_cast<int64_t>(ceil(roi_w / static_cast<T>(pw_n)));
  g.count = static_cast<T>(g.gh * g.gw > 1 ? g.gh * g.gw : 1);
  g.y0 = sh + static_cast<T>(ph) * g.bin_h;
  g.x0 = sw + static_cast<T>(pw) * g.bin_w;
  return g;
}

// Calls fn(pos, wt) with the bilinear taps of every sample point of bin g that lies on the map.
template <typename T, typename Fn>
__device__ void for_each_tap(const Bin<T>& g, int64_t H, int64_t W, Fn fn) {
  int64_t pos[4];
  T wt[4];
  for (int64_t iy = 0; iy < g.gh; ++iy) {
    const T y = g.y0 + static_cast<T>(iy + .5f) * g.bin_h / static_cast<T>(g.gh);
    for (int64_t ix = 0; ix < g.gw; ++ix) {
      const T x = g.x0 + static_cast<T>(ix + .5f) * g.bin_w / static_cast<T>(g.gw);
      if (bilinear_taps(y, x, H, W, pos, wt)) fn(pos, wt);
    }
  }
}

template <typename T>
__global__ void roi_align_forward_kernel(const T* features, const T* rois, int64_t total, int64_t C, int64_t H,
                                         int64_t W, int64_t ph_n, int64_t pw_n, T scale, int64_t sampling_ratio,
                                         bool aligned, T* output) {
  for (int64_t index = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; index < total;
       index += int64_t(blockDim.x) * gridDim.x) {
    const int64_t pw = index % pw_n, ph = (index / pw_n) % ph_n, c = (index / pw_n / ph_n) % C;
    const int64_t r = index / pw_n / ph_n / C;
    const Bin<T> g = bin_of(rois + r * 5, ph, pw, ph_n, pw_n, scale, sampling_ratio, aligned);
    const T* plane = features + (g.batch * C + c) * H * W;
    T acc = 0;
    for_each_tap(g, H, W, [&](const int64_t* pos, const T* wt) {
      acc += wt[0] * plane[pos[0]] + wt[1] * plane[pos[1]] + wt[2] * plane[pos[2]] + wt[3] * plane[pos[3]];
    });
    output[index] = acc / g.count;
  }
}

template <typename T>
__global__ void roi_align_backward_kernel(const T* grad, const T* rois, int64_t total, int64_t C, int64_t H,
                                          int64_t W, int64_t ph_n, int64_t pw_n, T scale, int64_t sampling_ratio,
                                          bool aligned, T* grad_features) {
  for (int64_t index = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; index < total;
       index += int64_t(blockDim.x) * gridDim.x) {
    const int64_t pw = index % pw_n, ph = (index / pw_n) % ph_n, c = (index / pw_n / ph_n) % C;
    const int64_t r = index / pw_n / ph_n / C;
    const Bin<T> g = bin_of(rois + r * 5, ph, pw, ph_n, pw_n, scale, sampling_ratio, aligned);
    T* plane = grad_features + (g.batch * C + c) * H * W;
    const T v = grad[index] / g.count;
    for_each_tap(g, H, W, [&](const int64_t* pos, const T* wt) {
      for (int k = 0; k < 4; ++k) atomicAdd(plane + pos[k], wt[k] * v);
    });
  }
}

// One thread per (image b, channel c) plane of grad_features: walks the RoIs of image b in index order, their bins
// in row-major order, the samples of a bin and their 4 taps in the CPU backward's order, so the float sums do not
// depend on thread scheduling.
template <typename T>
__global__ void roi_align_backward_plane_kernel(const T* grad, const T* rois, int64_t R, int64_t planes, int64_t C,
                                                int64_t H, int64_t W, int64_t ph_n, int64_t pw_n, T scale,
                                                int64_t sampling_ratio, bool aligned, T* grad_features) {
  for (int64_t bc = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; bc < planes;
       bc += int64_t(blockDim.x) * gridDim.x) {
    const int64_t b = bc / C, c = bc % C;
    T* plane = grad_features + bc * H * W;
    for (int64_t r = 0; r < R; ++r) {
      if (static_cast<int64_t>(rois[r * 5]) != b) continue;
      const T* g_rc = grad + (r * C + c) * ph_n * pw_n;
      for (int64_t ph = 0; ph < ph_n; ++ph)
        for (int64_t pw = 0; pw < pw_n; ++pw) {
          const Bin<T> g = bin_of(rois + r * 5, ph, pw, ph_n, pw_n, scale, sampling_ratio, aligned);
          const T v = g_rc[ph * pw_n + pw] / g.count;
          for_each_tap(g, H, W, [&](const int64_t* pos, const T* wt) {
            for (int k = 0; k < 4; ++k) plane[pos[k]] += wt[k] * v;
          });
        }
    }
  }
}

}  // namespace

template <typename T>
int roi_align_forward_launch(const T* features, const T* rois, int64_t R, int64_t C, int64_t H, int64_t W,
                             int64_t ph, int64_t pw, double spatial_scale, int64_t sampling_ratio, bool aligned,
                             T* output, void* stream) {
  const int64_t total = R * C * ph * pw;
  if (total == 0) return 0;
  roi_align_forward_kernel<T><<<grid_for(total), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      features, rois, total, C, H, W, ph, pw, static_cast<T>(spatial_scale), sampling_ratio, aligned, output);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int roi_align_backward_launch(const T* grad, const T* rois, int64_t R, int64_t C, int64_t H, int64_t W, int64_t ph,
                              int64_t pw, double spatial_scale, int64_t sampling_ratio, bool aligned,
                              T* grad_features, void* stream) {
  const int64_t total = R * C * ph * pw;
  if (total == 0) return 0;
  roi_align_backward_kernel<T><<<grid_for(total), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      grad, rois, total, C, H, W, ph, pw, static_cast<T>(spatial_scale), sampling_ratio, aligned, grad_features);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int roi_align_backward_deterministic_launch(const T* grad, const T* rois, int64_t R, int64_t B, int64_t C, int64_t H,
                                            int64_t W, int64_t ph, int64_t pw, double spatial_scale,
                                            int64_t sampling_ratio, bool aligned, T* grad_features, void* stream) {
  const int64_t planes = B * C;
  if (R * ph * pw == 0 || planes * H * W == 0) return 0;
  roi_align_backward_plane_kernel<T><<<grid_for(planes, kPlaneThreads), kPlaneThreads, 0,
                                       static_cast<cudaStream_t>(stream)>>>(
      grad, rois, R, planes, C, H, W, ph, pw, static_cast<T>(spatial_scale), sampling_ratio, aligned, grad_features);
  return static_cast<int>(cudaGetLastError());
}

template int roi_align_forward_launch<float>(const float*, const float*, int64_t, int64_t, int64_t, int64_t,
                                             int64_t, int64_t, double, int64_t, bool, float*, void*);
template int roi_align_forward_launch<double>(const double*, const double*, int64_t, int64_t, int64_t, int64_t,
                                              int64_t, int64_t, double, int64_t, bool, double*, void*);
template int roi_align_backward_launch<float>(const float*, const float*, int64_t, int64_t, int64_t, int64_t,
                                              int64_t, int64_t, double, int64_t, bool, float*, void*);
template int roi_align_backward_launch<double>(const double*, const double*, int64_t, int64_t, int64_t, int64_t,
                                               int64_t, int64_t, double, int64_t, bool, double*, void*);
template int roi_align_backward_deterministic_launch<float>(const float*, const float*, int64_t, int64_t, int64_t,
                                                            int64_t, int64_t, int64_t, int64_t, double, int64_t, bool,
                                                            float*, void*);
template int roi_align_backward_deterministic_launch<double>(const double*, const double*, int64_t, int64_t, int64_t,
                                                             int64_t, int64_t, int64_t, int64_t, double, int64_t,
                                                             bool, double*, void*);
