"""The built M0 (PIPELINE.WEIGHTS 'pretrain:<recipe>'): the crops it learns from, the weights file it writes, its
cache under <DATA_ROOT>/pretrained, and how the runner builds it before any fingerprint."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nets.backbones import PYFRCNN_PIXEL_MEANS, build_backbone, init_backbone, load_backbone_weights
from nets.pretrain import CropClassifier
from roidb.crops import CropLoader, render_scenes
from roidb.synthetic import DEFAULT_SEED, SHAPE_CLASSES
from stages import pretrain
from stages.engine.config import load_config
from stages.engine.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
TINY_BUDGET = [("PIPELINE.PRETRAIN_ITERS", "3"), ("PIPELINE.PRETRAIN_SCENES", "10")]


def _config(tmp_path, *sets):
    return load_config(ROOT / "configs" / "default.yml",
                       [("PIPELINE.DATA_ROOT", str(tmp_path / "data")), ("PIPELINE.OUTPUT_ROOT", str(tmp_path / "out")),
                        ("PIPELINE.WEIGHTS", "pretrain:tiny_shapes"), *TINY_BUDGET, *sets])


@pytest.fixture(scope="module")
def scenes():
    return render_scenes(1507, 12, n_jobs=1)


def _loader(scenes, seed=0, **kw):
    args = dict(crop_size=32, batch_size=16, fg_fraction=0.5, pixel_means=PYFRCNN_PIXEL_MEANS, seed=seed)
    return CropLoader(scenes, **{**args, **kw})


def test_recipes_never_render_the_demo_set():
    for recipe in pretrain.RECIPES.values():
        assert recipe.scene_seed != DEFAULT_SEED


def test_scenes_are_the_seeded_renders_in_order(scenes):
    from roidb.synthetic import render_image
    img, objects = render_image(np.random.default_rng([1507, 3]))
    assert np.array_equal(scenes[2][0], img)
    assert [o["box"] for o in scenes[2][1]] == [o["box"] for o in objects]
    parallel = render_scenes(1507, 12, n_jobs=2)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(scenes, parallel))


def test_object_windows_hold_their_object_and_label(scenes):
    loader = _loader(scenes)
    for _ in range(200):
        i, window, label = loader._object_window()
        boxes = [(o["box"], o["name"]) for o in scenes[i][1] if not o["difficult"]]
        cx, cy = (window[0] + window[2]) / 2, (window[1] + window[3]) / 2
        side = window[2] - window[0]
        assert abs((window[3] - window[1]) - side) < 1e-9
        # the centre lies inside a non-difficult box of the labelled class, jittered at most 15% of its size
        assert any(name == SHAPE_CLASSES[label - 1]
                   and b[0] - 0.15 * (b[2] - b[0] + 1) <= cx <= b[2] + 0.15 * (b[2] - b[0] + 1)
                   and b[1] - 0.15 * (b[3] - b[1] + 1) <= cy <= b[3] + 0.15 * (b[3] - b[1] + 1)
                   and 1.1 * max(b[2] - b[0] + 1, b[3] - b[1] + 1) - 1e-6 <= side
                   <= 2.2 * max(b[2] - b[0] + 1, b[3] - b[1] + 1) + 1e-6
                   for b, name in boxes)


def test_background_windows_cover_little_of_any_object(scenes):
    loader = _loader(scenes)
    for _ in range(200):
        i, (x1, y1, x2, y2) = loader._background_window()
        for o in scenes[i][1]:
            bx1, by1, bx2, by2 = o["box"]
            # naive: count the box's pixel centres inside the window
            xs, ys = np.arange(bx1, bx2 + 1) + 0.5, np.arange(by1, by2 + 1) + 0.5
            inside = np.outer((ys >= y1) & (ys < y2), (xs >= x1) & (xs < x2)).mean()
            assert inside <= 0.2 + 0.05


def test_batches_are_deterministic_and_resume(scenes):
    a, b = _loader(scenes, seed=5), _loader(scenes, seed=5)
    first_a, first_b = next(a), next(b)
    assert np.array_equal(first_a[0], first_b[0]) and np.array_equal(first_a[1], first_b[1])
    assert first_a[0].shape == (16, 3, 32, 32) and first_a[0].dtype == np.float32
    assert list(first_a[1][:8] > 0) == [True] * 8 and not first_a[1][8:].any()
    state = a.state_dict()
    expected = next(a)
    c = _loader(scenes, seed=99)
    c.load_state_dict(state)
    got = next(c)
    assert np.array_equal(expected[0], got[0]) and np.array_equal(expected[1], got[1])


def test_crop_is_the_resized_window(scenes):
    """A window of exactly crop_size pixels at integer offsets inside the image is the image's pixels, less the
    means (mirroring aside)."""
    from roidb.crops import _crop
    img = scenes[0][0]
    crop = _crop(img, np.array([10.0, 20.0, 42.0, 52.0]), 32, (0.0, 0.0, 0.0))
    assert np.array_equal(crop, img[20:52, 10:42].astype(np.float32))


def test_exported_weights_load_as_a_caffe_file(tmp_path):
    generator = torch.Generator().manual_seed(0)
    backbone = build_backbone("tiny")
    init_backbone(backbone, generator)
    model = CropClassifier(backbone, 7, generator)
    logits = model(torch.zeros(2, 3, 64, 64))
    assert logits.shape == (2, 7)
    path = tmp_path / "m0.pt"
    torch.save(model.export_weights(), path)
    fresh = build_backbone("tiny")
    assert load_backbone_weights(fresh, path) == "caffe"
    for name in fresh.conv_names:
        assert torch.equal(getattr(fresh.body, name).weight, getattr(backbone.body, name).weight)
    assert torch.equal(fresh.box_head.fc7.bias, backbone.box_head.fc7.bias)


def test_recipe_settings_and_bad_values(tmp_path):
    name, recipe = pretrain.recipe_of(_config(tmp_path))
    assert (name, recipe.iters, recipe.stepsize, recipe.num_scenes) == ("tiny_shapes", 3, 2, 10)
    assert pretrain.recipe_of(_config(tmp_path, ("PIPELINE.WEIGHTS", ""))) is None
    with pytest.raises(ConfigError, match="PIPELINE.WEIGHTS: unknown pretraining recipe 'imagenet'"):
        pretrain.recipe_of(_config(tmp_path, ("PIPELINE.WEIGHTS", "pretrain:imagenet")))
    with pytest.raises(ConfigError, match="pretrains tiny or tiny_s8, PIPELINE.NET is vgg16"):
        pretrain.recipe_of(_config(tmp_path, ("PIPELINE.NET", "vgg16")))
    with pytest.raises(ConfigError, match="PIPELINE.PRETRAIN_SCENES"):
        pretrain.recipe_of(_config(tmp_path, ("PIPELINE.PRETRAIN_SCENES", "5")))
    other = pretrain.recipe_of(_config(tmp_path, ("PIPELINE.PRETRAIN_ITERS", "4")))[1]
    assert pretrain.recipe_key(other) != pretrain.recipe_key(recipe)


def test_build_once_reuse_and_rebuild_identically(tmp_path):
    config = _config(tmp_path)
    assert pretrain.locate(config) is None
    messages = []
    path, manifest = pretrain.build(config, echo=messages.append)
    assert path.parent == tmp_path / "data" / "pretrained" and path.is_file()
    assert any("pretrained in" in m for m in messages)
    assert pretrain.locate(config) == (path, manifest["sha256"])
    assert set(manifest["held_out_accuracy"]) == {"all", "objects", "background"}
    assert not list(path.parent.glob(".work-*"))  # snapshots and the work folder are gone
    assert load_backbone_weights(build_backbone("tiny"), path) == "caffe"
    stamp = path.stat().st_mtime_ns
    again = []
    assert pretrain.build(config, echo=again.append)[0] == path and again == [] and path.stat().st_mtime_ns == stamp
    # a damaged file is not the built M0: rebuilt, bit for bit the same
    path.write_bytes(path.read_bytes()[:-10])
    assert pretrain.locate(config) is None
    assert pretrain.build(config, echo=lambda m: None)[1]["sha256"] == manifest["sha256"]


def _pipeline(tmp_path, *args):
    sets = [x for key, value in TINY_BUDGET for x in ("--set", key, value)]
    return subprocess.run([sys.executable, str(ROOT / "pipeline.py"), *args,
                           "--config", str(ROOT / "tests" / "data" / "tiny_pipeline.yml"),
                           "--set", "PIPELINE.DATA_ROOT", str(tmp_path / "data"),
                           "--set", "PIPELINE.OUTPUT_ROOT", str(tmp_path / "out"),
                           "--set", "PIPELINE.TRAIN_IMDB", "shapes_trainval", "--set", "PIPELINE.TEST_IMDB",
                           "shapes_test", "--set", "PIPELINE.CLASSES", "[]", "--set", "PIPELINE.WEIGHTS", "pretrain:tiny_shapes",
                           *sets],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)


def test_run_builds_m0_first_and_its_sha256_is_the_m0_input(tmp_path):
    before = _pipeline(tmp_path, "status")
    assert before.returncode == 0, before.stderr
    assert "stage1" in before.stdout and "done" not in before.stdout
    ran = _pipeline(tmp_path, "run", "--until", "stage1")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert ran.stdout.index("M0: pretrained in") < ran.stdout.index("stage1: running")
    built = list((tmp_path / "data" / "pretrained").glob("tiny_shapes-*.json"))
    assert len(built) == 1
    sha = json.loads(built[0].read_text())["sha256"]
    stage1 = json.loads((tmp_path / "out" / "tiny_e2e" / "stage1" / "manifest.json").read_text())
    assert stage1["inputs"]["M0"] == sha
    status = _pipeline(tmp_path, "status")
    assert "stage1  done" in status.stdout
    shown = _pipeline(tmp_path, "pretrain")
    assert shown.returncode == 0 and "pretrain:tiny_shapes: " in shown.stdout and sha in shown.stdout
    assert "pretraining" not in shown.stdout  # found, not rebuilt


def test_a_killed_pretraining_resumes_to_the_same_file(tmp_path):
    """Killed (SIGKILL) while writing its third snapshot, the next `pretrain` resumes from the second and writes
    the same bytes as a build that was never interrupted."""
    import os
    import hashlib

    def pretrain_cmd(root, env=None):
        # output to a file, not a pipe: a helper process outliving the killed one must not hold the test up
        log = tmp_path / f"{root.name}-{len(list(tmp_path.glob('*.log')))}.log"
        with open(log, "w") as out:
            code = subprocess.run([sys.executable, str(ROOT / "pipeline.py"), "pretrain",
                                   "--set", "PIPELINE.DATA_ROOT", str(root), "--set", "PIPELINE.PRETRAIN_ITERS", "6",
                                   "--set", "PIPELINE.PRETRAIN_SCENES", "10"],
                                  stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, timeout=600,
                                  env=env).returncode
        return subprocess.CompletedProcess([], code, log.read_text(), "")

    killed = pretrain_cmd(tmp_path / "a", {**os.environ, "FRCNN_FAULT": "kill:snapshots/iter_*.pt:3"})
    assert killed.returncode == -9, killed.stdout + killed.stderr
    assert not list((tmp_path / "a" / "pretrained").glob("tiny_shapes-*.pt"))
    resumed = pretrain_cmd(tmp_path / "a")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming from snapshot iteration 2/6" in resumed.stdout
    clean = pretrain_cmd(tmp_path / "b")
    assert clean.returncode == 0 and "resuming" not in clean.stdout

    def built(root):
        (path,) = (root / "pretrained").glob("tiny_shapes-*.pt")
        return hashlib.sha256(path.read_bytes()).hexdigest()
    assert built(tmp_path / "a") == built(tmp_path / "b")
