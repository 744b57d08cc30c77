"""The Faster R-CNN model: anchors, backbones (vgg16, zf, tiny), RPN, RoI head, losses, freezing, checkpoints.

Box math is re-exported from ``kernels.boxes`` (``[x1, y1, x2, y2]`` inclusive pixels, width = x2 - x1 + 1).
"""
from kernels.boxes import bbox_overlaps, bbox_transform, bbox_transform_inv, clip_boxes
from nets.anchors import generate_anchors, shifted_anchors
from nets.backbones import Backbone, WeightsError, build_backbone, load_backbone_weights
from nets.checkpoint import CheckpointError, load_checkpoint, load_weights_into, read_checkpoint, save_checkpoint
from nets.detector import FasterRCNN, detect_blob, im_detect, im_detect_blob, postprocess_detections, prep_image
from nets.freezing import STAGE_KINDS, STAGES, param_groups, reinit_predictors, reinit_rpn_head, set_trainable
from nets.losses import fast_rcnn_loss, rpn_loss, smooth_l1_loss
from nets.proposal_target import proposal_target_layer
from nets.roi_head import RoIHead
from nets.rpn import RPNHead, anchor_target_layer, proposal_layer

__all__ = [
    "bbox_overlaps", "bbox_transform", "bbox_transform_inv", "clip_boxes", "generate_anchors", "shifted_anchors",
    "Backbone", "WeightsError", "build_backbone", "load_backbone_weights", "CheckpointError", "load_checkpoint",
    "load_weights_into", "read_checkpoint", "save_checkpoint", "FasterRCNN", "detect_blob", "im_detect", "im_detect_blob",
    "postprocess_detections", "prep_image", "STAGE_KINDS", "STAGES", "param_groups", "reinit_predictors",
    "reinit_rpn_head", "set_trainable", "fast_rcnn_loss", "rpn_loss", "smooth_l1_loss", "proposal_target_layer",
    "RoIHead", "RPNHead", "anchor_target_layer", "proposal_layer",
]
