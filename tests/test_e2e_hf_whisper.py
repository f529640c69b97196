"""Real Whisper base weights through transformers (marked e2e): the offline openai-whisper
checkpoint converted to a WhisperModel folder gives the openai-whisper path's states, in
every mode and every state, on real RAVDESS speech; and a head trained on one cache scores
the same on the other. The maximum relative differences are printed (pytest -s shows them).
"""
from __future__ import annotations

import numpy as np
import pytest

from ser_cache.audio import load_utterance
from ser_cache.cache import open_cache
from ser_cache.corpora import prepare
from ser_cache.encoder import encoder_input, load_encoder
from ser_cache.extract import ExtractOptions, encode_batch, extract
from ser_cache.training import TrainConfig, train_from_cache
from ser_cache.whisper_to_hf import convert_whisper

from conftest import real_checkpoint
from test_e2e import subset

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    checkpoint = real_checkpoint("base")
    folder = convert_whisper(checkpoint, tmp_path_factory.mktemp("hf") / "whisper-base")
    return load_encoder(str(checkpoint)), load_encoder(str(folder))


def max_relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| over max |a|: the largest difference as a fraction of the state's scale."""
    return float(np.abs(a - b).max() / np.abs(a).max())


@pytest.mark.parametrize("mode", ["padded", "trim", "short"])
def test_every_state_of_converted_base_equals_openai_whisper(ravdess_dir, encoders, mode):
    theirs, ours = encoders
    assert ours.family == "whisper" and ours.n_states == theirs.n_states == 7
    files = sorted((ravdess_dir / "Actor_03").glob("*.flac"))[:4]
    batch = [(0, i, *encoder_input(ours, load_utterance(str(f))[0][0], mode)) for i, f in enumerate(files)]
    states = list(range(7))
    a = encode_batch(theirs, batch, mode, states, "float32", "cpu")
    b = encode_batch(ours, batch, mode, states, "float32", "cpu")
    worst = {s: max(max_relative_difference(x[s], y[s]) for x, y in zip(a, b)) for s in states}
    print(f"\n{mode}: max relative difference per state {worst}")
    assert max(worst.values()) < 1e-5


def test_a_head_scores_the_same_on_either_cache(ravdess_dir, encoders, tmp_path):
    data = subset(ravdess_dir, tmp_path, actors=("01", "02", "03"))
    records = prepare("ravdess", data).records
    scores = {}
    for enc in encoders:
        cache = tmp_path / f"cache-{enc.family}"
        extract(records, cache, "ravdess", enc, ExtractOptions(mode="short", progress=False))
        assert open_cache(cache).settings.family == enc.family
        result = train_from_cache(cache, 4, "linear", tmp_path / f"run-{enc.family}",
                                  TrainConfig(device="cpu", compute_dtype="float32"), protocol="kfold", n_folds=3)
        scores[enc.family] = result.metrics["ua"]["mean"]
    print(f"\nlinear head on state 4, 3 actors, 3 folds: UA {scores}")
    assert scores["whisper"] == pytest.approx(scores["openai-whisper"], abs=1e-6)
