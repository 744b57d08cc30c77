"""The step graph: inputs, fingerprints (TEST.NMS -> eval only; STAGE2_ITERS -> stage2 and after), selection."""
from __future__ import annotations

import pytest

from stages.engine.config import load_config
from stages.engine.errors import StepSelectionError
from stages.engine.graph import (M0, NON_RESULT_KEYS, STEP_ORDER, STEPS, TEST_DATA, TRAIN_DATA, downstream_steps,
                                 fingerprint, get_step, graph_for, keys_read, select_steps, undeclared_reads,
                                 upstream_steps)


def test_step_table():
    assert STEP_ORDER == ("stage1", "p1", "stage2", "stage3", "p2", "stage4", "eval")
    assert {s: STEPS[s].inputs for s in STEP_ORDER} == {
        "stage1": (M0, TRAIN_DATA), "p1": ("stage1", TRAIN_DATA), "stage2": ("p1", M0, TRAIN_DATA),
        "stage3": ("stage2", TRAIN_DATA), "p2": ("stage3", TRAIN_DATA), "stage4": ("stage3", "p2", TRAIN_DATA),
        "eval": ("stage4", TEST_DATA)}
    assert upstream_steps("stage4") == ["stage1", "p1", "stage2", "stage3", "p2"]
    assert downstream_steps("stage3") == ["p2", "stage4", "eval"]
    assert [STEPS[s].stage for s in ("stage1", "stage2", "stage3", "stage4")] == [1, 2, 3, 4]


def test_every_read_key_exists():
    cfg = load_config()
    for step in STEPS.values():
        assert keys_read(step, cfg)


def simulate(config, outputs_of):
    """Fingerprints of all steps, feeding each step's fake output digest (a function of its fingerprint) on."""
    prints, digests = {}, {M0: "m0", TRAIN_DATA: "train-content", TEST_DATA: "test-content"}
    for step in STEP_ORDER:
        prints[step] = fingerprint(step, config, {i: digests[i] for i in STEPS[step].inputs})
        digests[step] = outputs_of(step, prints[step])
    return prints


def deterministic_outputs(step, fp):
    return "out-" + fp


def changed_steps(overrides):
    before = simulate(load_config(), deterministic_outputs)
    after = simulate(load_config(overrides=overrides), deterministic_outputs)
    return [s for s in STEP_ORDER if before[s] != after[s]]


def test_nothing_changed_nothing_reruns():
    assert changed_steps([]) == []
    assert changed_steps([("PIPELINE.DEVICE", "'cpu'"), ("PIPELINE.ISOLATE_STEPS", "True"),
                          ("PIPELINE.STAGE2_SNAPSHOT_ITERS", "7"), ("PIPELINE.WORKERS", "2")]) == []


def test_test_nms_reruns_eval_only():
    assert changed_steps([("TEST.NMS", "0.4")]) == ["eval"]


def test_stage2_iters_reruns_stage2_and_after():
    assert changed_steps([("PIPELINE.STAGE2_ITERS", "123")]) == ["stage2", "stage3", "p2", "stage4", "eval"]


def test_rpn_settings_and_proposal_settings():
    assert changed_steps([("TRAIN.RPN_BATCHSIZE", "128")]) == list(STEP_ORDER)
    assert changed_steps([("TEST.RPN_NMS_THRESH", "0.6")]) == ["p1", "stage2", "stage3", "p2", "stage4", "eval"]
    assert changed_steps([("TRAIN.FG_THRESH", "0.6")]) == ["stage2", "stage3", "p2", "stage4", "eval"]


def test_byte_identical_upstream_outputs_stop_the_cascade():
    base = load_config()
    forced = simulate(base, lambda s, fp: "same bytes" if s == "stage2" else "out-" + fp)
    again = simulate(base, lambda s, fp: "same bytes" if s == "stage2" else "out-" + fp)
    assert forced == again
    changed = simulate(load_config(overrides=[("PIPELINE.STAGE2_LR", "0.002")]),
                       lambda s, fp: "same bytes" if s == "stage2" else "out-" + fp)
    assert [s for s in STEP_ORDER if forced[s] != changed[s]] == ["stage2"]


def test_fingerprint_needs_every_input_digest():
    with pytest.raises(KeyError, match="no digest for input"):
        fingerprint("stage4", load_config(), {"stage3": "x"})


def test_extra_and_version_enter_the_fingerprint():
    cfg = load_config()
    ins = {"stage4": "d", TEST_DATA: "t"}
    assert fingerprint("eval", cfg, ins) != fingerprint("eval", cfg, ins, extra={"v": 2})
    assert fingerprint("eval", cfg, ins) != fingerprint("eval", cfg, {**ins, "stage4": "e"})


def test_the_data_is_an_input_and_its_path_is_not():
    """A changed content digest re-fingerprints exactly the steps that read that imdb; the imdb's name, DATA_ROOT
    and the folder it lives in are stood for by the digest, so moving the data changes nothing."""
    def prints(train, test, overrides=()):
        config, out = load_config(overrides=list(overrides)), {}
        digests = {M0: "m0", TRAIN_DATA: train, TEST_DATA: test}
        for step in STEP_ORDER:
            out[step] = fingerprint(step, config, {i: digests[i] for i in STEPS[step].inputs})
            digests[step] = "out-" + out[step]
        return out

    base = prints("a", "b")
    assert [s for s in STEP_ORDER if prints("a2", "b")[s] != base[s]] == list(STEP_ORDER)
    assert [s for s in STEP_ORDER if prints("a", "b2")[s] != base[s]] == ["eval"]
    moved = prints("a", "b", [("PIPELINE.DATA_ROOT", "'/elsewhere'"),
                              ("PIPELINE.TRAIN_IMDB", "'vocfmt:/elsewhere/VOC2007:trainval'"),
                              ("PIPELINE.TEST_IMDB", "'vocfmt:/elsewhere/VOC2007:test'")])
    assert moved == base


def test_undeclared_reads_are_named():
    stage1 = get_step("stage1")
    assert undeclared_reads(stage1, {"TRAIN.SCALES", "PIPELINE.STAGE1_LR", "PIPELINE.TRAIN_IMDB",
                                     "PIPELINE.LOG_EVERY"}) == []
    assert undeclared_reads(stage1, {"TEST.NMS", "TRAIN.FG_THRESH", "TRAIN.SCALES"}) == ["TEST.NMS", "TRAIN.FG_THRESH"]
    assert undeclared_reads(get_step("eval"), {"PIPELINE.TEST_IMDB", "PIPELINE.TRAIN_IMDB"}) == ["PIPELINE.TRAIN_IMDB"]
    assert all(key in load_config().flat() for key in NON_RESULT_KEYS)


def test_graph_for_the_mode():
    assert graph_for(load_config()).order == STEP_ORDER
    with pytest.raises(Exception, match="PIPELINE.MODE"):
        load_config(overrides=[("PIPELINE.MODE", "'joint'")])


def done_until(last):
    done = set(STEP_ORDER[:STEP_ORDER.index(last) + 1]) if last else set()
    return lambda s: None if s in done else "missing"


def test_default_and_until():
    sel = select_steps()
    assert sel.steps == STEP_ORDER and sel.forced == frozenset()
    assert select_steps(until="stage4").steps == STEP_ORDER[:6]


def test_from_forces_the_step_and_everything_after():
    sel = select_steps(from_="stage3", is_done=done_until("stage2"))
    assert sel.steps == ("stage3", "p2", "stage4", "eval") and sel.forced == set(sel.steps)
    sel = select_steps(from_="stage3", until="p2", is_done=done_until("stage2"))
    assert sel.steps == ("stage3", "p2")
    with pytest.raises(StepSelectionError, match=r"--from stage3: its input stage2 is not done \(missing\)"):
        select_steps(from_="stage3", is_done=done_until("p1"))
    with pytest.raises(StepSelectionError, match="comes after --until"):
        select_steps(from_="stage4", until="stage2", is_done=done_until("p2"))


def test_only_runs_just_that_step_when_its_inputs_are_done():
    sel = select_steps(only="stage4", is_done=done_until("p2"))
    assert sel.steps == ("stage4",) and sel.forced == frozenset()
    with pytest.raises(StepSelectionError, match=r"--only stage4: its input p2 is not done"):
        select_steps(only="stage4", is_done=done_until("stage3"))
    with pytest.raises(StepSelectionError, match="cannot be combined"):
        select_steps(only="p1", until="eval")


def test_force_reruns_one_step():
    sel = select_steps(force="p2", is_done=done_until("eval"))
    assert sel.steps == STEP_ORDER and sel.forced == {"p2"}
    assert select_steps(only="p1", force="p1", is_done=done_until("stage1")).forced == {"p1"}
    with pytest.raises(StepSelectionError, match="--force eval is not among the selected steps"):
        select_steps(until="stage4", force="eval")


def test_unknown_step_names_the_nearest():
    with pytest.raises(StepSelectionError, match=r"unknown step 'stage5' \(did you mean stage4\?\)"):
        get_step("stage5")
