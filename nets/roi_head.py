"""The Fast R-CNN head: RoI pooling (or RoI align), the backbone's fc6/fc7, then cls_score and bbox_pred."""
from __future__ import annotations

import torch
from torch import nn

from kernels import roi_align, roi_pool

__all__ = ["RoIHead", "POOLING_MODES"]

POOLING_MODES = ("roi_pool", "roi_align")


class RoIHead(nn.Module):
    """RoIs -> class logits (R, K) and per-class deltas (R, 4K).

    ``box_head`` is the backbone's (R, C, P, P) -> (R, fc_dim) head: fc6/fc7, or a ResNet's res5 + average pool
    (owned here so checkpoints keep it with the predictors).
    Pooling is ``kernels.roi_pool`` (Caffe's RoI max pooling, py-faster-rcnn's default) or ``kernels.roi_align``
    (sampling_ratio 2, aligned=False), at ``spatial_scale`` = 1/16 with ``pool_size`` x ``pool_size`` bins.
    """

    def __init__(self, box_head: nn.Module, in_channels: int, fc_dim: int, num_classes: int, pool_size: int,
                 spatial_scale: float = 1.0 / 16, pooling: str = "roi_pool"):
        super().__init__()
        if pooling not in POOLING_MODES:
            raise ValueError(f"unknown pooling '{pooling}' (known: {', '.join(POOLING_MODES)})")
        self.pooling, self.pool_size, self.spatial_scale = pooling, pool_size, spatial_scale
        self.in_channels = in_channels
        self.box_head = box_head
        self.cls_score = nn.Linear(fc_dim, num_classes)
        self.bbox_pred = nn.Linear(fc_dim, 4 * num_classes)

    def reset_predictors(self, generator: torch.Generator) -> None:
        """py-faster-rcnn's init: cls_score N(0, 0.01), bbox_pred N(0, 0.001), biases 0."""
        with torch.no_grad():
            self.cls_score.weight.normal_(0.0, 0.01, generator=generator)
            self.bbox_pred.weight.normal_(0.0, 0.001, generator=generator)
            self.cls_score.bias.zero_()
            self.bbox_pred.bias.zero_()

    def pool(self, features: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) features, (R, 5) ``[batch_idx, x1, y1, x2, y2]`` blob-pixel RoIs -> (R, C, P, P)."""
        size = (self.pool_size, self.pool_size)
        if self.pooling == "roi_align":
            return roi_align(features, rois, size, self.spatial_scale, sampling_ratio=2, aligned=False)
        return roi_pool(features, rois, size, self.spatial_scale)

    def predict(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(R, C, P, P) pooled features -> cls_score (R, K), bbox_pred (R, 4K), float32 even under autocast
        (the losses and box decoding run in float32)."""
        fc7 = self.box_head(pooled)
        return self.cls_score(fc7).float(), self.bbox_pred(fc7).float()

    def forward(self, features: torch.Tensor, rois: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) features and (R, 5) RoIs -> cls_score (R, K), bbox_pred (R, 4K)."""
        return self.predict(self.pool(features, rois))
