// RoIAlign forward and backward on the CPU with torchvision's semantics.
// The bilinear taps (4 positions, 4 weights per sample) of a chunk of RoIs are computed once, in parallel over
// RoIs; then each thread owns blocks of channels and walks every RoI of the chunk over its block, so the backward
// scatter into a channel plane has a single writer (deterministic, no atomics), a RoI's taps stay in L1 across the
// block's channels and the block's planes stay in L2 across RoIs.
#include "kernels_cpu.h"
#include "roi_align_taps.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr int64_t kChunkSamples = 1 << 15;  // 1 MB of float taps per chunk

template <typename T>
struct Tap {  // one bilinear sample: positions in the H*W plane and weights
  int p1, p2, p3, p4;
  T w1, w2, w3, w4;
};

template <typename T>
struct Geom {
  int64_t batch = 0;
  T start_h, start_w, bin_h, bin_w;
  int64_t gh = 0, gw = 0;
  T count;
  int64_t samples() const { return gh > 0 && gw > 0 ? gh * gw : 0; }
};

template <typename T>
Geom<T> roi_geom(const T* roi, T scale, bool aligned, int64_t ph_n, int64_t pw_n, int64_t sampling_ratio) {
  Geom<T> g;
  g.batch = static_cast<int64_t>(roi[0]);
  const T offset = aligned ? T(0.5) : T(0);
  g.start_w = roi[1] * scale - offset;
  g.start_h = roi[2] * scale - offset;
  T roi_w = roi[3] * scale - offset - g.start_w;
  T roi_h = roi[4] * scale - offset - g.start_h;
  if (!aligned) {
    roi_w = std::max(roi_w, T(1));
    roi_h = std::max(roi_h, T(1));
  }
  g.bin_h = roi_h / static_cast<T>(ph_n);
  g.bin_w = roi_w / static_cast<T>(pw_n);
  auto grid = [](T v) { return static_cast<int64_t>(std::min<double>(std::ceil(double(v)), 1e6)); };
  g.gh = sampling_ratio > 0 ? sampling_ratio : grid(roi_h / static_cast<T>(ph_n));
  g.gw = sampling_ratio > 0 ? sampling_ratio : grid(roi_w / static_cast<T>(pw_n));
  g.count = static_cast<T>(std::max<int64_t>(g.gh * g.gw, 1));
  return g;
}

template <typename T>
Tap<T> bilinear_tap(T y, T x, int64_t H, int64_t W) {
  Tap<T> t{-1, 0, 0, 0, T(0), T(0), T(0), T(0)};  // p1 = -1: outside the map, contributes nothing
  int64_t pos[4];
  T wt[4];
  if (!bilinear_taps(y, x, H, W, pos, wt)) return t;
  t.p1 = int(pos[0]); t.p2 = int(pos[1]); t.p3 = int(pos[2]); t.p4 = int(pos[3]);
  t.w1 = wt[0]; t.w2 = wt[1]; t.w3 = wt[2]; t.w4 = wt[3];
  return t;
}

template <typename T>
void fill_taps(const Geom<T>& g, int64_t ph_n, int64_t pw_n, int64_t H, int64_t W, Tap<T>* out) {
  for (int64_t ph = 0; ph < ph_n; ++ph)
    for (int64_t pw = 0; pw < pw_n; ++pw)
      for (int64_t iy = 0; iy < g.gh; ++iy) {
        const T y = g.start_h + static_cast<T>(ph) * g.bin_h +
                    static_cast<T>(iy + .5f) * g.bin_h / static_cast<T>(g.gh);
        for (int64_t ix = 0; ix < g.gw; ++ix) {
          const T x = g.start_w + static_cast<T>(pw) * g.bin_w +
                      static_cast<T>(ix + .5f) * g.bin_w / static_cast<T>(g.gw);
          *out++ = bilinear_tap(y, x, H, W);
        }
      }
}

// Calls body(block, c0, c1, r, geom, taps_of_r) for each channel block and each RoI, chunk by chunk: the taps of
// a chunk of RoIs are filled in parallel over RoIs, then the channel blocks run in parallel over that chunk.
template <typename T, typename Body>
void for_chunks(const T* rois, int64_t R, int64_t C, int64_t H, int64_t W, int64_t ph_n, int64_t pw_n, T scale,
                int64_t sampling_ratio, bool aligned, Body body) {
  std::vector<Geom<T>> geoms(R);
  for (int64_t r = 0; r < R; ++r) geoms[r] = roi_geom(rois + 5 * r, scale, aligned, ph_n, pw_n, sampling_ratio);
  const int64_t P = ph_n * pw_n;
  std::vector<Tap<T>> taps;
  std::vector<int64_t> offset;
  int64_t r0 = 0;
  while (r0 < R) {
    int64_t r1 = r0, total = 0;
    offset.assign(1, 0);
    while (r1 < R && (r1 == r0 || total + geoms[r1].samples() * P <= kChunkSamples)) {
      total += geoms[r1].samples() * P;
      offset.push_back(total);
      ++r1;
    }
    taps.resize(std::max<int64_t>(total, 1));
    at::parallel_for(r0, r1, 1, [&](int64_t a, int64_t b) {
      for (int64_t r = a; r < b; ++r)
        if (geoms[r].samples()) fill_taps(geoms[r], ph_n, pw_n, H, W, taps.data() + offset[r - r0]);
    });
    for_channel_blocks(C, [&](int64_t blk, int64_t c0, int64_t c1) {
      for (int64_t r = r0; r < r1; ++r) body(blk, c0, c1, r, geoms[r], taps.data() + offset[r - r0]);
    });
    r0 = r1;
  }
}

template <typename T>
void forward(const T* feat, const T* rois, int64_t B, int64_t R, int64_t C, int64_t H, int64_t W, int64_t ph_n,
             int64_t pw_n, T scale, int64_t sampling_ratio, bool aligned, T* out) {
  constexpr int64_t K = kChannelBlock;
  const int64_t P = ph_n * pw_n, HW = H * W;
  const std::vector<T> blocks = to_channel_blocks(feat, B, C, HW);
  for_chunks<T>(rois, R, C, H, W, ph_n, pw_n, scale, sampling_ratio, aligned,
                [&](int64_t blk, int64_t c0, int64_t c1, int64_t r, const Geom<T>& g, const Tap<T>* taps) {
                  const T* base = blocks.data() + (blk * B + g.batch) * HW * K;
                  const int64_t n = g.samples();
                  T tile[K * 64];  // [K][P] for P <= 64, else written per bin
                  T acc[K];
                  const Tap<T>* t = taps;
                  for (int64_t p = 0; p < P; ++p) {
                    for (int64_t k = 0; k < K; ++k) acc[k] = 0;
                    for (int64_t s = 0; s < n; ++s, ++t) {
                      if (t->p1 < 0) continue;
                      const T *v1 = base + t->p1 * K, *v2 = base + t->p2 * K, *v3 = base + t->p3 * K,
                              *v4 = base + t->p4 * K;
                      for (int64_t k = 0; k < K; ++k)
                        acc[k] += t->w1 * v1[k] + t->w2 * v2[k] + t->w3 * v3[k] + t->w4 * v4[k];
                    }
                    if (P <= 64) {
                      for (int64_t k = 0; k < K; ++k) tile[k * P + p] = acc[k] / g.count;
                    } else {
                      for (int64_t c = c0; c < c1; ++c) out[(r * C + c) * P + p] = acc[c - c0] / g.count;
                    }
                  }
                  if (P <= 64)
                    for (int64_t c = c0; c < c1; ++c) std::copy_n(tile + (c - c0) * P, P, out + (r * C + c) * P);
                });
}

template <typename T>
void backward(const T* grad, const T* rois, int64_t B, int64_t R, int64_t C, int64_t H, int64_t W, int64_t ph_n,
              int64_t pw_n, T scale, int64_t sampling_ratio, bool aligned, T* gin) {
  constexpr int64_t K = kChannelBlock;
  const int64_t P = ph_n * pw_n, HW = H * W;
  std::vector<T> blocks(channel_blocks(C) * B * HW * K, T(0));  // channel-blocked gradient, one writer per block
  for_chunks<T>(rois, R, C, H, W, ph_n, pw_n, scale, sampling_ratio, aligned,
                [&](int64_t blk, int64_t c0, int64_t c1, int64_t r, const Geom<T>& g, const Tap<T>* taps) {
                  T* base = blocks.data() + (blk * B + g.batch) * HW * K;
                  const int64_t n = g.samples();
                  T v[K];
                  const Tap<T>* t = taps;
                  for (int64_t p = 0; p < P; ++p) {
                    for (int64_t k = 0; k < K; ++k)
                      v[k] = c0 + k < c1 ? grad[(r * C + c0 + k) * P + p] / g.count : T(0);
                    for (int64_t s = 0; s < n; ++s, ++t) {
                      if (t->p1 < 0) continue;
                      T* d = base + t->p1 * K;
                      for (int64_t k = 0; k < K; ++k) d[k] += t->w1 * v[k];
                      d = base + t->p2 * K;
                      for (int64_t k = 0; k < K; ++k) d[k] += t->w2 * v[k];
                      d = base + t->p3 * K;
                      for (int64_t k = 0; k < K; ++k) d[k] += t->w3 * v[k];
                      d = base + t->p4 * K;
                      for (int64_t k = 0; k < K; ++k) d[k] += t->w4 * v[k];
                    }
                  }
                });
  from_channel_blocks(blocks.data(), B, C, HW, gin);
}

}  // namespace

at::Tensor roi_align_forward_cpu(const at::Tensor& features, const at::Tensor& rois, int64_t pooled_h,
                                 int64_t pooled_w, double spatial_scale, int64_t sampling_ratio, bool aligned) {
  TORCH_CHECK(features.dim() == 4 && rois.dim() == 2 && rois.size(1) == 5, "roi_align: bad shapes");
  TORCH_CHECK(features.scalar_type() == rois.scalar_type(), "roi_align: features and rois must share a dtype");
  at::Tensor f = features.contiguous(), r = rois.contiguous();
  const int64_t R = r.size(0), C = f.size(1), H = f.size(2), W = f.size(3);
  at::Tensor out = at::empty({R, C, pooled_h, pooled_w}, f.options());  // every element is written
  if (R == 0 || C == 0 || H == 0 || W == 0) {
    AT_DISPATCH_FLOATING_TYPES(f.scalar_type(), "roi_align_check",
                               [&] { check_rois(r.data_ptr<scalar_t>(), R, f.size(0)); });
    return out.zero_();
  }
  AT_DISPATCH_FLOATING_TYPES(f.scalar_type(), "roi_align_forward_cpu", [&] {
    check_rois(r.data_ptr<scalar_t>(), R, f.size(0));
    forward<scalar_t>(f.data_ptr<scalar_t>(), r.data_ptr<scalar_t>(), f.size(0), R, C, H, W, pooled_h, pooled_w,
                      static_cast<scalar_t>(spatial_scale), sampling_ratio, aligned, out.data_ptr<scalar_t>());
  });
  return out;
}

at::Tensor roi_align_backward_cpu(const at::Tensor& grad, const at::Tensor& rois, int64_t batch, int64_t channels,
                                  int64_t height, int64_t width, int64_t pooled_h, int64_t pooled_w,
                                  double spatial_scale, int64_t sampling_ratio, bool aligned) {
  at::Tensor g = grad.contiguous(), r = rois.contiguous();
  at::Tensor gin = at::empty({batch, channels, height, width}, g.options());  // written by from_channel_blocks
  const int64_t R = r.size(0);
  if (R == 0 || gin.numel() == 0) return gin.zero_();
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "roi_align_backward_cpu", [&] {
    backward<scalar_t>(g.data_ptr<scalar_t>(), r.data_ptr<scalar_t>(), batch, R, channels, height, width, pooled_h,
                       pooled_w, static_cast<scalar_t>(spatial_scale), sampling_ratio, aligned,
                       gin.data_ptr<scalar_t>());
  });
  return gin;
}
