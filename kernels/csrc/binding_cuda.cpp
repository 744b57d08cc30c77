// Thin torch binding of the CUDA launchers (kernels_cuda.h); built only when torch.cuda.is_available().
// Same Python names and signatures as binding_cpu.cpp, plus a keyword `deterministic` (default false) on the two
// backward functions: true picks the one-writer-per-plane kernels instead of atomicAdd.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <vector>

#include "kernels_cuda.h"

namespace {

void check_launch(int err, const char* what) { TORCH_CHECK(err == 0, what, ": CUDA error ", err); }

void* stream() { return static_cast<void*>(at::cuda::getCurrentCUDAStream().stream()); }

at::Tensor nms(const at::Tensor& boxes, const at::Tensor& scores, double iou_threshold, int64_t max_keep) {
  TORCH_CHECK(boxes.is_cuda() && boxes.dim() == 2 && boxes.size(1) == 4, "nms: boxes must be CUDA [N, 4]");
  c10::cuda::CUDAGuard guard(boxes.device());
  const int64_t n = boxes.size(0);
  if (n == 0) return at::empty({0}, boxes.options().dtype(at::kLong));
  // py-faster-rcnn's order, scores.argsort()[::-1]: a stable increasing sort, reversed (equal scores by
  // decreasing index), as the CPU kernel and kernels.reference do.
  at::Tensor order = std::get<1>(scores.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false)).flip({0});
  at::Tensor sorted = boxes.index_select(0, order).contiguous();
  const int64_t blocks = (n + kNmsThreadsPerBlock - 1) / kNmsThreadsPerBlock;
  at::Tensor mask = at::empty({n * blocks}, boxes.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(boxes.scalar_type(), "nms_cuda", [&] {
    check_launch(nms_mask_launch<scalar_t>(sorted.data_ptr<scalar_t>(), n, iou_threshold,
                                           reinterpret_cast<uint64_t*>(mask.data_ptr<int64_t>()), stream()),
                 "nms");
  });
  at::Tensor host_mask = mask.cpu();
  std::vector<int64_t> keep(n);
  const int64_t kept = nms_reduce_mask(reinterpret_cast<const uint64_t*>(host_mask.data_ptr<int64_t>()), n,
                                       keep.data(), max_keep);
  at::Tensor ranks = at::from_blob(keep.data(), {kept}, at::kLong).to(boxes.device());
  return order.index_select(0, ranks);
}

std::tuple<at::Tensor, at::Tensor> roi_pool_forward(const at::Tensor& features, const at::Tensor& rois,
                                                    int64_t pooled_h, int64_t pooled_w, double spatial_scale) {
  c10::cuda::CUDAGuard guard(features.device());
  at::Tensor f = features.contiguous(), r = rois.contiguous();
  const int64_t R = r.size(0), C = f.size(1), H = f.size(2), W = f.size(3);
  at::Tensor out = at::zeros({R, C, pooled_h, pooled_w}, f.options());
  at::Tensor argmax = at::full({R, C, pooled_h, pooled_w}, -1, f.options().dtype(at::kInt));
  if (out.numel() == 0 || H == 0 || W == 0) return {out, argmax};
  AT_DISPATCH_FLOATING_TYPES(f.scalar_type(), "roi_pool_forward_cuda", [&] {
    check_launch(roi_pool_forward_launch<scalar_t>(f.data_ptr<scalar_t>(), r.data_ptr<scalar_t>(), R, C, H, W,
                                                   pooled_h, pooled_w, spatial_scale, out.data_ptr<scalar_t>(),
                                                   argmax.data_ptr<int>(), stream()),
                 "roi_pool_forward");
  });
  return {out, argmax};
}

at::Tensor roi_pool_backward(const at::Tensor& grad, const at::Tensor& rois, const at::Tensor& argmax,
                             int64_t batch, int64_t channels, int64_t height, int64_t width, bool deterministic) {
  c10::cuda::CUDAGuard guard(grad.device());
  at::Tensor g = grad.contiguous(), r = rois.contiguous(), a = argmax.contiguous();
  at::Tensor gin = at::zeros({batch, channels, height, width}, g.options());
  if (g.numel() == 0 || gin.numel() == 0) return gin;
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "roi_pool_backward_cuda", [&] {
    const scalar_t *gp = g.data_ptr<scalar_t>(), *rp = r.data_ptr<scalar_t>();
    const int* ap = a.data_ptr<int>();
    scalar_t* out = gin.data_ptr<scalar_t>();
    const int err = deterministic
        ? roi_pool_backward_deterministic_launch<scalar_t>(gp, rp, ap, r.size(0), batch, channels, height, width,
                                                           g.size(2), g.size(3), out, stream())
        : roi_pool_backward_launch<scalar_t>(gp, rp, ap, r.size(0), channels, height, width, g.size(2), g.size(3),
                                             out, stream());
    check_launch(err, "roi_pool_backward");
  });
  return gin;
}

at::Tensor roi_align_forward(const at::Tensor& features, const at::Tensor& rois, int64_t pooled_h, int64_t pooled_w,
                             double spatial_scale, int64_t sampling_ratio, bool aligned) {
  c10::cuda::CUDAGuard guard(features.device());
  at::Tensor f = features.contiguous(), r = rois.contiguous();
  const int64_t R = r.size(0), C = f.size(1), H = f.size(2), W = f.size(3);
  at::Tensor out = at::zeros({R, C, pooled_h, pooled_w}, f.options());
  if (out.numel() == 0 || H == 0 || W == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(f.scalar_type(), "roi_align_forward_cuda", [&] {
    check_launch(roi_align_forward_launch<scalar_t>(f.data_ptr<scalar_t>(), r.data_ptr<scalar_t>(), R, C, H, W,
                                                    pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned,
                                                    out.data_ptr<scalar_t>(), stream()),
                 "roi_align_forward");
  });
  return out;
}

at::Tensor roi_align_backward(const at::Tensor& grad, const at::Tensor& rois, int64_t batch, int64_t channels,
                              int64_t height, int64_t width, int64_t pooled_h, int64_t pooled_w,
                              double spatial_scale, int64_t sampling_ratio, bool aligned, bool deterministic) {
  c10::cuda::CUDAGuard guard(grad.device());
  at::Tensor g = grad.contiguous(), r = rois.contiguous();
  at::Tensor gin = at::zeros({batch, channels, height, width}, g.options());
  if (g.numel() == 0 || gin.numel() == 0) return gin;
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "roi_align_backward_cuda", [&] {
    const scalar_t *gp = g.data_ptr<scalar_t>(), *rp = r.data_ptr<scalar_t>();
    scalar_t* out = gin.data_ptr<scalar_t>();
    const int err = deterministic
        ? roi_align_backward_deterministic_launch<scalar_t>(gp, rp, r.size(0), batch, channels, height, width,
                                                            pooled_h, pooled_w, spatial_scale, sampling_ratio,
                                                            aligned, out, stream())
        : roi_align_backward_launch<scalar_t>(gp, rp, r.size(0), channels, height, width, pooled_h, pooled_w,
                                              spatial_scale, sampling_ratio, aligned, out, stream());
    check_launch(err, "roi_align_backward");
  });
  return gin;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "frcnn kernels, CUDA: nms, roi_pool, roi_align (boxes [x1, y1, x2, y2], inclusive pixels)";
  m.def("nms", &nms, "greedy NMS (64-bit mask kernel): boxes [N,4], scores [N], iou_threshold[, max_keep] -> int64 [K]",
        py::arg("boxes"), py::arg("scores"), py::arg("iou_threshold"), py::arg("max_keep") = -1);
  m.def("roi_pool_forward", &roi_pool_forward, "Caffe ROIPooling forward -> (output, argmax)");
  m.def("roi_pool_backward", &roi_pool_backward,
        "Caffe ROIPooling backward through argmax (deterministic: fixed summation order, no atomics)",
        py::arg("grad"), py::arg("rois"), py::arg("argmax"), py::arg("batch"), py::arg("channels"),
        py::arg("height"), py::arg("width"), py::arg("deterministic") = false);
  m.def("roi_align_forward", &roi_align_forward, "torchvision RoIAlign forward");
  m.def("roi_align_backward", &roi_align_backward,
        "torchvision RoIAlign backward (deterministic: fixed summation order, no atomics)", py::arg("grad"),
        py::arg("rois"), py::arg("batch"), py::arg("channels"), py::arg("height"), py::arg("width"),
        py::arg("pooled_h"), py::arg("pooled_w"), py::arg("spatial_scale"), py::arg("sampling_ratio"),
        py::arg("aligned"), py::arg("deterministic") = false);
}
