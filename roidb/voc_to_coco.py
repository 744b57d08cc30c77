"""Convert a VOC-format split into a COCO instances document (the COCO-format copy of the shapes set uses it).

Each VOC object becomes one annotation with the same pixels: the XML's 1-based ``xmin..xmax`` is the 0-based
inclusive ``x1 = xmin - 1 .. x2 = xmax - 1`` of the VOC roidb, written as COCO's ``[x1, y1, x2 - x1 + 1,
y2 - y1 + 1]``, which :func:`roidb.coco.coco_box_to_xyxy` turns back into exactly ``[x1, y1, x2, y2]``. ``area``
is ``w * h`` (VOC's ``seg_areas``). A ``difficult`` object becomes ``iscrowd: 1``, COCO's way of saying "neither
foreground nor background, and not counted by the evaluation". Category ids are 1..K in class order; image ids are
the VOC ids as integers when every id is a number, else 1..N in image-set order (``file_name`` keeps the VOC id).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence


from roidb.errors import DataError
from roidb.imdb import read_image_size
from roidb.pascal_voc import normalize_classes, parse_voc_annotation
from roidb.xmlsafe import parse_xml

__all__ = ["voc_to_coco", "CONVERTER_VERSION"]

CONVERTER_VERSION = 1


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def _difficult_flags(data: bytes, path: str) -> list[bool]:
    root = parse_xml(data, path)
    flags = []
    for obj in root.findall("object"):
        node = obj.find("difficult")
        flags.append(node is not None and (node.text or "").strip() == "1")
    return flags


def voc_to_coco(data_path: str | os.PathLike, split: str, classes: Sequence[str]) -> dict:
    """The COCO instances dict of ``<data_path>/ImageSets/Main/<split>.txt`` (``file_name`` ``<id>.jpg``).

    Args:
        data_path: the VOC folder (holding JPEGImages, Annotations, ImageSets).
        split: the image set.
        classes: the class names (without ``__background__``), which become categories 1..K.
    Raises:
        DataError: what the VOC imdb would raise on the same files (malformed XML, unknown class, ...).
    """
    data_path = Path(data_path)
    names = normalize_classes(classes)
    class_to_ind = {c: i for i, c in enumerate(names)}
    set_file = data_path / "ImageSets" / "Main" / f"{split}.txt"
    try:
        ids = [line.strip() for line in set_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError as exc:
        raise DataError(set_file, f"cannot read image set file ({exc.strerror or exc})") from None
    numeric = all(i.isdigit() for i in ids) and len({int(i) for i in ids}) == len(ids)
    images, annotations = [], []
    for n, voc_id in enumerate(ids):
        xml_path = data_path / "Annotations" / f"{voc_id}.xml"
        try:
            data = xml_path.read_bytes()
        except OSError as exc:
            raise DataError(xml_path, f"cannot read annotation file ({exc.strerror or exc})") from None
        header = read_image_size(data_path / "JPEGImages" / f"{voc_id}.jpg")
        boxes, gt_classes, size, _ = parse_voc_annotation(data, str(xml_path), class_to_ind, True, header)
        image_id = int(voc_id) if numeric else n + 1
        images.append({"id": image_id, "file_name": f"{voc_id}.jpg", "width": int(size[1]),
                       "height": int(size[0])})
        for box, cls, difficult in zip(boxes.tolist(), gt_classes.tolist(), _difficult_flags(data, str(xml_path))):
            x1, y1, x2, y2 = box
            w, h = x2 - x1 + 1.0, y2 - y1 + 1.0
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(cls),
                                "bbox": [_number(x1), _number(y1), _number(w), _number(h)], "area": _number(w * h),
                                "iscrowd": int(difficult)})
    categories = [{"id": k, "name": name, "supercategory": "object"} for k, name in enumerate(names) if k > 0]
    return {"info": {"description": f"COCO-format copy of the VOC split '{split}'",
                     "converter": "roidb.voc_to_coco", "version": CONVERTER_VERSION},
            "images": images, "annotations": annotations, "categories": categories}
