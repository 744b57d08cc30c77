// Caffe ROIPooling (max) forward and backward on the CPU.
// start/end = round(x * scale) (C round: half away from zero); roi w/h = max(end - start + 1, 1);
// bin = roi / pooled; cell [floor(p * bin), ceil((p + 1) * bin)) + start, clipped to the map; empty cell -> 0.
// Both directions run in parallel over blocks of channels (a block's planes stay in cache while every RoI visits
// them); in the backward each channel plane has one writer, so it is deterministic and needs no atomics.
#include "kernels_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

struct Cells {
  std::vector<int> hs, he, ws, we;
};

// floor/ceil/round results as int64, saturated far outside any feature map (absurd RoIs stay well defined).
template <typename T>
int64_t to_i64(T v) {
  return static_cast<int64_t>(std::min<double>(std::max<double>(double(v), -1e15), 1e15));
}

inline int clip(int64_t v, int64_t hi) { return static_cast<int>(std::min<int64_t>(std::max<int64_t>(v, 0), hi)); }

template <typename T>
Cells roi_cells(const T* roi, int64_t ph_n, int64_t pw_n, T scale, int64_t H, int64_t W, int64_t* batch) {
  *batch = static_cast<int64_t>(roi[0]);
  const T sw = std::round(roi[1] * scale), sh = std::round(roi[2] * scale);
  const T ew = std::round(roi[3] * scale), eh = std::round(roi[4] * scale);
  const T roi_w = std::max(ew - sw + T(1), T(1)), roi_h = std::max(eh - sh + T(1), T(1));
  const T bin_w = roi_w / static_cast<T>(pw_n), bin_h = roi_h / static_cast<T>(ph_n);
  const int64_t isw = to_i64(sw), ish = to_i64(sh);
  Cells c;
  c.hs.resize(ph_n); c.he.resize(ph_n); c.ws.resize(pw_n); c.we.resize(pw_n);
  for (int64_t p = 0; p < ph_n; ++p) {
    c.hs[p] = clip(to_i64(std::floor(static_cast<T>(p) * bin_h)) + ish, H);
    c.he[p] = clip(to_i64(std::ceil(static_cast<T>(p + 1) * bin_h)) + ish, H);
  }
  for (int64_t p = 0; p < pw_n; ++p) {
    c.ws[p] = clip(to_i64(std::floor(static_cast<T>(p) * bin_w)) + isw, W);
    c.we[p] = clip(to_i64(std::ceil(static_cast<T>(p + 1) * bin_w)) + isw, W);
  }
  return c;
}

template <typename T>
void forward(const T* feat, const T* rois, int64_t B, int64_t R, int64_t C, int64_t H, int64_t W, int64_t ph_n,
             int64_t pw_n, T scale, T* out, int* argmax) {
  constexpr int64_t K = kChannelBlock;
  const int64_t P = ph_n * pw_n, HW = H * W;
  std::vector<Cells> cells(R);
  std::vector<int64_t> batch(R);
  for (int64_t r = 0; r < R; ++r) cells[r] = roi_cells(rois + 5 * r, ph_n, pw_n, scale, H, W, &batch[r]);
  const std::vector<T> blocks = to_channel_blocks(feat, B, C, HW);
  for_channel_blocks(C, [&](int64_t blk, int64_t c0, int64_t c1) {
    std::vector<T> tile(K * P);
    std::vector<int> atile(K * P);
    T best[K];
    int arg[K];
    for (int64_t r = 0; r < R; ++r) {
      const Cells& cl = cells[r];
      const T* base = blocks.data() + (blk * B + batch[r]) * HW * K;
      for (int64_t ph = 0; ph < ph_n; ++ph) {
        for (int64_t pw = 0; pw < pw_n; ++pw) {
          const int hs = cl.hs[ph], he = cl.he[ph], ws = cl.ws[pw], we = cl.we[pw];
          const bool empty = he <= hs || we <= ws;
          for (int64_t k = 0; k < K; ++k) {
            best[k] = empty ? T(0) : std::numeric_limits<T>::lowest();
            arg[k] = -1;
          }
          for (int h = hs; h < he; ++h)
            for (int w = ws; w < we; ++w) {
              const int idx = h * static_cast<int>(W) + w;
              const T* v = base + idx * K;
              for (int64_t k = 0; k < K; ++k) {  // first maximum in row-major order wins (strict >); branch-free
                const T x = v[k], b = best[k];
                const int m = -static_cast<int>(x > b);
                arg[k] = (arg[k] & ~m) | (idx & m);
                best[k] = x > b ? x : b;
              }
            }
          const int64_t p = ph * pw_n + pw;
          for (int64_t k = 0; k < K; ++k) {
            tile[k * P + p] = best[k];
            atile[k * P + p] = arg[k];
          }
        }
      }
      for (int64_t c = c0; c < c1; ++c) {
        std::copy_n(tile.data() + (c - c0) * P, P, out + (r * C + c) * P);
        std::copy_n(atile.data() + (c - c0) * P, P, argmax + (r * C + c) * P);
      }
    }
  });
}

template <typename T>
void backward(const T* grad, const T* rois, const int* argmax, int64_t R, int64_t C, int64_t H, int64_t W,
              int64_t P, T* gin) {
  for_channel_blocks(C, [&](int64_t, int64_t c0, int64_t c1) {
    for (int64_t r = 0; r < R; ++r)
      for (int64_t c = c0; c < c1; ++c) {
        T* plane = gin + (static_cast<int64_t>(rois[5 * r]) * C + c) * H * W;
        const T* g = grad + (r * C + c) * P;
        const int* a = argmax + (r * C + c) * P;
        for (int64_t p = 0; p < P; ++p)
          if (a[p] >= 0) plane[a[p]] += g[p];
      }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> roi_pool_forward_cpu(const at::Tensor& features, const at::Tensor& rois,
                                                        int64_t pooled_h, int64_t pooled_w, double spatial_scale) {
  TORCH_CHECK(features.dim() == 4 && rois.dim() == 2 && rois.size(1) == 5, "roi_pool: bad shapes");
  TORCH_CHECK(features.scalar_type() == rois.scalar_type(), "roi_pool: features and rois must share a dtype");
  at::Tensor f = features.contiguous(), r = rois.contiguous();
  const int64_t R = r.size(0), C = f.size(1), H = f.size(2), W = f.size(3);
  at::Tensor out = at::empty({R, C, pooled_h, pooled_w}, f.options());  // every element is written
  at::Tensor argmax = at::empty({R, C, pooled_h, pooled_w}, f.options().dtype(at::kInt));
  if (R == 0 || C == 0 || H == 0 || W == 0) {
    AT_DISPATCH_FLOATING_TYPES(f.scalar_type(), "roi_pool_check",
                               [&] { check_rois(r.data_ptr<scalar_t>(), R, f.size(0)); });
    return {out.zero_(), argmax.fill_(-1)};
  }
  AT_DISPATCH_FLOATING_TYPES(f.scalar_type(), "roi_pool_forward_cpu", [&] {
    check_rois(r.data_ptr<scalar_t>(), R, f.size(0));
    forward<scalar_t>(f.data_ptr<scalar_t>(), r.data_ptr<scalar_t>(), f.size(0), R, C, H, W, pooled_h, pooled_w,
                      static_cast<scalar_t>(spatial_scale), out.data_ptr<scalar_t>(), argmax.data_ptr<int>());
  });
  return {out, argmax};
}

at::Tensor roi_pool_backward_cpu(const at::Tensor& grad, const at::Tensor& rois, const at::Tensor& argmax,
                                 int64_t batch, int64_t channels, int64_t height, int64_t width) {
  at::Tensor g = grad.contiguous(), r = rois.contiguous(), a = argmax.contiguous();
  at::Tensor gin = at::zeros({batch, channels, height, width}, g.options());
  const int64_t R = r.size(0);
  if (R == 0 || gin.numel() == 0) return gin;
  const int64_t P = g.size(2) * g.size(3);
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "roi_pool_backward_cpu", [&] {
    backward<scalar_t>(g.data_ptr<scalar_t>(), r.data_ptr<scalar_t>(), a.data_ptr<int>(), R, channels, height,
                       width, P, gin.data_ptr<scalar_t>());
  });
  return gin;
}
