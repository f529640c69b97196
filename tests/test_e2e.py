"""End to end on real Whisper weights and real RAVDESS speech (marked e2e).

Kept to a few actors so CI stays in minutes; the full-corpus figures live in `make bench`.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import whisper
from click.testing import CliRunner

from ser_cache.audio import load_utterance
from ser_cache.cache import open_cache
from ser_cache.cli import main
from ser_cache.encoder import encode, load_encoder, log_mel

from conftest import real_checkpoint

pytestmark = pytest.mark.e2e


def invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def subset(ravdess_dir, tmp_path, actors=("01", "02")):
    """A RAVDESS-layout folder holding only some actors (symlinks, no copies)."""
    root = tmp_path / "ravdess"
    root.mkdir()
    for a in actors:
        (root / f"Actor_{a}").symlink_to(ravdess_dir / f"Actor_{a}")
    return root


def test_base_padded_last_state_equals_whisper_encoder(ravdess_dir):
    path = real_checkpoint("base")
    enc = load_encoder(str(path))
    assert enc.n_states == 7 and enc.dim == 512
    model = whisper.load_model(str(path), device="cpu")
    files = sorted((ravdess_dir / "Actor_03").glob("*.flac"))[:2]
    mel = torch.stack([log_mel(load_utterance(str(f))[0][0], 80, "padded") for f in files])
    ours = encode(enc.encoder, mel, None, [6])[6]
    torch.testing.assert_close(ours, model.encoder(mel), atol=1e-5, rtol=0)


def test_extract_real_subset_with_tiny_en(ravdess_dir, tmp_path):
    data = subset(ravdess_dir, tmp_path)
    out = tmp_path / "cache"
    text = invoke("extract", data, "--corpus", "ravdess", "--model", real_checkpoint("tiny.en"), "--out", out, "--mode", "short")
    assert "120 utterances" in text and "complete" in text
    info = json.loads(invoke("inspect", out, "--json"))
    assert info["utterances"] == 120 and info["complete"] and info["skipped"] == []
    assert info["layers"] == [0, 1, 2, 3, 4] and info["dim"] == 384
    layer = open_cache(out).read_layer(4)
    # RAVDESS clips last about 3.5 s: 50 frames per second of speech.
    assert 120 < np.median(layer.n_frames) < 260
    assert np.isfinite(layer.frames.astype(np.float32)).all()
    # Resuming a complete cache writes nothing.
    assert "0 written now" in invoke("extract", data, "--corpus", "ravdess", "--model", real_checkpoint("tiny.en"),
                                     "--out", out, "--mode", "short")
    invoke("verify", out)


def test_real_statistics_and_pooled_caches_agree_with_the_frames_they_come_from(ravdess_dir, tmp_path):
    """tiny.en on two actors: a statistics cache extracted directly holds the frames cache's
    statistics bit for bit (float32) and is over 40x smaller; a derived x4 cache holds the
    frames pooled at read time."""
    data, model = subset(ravdess_dir, tmp_path), real_checkpoint("tiny.en")
    frames, stats, pooled = tmp_path / "frames", tmp_path / "stats", tmp_path / "pool4"
    invoke("extract", data, "--corpus", "ravdess", "--model", model, "--out", frames, "--mode", "short")
    invoke("extract", data, "--corpus", "ravdess", "--model", model, "--out", stats, "--mode", "short", "--store", "stats")
    assert "x smaller than" in invoke("derive", frames, "--out", pooled, "--frame-pool", "4")
    whole, summary = open_cache(frames), open_cache(stats).summary()
    np.testing.assert_array_equal(open_cache(stats).read_layer((2, 3)).statistics.astype(np.float32),
                                  whole.read_layer((2, 3)).statistics.astype(np.float32))
    assert whole.summary()["bytes"] / summary["bytes"] > 40
    assert 3.8 < whole.summary()["bytes"] / open_cache(pooled).summary()["bytes"] <= 4  # partial last groups
    np.testing.assert_array_equal(open_cache(pooled).read_layer(4).frames, whole.read_layer(4, frame_pool=4).frames)
