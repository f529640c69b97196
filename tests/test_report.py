"""Reports comparing models: caches of different encoders swept together (a tiny openai-whisper
of 3 states beside a tiny transformers wav2vec2 of 5) get a model column and a plot of UA
against relative depth, state / last state; a one-model report is as it was.

The numbers mean nothing; the invariants do: which model each row names, where each state
lies on the depth axis, which files are written.
"""
from __future__ import annotations

import json
import shutil
from collections import Counter

import numpy as np
import pytest
import torch
import transformers

from ser_cache.cache import open_cache
from ser_cache.config import TrainConfig
from ser_cache.encoder import load_encoder
from ser_cache.extract import ExtractOptions, extract
from ser_cache.report import (DEPTH_PLOT, LAYER_PLOT, SUMMARY_FILE, Cell, Panel, depth_curve, load_sweep, panels_of,
                              relative_depth, several_models, write_report)
from ser_cache.sweeping import SweepSpec, run_sweep

from conftest import write_corpus

pytestmark = pytest.mark.usefixtures("one_thread_per_job")  # conftest

N_FOLDS = 3
TRAIN = TrainConfig(epochs=2, linear_c=(1.0,), compute_dtype="float32")
# A real wav2vec2 architecture at toy size: 4 blocks, so states 0..4 against the tiny Whisper's 0..2.
W2V = transformers.Wav2Vec2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                                  conv_dim=(16,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
                                  feat_extract_norm="layer", do_stable_layer_norm=True)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("report")


@pytest.fixture(scope="module")
def caches(root, tiny_checkpoint):
    """One corpus (6 speakers x 3 utterances) through two encoders: {"whisper": 3 states, "w2v": 5}."""
    records = write_corpus(root / "corpus", n_speakers=6, per_speaker=3)
    torch.manual_seed(0)
    folder = root / "w2v-tiny"
    transformers.AutoModel.from_config(W2V).save_pretrained(folder)
    transformers.Wav2Vec2FeatureExtractor(do_normalize=True).save_pretrained(folder)
    out = {}
    for name, model in (("whisper", str(tiny_checkpoint)), ("w2v", str(folder))):
        out[name] = root / f"cache-{name}"
        extract(records, out[name], "csv", load_encoder(model), ExtractOptions(mode="short", progress=False, batch_size=4))
    return out


@pytest.fixture(scope="module")
def joint(root, caches):
    """One sweep over both caches, every state of each (`--layers all`), the linear head."""
    out = root / "joint"
    spec = SweepSpec(caches=[caches["whisper"], caches["w2v"]], heads=["linear"], train=TRAIN, n_folds=N_FOLDS)
    return out, run_sweep(spec, out, jobs=1, device="cpu", progress=False)


@pytest.fixture(scope="module")
def single(root, caches):
    """The Whisper cache alone: one model."""
    out = root / "single"
    spec = SweepSpec(caches=[caches["whisper"]], heads=["linear"], train=TRAIN, n_folds=N_FOLDS)
    return out, run_sweep(spec, out, jobs=1, device="cpu", progress=False)


def table_rows(summary: str, heading: str) -> list[list[str]]:
    """The body rows of the first markdown table after the line starting with `heading`."""
    lines = summary.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    body = []
    for line in lines[start + 1:]:
        if line.startswith("|"):
            body.append([c.strip() for c in line.strip("|").split("|")])
        elif body:
            break
    return body[2:]  # header and rule


def test_a_sweep_over_two_encoders_resolves_all_per_cache(joint, caches):
    out, outcome = joint
    assert outcome.folds_total == outcome.folds_run == (3 + 5) * N_FOLDS and not outcome.failures
    config = json.loads((out / "sweep.json").read_text())["config"]
    assert config["layers"] == {"cache-whisper": [0, 1, 2], "cache-w2v": [0, 1, 2, 3, 4]}
    records = load_sweep(out).records
    assert {(r.cache, r.model, r.family, r.last_state) for r in records} == {
        ("cache-whisper", "tiny-random", "openai-whisper", 2), ("cache-w2v", "w2v-tiny", "wav2vec2", 4)}
    for name in ("whisper", "w2v"):  # as each cache records its encoder
        s = open_cache(caches[name]).settings
        assert {(r.family, r.last_state) for r in records if r.cache == f"cache-{name}"} == {
            (s.family, s.dims["n_audio_layer"])}


def test_the_summary_has_a_model_column_and_the_depth_plot_is_written(joint):
    out, outcome = joint
    assert outcome.report["depth"] == out / DEPTH_PLOT and (out / DEPTH_PLOT).stat().st_size > 10_000
    assert (out / LAYER_PLOT).stat().st_size > 10_000
    summary = (out / SUMMARY_FILE).read_text(encoding="utf-8")
    rows = table_rows(summary, "UA % by model, layer and head")
    models = {"cache-whisper": "tiny-random (openai-whisper)", "cache-w2v": "w2v-tiny (wav2vec2)"}
    assert [(r[1], r[2]) for r in rows] == [("cache-whisper", str(s)) for s in range(3)] + [
        ("cache-w2v", str(s)) for s in range(5)]
    assert all(r[0] == models[r[1]] for r in rows)
    assert [r[3] for r in rows] == ["0.00", "0.50", "1.00", "0.00", "0.25", "0.50", "0.75", "1.00"]
    assert sum("★" in r[4] for r in rows) == 2  # one best cell per cache
    best = table_rows(summary, "## Models compared")  # a line per cache: its best cells
    assert [(r[0], r[1], r[2]) for r in best] == [(models["cache-whisper"], "cache-whisper", "3"),
                                                   (models["cache-w2v"], "cache-w2v", "5")]
    # each cache's own panel is still there, as in a one-model report
    assert "## cache-whisper (tiny-random, short)" in summary and "## cache-w2v (w2v-tiny, short)" in summary


def test_depth_is_state_over_last_state_per_cache(joint):
    panels = panels_of([load_sweep(joint[0])])
    assert several_models(panels)
    by_cache = {p.cache: p for p in panels}
    for cache, last in (("cache-whisper", 2), ("cache-w2v", 4)):
        p = by_cache[cache]
        assert p.last_state == last
        depth, mean, std = depth_curve(p, "linear")
        np.testing.assert_array_equal(depth, np.arange(last + 1) / last)
        np.testing.assert_array_equal(mean, [p.cells[s, "linear"].ua[0] for s in range(last + 1)])
        np.testing.assert_array_equal(std, [p.cells[s, "linear"].ua[1] for s in range(last + 1)])
    assert relative_depth(6, 12) == relative_depth(12, 24) == 0.5
    with pytest.raises(AssertionError, match="outside"):
        relative_depth(5, 4)


def cell(layer, ua: float) -> Cell:
    return Cell(layer, "linear", (ua, 0.01), (ua, 0.0), (ua, 0.0), ua, 3, Counter(), 1.0, np.zeros((2, 2)))


def test_multi_layer_cells_are_not_points_on_the_depth_curve():
    cells = {(layer, "linear"): cell(layer, ua) for layer, ua in ((0, 0.4), (6, 0.6), (12, 0.5), ((0, 1, 2), 0.7))}
    p = Panel("t", None, "c", ["linear"], ["a", "b"], cells, {}, "c", "m", "wavlm", 12)
    depth, mean, _ = depth_curve(p, "linear")
    np.testing.assert_array_equal(depth, [0, 0.5, 1])
    np.testing.assert_array_equal(mean, [0.4, 0.6, 0.5])


def test_sweeps_side_by_side_compare_their_models(root, joint, single):
    out = root / "side-by-side"
    paths = write_report([single[0], joint[0]], out)
    assert paths["depth"].stat().st_size > 10_000
    rows = table_rows((out / SUMMARY_FILE).read_text(encoding="utf-8"), "UA % by model, layer and head")
    assert [r[1] for r in rows] == ["single: cache-whisper"] * 3 + ["joint: cache-whisper"] * 3 + ["joint: cache-w2v"] * 5


def test_one_model_reports_as_before(single, root):
    out, outcome = single
    assert set(outcome.report) == {"results", "summary", "layers", "confusion"}
    assert not (out / DEPTH_PLOT).exists()
    summary = (out / SUMMARY_FILE).read_text(encoding="utf-8")
    assert "Models compared" not in summary and "depth" not in summary
    # the same model twice, side by side: still one model
    paths = write_report([single[0], single[0]], root / "twice")
    assert "depth" not in paths and "Models compared" not in paths["summary"].read_text(encoding="utf-8")


def test_cells_saved_before_encoders_were_recorded_report_by_name(joint, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(joint[0], old)
    for path in (old / "cells").glob("*/*/*.json"):  # as an earlier version wrote them
        cell = json.loads(path.read_text())
        del cell["family"], cell["last_state"]
        path.write_text(json.dumps(cell))
    paths = write_report([old], old)
    rows = table_rows(paths["summary"].read_text(encoding="utf-8"), "UA % by model, layer and head")
    assert {r[0] for r in rows} == {"tiny-random", "w2v-tiny"}  # no family recorded: the name alone
    assert [r[3] for r in rows][3:] == ["0.00", "0.25", "0.50", "0.75", "1.00"]  # depth by the highest state swept
    assert paths["depth"].exists()
