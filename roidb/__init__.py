"""The imdb/roidb layer of py-faster-rcnn: datasets, gt caches, proposals, training roidbs, minibatches, VOC eval.

Modules: ``imdb`` (base class), ``pascal_voc`` (VOC-format data), ``factory`` (``get_imdb`` by name),
``synthetic`` (the embedded shapes demo set), ``safe_pickle`` (restricted unpickling), ``errors``,
``training``, ``minibatch``, ``loader`` and ``voc_eval``.
"""
