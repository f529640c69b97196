"""One small run of every head, pinned: refactoring stage 2 must not move its metrics.

`tests/data/pinned_run.json` was written by `current_run()` with the pinned CPU torch of `make
install`: linear, mean, attentive and qkv on the code before the head interface was introduced
(commit 8b5736f), cta and stats before the modules were split by responsibility. The
test compares today's run with it: the epoch or C chosen on validation in every fold must be
the same, and every test probability within 1e-5 (float32 training on one thread).
Regenerate only for an intended change of results:
    PYTHONPATH=tests .venv/bin/python -c "import test_pinned_run as t; t.write_pinned()"
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ser_cache.config import TrainConfig
from ser_cache.training import run_folds
from test_training import SMALL, folds_of, layer_data

PINNED = Path(__file__).parent / "data" / "pinned_run.json"
HEAD_NAMES = ("linear", "mean", "attentive", "qkv", "cta", "stats")


def current_run(heads=HEAD_NAMES) -> dict:
    """{head: {"selected": [...], "ua": [...], "probs": (n, classes) list}} of a 3-fold run."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = layer_data(n_speakers=6, per_speaker=8, seed=3)
        folds = folds_of(data, n_folds=3, seed=0)
        out = {}
        for head in heads:
            result = run_folds(data, folds, head, TrainConfig(**{**SMALL, "epochs": 8}, lr=3e-3, seed=1))
            probs, row = np.zeros((len(data), len(result.labels))), {u: i for i, u in enumerate(data.ids)}
            for f in result.folds:  # (rows were test_idx before the refactor; the same utterances)
                probs[[row[u] for u in f.test_ids]] = f.probs
            out[head] = {"selected": [{k: v for k, v in f.selected.items() if k != "ua"} for f in result.folds],
                         "ua": [f.metrics["ua"] for f in result.folds], "probs": probs.round(7).tolist()}
        return out
    finally:
        torch.set_num_threads(before)


def write_pinned(heads=HEAD_NAMES) -> None:
    """Pin `heads` (the others keep their pinned results)."""
    pinned = json.loads(PINNED.read_text(encoding="utf-8")) if PINNED.exists() else {}
    PINNED.write_text(json.dumps({**pinned, **current_run(heads)}, indent=0) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def now():
    return current_run()


@pytest.mark.parametrize("head", HEAD_NAMES)
def test_metrics_are_those_pinned_before_the_refactor(now, head):
    pinned = json.loads(PINNED.read_text(encoding="utf-8"))[head]
    assert now[head]["selected"] == pinned["selected"]
    np.testing.assert_allclose(now[head]["ua"], pinned["ua"], atol=1e-9)
    np.testing.assert_allclose(now[head]["probs"], pinned["probs"], atol=1e-5)
