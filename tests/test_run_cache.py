"""The engine's promise on the real small pipeline: "done" means current (the data is an input), and no finished
work is lost (the run cache keeps every finished version; a snapshot of another run is never resumed).

Each test starts from the baseline run of tests/faults.py (every step done) and puts it back afterwards.
"""
from __future__ import annotations

import shutil

import cv2

from faults import STEPS, Workspace, cli, digest_tree, manifest, sha256


def state_words(capsys, ws: Workspace, **overrides: str) -> dict[str, str]:
    """step -> its state column (without time and metrics)."""
    code, out, err = cli(capsys, ws, "status", **overrides)
    assert code == 0, err
    lines = out.splitlines()
    start, end = lines[1].index("state"), lines[1].index("time")
    return {line.split()[0]: line[start:end].strip() for line in lines[2:] if line.split() and line.split()[0] in STEPS}


def ran(out: str) -> list[str]:
    return [line.split(":")[0] for line in out.splitlines() if line.endswith(")") and ": running (" in line]


def test_an_edited_annotation_makes_exactly_the_training_steps_stale_and_says_why(capsys, ws):
    xml = ws.voc / "Annotations" / "000001.xml"
    text = xml.read_text()
    first = text.index("<xmin>") + len("<xmin>")
    xml.write_text(text[:first] + "1" + text[first:])  # a box moved
    words = state_words(capsys, ws)
    assert words["stage1"] == "stale: training data changed (1 annotation)"
    assert all(words[s].startswith("stale: waiting for") for s in ("p1", "stage2", "stage3", "p2", "stage4"))
    assert words["eval"] == "stale: waiting for stage4"


def test_an_image_of_the_test_set_makes_eval_alone_stale(capsys, ws):
    test_id = (ws.voc / "ImageSets" / "Main" / "test.txt").read_text().split()[0]
    jpeg = ws.voc / "JPEGImages" / f"{test_id}.jpg"
    cv2.imwrite(str(jpeg), 255 - cv2.imread(str(jpeg)))  # inverted pixels, same size
    words = state_words(capsys, ws)
    assert [s for s in STEPS if words[s] != "done"] == ["eval"]
    assert words["eval"] == "stale: test data changed (1 image)"


def test_a_dropped_id_and_a_swapped_class_are_named(capsys, ws):
    image_set = ws.voc / "ImageSets" / "Main" / "trainval.txt"
    ids = image_set.read_text().split()
    image_set.write_text("\n".join(ids[:-1]) + "\n")
    xml = ws.voc / "Annotations" / f"{ids[0]}.xml"
    text = xml.read_text()
    name = text[text.index("<name>") + 6:text.index("</name>")]
    other = "ring" if name != "ring" else "cross"
    xml.write_text(text.replace(f"<name>{name}</name>", f"<name>{other}</name>", 1))
    assert state_words(capsys, ws)["stage1"] == "stale: training data changed (1 annotation, image set)"


def test_the_same_data_in_another_folder_reruns_nothing(capsys, ws, tmp_path):
    moved = tmp_path / "elsewhere"
    shutil.copytree(ws.data_root, moved, copy_function=shutil.copy)  # new inodes and mtimes, same bytes
    voc = moved / "shapes" / "VOC2007"
    overrides = {"PIPELINE.DATA_ROOT": str(moved), "PIPELINE.TRAIN_IMDB": f"vocfmt:{voc}:trainval",
                 "PIPELINE.TEST_IMDB": f"vocfmt:{voc}:test"}
    assert set(state_words(capsys, ws, **overrides).values()) == {"done"}
    before = digest_tree(ws.exp)
    code, out, err = cli(capsys, ws, "run", **overrides)
    assert code == 0 and ran(out) == [], out + err
    after = digest_tree(ws.exp)
    assert {k: v for k, v in after.items() if k != "config.yml"} == {k: v for k, v in before.items()
                                                                     if k != "config.yml"}


def test_a_killed_rerun_with_a_changed_config_loses_nothing(capsys, ws):
    """The finished stage2 goes to the run cache when a re-run with another lr starts; the re-run is killed
    mid-manifest; back on the original config the finished version is restored, not retrained."""
    before = {s: manifest(ws.exp, s)["outputs"] for s in STEPS}
    m2 = sha256(ws.exp / "stage2" / "model.pt")
    proc = ws.run("run", fault="kill:stage2/manifest.json:2", **{"PIPELINE.STAGE2_LR": "0.02"})
    assert proc.returncode == -9, proc.stderr
    words = state_words(capsys, ws)
    assert words["stage2"].startswith("done (in the run cache") and words["stage3"] == "done"
    code, out, err = cli(capsys, ws, "run")
    assert code == 0, err
    assert "stage2: done (restored from the run cache)" in out and ran(out) == []
    assert {s: manifest(ws.exp, s)["outputs"] for s in STEPS} == before
    assert sha256(ws.exp / "stage2" / "model.pt") == m2


def test_a_nan_in_a_rerun_after_a_snapshot_loses_nothing_and_the_rerun_resumes_later(capsys, ws):
    before = {s: manifest(ws.exp, s)["outputs"] for s in STEPS}
    changed = {"PIPELINE.STAGE4_LR": "0.02"}
    code, _, err = cli(capsys, ws, "run", fault="nan:stage4:3", **changed)
    assert code == 2 and "non-finite loss at iteration 3" in err
    assert (ws.exp / "stage4" / "snapshots" / "iter_00000002.pt").is_file()
    code, out, err = cli(capsys, ws, "run")
    assert code == 0 and "stage4: done (restored from the run cache)" in out and ran(out) == [], out + err
    assert {s: manifest(ws.exp, s)["outputs"] for s in STEPS} == before
    code, out, err = cli(capsys, ws, "run", "--until", "stage4", **changed)  # the partial run waits in the cache
    assert code == 0, err
    assert "resuming its partial run from the run cache" in out and "resuming from snapshot iteration 2/4" in out


def test_a_snapshot_of_another_run_is_never_resumed(capsys, ws):
    code, _, err = cli(capsys, ws, "run", fault="nan:stage4:3", **{"PIPELINE.STAGE4_LR": "0.02"})
    assert code == 2, err
    foreign = (ws.exp / "stage4" / "snapshots" / "iter_00000002.pt").read_bytes()
    assert cli(capsys, ws, "clean", "stage4")[0] == 0  # its folder and its cached versions
    code, _, err = cli(capsys, ws, "run", "--until", "stage4", fault="nan:stage4:1")
    assert code == 2 and not (ws.exp / "stage4" / "snapshots").exists()  # a partial stage4 of this config
    (ws.exp / "stage4" / "snapshots").mkdir()
    (ws.exp / "stage4" / "snapshots" / "iter_00000002.pt").write_bytes(foreign)
    code, out, err = cli(capsys, ws, "run", "--until", "stage4")
    assert code == 0, err
    assert "ignoring snapshot iter_00000002.pt: it belongs to another run" in out
    assert "resuming from snapshot" not in out
    assert manifest(ws.exp, "stage4")["outputs"] == ws.baseline["stage4"]


def test_the_cache_is_bounded_and_clean_cache_empties_it(capsys, ws):
    for lr in ("0.02", "0.03", "0.04"):
        code, _, err = cli(capsys, ws, "run", "--only", "stage4", **{"PIPELINE.STAGE4_LR": lr})
        assert code == 0, err
    versions = sorted(p.name for p in (ws.exp / ".cache" / "stage4").iterdir())
    assert len(versions) == 2  # PIPELINE.RUN_CACHE_VERSIONS: lr 0.03's and 0.02's; the baseline's went first
    code, out, _ = cli(capsys, ws, "status")
    assert "run cache: 2 versions" in out
    code, out, _ = cli(capsys, ws, "clean", "--cache")
    assert code == 0 and out.startswith("removed 2 cached versions")
    assert not any((ws.exp / ".cache").rglob("manifest.json"))


def test_how_the_test_imdb_is_scored_is_part_of_its_content(capsys, ws):
    """vocfmt: data is scored by the area under the PR curve, voc_2007_* by VOC07's 11 points: the metric the imdb's
    name implies enters the test data's digest (not the training data's), so a name that changes it re-runs eval."""
    from stages.data import imdb_content
    from stages.engine.config import load_config

    base = [("PIPELINE.DATA_ROOT", str(ws.data_root)),
            ("PIPELINE.CLASSES", "[ellipse, rectangle, triangle, star, cross, ring]")]
    vocfmt = imdb_content(load_config(overrides=base + [("PIPELINE.TEST_IMDB", f"vocfmt:{ws.voc}:test")]),
                          "PIPELINE.TEST_IMDB", evaluated=True)
    plain = imdb_content(load_config(overrides=base + [("PIPELINE.TEST_IMDB", f"vocfmt:{ws.voc}:test")]),
                         "PIPELINE.TEST_IMDB")
    assert vocfmt.digest != plain.digest
    assert vocfmt.listing["options"]["evaluation"] == [{"imdb": "PascalVoc", "use_07_metric": False}]
