"""The user's path on real weights and real speech (marked e2e): RAVDESS -> cache -> linear head
-> export -> predict on RAVDESS files and on audio the head never saw.

Four actors, tiny.en, short mode, one cached layer: about a minute on a laptop CPU.
"""
from __future__ import annotations

import json
import math
import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

from ser_cache.cli import main
from ser_cache.corpora import RAVDESS_EMOTIONS
from ser_cache.config import TrainConfig
from ser_cache.training import train_from_cache

from conftest import real_checkpoint
from test_e2e import subset

pytestmark = pytest.mark.e2e

LAYER = 2  # of tiny.en's states 0..4: predict runs 2 of its 4 blocks


def invoke(*args, ok=True):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert (result.exit_code == 0) == ok, result.output
    return result


def voiced(seconds: float, rate: int = 16000) -> np.ndarray:
    """A synthetic vowel-like voice: a gliding pitch with decaying harmonics and an amplitude
    envelope of syllables, plus breath noise."""
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * rate)) / rate
    f0 = 140 + 30 * np.sin(2 * math.pi * 0.7 * t)
    phase = 2 * math.pi * np.cumsum(f0) / rate
    x = sum(np.sin(h * phase) / h**1.5 for h in range(1, 12))
    envelope = 0.5 + 0.5 * np.sin(2 * math.pi * 3.0 * t) ** 2
    return (0.1 * x * envelope + 0.003 * rng.standard_normal(len(t))).astype(np.float32)


def test_export_and_predict_on_real_speech(ravdess_dir, tmp_path):
    checkpoint = real_checkpoint("tiny.en")
    data = subset(ravdess_dir, tmp_path, actors=("01", "02", "03", "04"))
    cache = tmp_path / "cache"
    invoke("extract", data, "--corpus", "ravdess", "--model", checkpoint, "--out", cache,
           "--mode", "short", "--layers", LAYER)
    run = tmp_path / "run"
    train_from_cache(cache, LAYER, "linear", run, TrainConfig(linear_c=(0.1, 1.0), device="cpu"), n_folds=2)
    model = tmp_path / "model.pt"
    text = invoke("export", run, "--out", model).output
    assert "trained on all speakers (240 utterances" in text

    labels = sorted(set(RAVDESS_EMOTIONS.values()))
    seen = sorted((ravdess_dir / "Actor_02").glob("*.flac"))[::12]  # 5 files it was trained on
    unseen = sorted((ravdess_dir / "Actor_05").glob("*.flac"))[:3]
    made = [tmp_path / "voiced.wav", tmp_path / "voiced-long.wav"]
    sf.write(made[0], voiced(3.0), 16000)
    sf.write(made[1], voiced(35.0), 16000)
    if shutil.which("espeak-ng"):  # a real TTS voice, where the engine is installed
        made.append(tmp_path / "espeak.wav")
        subprocess.run(["espeak-ng", "-w", str(made[-1]), "The kids are talking by the door."], check=True)
    out = json.loads(invoke("predict", model, *seen, *unseen, *made, "--model", checkpoint, "--json").stdout)

    assert [o["file"] for o in out] == [str(p) for p in (*seen, *unseen, *made)]
    for o in out:
        assert o["prediction"] in labels and sorted(o["probabilities"]) == labels
        assert sum(o["probabilities"].values()) == pytest.approx(1, abs=1e-5)
    # Files it was trained on: a linear head on 240 clips fits them, so a wrong label order or a
    # mode/layer mismatch between training and prediction would show here.
    truth = [RAVDESS_EMOTIONS[p.name.split("-")[2]] for p in seen]
    assert np.mean([o["prediction"] == t for o, t in zip(out, truth)]) >= 0.8
    long = out[len(seen) + len(unseen) + 1]
    assert [(w["start"], w["end"]) for w in long["windows"]] == [(0, 30), (30, 35)]

    table = invoke("predict", model, made[0], "--model", checkpoint).stdout
    assert "voiced.wav" in table and table.splitlines()[0].split()[3:] == labels
