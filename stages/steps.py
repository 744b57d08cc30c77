"""Registers the real bodies of the steps (alt_opt: stage1, p1, stage2, stage3, p2, stage4, eval; end2end: e2e,
eval), the data inputs (data:train, data:test) and the built M0 (PIPELINE.WEIGHTS 'pretrain:<recipe>') with the
runner.

Importing `stages` imports this module, so `pipeline.py run` finds every body. Bodies are registered by name
("module:function") and imported only when a step runs, so a rerun with nothing to do never loads the model or
data code. A body's version enters its step's fingerprint: bump it when a change to the body changes what the
step computes.
"""
from __future__ import annotations

from .engine.runner import register_data_input, register_step, register_weights_source

__all__ = ["BODIES", "BODY_VERSION"]

BODIES = {"stage1": "stages.training:stage1", "p1": "stages.proposals:p1",
          "stage2": "stages.training:stage2", "stage3": "stages.training:stage3",
          "p2": "stages.proposals:p2", "stage4": "stages.training:stage4", "eval": "stages.evaluation:evaluate",
          "e2e": "stages.joint:e2e"}
BODY_VERSION = "2"

# p1, p2 3: NMS keeps the higher index among equal scores (py-faster-rcnn's argsort()[::-1]); pickles name
# numpy.core.multiarray. eval 4: the same NMS, and it records the RPN's recall of the test GT by its top 300
# proposals.
VERSIONS = {"p1": "3", "p2": "3", "eval": "4"}

for _step_id, _body in BODIES.items():
    register_step(_step_id, _body, version=VERSIONS.get(_step_id, BODY_VERSION))

register_data_input("data:train", "stages.data:train_data")
register_data_input("data:test", "stages.data:test_data")
register_weights_source("pretrain:", "stages.pretrain:locate", "stages.pretrain:build")
