"""Paired comparisons: the sign-flip test, pairing runs and sweep cells, refusing other folds."""
from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from ser_cache import sweeping as S
from ser_cache.cli import main
from ser_cache.compare import CompareError, Scored, compare, paired, sign_flip_p
from ser_cache.encoder import load_encoder
from ser_cache.extract import ExtractOptions, extract
from ser_cache.sweeping import SweepSpec, run_sweep
from ser_cache.config import TrainConfig
from ser_cache.training import train_from_cache

from conftest import write_corpus

TRAIN = TrainConfig(epochs=2, n_heads=2, head_dim=2, linear_c=(1.0,), compute_dtype="float32")


def test_sign_flip_p_is_exact():
    # All 6 differences positive: only the all-plus and all-minus patterns are as extreme.
    assert sign_flip_p(np.full(6, 0.02)) == pytest.approx(2 / 64)
    # Differences that cancel: every pattern is at least as extreme as a mean of zero.
    assert sign_flip_p(np.array([0.01, -0.01, 0.03, -0.03])) == 1.0
    # One large difference among small ones of both signs is no evidence.
    assert sign_flip_p(np.array([0.2, 0.01, -0.01, 0.01, -0.01, 0.01])) > 0.1


def test_paired_differences_are_per_fold_and_refuse_other_splits():
    base = Scored("a", {(0, k): {"ua": u} for k, u in enumerate([0.5, 0.7, 0.6])}, {(0, k): str(k) for k in range(3)})
    other = Scored("b", {(0, k): {"ua": u} for k, u in enumerate([0.55, 0.74, 0.66])}, {(0, k): str(k) for k in range(3)})
    row = paired(base, other)
    assert row["n"] == 3 and row["better"] == 3 and row["worse"] == 0
    assert row["diff_mean"] == pytest.approx(0.05) and row["diff_std"] == pytest.approx(np.std([0.05, 0.04, 0.06]))
    moved = Scored("c", other.scores, {**other.splits, (0, 1): "another split"})
    with pytest.raises(CompareError, match="not tested on the same folds"):
        paired(base, moved)
    with pytest.raises(CompareError, match="share no"):
        paired(base, Scored("d", {(1, 0): {"ua": 0.5}}, {(1, 0): "0"}))


@pytest.fixture(scope="module")
def cache(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    records = write_corpus(root / "corpus", n_speakers=6, per_speaker=4)
    extract(records, root / "tiny", "csv", load_encoder(str(tiny_checkpoint)), ExtractOptions(mode="short", progress=False))
    return root / "tiny"


def test_a_run_and_the_same_sweep_cell_pair_with_no_difference(cache, tmp_path, monkeypatch):
    monkeypatch.setattr(S, "available_cores", lambda: 1)
    sweep = tmp_path / "sweep"
    run_sweep(SweepSpec(caches=[cache], layers="1,[0-2]", heads=["linear", "mean"], train=TRAIN, n_folds=3),
              sweep, jobs=1, progress=False)
    train_from_cache(cache, "1", "linear", tmp_path / "run", TRAIN, n_folds=3)
    rows = compare([f"{sweep}:1:linear", str(tmp_path / "run"), f"{sweep}:0-2:linear", f"{sweep}:all:mean"])
    same, multi, mean = rows
    assert same["n"] == 3 and same["diff_mean"] == 0.0 and same["p"] == 1.0
    assert multi["other"].endswith(":0-2:linear") and multi["n"] == 3
    assert mean["base_mean"] == same["base_mean"]
    # Other folds (4 instead of 3) hold other utterances: refused, not paired.
    train_from_cache(cache, "1", "linear", tmp_path / "run4", TRAIN, n_folds=4)
    with pytest.raises(CompareError, match="same folds"):
        compare([f"{sweep}:1:linear", str(tmp_path / "run4")])
    runner = CliRunner()
    ok = runner.invoke(main, ["compare", f"{sweep}:1:linear", f"{sweep}:0-2:mean"])
    assert ok.exit_code == 0, ok.output
    assert "paired differences" in ok.output and ":0-2:mean" in ok.output
    for args, fix in (([str(sweep), str(tmp_path / "run")], "name one of its cells"),
                      ([f"{sweep}:2:qkv", str(tmp_path / "run")], "its cells: 1:linear"),
                      ([str(tmp_path / "nothing"), str(tmp_path / "run")], "neither a run folder")):
        bad = runner.invoke(main, ["compare", *args])
        assert bad.exit_code == 1 and fix in bad.output and "Traceback" not in bad.output, bad.output
