"""The imdb/roidb layer of py-faster-rcnn: datasets, gt caches, proposals, training roidbs, minibatches, VOC and
COCO eval.

Modules: ``imdb`` (base class), ``pascal_voc`` (VOC-format data), ``coco`` (COCO-format data), ``factory``
(``get_imdb`` by name), ``synthetic`` (the embedded shapes demo set and its COCO copy), ``voc_to_coco``,
``safe_pickle`` (restricted unpickling), ``errors``, ``training``, ``minibatch``, ``loader``, ``voc_eval`` and
``coco_eval`` (pycocotools' COCOeval).
"""
