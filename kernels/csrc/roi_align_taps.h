// The bilinear taps of one RoIAlign sample point (torchvision's rule), shared by the CPU and CUDA kernels.
// Plain C++ that nvcc compiles as host + device code and g++ as host code.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define FRCNN_HOST_DEVICE __host__ __device__
#else
#define FRCNN_HOST_DEVICE
#endif

// False when (y, x) lies outside [-1, H] x [-1, W]; otherwise the 4 positions in the H*W plane and their weights.
template <typename T>
FRCNN_HOST_DEVICE inline bool bilinear_taps(T y, T x, int64_t H, int64_t W, int64_t* pos, T* wt) {
  if (y < T(-1) || y > static_cast<T>(H) || x < T(-1) || x > static_cast<T>(W)) return false;
  if (y <= 0) y = 0;
  if (x <= 0) x = 0;
  int64_t y_low = static_cast<int64_t>(y), x_low = static_cast<int64_t>(x), y_high, x_high;
  if (y_low >= H - 1) {
    y_high = y_low = H - 1;
    y = static_cast<T>(y_low);
  } else {
    y_high = y_low + 1;
  }
  if (x_low >= W - 1) {
    x_high = x_low = W - 1;
    x = static_cast<T>(x_low);
  } else {
    x_high = x_low + 1;
  }
  const T ly = y - static_cast<T>(y_low), lx = x - static_cast<T>(x_low), hy = T(1) - ly, hx = T(1) - lx;
  pos[0] = y_low * W + x_low; pos[1] = y_low * W + x_high; pos[2] = y_high * W + x_low; pos[3] = y_high * W + x_high;
  wt[0] = hy * hx; wt[1] = hy * lx; wt[2] = ly * hx; wt[3] = ly * lx;
  return true;
}
