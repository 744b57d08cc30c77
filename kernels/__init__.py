"""Detection kernels: NMS, RoI pooling and RoI align (C++ on the CPU, CUDA on the GPU, pure-torch reference).

Boxes are ``[x1, y1, x2, y2]`` in pixels, inclusive (width = x2 - x1 + 1), as in py-faster-rcnn.
The compiled kernels are JIT-built on the first op call (not at import) and cached under
``TORCH_EXTENSIONS_DIR``; ``FRCNN_KERNELS=reference`` selects :mod:`kernels.reference` everywhere.
"""
from ._validate import KernelInputError
from .ops import batched_nms, nms, roi_align, roi_pool

__all__ = ["nms", "batched_nms", "roi_pool", "roi_align", "KernelInputError"]
