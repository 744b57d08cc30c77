"""The embedded demo dataset: a deterministic, VOC-format detection set of coloured shapes on cluttered scenes.

``ensure_shapes_dataset(root)`` writes ``<root>/VOC2007/{JPEGImages,Annotations,ImageSets/Main}`` (ids 000001...,
``trainval.txt`` then ``test.txt``) and a ``manifest.json`` holding the generator version, the seed, the split
sizes and the sha256 of every file. A complete set with the same version and seed is reused; anything else is
generated into a temporary folder and renamed into place, so a crash never leaves a half-written set.

The problem is fair, not trivial: six shape classes (:data:`SHAPE_CLASSES`), and the class is the shape, never
the colour or the texture (each object draws both independently of its class). Each image (240..480 px a side)
holds 1..6 objects whose long side runs from 18 px to half the short image side, with aspect ratios 1:2..2:1,
solid/striped/checkered/speckled fills and a contrasting outline, over a noisy, textured background with
clutter that is no class (thin lines, open arcs, zigzags, faint irregular blobs). Objects may be cut by the
border and partly hidden by later objects; each box is the object's visible extent (1-based in the XML).
``difficult=1`` marks the tiny (sqrt(w*h) < 20 px) and the heavily hidden (< 60% of the shape visible).

``ensure_shapes_coco(root)`` adds the COCO-format copy: ``<root>/coco/instances_{trainval,test}.json`` whose
``file_name`` entries point into ``<root>/VOC2007/JPEGImages`` (no pixel is stored twice), converted from the XML by
:func:`roidb.voc_to_coco.voc_to_coco` (difficult objects become crowd annotations), and ``<root>/coco/manifest.json``
keyed by the sha256 of the VOC set's manifest, so a regenerated VOC set regenerates its COCO copy.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import uuid
from pathlib import Path

import cv2
import numpy as np
from lxml import etree

__all__ = ["SHAPE_CLASSES", "COLOURS", "TEXTURES", "GENERATOR_VERSION", "DEFAULT_SEED", "ensure_shapes_dataset",
           "ensure_shapes_coco", "shapes_coco_paths", "render_image", "read_manifest"]

SHAPE_CLASSES = ("ellipse", "rectangle", "triangle", "star", "cross", "ring")
COLOURS = {"red": (40, 40, 215), "green": (50, 175, 40), "blue": (210, 90, 30), "yellow": (40, 215, 230),
           "magenta": (200, 50, 200), "cyan": (215, 210, 40), "orange": (25, 125, 250)}
TEXTURES = ("solid", "stripes", "checker", "speckle")
GENERATOR_VERSION = 1
DEFAULT_SEED = 2015
NUM_TRAINVAL = 500
NUM_TEST = 250
MIN_VISIBLE = 0.35       # placements hiding more than this of any object are redrawn
DIFFICULT_VISIBLE = 0.6  # below this visible fraction an object is difficult
DIFFICULT_SIZE = 20.0    # below this sqrt(w * h) an object is difficult
_SHIFT = 4               # fixed-point bits for sub-pixel polygon vertices
_JPEG_QUALITY = 92


# ---------------------------------------------------------------------- shapes
def _ellipse(n: int = 48) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([0.5 + 0.5 * np.cos(t), 0.5 + 0.5 * np.sin(t)], 1)


def _unit_contours(cls: str, rng: np.random.Generator) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Outer contours and holes of a shape, in the unit square [0, 1]^2 touching all four sides."""
    if cls == "ellipse":
        return [_ellipse()], []
    if cls == "rectangle":
        return [np.array([[0, 0], [1, 0], [1, 1], [0, 1]], float)], []
    if cls == "triangle":
        tri = np.array([[0.5, 0], [1, 1], [0, 1]], float)
        return [tri if rng.random() < 0.5 else np.c_[tri[:, 0], 1 - tri[:, 1]]], []
    if cls == "star":
        inner = rng.uniform(0.38, 0.5)
        t = rng.uniform(0, 2 * np.pi) + np.arange(10) * np.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 1.0, inner)
        pts = np.stack([r * np.cos(t), r * np.sin(t)], 1)
        pts -= pts.min(0)
        return [pts / pts.max(0)], []
    if cls == "cross":
        a = (1 - rng.uniform(0.3, 0.4)) / 2
        b = 1 - a
        return [np.array([[a, 0], [b, 0], [b, a], [1, a], [1, b], [b, b], [b, 1], [a, 1], [a, b], [0, b],
                          [0, a], [a, a]], float)], []
    if cls == "ring":
        hole = rng.uniform(0.5, 0.62)
        return [_ellipse()], [0.5 + (_ellipse() - 0.5) * hole]
    raise ValueError(f"unknown shape class '{cls}'")


def _to_fixed(unit: np.ndarray, x0: int, y0: int, w: int, h: int) -> np.ndarray:
    pts = unit * [w - 1, h - 1] + [x0, y0]
    return np.round(pts * (1 << _SHIFT)).astype(np.int32)


def _shape_mask(canvas_hw: tuple[int, int], outer, holes, x0: int, y0: int, w: int, h: int, thick: int):
    """uint8 mask (1 = shape incl. its outline) of a shape whose box starts at (x0, y0), on a canvas."""
    mask = np.zeros(canvas_hw, np.uint8)
    outer_px = [_to_fixed(c, x0, y0, w, h) for c in outer]
    hole_px = [_to_fixed(c, x0, y0, w, h) for c in holes]
    cv2.fillPoly(mask, outer_px, 1, cv2.LINE_8, _SHIFT)
    if hole_px:
        cv2.fillPoly(mask, hole_px, 0, cv2.LINE_8, _SHIFT)
    cv2.polylines(mask, outer_px + hole_px, True, 1, thick, cv2.LINE_8, _SHIFT)
    return mask, outer_px + hole_px


# ---------------------------------------------------------------------- painting
def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    grey = rng.uniform(70, 190)
    base = (grey + rng.uniform(-25, 25, 3)).astype(np.float32)
    grid = (max(2, h // 40), max(2, w // 40))
    texture = rng.normal(0, 24, (*grid, 1)) + rng.normal(0, 10, (*grid, 3))
    out = cv2.resize(texture.astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    angle, amplitude = rng.uniform(0, 2 * np.pi), rng.uniform(0, 40)
    ramp = (np.float32(amplitude * np.cos(angle) / w) * np.arange(w, dtype=np.float32))[None, :] \
        + (np.float32(amplitude * np.sin(angle) / h) * np.arange(h, dtype=np.float32))[:, None]
    noise = rng.standard_normal((h, w, 3), dtype=np.float32)
    noise *= np.float32(rng.uniform(4, 12))
    out += noise
    out += ramp[..., None]
    out += base
    return np.clip(out, 0, 255, out=out).astype(np.uint8)


def _random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def _clutter(img: np.ndarray, rng: np.random.Generator) -> None:
    """Non-object distractors: thin lines, open arcs, zigzags and faint irregular blobs."""
    h, w = img.shape[:2]
    for _ in range(int(rng.integers(3, 10))):
        kind = rng.integers(4)
        colour = _random_colour(rng)
        if kind == 0:
            p, q = rng.integers(0, [w, h]), rng.integers(0, [w, h])
            cv2.line(img, tuple(int(v) for v in p), tuple(int(v) for v in q), colour, int(rng.integers(1, 3)),
                     cv2.LINE_AA)
        elif kind == 1:
            centre = tuple(int(v) for v in rng.integers(0, [w, h]))
            axes = tuple(int(v) for v in rng.integers(8, max(9, min(w, h) // 3), 2))
            start = float(rng.uniform(0, 360))
            cv2.ellipse(img, centre, axes, float(rng.uniform(0, 180)), start, start + rng.uniform(40, 220),
                        colour, int(rng.integers(1, 3)), cv2.LINE_AA)
        elif kind == 2:
            n = int(rng.integers(3, 7))
            start = rng.integers(0, [w, h])
            pts = start + np.cumsum(rng.integers(-30, 31, (n, 2)), 0)
            cv2.polylines(img, [pts.astype(np.int32)], False, colour, 1, cv2.LINE_AA)
        else:
            n = int(rng.integers(7, 13))
            t = np.sort(rng.uniform(0, 2 * np.pi, n))
            r = rng.uniform(6, max(7, min(w, h) // 6)) * rng.uniform(0.4, 1.0, n)
            centre = rng.integers(0, [w, h])
            pts = (centre + np.stack([r * np.cos(t), r * np.sin(t)], 1)).astype(np.int32)
            layer = img.copy()
            cv2.fillPoly(layer, [pts], colour, cv2.LINE_AA)
            cv2.addWeighted(layer, 0.3, img, 0.7, 0, dst=img)


def _texture(rng: np.random.Generator, texture: str, colour, h: int, w: int) -> np.ndarray:
    c = np.array(colour, np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if texture == "solid":
        out = np.broadcast_to(c, (h, w, 3)).copy()
    elif texture == "stripes":
        theta, period = rng.uniform(0, np.pi), rng.uniform(5, 9)
        on = ((xx * np.cos(theta) + yy * np.sin(theta)) % period) < period / 2
        out = np.where(on[..., None], c, c * 0.55)
    elif texture == "checker":
        period = int(rng.integers(5, 10))
        on = ((xx // period + yy // period) % 2) == 0
        out = np.where(on[..., None], c, c * 0.6 + 40)
    else:
        out = c + rng.normal(0, 30, (h, w, 3)).astype(np.float32)
    return np.clip(out, 0, 255).astype(np.uint8)


def _outline_colour(colour) -> tuple[int, int, int]:
    b, g, r = colour
    return (20, 20, 20) if 0.114 * b + 0.587 * g + 0.299 * r > 100 else (235, 235, 235)


# ---------------------------------------------------------------------- layout
def _propose(rng: np.random.Generator, h: int, w: int) -> tuple[int, int, int, int]:
    long_side = math.exp(rng.uniform(math.log(18), math.log(min(h, w) / 2)))
    aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
    bw, bh = (long_side, long_side / aspect) if aspect >= 1 else (long_side * aspect, long_side)
    bw, bh = max(8, int(round(bw))), max(8, int(round(bh)))
    if rng.random() < 0.75:
        x0, y0 = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
    else:
        x0 = int(rng.integers(-int(0.4 * bw), w - int(0.6 * bw) + 1))
        y0 = int(rng.integers(-int(0.4 * bh), h - int(0.6 * bh) + 1))
    return x0, y0, bw, bh


def _layout(rng: np.random.Generator, h: int, w: int, n: int) -> list[dict]:
    """Place up to ``n`` objects; each keeps >= MIN_VISIBLE of its shape visible under later ones and the border."""
    placed: list[dict] = []
    for _ in range(n):
        cls = SHAPE_CLASSES[int(rng.integers(len(SHAPE_CLASSES)))]
        for _attempt in range(25):
            x0, y0, bw, bh = _propose(rng, h, w)
            outer, holes = _unit_contours(cls, rng)
            thick = 1 if min(bw, bh) < 40 else 2
            full, _ = _shape_mask((bh + 2 * thick + 2, bw + 2 * thick + 2), outer, holes, thick + 1, thick + 1,
                                  bw, bh, thick)
            mask, px = _shape_mask((h, w), outer, holes, x0, y0, bw, bh, thick)
            area = int(full.sum())
            if mask.sum() < MIN_VISIBLE * area:
                continue
            covered = mask.astype(bool)
            if any(((o["visible"] & ~covered).sum() < MIN_VISIBLE * o["area"]) for o in placed):
                continue
            for o in placed:
                o["visible"] &= ~covered
            placed.append({"cls": cls, "box": (x0, y0, bw, bh), "mask": covered, "visible": covered.copy(),
                           "area": area, "contours": px, "thick": thick})
            break
    return placed


def render_image(rng: np.random.Generator) -> tuple[np.ndarray, list[dict]]:
    """One scene: BGR uint8 (H, W, 3) and its objects (name, 0-based inclusive visible box, difficult, ...)."""
    h, w = (int(v) for v in rng.integers(240, 481, 2))
    img = _background(rng, h, w)
    _clutter(img, rng)
    objects = []
    for obj in _layout(rng, h, w, int(rng.integers(1, 7))):
        colour_name = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
        colour = COLOURS[colour_name]
        ys, xs = np.nonzero(obj["mask"])
        y1, y2, x1, x2 = ys.min(), ys.max(), xs.min(), xs.max()
        patch = _texture(rng, texture, colour, y2 - y1 + 1, x2 - x1 + 1)
        region = img[y1:y2 + 1, x1:x2 + 1]
        region[obj["mask"][y1:y2 + 1, x1:x2 + 1]] = patch[obj["mask"][y1:y2 + 1, x1:x2 + 1]]
        cv2.polylines(img, obj["contours"], True, _outline_colour(colour), obj["thick"], cv2.LINE_AA, _SHIFT)
        vy, vx = np.nonzero(obj["visible"])
        bw, bh = obj["box"][2:]
        visible_frac = len(vx) / obj["area"]
        in_image = obj["mask"].sum() / obj["area"]
        objects.append({
            "name": obj["cls"], "box": (int(vx.min()), int(vy.min()), int(vx.max()), int(vy.max())),
            "difficult": int(math.sqrt(bw * bh) < DIFFICULT_SIZE or visible_frac < DIFFICULT_VISIBLE),
            "truncated": int(in_image < 0.999), "colour": colour_name, "texture": texture,
        })
    return img, objects


# ---------------------------------------------------------------------- files
def _annotation_xml(image_id: str, h: int, w: int, objects: list[dict]) -> bytes:
    root = etree.Element("annotation")
    etree.SubElement(root, "folder").text = "VOC2007"
    etree.SubElement(root, "filename").text = f"{image_id}.jpg"
    source = etree.SubElement(root, "source")
    etree.SubElement(source, "database").text = "roidb.synthetic shapes"
    size = etree.SubElement(root, "size")
    for tag, value in (("width", w), ("height", h), ("depth", 3)):
        etree.SubElement(size, tag).text = str(value)
    etree.SubElement(root, "segmented").text = "0"
    for o in objects:
        node = etree.SubElement(root, "object")
        etree.SubElement(node, "name").text = o["name"]
        etree.SubElement(node, "pose").text = "Unspecified"
        etree.SubElement(node, "truncated").text = str(o["truncated"])
        etree.SubElement(node, "difficult").text = str(o["difficult"])
        etree.SubElement(node, "colour").text = o["colour"]
        etree.SubElement(node, "texture").text = o["texture"]
        bb = etree.SubElement(node, "bndbox")
        for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), o["box"]):
            etree.SubElement(bb, tag).text = str(value + 1)
    return etree.tostring(root, pretty_print=True)


def _write_chunk(voc_dir: str, seed: int, numbers: list[int]) -> dict[str, str]:
    """Render images ``numbers`` into ``voc_dir``; {relative path: sha256}."""
    cv2.setNumThreads(1)
    digests = {}
    for number in numbers:
        image_id = f"{number:06d}"
        img, objects = render_image(np.random.default_rng([seed, number]))
        ok, jpeg = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY])
        if not ok:
            raise RuntimeError(f"OpenCV could not encode image {image_id}")
        files = {f"JPEGImages/{image_id}.jpg": jpeg.tobytes(),
                 f"Annotations/{image_id}.xml": _annotation_xml(image_id, *img.shape[:2], objects)}
        for rel, data in files.items():
            Path(voc_dir, rel).write_bytes(data)
            digests[rel] = hashlib.sha256(data).hexdigest()
    return digests


def read_manifest(voc_dir: str | os.PathLike) -> dict | None:
    """The manifest of a generated set, or None if absent or unreadable."""
    try:
        return json.loads(Path(voc_dir, "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def _is_complete(voc_dir: Path, seed: int, num_trainval: int, num_test: int) -> bool:
    manifest = read_manifest(voc_dir)
    if not manifest or (manifest.get("version"), manifest.get("seed"), manifest.get("num_trainval"),
                        manifest.get("num_test")) != (GENERATOR_VERSION, seed, num_trainval, num_test):
        return False
    for rel, digest in manifest.get("files", {}).items():
        try:
            if hashlib.sha256((voc_dir / rel).read_bytes()).hexdigest() != digest:
                return False
        except OSError:
            return False
    return bool(manifest.get("files"))


def _generate(tmp: Path, seed: int, num_trainval: int, num_test: int, n_jobs: int) -> None:
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (tmp / sub).mkdir(parents=True)
    numbers = list(range(1, num_trainval + num_test + 1))
    chunks = [numbers[i::max(1, n_jobs * 4)] for i in range(max(1, n_jobs * 4))]
    if n_jobs > 1:
        from joblib import Parallel, delayed

        results = Parallel(n_jobs=n_jobs)(delayed(_write_chunk)(str(tmp), seed, c) for c in chunks)
    else:
        results = [_write_chunk(str(tmp), seed, c) for c in chunks]
    digests = {k: v for r in results for k, v in r.items()}
    splits = {"trainval": numbers[:num_trainval], "test": numbers[num_trainval:]}
    for split, ids in splits.items():
        data = "".join(f"{n:06d}\n" for n in ids).encode()
        rel = f"ImageSets/Main/{split}.txt"
        (tmp / rel).write_bytes(data)
        digests[rel] = hashlib.sha256(data).hexdigest()
    manifest = {"generator": "roidb.synthetic", "version": GENERATOR_VERSION, "seed": seed,
                "num_trainval": num_trainval, "num_test": num_test, "classes": list(SHAPE_CLASSES),
                "files": dict(sorted(digests.items()))}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))


def ensure_shapes_dataset(root: str | os.PathLike, *, seed: int = DEFAULT_SEED, num_trainval: int = NUM_TRAINVAL,
                          num_test: int = NUM_TEST, n_jobs: int = 2) -> Path:
    """Make sure ``<root>/VOC2007`` holds the complete set for ``seed``; return ``root`` (the devkit path).

    Reuses a complete set (manifest version, seed, sizes and every file's sha256 match); otherwise generates
    one into ``<root>/.VOC2007.tmp-*`` and renames it into place (replacing a stale or broken set).
    """
    root = Path(root)
    final = root / "VOC2007"
    if _is_complete(final, seed, num_trainval, num_test):
        return root
    root.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = root / f".VOC2007.tmp-{tag}"
    try:
        _generate(tmp, seed, num_trainval, num_test, n_jobs)
        if final.exists():
            if _is_complete(final, seed, num_trainval, num_test):
                return root
            old = root / f".VOC2007.old-{tag}"
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError:
            if not _is_complete(final, seed, num_trainval, num_test):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


# ---------------------------------------------------------------------- the COCO-format copy
def shapes_coco_paths(root: str | os.PathLike, split: str) -> tuple[Path, Path]:
    """(annotation JSON, image folder) of the COCO-format copy of split ``split`` under ``root``."""
    root = Path(root)
    return root / "coco" / f"instances_{split}.json", root / "VOC2007" / "JPEGImages"


def _coco_key(voc_dir: Path) -> str | None:
    from roidb.voc_to_coco import CONVERTER_VERSION

    try:
        source = hashlib.sha256((voc_dir / "manifest.json").read_bytes()).hexdigest()
    except OSError:
        return None
    return f"{CONVERTER_VERSION}:{source}"


def _coco_is_complete(coco_dir: Path, key: str) -> bool:
    manifest = read_manifest(coco_dir)
    if not manifest or manifest.get("key") != key or not manifest.get("files"):
        return False
    for rel, digest in manifest["files"].items():
        try:
            if hashlib.sha256((coco_dir / rel).read_bytes()).hexdigest() != digest:
                return False
        except OSError:
            return False
    return True


def ensure_shapes_coco(root: str | os.PathLike) -> Path:
    """Make sure ``<root>/coco`` holds the COCO-format copy of the (complete) VOC set in ``<root>/VOC2007``.

    Reuses a copy whose manifest key (converter version + sha256 of the VOC manifest) and file digests match;
    otherwise converts every split of the VOC manifest and writes each file atomically, the manifest last.
    Returns the ``coco`` folder.
    """
    from roidb.imdb import atomic_write_bytes
    from roidb.voc_to_coco import voc_to_coco

    root = Path(root)
    voc_dir, coco_dir = root / "VOC2007", root / "coco"
    key = _coco_key(voc_dir)
    source = read_manifest(voc_dir)
    if key is None or source is None:
        raise FileNotFoundError(f"{voc_dir}: no shapes set to copy (generate it with ensure_shapes_dataset)")
    if _coco_is_complete(coco_dir, key):
        return coco_dir
    digests = {}
    for split in ("trainval", "test"):
        doc = voc_to_coco(voc_dir, split, source.get("classes", SHAPE_CLASSES))
        data = json.dumps(doc, separators=(",", ":")).encode()
        atomic_write_bytes(shapes_coco_paths(root, split)[0], data)
        digests[f"instances_{split}.json"] = hashlib.sha256(data).hexdigest()
    manifest = {"generator": "roidb.synthetic coco copy", "key": key, "files": digests}
    atomic_write_bytes(coco_dir / "manifest.json", json.dumps(manifest, indent=1).encode())
    return coco_dir
