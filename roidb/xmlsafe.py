"""The one XML parser of the project: every annotation read (training's gt roidb, voc_eval's parse_rec, the
VOC-to-COCO converter) goes through `parse_xml` / `read_xml`, so one document parses the same way everywhere.

lxml is told not to resolve entities, load DTDs or touch the network, and keeps its huge-tree limits; on top of that a
document that declares an entity (`<!ENTITY ...>`, external or not) or refers to one is refused with a message
saying so, rather than silently reading as "missing <name>" (an unresolved entity) in one place and otherwise in
another. Files over MAX_XML_BYTES and anything that is not a regular file are refused before reading.
"""
from __future__ import annotations

import os
import re

from lxml import etree

from roidb.errors import DataError
from roidb.guard import regular_file

__all__ = ["parse_xml", "read_xml", "MAX_XML_BYTES"]

MAX_XML_BYTES = 4 << 20  # a VOC annotation is a few KB
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False, load_dtd=False,
                          dtd_validation=False, attribute_defaults=False)
_ENTITY_DECL = re.compile(rb"<!ENTITY\s+(%\s*)?([^\s>]{0,60})")


def parse_xml(data: bytes, path: str | os.PathLike) -> etree._Element:
    """The root element of the XML document `data` (from `path`, for messages), or DataError naming the file."""
    if len(data) > MAX_XML_BYTES:
        raise DataError(path, f"XML file of {len(data)} bytes is over the {MAX_XML_BYTES}-byte limit")
    declared = _ENTITY_DECL.search(data)
    if declared:
        name = declared.group(2).decode("utf-8", "replace")
        raise DataError(path, f"XML declares the entity '{name}' (<!ENTITY ...>): entities, external or not, are "
                              "refused and never resolved")
    try:
        root = etree.fromstring(data, _PARSER)
    except etree.XMLSyntaxError as exc:
        raise DataError(path, f"malformed XML ({exc})") from None
    for node in root.iter(etree.Entity):
        raise DataError(path, f"XML refers to the entity {node.text} (line {node.sourceline}): entities are refused "
                              "and never resolved")
    return root


def read_xml(path: str | os.PathLike, what: str = "annotation file") -> etree._Element:
    """parse_xml of the regular file at `path` (a FIFO, device or directory is named as such, not read)."""
    info = regular_file(path, what)
    if info.st_size > MAX_XML_BYTES:
        raise DataError(path, f"XML file of {info.st_size} bytes is over the {MAX_XML_BYTES}-byte limit")
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_XML_BYTES + 1)
    except OSError as exc:
        raise DataError(path, f"cannot read {what} ({exc.strerror or exc})") from None
    return parse_xml(data, path)
