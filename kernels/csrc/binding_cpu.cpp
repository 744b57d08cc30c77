// Python binding of the C++ CPU kernels (declared in kernels_cpu.h).
// torch/csrc/utils/pybind.h (pybind11 + the Tensor caster) compiles in a quarter of the time of torch/extension.h.
#include <torch/csrc/utils/pybind.h>

#include "kernels_cpu.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "frcnn kernels, C++ CPU: nms, roi_pool, roi_align (boxes [x1, y1, x2, y2], inclusive pixels)";
  m.def("nms", &nms_cpu, "greedy NMS: boxes [N,4], scores [N], iou_threshold[, max_keep] -> int64 [K]",
        pybind11::arg("boxes"), pybind11::arg("scores"), pybind11::arg("iou_threshold"),
        pybind11::arg("max_keep") = -1);
  m.def("roi_pool_forward", &roi_pool_forward_cpu, "Caffe ROIPooling forward -> (output, argmax)");
  m.def("roi_pool_backward", &roi_pool_backward_cpu, "Caffe ROIPooling backward through argmax");
  m.def("roi_align_forward", &roi_align_forward_cpu, "torchvision RoIAlign forward");
  m.def("roi_align_backward", &roi_align_backward_cpu, "torchvision RoIAlign backward");
}
